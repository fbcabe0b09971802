"""vitfood.publish without a network: the Hub client's functions are replaced where publish.py looks
them up, and the file selection is checked on a real output folder (with a real checkpoint in it)."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import save_file

from helpers import make_checkpoint

from vitfood import checkpoint, hub, model_card, publish, report
from vitfood.fileio import write_json
from vitfood.errors import VitfoodError
from vitfood.models import load_model

UPLOADED = ["README.md", "config.json", "confusion_matrix.json", "confusion_matrix.png", "eval_results.json",
            "metrics.jsonl", "model.safetensors", "preprocessor_config.json", "run.json",
            "runs/events.out.tfevents.1700000000.host.1.0", "training_curves.png"]


@pytest.fixture
def output_folder(tmp_path) -> Path:
    """What train.py leaves: the model, what describes it, resumable checkpoints and stray temp files."""
    out = tmp_path / "vitfood-output"
    out.mkdir()
    save_file({"w": torch.zeros(4, 4)}, str(out / "model.safetensors"))
    write_json(out / "config.json", {"model_type": "vit", "id2label": {"0": "a", "1": "b"}})
    write_json(out / "preprocessor_config.json", {"image_mean": [0.5] * 3})
    write_json(out / "eval_results.json", {"eval_accuracy": 0.9})
    write_json(out / "run.json", {"config": {}})
    (out / "metrics.jsonl").write_text('{"type": "train", "step": 1, "loss": 1.0}\n')
    (out / "README.md").write_text(model_card.model_card({}, {"eval_accuracy": 0.9}, ["a", "b"], "google/vit", "ethz/food101"))
    report.save_confusion(out / "confusion_matrix.json", [[3, 1], [0, 4]], ["a", "b"])
    for png in ("training_curves.png", "confusion_matrix.png"):
        (out / png).write_bytes(b"\x89PNG\r\n\x1a\n")
    (out / "runs").mkdir()
    (out / "runs" / "events.out.tfevents.1700000000.host.1.0").write_bytes(b"events")
    (out / "bad_images.txt").write_text("/home/me/photos/broken.jpg\tcannot decode\n")  # local paths: stays home
    model, base_config = load_model(make_checkpoint(tmp_path / "base"), labels=["a", "b"])
    for step in (10, 20):  # real resumable checkpoints, as the loop saves them
        checkpoint.save_training_state(out, step, model, base_config, {"image_mean": [0.5] * 3},
                                       {"state": {}, "param_groups": []}, {"torch": torch.get_rng_state()},
                                       {"run": {"step": step}}, keep=0)
    (out / "checkpoints" / ".tmp-step-00000030-77").mkdir()  # a checkpoint save cut short
    (out / "checkpoints" / ".tmp-step-00000030-77" / "model.safetensors").write_bytes(b"partial")
    (out / ".model.safetensors.tmp4242").write_bytes(b"partial")  # an atomic write cut short
    (out / ".write-test-99").write_bytes(b"ok")
    return out


def listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def selected_by_fnmatch(files: list[str], allow: list[str], ignore: list[str]) -> list[str]:
    """The Hub client's rule, spelled out: kept when some allow pattern matches and no ignore pattern does."""
    return [f for f in files if any(fnmatch.fnmatchcase(f, p) for p in allow)
            and not any(fnmatch.fnmatchcase(f, p) for p in ignore)]


def test_patterns_upload_the_model_and_its_description_only(output_folder):
    files = listing(output_folder)
    assert any(f.startswith("checkpoints/step-00000010/") for f in files)  # the folder really holds them
    chosen = selected_by_fnmatch(files, publish.ALLOW_PATTERNS, publish.IGNORE_PATTERNS)
    assert chosen == UPLOADED
    assert not [f for f in chosen if f.startswith("checkpoints/") or "/." in f or f.startswith(".")]
    assert publish.files_to_upload(output_folder) == UPLOADED  # huggingface_hub's own filter agrees
    # the ignore list alone also keeps checkpoints out, e.g. if someone widens the allow list to "*"
    assert not [f for f in selected_by_fnmatch(files, ["*"], publish.IGNORE_PATTERNS) if "checkpoints" in f]


def test_the_hub_client_would_add_exactly_these_files(output_folder, monkeypatch):
    """The client's own folder-to-commit step (private API: skipped if a huggingface_hub version lacks it)."""
    api = huggingface_hub.HfApi()
    if not hasattr(api, "_prepare_upload_folder_additions") or not hasattr(api, "_validate_yaml"):
        pytest.skip("this huggingface_hub has no _prepare_upload_folder_additions")
    monkeypatch.setattr(huggingface_hub.HfApi, "_validate_yaml", lambda self, *a, **k: None)  # a network call
    ops = api._prepare_upload_folder_additions(output_folder, "", allow_patterns=publish.ALLOW_PATTERNS,
                                               ignore_patterns=list(publish.IGNORE_PATTERNS), repo_type="model")
    assert sorted(op.path_in_repo for op in ops) == UPLOADED


def test_push_output_dir_hands_over_folder_repo_and_patterns(output_folder, monkeypatch):
    calls = []

    def create_repo(repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(**kwargs):
        calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        return "commit"

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    url = publish.push_output_dir(output_folder, "alice/vit-food", "hf_secret", "Epoch 3: accuracy 0.9")
    assert url == "https://huggingface.co/alice/vit-food"
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]  # the repository exists before the upload
    assert calls[0][1] == "alice/vit-food" and calls[0][2]["exist_ok"] is True and calls[0][2]["token"] == "hf_secret"
    up = calls[1][2]
    assert up["repo_id"] == "alice/vit-food" and Path(up["folder_path"]) == output_folder
    assert up["token"] == "hf_secret" and up["commit_message"] == "Epoch 3: accuracy 0.9"
    assert up.get("repo_type", "model") == "model" and up.get("path_in_repo") in (None, "")
    assert "checkpoints/*" in up["ignore_patterns"]
    assert selected_by_fnmatch(listing(Path(up["folder_path"])), up["allow_patterns"], up["ignore_patterns"]) == UPLOADED


def test_push_output_dir_errors_are_one_line(output_folder, tmp_path, monkeypatch):
    with pytest.raises(VitfoodError, match="no trained model there"):
        publish.push_output_dir(tmp_path / "empty", "alice/x", "hf_secret")

    def refused(*args, **kwargs):
        raise RuntimeError("403 Forbidden: you cannot write to this repository\n(details...)")

    monkeypatch.setattr(huggingface_hub, "create_repo", refused)
    with pytest.raises(VitfoodError) as e:
        publish.push_output_dir(output_folder, "alice/x", "hf_secret")
    assert "\n" not in str(e.value) and "403 Forbidden" in str(e.value)
    assert f"the trained model is intact in {output_folder}" in str(e.value)


# ---------------------------------------------------------------- check_push, before training


@pytest.fixture
def hub_online(monkeypatch):
    """The Hub is reachable and the token belongs to alice (member of food-lab), with write access."""
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_saved")
    seen = {}

    def whoami(token=None, **kwargs):
        seen["token"] = token
        return {"name": "alice", "orgs": [{"name": "food-lab"}], "auth": {"accessToken": {"role": "write"}}}

    monkeypatch.setattr(huggingface_hub, "whoami", whoami)
    return seen


def test_check_push_resolves_the_repository(hub_online, tmp_path):
    assert publish.check_push("alice/vit-food", None) == "alice/vit-food"
    assert hub_online["token"] == "hf_saved"  # the token from `hf auth login` / HF_TOKEN
    assert publish.check_push("vit-food", "hf_given") == "alice/vit-food"  # namespace: the token's user
    assert hub_online["token"] == "hf_given"
    assert publish.check_push("food-lab/vit", None) == "food-lab/vit"  # an organisation of the user
    assert publish.check_push(None, None, output_dir=tmp_path / "food-run") == "alice/food-run"  # as the Trainer


@pytest.mark.parametrize("repo_id", ["a/b/c", "has space", "x--y", "-start"])
def test_check_push_bad_names_fail_before_any_request(repo_id, monkeypatch):
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: pytest.fail("probed the network"))
    with pytest.raises(VitfoodError, match="not a Hub repository name") as e:
        publish.check_push(repo_id, "hf_x")
    assert "\n" not in str(e.value)


def test_check_push_needs_a_name_or_an_output_folder():
    with pytest.raises(VitfoodError, match="pass --hub-model-id"):
        publish.check_push(None, "hf_x")


def test_check_push_offline_says_training_did_not_start(monkeypatch):
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(huggingface_hub, "whoami", lambda **k: pytest.fail("whoami called offline"))
    with pytest.raises(VitfoodError) as e:
        publish.check_push("alice/vit-food", "hf_x")
    msg = str(e.value)
    assert "\n" not in msg and "cannot be reached" in msg and "training did not start" in msg


def test_check_push_offline_with_the_real_probe(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the probe answers False at once, without a socket
    with pytest.raises(VitfoodError, match="cannot be reached.*training did not start"):
        publish.check_push("alice/vit-food", "hf_x")


def test_check_push_online_probe_reaches_whoami(hub_online):
    """The other way round: with the probe saying yes, the token is checked with the Hub."""
    hub_online.clear()
    publish.check_push("alice/x", "hf_t")
    assert hub_online == {"token": "hf_t"}


def test_check_push_without_token(hub_online, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(VitfoodError) as e:
        publish.check_push("alice/vit-food", None)
    msg = str(e.value)
    assert "\n" not in msg and "no Hugging Face token" in msg
    assert "hf auth login" in msg and "HF_TOKEN" in msg and "training did not start" in msg


def test_check_push_token_problems(hub_online, monkeypatch):
    class Unauthorized(Exception):
        response = type("Response", (), {"status_code": 401})()

    def bad_token(**kwargs):
        raise Unauthorized("401 Client Error: Unauthorized")

    with pytest.raises(VitfoodError, match="is not 'bob' nor one of its organisations"):
        publish.check_push("bob/x", None)
    monkeypatch.setattr(huggingface_hub, "whoami", lambda **k: {"name": "alice", "auth": {"accessToken": {"role": "read"}}})
    with pytest.raises(VitfoodError, match="read-only"):
        publish.check_push("alice/x", None)
    monkeypatch.setattr(huggingface_hub, "whoami", bad_token)
    with pytest.raises(VitfoodError, match="invalid or expired.*hf auth login"):
        publish.check_push("alice/x", None)

