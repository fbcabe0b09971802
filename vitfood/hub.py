"""Downloads from the Hugging Face Hub: a ViT checkpoint, or the parquet shards of a dataset split.

Each failure (no network, no such repository, no access) becomes one VitfoodError line that names
the flag for working from local files instead.
"""

from __future__ import annotations

import re
from pathlib import Path

from vitfood.errors import VitfoodError

_MODEL_FILES_REQUIRED = ("config.json",)
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _reason(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return f"{type(e).__name__}: {first[:160]}"


def _hub_error(kind: str, repo_id: str, e: BaseException, flag: str) -> VitfoodError:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(e, GatedRepoError):
        why = "it is gated: accept its terms on the Hub and log in with `hf auth login`"
    elif isinstance(e, RepositoryNotFoundError):
        why = "no such repository (or it is private)"
    else:
        why = f"the Hub cannot be reached ({_reason(e)})"
    return VitfoodError(f"cannot download {kind} {repo_id!r} from the Hugging Face Hub: {why}; "
                        f"to work offline pass a local folder with {flag} PATH")


def download_model(repo_id: str) -> Path:
    """config.json, preprocessor_config.json and the weights (safetensors preferred) into the HF cache."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        config = Path(hf_hub_download(repo_id, "config.json"))
        try:
            hf_hub_download(repo_id, "preprocessor_config.json")
        except EntryNotFoundError:
            pass  # the size then comes from config.json's image_size
        for name in _WEIGHT_FILES:
            try:
                hf_hub_download(repo_id, name)
                break
            except EntryNotFoundError:
                continue
        else:
            raise VitfoodError(f"model {repo_id!r} on the Hub has neither {' nor '.join(_WEIGHT_FILES)}")
    except VitfoodError:
        raise
    except Exception as e:  # network, HTTP and cache errors all come here
        raise _hub_error("model", repo_id, e, "--model") from None
    return config.parent


def split_shards(files: list[str], split: str) -> list[str]:
    """The parquet files of one split, in order: 'data/train-00000-of-00008.parquet' or 'train/0000.parquet'."""
    pattern = re.compile(rf"(^|/){re.escape(split)}([-_.][^/]*)?\.parquet$|(^|/){re.escape(split)}/[^/]+\.parquet$")
    return sorted(f for f in files if pattern.search(f))


def download_split(repo_id: str, split: str, max_rows: int = 0) -> list[str]:
    """Download a dataset split's parquet shards in order, stopping once `max_rows` rows are in hand.

    Food-101's training split is 8 shards of about 490 MB: the guide's first 5,000 images need
    only the first shard, where `load_dataset` would fetch all of them.
    """
    from huggingface_hub import HfApi, hf_hub_download
    import pyarrow.parquet as pq

    try:
        files = HfApi().list_repo_files(repo_id, repo_type="dataset")
        shards = split_shards(files, split)
        if not shards:
            raise VitfoodError(f"dataset {repo_id!r} has no parquet files for split {split!r} on the Hub")
        paths, rows = [], 0
        for shard in shards:
            path = hf_hub_download(repo_id, shard, repo_type="dataset")
            paths.append(path)
            rows += pq.ParquetFile(path).metadata.num_rows
            if max_rows and rows >= max_rows:
                break
        return paths
    except VitfoodError:
        raise
    except Exception as e:
        raise _hub_error("dataset", repo_id, e, "--dataset") from None
