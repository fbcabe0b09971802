"""The pure-PyTorch ViT against transformers, and checkpoint loading and saving."""

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import ViTForImageClassification

from helpers import make_checkpoint
from vitfood.errors import VitfoodError
from vitfood.models import load_model, save_model
from vitfood.preprocess import Preprocessing, load_preprocessing


def test_logits_equal_transformers(tmp_path):
    ckpt = make_checkpoint(tmp_path / "cls", classification_labels=["a", "b", "c", "d"], seed=3)
    hf = ViTForImageClassification.from_pretrained(ckpt).eval()
    ours, _ = load_model(ckpt)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(pixel_values=x).logits
        got = ours(x)
    assert ours.arch.labels == ["a", "b", "c", "d"]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_backbone_only_checkpoint_gets_a_fresh_seeded_head(backbone_dir):
    a, cfg = load_model(backbone_dir, labels=["x", "y", "z"], seed=1)
    b, _ = load_model(backbone_dir, labels=["x", "y", "z"], seed=1)
    c, _ = load_model(backbone_dir, labels=["x", "y", "z"], seed=2)
    assert a.head.weight.shape == (3, 32)
    assert torch.equal(a.head.weight, b.head.weight) and not torch.equal(a.head.weight, c.head.weight)
    assert torch.count_nonzero(a.head.bias) == 0
    # every backbone tensor loaded exactly (the pooler of ViTModel is ignored, not an error)
    raw = load_file(str(backbone_dir / "model.safetensors"))
    assert torch.equal(a.patch_embed.weight, raw["embeddings.patch_embeddings.projection.weight"])
    assert torch.equal(a.blocks[1].qkv.weight[32:64], raw["encoder.layer.1.attention.attention.key.weight"])
    with pytest.raises(VitfoodError, match="no trained classifier head"):
        load_model(backbone_dir)  # inference needs a head


def test_head_kept_only_for_the_same_labels(tmp_path):
    ckpt = make_checkpoint(tmp_path / "cls", classification_labels=["a", "b", "c"])
    raw = load_file(str(ckpt / "model.safetensors"))
    same, _ = load_model(ckpt, labels=["a", "b", "c"])
    assert torch.equal(same.head.weight, raw["classifier.weight"])
    other, _ = load_model(ckpt, labels=["a", "c", "b"])  # same names, other order: a new head
    assert not torch.equal(other.head.weight, raw["classifier.weight"])
    assert torch.equal(other.blocks[0].fc1.weight, raw["vit.encoder.layer.0.intermediate.dense.weight"])


def test_saved_model_round_trips_through_transformers(tmp_path, backbone_dir):
    model, base = load_model(backbone_dir, labels=["cat", "dog"], seed=0)
    prep = load_preprocessing(backbone_dir, 32)
    save_model(model, tmp_path / "out", base, prep.to_hf_dict())
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == ["ViTForImageClassification"]
    assert cfg["id2label"] == {"0": "cat", "1": "dog"} and cfg["label2id"] == {"cat": 0, "dog": 1}
    hf = ViTForImageClassification.from_pretrained(tmp_path / "out").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).logits, model(x), atol=1e-5, rtol=1e-5)
    again, _ = load_model(tmp_path / "out")
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_pytorch_model_bin_loads_and_matches(tmp_path, backbone_dir):
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_bytes((backbone_dir / "config.json").read_bytes())
    torch.save(load_file(str(backbone_dir / "model.safetensors")), folder / "pytorch_model.bin")
    a, _ = load_model(folder, labels=["x", "y"])
    b, _ = load_model(backbone_dir, labels=["x", "y"])
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


class _Evil:
    def __reduce__(self):
        return (open, ("/tmp/vitfood-pwned", "w"))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path, backbone_dir):
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_bytes((backbone_dir / "config.json").read_bytes())
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"embeddings.cls_token": _Evil()}, f)
    marker = __import__("pathlib").Path("/tmp/vitfood-pwned")
    marker.unlink(missing_ok=True)
    with pytest.raises(VitfoodError, match="pytorch_model.bin: refused"):
        load_model(folder, labels=["x", "y"])
    assert not marker.exists()


def test_missing_and_unexpected_backbone_keys_are_errors(tmp_path, backbone_dir):
    weights = load_file(str(backbone_dir / "model.safetensors"))
    for name, change in [("missing", lambda w: w.pop("encoder.layer.1.output.dense.weight")),
                         ("unexpected", lambda w: w.__setitem__("encoder.layer.7.extra", torch.zeros(1)))]:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_bytes((backbone_dir / "config.json").read_bytes())
        w = dict(weights)
        change(w)
        save_file(w, str(folder / "model.safetensors"))
        with pytest.raises(VitfoodError, match=f"{name} "):
            load_model(folder, labels=["x", "y"])


def test_bad_checkpoint_folders(tmp_path, backbone_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VitfoodError, match="config.json: file not found"):
        load_model(empty, labels=["x", "y"])
    (empty / "config.json").write_bytes((backbone_dir / "config.json").read_bytes())
    with pytest.raises(VitfoodError, match="no model.safetensors or pytorch_model.bin"):
        load_model(empty, labels=["x", "y"])
    (empty / "model.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(VitfoodError, match="cannot read safetensors"):
        load_model(empty, labels=["x", "y"])
    (empty / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(VitfoodError, match="model_type is 'bert'"):
        load_model(empty, labels=["x", "y"])


@pytest.mark.parametrize("cfg, expected", [
    ({"size": 224, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 2,
      "feature_extractor_type": "ViTFeatureExtractor"}, (224, 224, None, 2)),
    ({"size": {"height": 384, "width": 384}, "resample": 3}, (384, 384, None, 3)),
    ({"size": {"shortest_edge": 256}, "do_center_crop": True, "crop_size": {"height": 224, "width": 224}},
     (224, 224, 256, 2)),
])
def test_preprocessor_config_forms(cfg, expected):
    p = Preprocessing.from_hf_dict(cfg)
    assert (p.height, p.width, p.shortest_edge, p.resample) == expected


def test_preprocessor_must_match_the_model_size(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m", preprocessor={"size": 64})
    with pytest.raises(VitfoodError, match="resizes to 64x64 but the model's config.json has image_size 32"):
        load_preprocessing(ckpt, 32)

