"""prepare.py without a network: huggingface_hub's download functions are replaced by stand-ins that serve a
tiny checkpoint and parquet shards from local folders laid out as Hub repositories; the command it prints is
then run for real, offline."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest

from helpers import CLASSES, draw_image, make_checkpoint, run
from vitfood import hub, prepare

MODEL_ID, DATASET_ID = "google/vit-base-patch16-224-in21k", "ethz/food101"  # prepare.py's defaults
SHARD_ROWS = 9
TRAIN_SHARDS = [f"data/train-0000{i}-of-00003.parquet" for i in range(3)]
VALIDATION_SHARDS = ["data/validation-00000-of-00001.parquet"]
SMALL_RUN = ("--epochs", 1, "--batch-size", 4, "--grad-accum-steps", 1, "--num-workers", 0)


def write_shard(path: Path, rows: int, seed: int) -> None:
    """Food-101's features: an Image column and a ClassLabel, with small PNGs embedded."""
    from datasets import ClassLabel, Dataset, Features, Image

    rng = np.random.default_rng(seed)
    labels = [i % len(CLASSES) for i in range(rows)]
    images = [draw_image(CLASSES[label], rng, (40, 40)) for label in labels]
    features = Features({"image": Image(), "label": ClassLabel(names=list(CLASSES))})
    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(str(path))


@pytest.fixture(scope="module")
def repos(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """(repo type, id) -> a folder holding that repository's files."""
    root = tmp_path_factory.mktemp("hub")
    model = make_checkpoint(root / "model")
    dataset = root / "dataset"
    for seed, shard in enumerate(TRAIN_SHARDS + VALIDATION_SHARDS):
        write_shard(dataset / shard, SHARD_ROWS, seed)
    (dataset / "README.md").write_text("shapes")
    return {("model", MODEL_ID): model, ("dataset", DATASET_ID): dataset}


@pytest.fixture
def online(repos, tmp_path, monkeypatch):
    """The Hub reachable, its downloads served from `repos`; returns the files fetched, in order."""
    import datasets

    fetched = []

    def hf_hub_download(repo_id, filename, *, repo_type=None, local_dir=None, local_files_only=False, **kwargs):
        source = repos[(repo_type or "model", repo_id)] / filename
        if not source.is_file():
            raise huggingface_hub.errors.EntryNotFoundError(f"{repo_id}: no {filename}")
        fetched.append(filename)
        if local_dir is None:
            return str(source)
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        (Path(local_dir) / ".cache" / "huggingface").mkdir(parents=True, exist_ok=True)  # as the real client leaves
        return str(target)

    def list_repo_files(self, repo_id, *, repo_type=None, **kwargs):
        root = repos[(repo_type or "model", repo_id)]
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    monkeypatch.chdir(tmp_path)
    return fetched


def outcome(capsys, *argv) -> tuple[int, str, str]:
    code = prepare.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def test_prepared_folders_train_offline_with_the_printed_command(online, tmp_path, capsys):
    code, out, err = outcome(capsys, "--max-samples", 15)
    assert code == 0, err
    command = out.strip().splitlines()[-1].strip()
    assert command == "python train.py --model vitfood-offline/model --dataset vitfood-offline/dataset --epochs 3"
    assert "Copy vitfood-offline/ to the machine without the Hub" in out

    offline = tmp_path / "vitfood-offline"
    assert listing(offline) == ["dataset", "dataset/dataset_dict.json", "dataset/train",
                                *sorted(f"dataset/train/{p.name}" for p in (offline / "dataset/train").iterdir()),
                                "model", "model/config.json", "model/model.safetensors",
                                "model/preprocessor_config.json"]
    assert TRAIN_SHARDS[2] not in online and TRAIN_SHARDS[:2] == [f for f in online if f.endswith(".parquet")]
    assert "15 images of train; 3 classes" in out and "a ViT of 2 layers at 32x32" in out

    words = shlex.split(command)
    assert words[:2] == ["python", "train.py"]
    r = run("train.py", *words[2:], *SMALL_RUN, "--output-dir", "trained", cwd=tmp_path)  # HF_HUB_OFFLINE=1
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "trained" / "model.safetensors").is_file()


def test_eval_split_other_ids_and_all_rows(online, repos, tmp_path, capsys):
    import datasets

    repos[("model", "alice/vit-tiny")] = repos[("model", MODEL_ID)]
    repos[("dataset", "bob/shapes")] = repos[("dataset", DATASET_ID)]
    out_dir = tmp_path / "for the cluster"
    code, out, err = outcome(capsys, "--model", "alice/vit-tiny", "--dataset", "bob/shapes", "--eval-split",
                             "validation", "--max-samples", 0, "--output-dir", out_dir)
    assert code == 0, err
    assert out.strip().splitlines()[-1].strip() == shlex.join(
        ["python", "train.py", "--model", f"{out_dir}/model", "--dataset", f"{out_dir}/dataset",
         "--eval-split", "validation", "--epochs", "3"])
    saved = datasets.load_from_disk(str(out_dir / "dataset"))
    assert {k: v.num_rows for k, v in saved.items()} == {"train": 3 * SHARD_ROWS, "validation": SHARD_ROWS}
    assert "27 images of train, 9 of validation; 3 classes" in out


def test_an_unreachable_hub_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    code, out, err = outcome(capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("prepare.py: error: the Hugging Face Hub cannot be reached")
    assert not (tmp_path / "vitfood-offline").exists()
    r = run("prepare.py", "--output-dir", tmp_path / "real", timeout=60)  # the real probe, with HF_HUB_OFFLINE=1
    assert r.returncode == 2 and r.stderr.startswith("prepare.py: error: the Hugging Face Hub cannot be reached")
    assert r.stderr.count("\n") == 1 and not (tmp_path / "real").exists()


def test_a_failed_download_leaves_no_folder(online, monkeypatch, tmp_path, capsys):
    serve = huggingface_hub.hf_hub_download

    def cut_off(repo_id, filename, **kwargs):
        if filename == "model.safetensors":
            raise ConnectionResetError("Connection reset by peer")
        return serve(repo_id, filename, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", cut_off)
    code, out, err = outcome(capsys, "--skip-dataset")
    assert code == 2 and err.count("\n") == 1 and "Connection reset by peer" in err, err
    assert listing(tmp_path / "vitfood-offline") == []  # not even the config.json that arrived


def test_an_interrupted_save_leaves_no_folder(online, monkeypatch, tmp_path, capsys):
    import datasets

    def interrupted(self, path, **kwargs):
        (Path(path) / "dataset_dict.json").write_text("{}")
        raise KeyboardInterrupt

    offline = tmp_path / "vitfood-offline"
    (offline / ".dataset-partial-killed").mkdir(parents=True)  # a run killed outright earlier
    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", interrupted)
    code, out, err = outcome(capsys, "--skip-model", "--max-samples", 4)
    assert code == 130 and "interrupted" in err
    assert listing(offline) == []


def test_existing_folders_are_kept_unless_overwritten(online, tmp_path, capsys):
    assert outcome(capsys, "--skip-dataset")[0] == 0
    code, out, err = outcome(capsys, "--max-samples", 4)
    assert code == 2 and "vitfood-offline/model already exists: pass --skip-model to keep it, or --overwrite" in err
    assert not (tmp_path / "vitfood-offline" / "dataset").exists()  # refused before downloading anything
    code, out, err = outcome(capsys, "--skip-model", "--max-samples", 4)
    assert code == 0 and "keeping vitfood-offline/model" in out and "4 images of train" in out
    code, out, err = outcome(capsys, "--overwrite", "--skip-model", "--max-samples", 6)
    assert code == 0 and "6 images of train" in out
    assert sorted(p.name for p in (tmp_path / "vitfood-offline").iterdir()) == ["dataset", "model"]  # no leftovers


def test_help_flags_and_the_command_hints(tmp_path):
    r = run("prepare.py", "--help", timeout=60)
    text = " ".join(r.stdout.split())  # argparse wraps lines where it likes
    assert r.returncode == 0
    for flag in ("--model ID", "--dataset ID", "--split", "--eval-split", "--max-samples N", "--output-dir DIR",
                 "--skip-model", "--skip-dataset", "--overwrite", "(default: ethz/food101)", "(default: 5000"):
        assert flag in text, flag
    r = run("prepare.py", "--skip-model", "--skip-dataset", timeout=60)
    assert r.returncode == 2 and "nothing to prepare" in r.stderr
    r = run("prepare.py", "--model", "./my-model", timeout=60, cwd=tmp_path)
    assert r.returncode == 2 and "--model ./my-model: a local path, not a Hub id" in r.stderr
    assert hub.prepare_command(model=MODEL_ID, dataset=DATASET_ID) == "python prepare.py"
    assert hub.prepare_command(model="a/b") == "python prepare.py --model a/b --skip-dataset"
    assert hub.prepare_command(dataset=DATASET_ID, split="test") == "python prepare.py --skip-model --split test"


def test_a_copied_hf_cache_serves_the_hub_ids_offline(repos, tmp_path, monkeypatch):
    """The other way to an offline machine: a Hugging Face cache that holds them, copied to HF_HOME/hub."""
    from test_hub_probe import add_to_cache

    home = tmp_path / "hf-home"
    for (kind, repo_id), root in repos.items():
        add_to_cache(home / "hub", kind, repo_id,
                     {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()})
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)  # HF_HOME decides
    r = run("train.py", *SMALL_RUN, "--max-train-samples", 15, "--output-dir", tmp_path / "trained",
            env_extra={"HF_HOME": str(home)})
    assert r.returncode == 0, r.stderr  # google/vit-base-patch16-224-in21k and ethz/food101, from the cache
    assert (tmp_path / "trained" / "model.safetensors").is_file()
