"""Upload the output folder to the Hugging Face Hub (--push-to-hub).

`check_push` runs before training: a wrong repository name, a missing or read-only token, or no
network would otherwise surface only after hours of training. `push_output_dir` runs after it and
uploads the model with what describes it, never the resumable checkpoints.
"""

from __future__ import annotations

from pathlib import Path

from vitfood import hub
from vitfood.checkpoint import CHECKPOINTS, EVAL_RESULTS, METRICS
from vitfood.errors import VitfoodError, first_line
from vitfood.models.base import CONFIG_NAME, PREPROCESSOR_NAME, SAFETENSORS_NAME
from vitfood.logs import TENSORBOARD_DIR
from vitfood.model_card import MODEL_CARD
from vitfood.report import CONFUSION_JSON, CONFUSION_PNG, TRAINING_CURVES
from vitfood.run_record import RUN_JSON

# What goes to the Hub: the model in Hugging Face format and the files that describe it, by name.
# Matched with fnmatch against paths relative to the output folder, where `*` also matches `/`:
# hence exact names rather than `*.safetensors`, which would also take checkpoints/*/model.safetensors.
ALLOW_PATTERNS = [SAFETENSORS_NAME, CONFIG_NAME, PREPROCESSOR_NAME, MODEL_CARD, EVAL_RESULTS, METRICS, RUN_JSON,
                  CONFUSION_JSON, TRAINING_CURVES, CONFUSION_PNG, f"{TENSORBOARD_DIR}/*"]
# And never, whatever the allow-list becomes: resumable training state (optimizer moments: twice the
# model's size per checkpoint), temporary files of an atomic write (.name.tmpPID), hidden files.
IGNORE_PATTERNS = [f"{CHECKPOINTS}/*", ".*", "*/.*", "*.tmp*", "__pycache__/*"]

_LOGIN = "log in with `hf auth login`, or set HF_TOKEN to a token with write access"


def check_push(repo_id: str | None, token: str | None, output_dir: str | Path | None = None) -> str:
    """The repository id to push to, checked before training; one-line VitfoodError otherwise.

    `repo_id` is `namespace/name`, or `name` (the namespace is then the token's user, as the Trainer
    does), or None: the output folder's name. The token (argument, else HF_TOKEN or the one saved by
    `hf auth login`) is checked with the Hub: it must be valid, not read-only, and its user must be
    the namespace or one of its organisations.
    """
    import huggingface_hub as hf
    from huggingface_hub.utils import validate_repo_id

    if repo_id is None:
        if output_dir is None:
            raise VitfoodError("--push-to-hub: pass --hub-model-id NAME or namespace/NAME")
        repo_id = Path(output_dir).expanduser().resolve().name
    try:
        validate_repo_id(repo_id)
    except Exception:
        raise VitfoodError(f"--hub-model-id {repo_id!r}: not a Hub repository name (namespace/name, letters, "
                           "digits, '-', '_', '.'); training did not start") from None
    token = token or hf.get_token()
    if not token:
        raise VitfoodError(f"--push-to-hub: no Hugging Face token found; {_LOGIN}; training did not start")
    if not hub.hub_reachable():
        raise VitfoodError("--push-to-hub: the Hugging Face Hub cannot be reached (no network, or HF_HUB_OFFLINE "
                           "is set); training did not start (drop --push-to-hub to train without uploading)")
    try:
        me = hf.whoami(token=token)
    except Exception as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        why = "the token is invalid or expired" if status == 401 else f"cannot check the token ({first_line(e)})"
        raise VitfoodError(f"--push-to-hub: {why}; {_LOGIN}; training did not start") from None
    role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise VitfoodError(f"--push-to-hub: the token is read-only; {_LOGIN}; training did not start")
    if "/" not in repo_id:
        repo_id = f"{me['name']}/{repo_id}"
    namespace = repo_id.split("/")[0]
    if "orgs" in me:
        writable = {me.get("name")} | {org.get("name") for org in me["orgs"]}
        if namespace not in writable:
            raise VitfoodError(f"--hub-model-id {repo_id}: the token's user {me.get('name')!r} is not "
                               f"{namespace!r} nor one of its organisations; training did not start")
    return repo_id


def files_to_upload(out_dir: str | Path) -> list[str]:
    """The paths, relative to out_dir, that push_output_dir would upload (the same filter as the Hub client)."""
    from huggingface_hub.utils import filter_repo_objects

    root = Path(out_dir)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return list(filter_repo_objects(files, allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS))


def push_output_dir(out_dir: str | Path, repo_id: str, token: str | None,
                    commit_message: str = "Upload model trained with vitfood") -> str:
    """Create the repository if needed, upload the model and its description; return the repo's URL.

    Files are selected by ALLOW_PATTERNS and IGNORE_PATTERNS (see files_to_upload). A failure leaves
    the local folder as it was and says so; the upload can simply be repeated.
    """
    import huggingface_hub as hf

    out_dir = Path(out_dir)
    missing = [n for n in (SAFETENSORS_NAME, CONFIG_NAME) if not (out_dir / n).is_file()]
    if missing:
        raise VitfoodError(f"cannot push {out_dir} to the Hub: no trained model there ({', '.join(missing)} missing)")
    try:
        url = hf.create_repo(repo_id, token=token, repo_type="model", exist_ok=True)
        hf.upload_folder(repo_id=repo_id, folder_path=str(out_dir), repo_type="model", token=token,
                         commit_message=commit_message, allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS)
    except Exception as e:
        raise VitfoodError(f"cannot push {out_dir} to the Hub repository {repo_id} ({first_line(e)}); "
                           f"the trained model is intact in {out_dir}") from None
    return str(url)
