"""Downloads from the Hugging Face Hub: a ViT checkpoint, or the parquet shards of a dataset split.

Each failure (no network, no such repository, no access) becomes one VitfoodError line that names
the flag for working from local files instead.
"""

from __future__ import annotations

import re
from pathlib import Path

from vitfood.errors import VitfoodError, first_line

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


HUB_HOST = "huggingface.co"


def resolve_model_dir(name_or_path: str) -> Path:
    """A local checkpoint folder as is; otherwise a Hub repository id, downloaded to the HF cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise VitfoodError(f"model {name_or_path!r}: no such checkpoint folder")
    return download_model(name_or_path)


def hub_reachable(timeout: float = 3.0) -> bool:
    """A TCP connect to the Hub: fails in milliseconds without DNS, where the client would retry for ~25 s."""
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    host = os.environ.get("HF_ENDPOINT", f"https://{HUB_HOST}").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host.split(":")[0], 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_error(kind: str, repo_id: str, e: BaseException | None, flag: str) -> VitfoodError:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(e, GatedRepoError):
        why = "it is gated: accept its terms on the Hub and log in with `hf auth login`"
    elif isinstance(e, RepositoryNotFoundError):
        why = "no such repository (or it is private)"
    elif e is None:
        why = "no connection to the Hub (offline, or HF_HUB_OFFLINE is set) and it is not in the local cache"
    else:
        why = first_line(e, 120)
    # A bare name ("food", "vitfood-output") is as likely a local folder that is missing or mistyped.
    local = f"no folder {repo_id!r} here, and " if "/" not in repo_id else ""
    return VitfoodError(f"{local}cannot download {kind} {repo_id!r} from the Hugging Face Hub: {why}; "
                        f"to work offline pass a local folder with {flag} PATH")


def _quiet_hub():
    """huggingface_hub logs each failed request as a warning: our one error line says it better."""
    from huggingface_hub.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def download_model(repo_id: str) -> Path:
    """config.json, preprocessor_config.json and the weights (safetensors preferred) into the HF cache."""
    _quiet_hub()
    try:  # a model downloaded before works offline
        return _download_model_files(repo_id, local_files_only=True)
    except Exception:
        pass
    if not hub_reachable():
        raise _hub_error("model", repo_id, None, "--model")
    try:
        return _download_model_files(repo_id, local_files_only=False)
    except VitfoodError:
        raise
    except Exception as e:  # HTTP and cache errors all come here
        raise _hub_error("model", repo_id, e, "--model") from None


def _download_model_files(repo_id: str, local_files_only: bool) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    def get(name: str) -> Path | None:
        try:
            return Path(hf_hub_download(repo_id, name, local_files_only=local_files_only))
        except (EntryNotFoundError, LocalEntryNotFoundError):
            return None

    config = get("config.json")
    if config is None:
        raise LocalEntryNotFoundError(f"{repo_id}: no config.json")
    get("preprocessor_config.json")  # optional: the size then comes from config.json's image_size
    if not any(get(name) for name in _WEIGHT_FILES):
        raise VitfoodError(f"model {repo_id!r} has neither {' nor '.join(_WEIGHT_FILES)}")
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

    _quiet_hub()
    if not hub_reachable():
        cached = _cached_split(repo_id, split, max_rows)
        if not cached:
            raise _hub_error("dataset", repo_id, None, "--dataset")
        return cached
    try:
        files = HfApi().list_repo_files(repo_id, repo_type="dataset")
        shards = split_shards(files, split)
        if not shards:
            raise VitfoodError(f"dataset {repo_id!r} has no parquet files for split {split!r} on the Hub")
        return _first_shards((hf_hub_download(repo_id, shard, repo_type="dataset") for shard in shards), max_rows)
    except VitfoodError:
        raise
    except Exception as e:
        raise _hub_error("dataset", repo_id, e, "--dataset") from None


def _cached_split(repo_id: str, split: str, max_rows: int) -> list[str]:
    """The split's shards from an earlier download, read from the local HF cache (offline)."""
    from huggingface_hub import snapshot_download

    try:
        root = Path(snapshot_download(repo_id, repo_type="dataset", local_files_only=True))
    except Exception:
        return []
    shards = split_shards([p.relative_to(root).as_posix() for p in root.rglob("*.parquet")], split)
    return _first_shards((str(root / rel) for rel in shards), max_rows)


def _first_shards(paths, max_rows: int) -> list[str]:
    """Take shard paths in order (a lazy iterable: a download happens only when asked for) until
    they hold `max_rows` rows, read from each parquet footer; 0 = all of them."""
    import pyarrow.parquet as pq

    taken, rows = [], 0
    for path in paths:
        taken.append(path)
        rows += pq.ParquetFile(path).metadata.num_rows
        if max_rows and rows >= max_rows:
            break
    return taken
