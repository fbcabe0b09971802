"""Downloads from the Hugging Face Hub: a ViT checkpoint, or the parquet shards of a dataset split.

Each failure (no network, no such repository, no access) becomes one VitfoodError line. A name that is no
local folder says so first, with the absolute path looked at (a mistyped folder is the likelier mistake),
and only then what the Hub said; where the Hub is out of reach, the line names the prepare.py command that
fetches the files on a machine that reaches it (`prepare_command`, here so that prepare.py and this module
share it without importing each other's callers).
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterable
from pathlib import Path

from vitfood.config import TrainConfig
from vitfood.errors import VitfoodError, first_line
from vitfood.paths import DEFAULT_OUTPUT_DIR

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


HUB_HOST = "huggingface.co"
_DEFAULT_PORTS = {"http": 80, "https": 443, "socks4": 1080, "socks4a": 1080, "socks5": 1080, "socks5h": 1080}
# A repository id as the Hub accepts it: 'name' or 'namespace/name', letters, digits, '_', '.', '-'.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$")


def looks_like_hub_id(name: str) -> bool:
    """'org/name' or 'name' that is not here. An existing file or folder is local; so is anything that a Hub id
    cannot be (present or missing): a name starting with . / ~, with two slashes, a backslash, a space, a
    trailing slash, '..' or '--'. Such a name is never sent to the Hub."""
    return (not Path(name).expanduser().exists() and bool(_HUB_ID.match(name))
            and ".." not in name and "--" not in name)


def _default_of(flag: str) -> str | None:
    return {"--model": TrainConfig.model, "--dataset": TrainConfig.dataset}.get(flag)


def no_local_folder(flag: str, name: str) -> str:
    """'--model 'models/nope': no such local folder (/home/me/models/nope)': the first words of every error about
    a name that is not on the disk. The absolute path shows where it was looked for (a folder named relative to
    another working directory is the common slip)."""
    return f"{flag} {name!r}: no such local folder ({os.path.abspath(os.path.expanduser(name))})"


def _what_it_is(flag: str, name: str) -> str:
    """How an error about a Hub id begins: the local folder that is not there first, unless the name is the flag's
    default (the user named no folder; the guide's model and dataset are Hub ids)."""
    if name == _default_of(flag):
        return f"{flag} {name!r} (the default)"
    return no_local_folder(flag, name)


def prepare_command(model: str | None = None, dataset: str | None = None, split: str = "train",
                    eval_split: str | None = None) -> str:
    """The prepare.py line that fetches `model` and `dataset` (None: not wanted), with flags only where
    they differ from its defaults."""
    words = ["python", "prepare.py"]
    for flag, name in (("--model", model), ("--dataset", dataset)):
        if name is None:
            words.append("--skip-" + flag[2:])
        elif name != _default_of(flag):
            words += [flag, name]
    if dataset is not None:
        words += (["--split", split] if split != "train" else []) + (["--eval-split", eval_split] if eval_split else [])
    return shlex.join(words)


def no_trained_model() -> str:
    """infer.py (or --eval-only) with the default --model before any training: say so, not that the Hub lacks it."""
    return (f"no trained model in ./{DEFAULT_OUTPUT_DIR} ({os.path.abspath(DEFAULT_OUTPUT_DIR)}), where train.py "
            "saves one: train one first with `python train.py --model MODEL --dataset ./my_photos` (it writes "
            f"./{DEFAULT_OUTPUT_DIR}), or pass --model with a trained model's folder or Hub id")


def resolve_model_dir(name_or_path: str, flag: str = "--model") -> Path:
    """A local checkpoint folder as is; otherwise a Hub repository id, downloaded to the HF cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise VitfoodError(f"{flag} {name_or_path!r}: a file, not a checkpoint folder ({path.absolute()})")
    if os.path.normpath(name_or_path) == DEFAULT_OUTPUT_DIR:
        raise VitfoodError(no_trained_model())
    if not looks_like_hub_id(name_or_path):
        raise VitfoodError(f"{no_local_folder(flag, name_or_path)}, and as a path it cannot be a Hub model id")
    return download_model(name_or_path)


def hub_reachable(timeout: float = 3.0) -> bool:
    """A TCP connect to where the client's first request goes: fails in milliseconds without DNS, where
    the client would retry for ~25 s."""
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    try:
        socket.create_connection(hub_address(), timeout=timeout).close()
        return True
    except (OSError, ValueError):  # ValueError: an HF_ENDPOINT or proxy URL with no host or a bad port
        return False


def hub_address(endpoint: str | None = None) -> tuple[str, int]:
    """(host, port) that a request to the Hub connects to: the proxy that HTTPS_PROXY, HTTP_PROXY or ALL_PROXY
    names for the endpoint's scheme unless NO_PROXY exempts its host (as requests and httpx decide), else
    the endpoint itself: `endpoint`, HF_ENDPOINT or https://huggingface.co, its port or its scheme's."""
    import os
    import urllib.parse
    import urllib.request

    url = urllib.parse.urlsplit(endpoint or os.environ.get("HF_ENDPOINT") or f"https://{HUB_HOST}")
    proxies = urllib.request.getproxies()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        url = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")  # httpx's reading of "host:port"
    if not url.hostname:
        raise ValueError(f"no host in {url.geturl()!r}")
    return url.hostname, url.port or _DEFAULT_PORTS.get(url.scheme, 443)


def _hub_error(kind: str, repo_id: str, e: BaseException | None, flag: str, local: bool = True) -> VitfoodError:
    """One line for a Hub id that could not be had. `local`: the name could have been a local folder (train.py,
    infer.py), so that comes first; prepare.py, which only downloads, says False."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    head = f"{_what_it_is(flag, repo_id)}; as a Hub id, " if local else f"{flag} {repo_id!r}: "
    if isinstance(e, GatedRepoError):
        return VitfoodError(f"{head}it is a gated {kind} on the Hugging Face Hub: accept its terms on the Hub and "
                            "log in with `hf auth login`")
    if isinstance(e, RepositoryNotFoundError):
        return VitfoodError(f"{head}the Hugging Face Hub has no such {kind} repository (or it is private)")
    why = ("it is not in the local Hugging Face cache and the Hub cannot be reached (no network, or HF_HUB_OFFLINE "
           "is set)") if e is None else f"downloading it from the Hugging Face Hub failed: {first_line(e, 120)}"
    # The Hub, not the repository, is the trouble: the files can be fetched elsewhere and brought here.
    return VitfoodError(f"{head}{why}; to work offline pass a local folder with {flag} PATH "
                        f"(`{prepare_command(**{kind: repo_id})}` writes one on a machine that reaches the Hub)")


def check_local_paths(model: str, dataset: str) -> None:
    """A --model or --dataset that can only be a local path (see looks_like_hub_id) and is not there: one error
    naming both, with the absolute paths looked at. No network, no heavy import: train.py says it at once."""
    absent = [no_local_folder(flag, name) for flag, name in (("--model", model), ("--dataset", dataset))
              if not Path(name).expanduser().exists() and not looks_like_hub_id(name)]
    if os.path.normpath(model) == DEFAULT_OUTPUT_DIR and not Path(model).exists():  # --eval-only before training
        absent.insert(0, no_trained_model())
    if absent:
        raise VitfoodError("; ".join(absent))


def check_sources(model: str, dataset: str, splits: Iterable[str | None] = ("train",)) -> None:
    """Before anything is loaded: a path-like --model or --dataset that is not on the disk, and, with the Hub out
    of reach, every Hub id (the model, the dataset's `splits`) that the local HF cache cannot serve: named all
    in one error, where loading would stop at the first.

    Existing local folders are left to the loaders, which say more about them; with both local, huggingface_hub is
    not even imported.
    """
    check_local_paths(model, dataset)
    hub_model, hub_dataset = looks_like_hub_id(model), looks_like_hub_id(dataset)
    if not (hub_model or hub_dataset):
        return
    _quiet_hub()
    model_missing = hub_model and _cached_model(model) is None
    wanted = [s for s in dict.fromkeys(splits) if s]
    lacking = [s for s in wanted if hub_dataset and not _cached_shards(dataset, s)]
    if not (model_missing or lacking) or hub_reachable():
        return
    missing = [_what_it_is("--model", model)] if model_missing else []
    if lacking:
        missing.append(_what_it_is("--dataset", dataset))
    command = prepare_command(model=model if model_missing else None, dataset=dataset if lacking else None,
                              split=wanted[0], eval_split=wanted[1] if len(wanted) > 1 else None)
    paths = " ".join(flag + " PATH" for flag, wanting in (("--model", model_missing), ("--dataset", lacking)) if wanting)
    lacks = "as Hub ids, the local cache lacks both" if len(missing) == 2 else "as a Hub id, the local cache lacks it"
    if lacking and lacking != ["train"]:
        lacks += f" (the dataset's split {', '.join(lacking)})"
    raise VitfoodError(f"{'; '.join(missing)}; {lacks}, and the Hugging Face Hub cannot be reached (no network, or "
                       f"HF_HUB_OFFLINE is set): run `{command}` on a machine that reaches the Hub, copy the folder it "
                       f"writes here, and pass {paths} as it prints")


def _quiet_hub():
    """huggingface_hub logs each failed request as a warning: our one error line says it better."""
    from huggingface_hub.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def download_model(repo_id: str, local_dir: Path | None = None) -> Path:
    """config.json, preprocessor_config.json and the weights (safetensors preferred): into the HF cache, or,
    with `local_dir`, from the Hub into that plain folder (prepare.py)."""
    local = local_dir is None  # train.py and infer.py: the name could have been a local folder
    _quiet_hub()
    if local_dir is None:
        cached = _cached_model(repo_id)  # a model downloaded before works offline
        if cached is not None:
            return cached
    if not hub_reachable():
        raise _hub_error("model", repo_id, None, "--model", local)
    try:
        return _download_model_files(repo_id, local_files_only=False, local_dir=local_dir)
    except VitfoodError:
        raise
    except Exception as e:  # HTTP and cache errors all come here
        raise _hub_error("model", repo_id, e, "--model", local) from None


def _cached_model(repo_id: str) -> Path | None:
    try:
        return _download_model_files(repo_id, local_files_only=True)
    except Exception:  # not cached, partly cached, or not even a valid repository id
        return None


def _download_model_files(repo_id: str, local_files_only: bool, local_dir: Path | None = None) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    def get(name: str) -> Path | None:
        try:
            return Path(hf_hub_download(repo_id, name, local_files_only=local_files_only, local_dir=local_dir))
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


def _cached_shards(repo_id: str, split: str) -> list[str]:
    """The split's shards from an earlier download, found in the local HF cache without the network."""
    from huggingface_hub import snapshot_download

    try:
        root = Path(snapshot_download(repo_id, repo_type="dataset", local_files_only=True))
    except Exception:
        return []
    shards = split_shards([p.relative_to(root).as_posix() for p in root.rglob("*.parquet")], split)
    return [str(root / rel) for rel in shards]


def _cached_split(repo_id: str, split: str, max_rows: int) -> list[str]:
    """The split's shards from an earlier download, read from the local HF cache (offline)."""
    return _first_shards(_cached_shards(repo_id, split), max_rows)


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
