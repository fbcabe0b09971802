import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from helpers import make_checkpoint, make_image_folder  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests run the real CUDA path: without a CUDA GPU they are skipped, saying why."""
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_tests:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False here)")
    for item in gpu_tests:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def backbone_dir(tmp_path_factory) -> Path:
    """A backbone-only tiny ViT, saved as transformers' ViTModel (as google/vit-base-patch16-224-in21k)."""
    return make_checkpoint(tmp_path_factory.mktemp("backbone"))


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"), per_class=24)
