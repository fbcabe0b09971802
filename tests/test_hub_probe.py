"""Is the Hub reachable (its endpoint's own port, or the proxy in front of it), and, when it is not, one error
naming every piece (model, dataset) that the local HF cache cannot serve. No network: a listening socket on
127.0.0.1 stands for the Hub or the proxy, and a folder laid out as the HF cache stands for earlier downloads."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub.constants
import pytest

from helpers import ROOT, run
from vitfood import hub
from vitfood.errors import VitfoodError

PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "REQUEST_METHOD")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """Whatever proxies or Hub settings this machine has, the tests set their own."""
    for name in PROXY_VARS + ("HF_HUB_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture
def listening():
    """A port on 127.0.0.1 that accepts connections (the kernel completes them from the backlog)."""
    server = socket.create_server(("127.0.0.1", 0), backlog=8)
    server.settimeout(5)
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


@pytest.fixture
def closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


def test_the_endpoints_own_port_is_probed(listening, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{listening}")
    assert hub.hub_address() == ("127.0.0.1", listening)
    assert hub.hub_reachable()


def test_nothing_listening_is_unreachable_at_once(closed_port, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port}")
    start = time.perf_counter()
    assert not hub.hub_reachable()
    assert time.perf_counter() - start < 1


def test_ports_come_from_the_scheme_unless_given():
    assert hub.hub_address() == ("huggingface.co", 443)
    assert hub.hub_address("http://mirror.example") == ("mirror.example", 80)
    assert hub.hub_address("https://mirror.example:8443/hf") == ("mirror.example", 8443)


def test_the_proxy_is_probed_instead_of_the_hub(listening, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")  # never resolved: the proxy would connect to it
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{listening}")
    assert hub.hub_address() == ("127.0.0.1", listening)
    assert hub.hub_reachable()
    monkeypatch.setenv("HTTPS_PROXY", f"127.0.0.1:{listening}")  # no scheme: http://, as httpx reads it
    assert hub.hub_address() == ("127.0.0.1", listening)


def test_only_the_proxy_for_the_endpoints_scheme_applies(monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", "http://plain-proxy:3128")
    assert hub.hub_address("https://hub.invalid") == ("hub.invalid", 443)
    assert hub.hub_address("http://hub.invalid") == ("plain-proxy", 3128)
    monkeypatch.setenv("ALL_PROXY", "http://any-proxy")
    assert hub.hub_address("https://hub.invalid") == ("any-proxy", 80)


def test_no_proxy_sends_the_probe_to_the_hub_itself(listening, closed_port, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://localhost:{closed_port}")
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{listening}")
    assert hub.hub_reachable()  # through the proxy
    monkeypatch.setenv("NO_PROXY", "example.org,localhost")
    assert hub.hub_address() == ("localhost", closed_port)
    assert not hub.hub_reachable()  # straight to the endpoint, where nothing listens
    monkeypatch.setenv("NO_PROXY", ".invalid")
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{listening}")
    assert hub.hub_address("https://hub.invalid") == ("hub.invalid", 443)


def test_offline_setting_and_bad_endpoints(listening, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{listening}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not hub.hub_reachable()  # however reachable the endpoint is
    monkeypatch.delenv("HF_HUB_OFFLINE")
    for endpoint in ("huggingface.co", "http://127.0.0.1:port"):  # no scheme, so no host; a port that is not one
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        assert not hub.hub_reachable()


# ---------------------------------------------------------------- check_sources: every missing piece at once

def add_to_cache(cache: Path, kind: str, repo_id: str, files: dict[str, bytes]) -> None:
    """The HF cache's layout for one repository: refs/main naming a snapshot that holds the files."""
    repo = cache / f"{kind}s--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    for name, content in files.items():
        path = repo / "snapshots" / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty HF cache where the client looks, and no Hub."""
    path = tmp_path / "hf-cache"
    path.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(path))
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    return path


def tiny_parquet(path: Path) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"label": [0, 1]}), path)
    return path.read_bytes()


def error_of(*args, **kwargs) -> str:
    with pytest.raises(VitfoodError) as e:
        hub.check_sources(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_check_sources_names_every_missing_piece_and_the_prepare_command(cache):
    msg = error_of("google/vit-base-patch16-224-in21k", "ethz/food101")
    assert "Hub cannot be reached" in msg
    # The defaults: Hub ids the user did not type, so no word about a local folder.
    assert msg.startswith("--model 'google/vit-base-patch16-224-in21k' (the default); --dataset 'ethz/food101' "
                          "(the default); as Hub ids, the local cache lacks both")
    assert "no such local folder" not in msg
    assert "run `python prepare.py` on a machine that reaches the Hub" in msg  # the defaults need no flags
    assert "pass --model PATH --dataset PATH" in msg
    msg = error_of("alice/vit-tiny", "bob/shapes", splits=("train", "validation"))
    assert "`python prepare.py --model alice/vit-tiny --dataset bob/shapes --eval-split validation`" in msg


def test_check_sources_names_only_what_the_cache_lacks(cache, tmp_path, monkeypatch):
    add_to_cache(cache, "model", "alice/vit-tiny", {"config.json": b"{}", "model.safetensors": b"weights"})
    msg = error_of("alice/vit-tiny", "bob/shapes")
    assert "--model" not in msg.split("prepare.py")[0]
    assert msg.startswith(f"--dataset 'bob/shapes': no such local folder ({Path.cwd() / 'bob/shapes'}); as a Hub id, "
                          "the local cache lacks it, and the Hugging Face Hub cannot be reached")
    assert "`python prepare.py --skip-model --dataset bob/shapes`" in msg and "pass --dataset PATH as" in msg

    add_to_cache(cache, "dataset", "bob/shapes", {"data/train-00000-of-00001.parquet": tiny_parquet(tmp_path / "t.parquet")})
    msg = error_of("alice/other", "bob/shapes", splits=("train", "validation"))
    assert msg.startswith(f"--model 'alice/other': no such local folder ({Path.cwd() / 'alice/other'}); --dataset "
                          f"'bob/shapes': no such local folder ({Path.cwd() / 'bob/shapes'}); as Hub ids, the local "
                          "cache lacks both (the dataset's split validation), and")

    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: pytest.fail("probed the network"))
    hub.check_sources("alice/vit-tiny", "bob/shapes", splits=("train", None))  # all cached: no probe either


def test_check_sources_lets_a_reachable_hub_download(cache, monkeypatch):
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: True)
    hub.check_sources("alice/vit-tiny", "bob/shapes")


def test_check_sources_with_a_local_folder_and_a_bare_name(cache, tmp_path):
    msg = error_of(str(tmp_path), "food")
    assert "--model" not in msg.split("prepare.py")[0]
    assert msg.startswith(f"--dataset 'food': no such local folder ({Path.cwd() / 'food'}); as a Hub id")
    assert "`python prepare.py --skip-model --dataset food`" in msg


def test_check_sources_with_local_folders_imports_no_hub_client(tmp_path):
    code = ("import sys; from vitfood import hub; hub.hub_reachable = None; "  # a probe would fail: None is not callable
            f"hub.check_sources({str(tmp_path)!r}, {str(tmp_path)!r}); print('huggingface_hub' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


def test_one_missing_piece_names_the_prepare_command_too(cache):
    with pytest.raises(VitfoodError) as e:
        hub.download_model("alice/vit-tiny")
    assert "`python prepare.py --model alice/vit-tiny --skip-dataset` writes one" in str(e.value)
    with pytest.raises(VitfoodError) as e:
        hub.download_split("bob/shapes", "train", 10)
    assert "pass a local folder with --dataset PATH (`python prepare.py --skip-model --dataset bob/shapes`" in str(e.value)


def test_a_name_that_is_no_folder_says_so_before_the_hub(cache, monkeypatch):
    from huggingface_hub.errors import RepositoryNotFoundError

    with pytest.raises(VitfoodError) as e:
        hub.resolve_model_dir("models/nope")  # offline, not cached
    assert str(e.value).startswith(f"--model 'models/nope': no such local folder ({Path.cwd() / 'models/nope'}); "
                                   "as a Hub id, it is not in the local Hugging Face cache and the Hub cannot be reached")
    with pytest.raises(VitfoodError) as e:
        hub.resolve_model_dir("models/nope/")  # a trailing slash: only a path can have one
    assert str(e.value) == (f"--model 'models/nope/': no such local folder ({Path.cwd() / 'models/nope'}), and as a "
                            "path it cannot be a Hub model id")
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: True)

    def not_there(*args, **kwargs):
        error = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # as the client raises it for a 404
        Exception.__init__(error, "404 Client Error")
        raise error

    monkeypatch.setattr(hub, "_download_model_files", not_there)
    with pytest.raises(VitfoodError) as e:
        hub.download_model("models/nope")
    assert str(e.value) == (f"--model 'models/nope': no such local folder ({Path.cwd() / 'models/nope'}); as a Hub id, "
                            "the Hugging Face Hub has no such model repository (or it is private)")
    with pytest.raises(VitfoodError) as e:
        hub.download_model("models/nope", local_dir=Path("x"))  # prepare.py only downloads: no word of a folder
    assert str(e.value).startswith("--model 'models/nope': the Hugging Face Hub has no such model repository")


def test_train_offline_names_model_and_dataset_in_one_line(tmp_path):
    home = tmp_path / "hf-home"
    home.mkdir()
    r = run("train.py", "--model", "alice/vit-not-cached", "--dataset", "bob/not-cached", "--output-dir",
            tmp_path / "out", env_extra={"HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
                                         "HF_DATASETS_CACHE": str(home / "datasets")}, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    # A mistyped local folder is the likelier slip: that comes first, with the absolute path looked at; then the Hub.
    assert lines[0].startswith(f"train.py: error: --model 'alice/vit-not-cached': no such local folder "
                               f"({ROOT / 'alice/vit-not-cached'}); --dataset 'bob/not-cached': no such local folder "
                               f"({ROOT / 'bob/not-cached'}); as Hub ids, the local cache lacks both, and the Hugging "
                               "Face Hub cannot be reached")
    assert "python prepare.py --model alice/vit-not-cached --dataset bob/not-cached" in lines[0]
