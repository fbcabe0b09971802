"""infer.py on many inputs: folders, globs, URLs, batches, devices, CSV, the summary line and the progress bar.

Each test runs `python infer.py` as a new process, the way a user does, on a tiny trained-head checkpoint.
"""

import csv
import fcntl
import http.server
import io
import json
import os
import re
import socket
import struct
import subprocess
import sys
import termios
import threading
import time

import numpy as np
import pytest
from PIL import Image

from helpers import ROOT, make_checkpoint, run

LABELS = ["apple pie", "fish, chips", 'say "cheese"']  # a comma and quotes: CSV must quote them


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("model"), classification_labels=LABELS)


def save_image(path, seed, fmt=None):
    """A small random picture (its own size and content per seed)."""
    rng = np.random.default_rng(seed)
    size = (int(rng.integers(20, 60)), int(rng.integers(20, 60)))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, format=fmt)
    return path


def json_lines(stdout):
    return [json.loads(line) for line in stdout.splitlines()]


def errors(stderr):
    lines = stderr.strip().splitlines()
    assert all(line.startswith("infer.py: ") for line in lines), stderr
    return [line for line in lines if line.startswith("infer.py: error: ")]


def test_folders_recursively_and_quoted_globs(model, tmp_path):
    photos = tmp_path / "photos"
    for i, name in enumerate(["b.jpg", "a.png", "e.bmp", "sub/c.JPG", "sub/deeper/d.bmp"]):
        save_image(photos / name, i, fmt="JPEG" if name.lower().endswith("jpg") else None)
    save_image(photos / ".hidden.jpg", 10)  # hidden file and folder: skipped, as train.py skips them
    save_image(photos / ".cache" / "x.jpg", 11)
    (photos / "notes.txt").write_text("not an image, and not an image name: ignored in a folder")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("no pictures here")
    walk = ["photos/a.png", "photos/b.jpg", "photos/e.bmp", "photos/sub/c.JPG", "photos/sub/deeper/d.bmp"]

    # No shell in between: the patterns reach infer.py as a quoted argument would.
    r = run("infer.py", "photos", "photos/**/*.bmp", "photos/[ab].*", "photos/**", "empty", "nothing/*.jpg",
            "photos/*.txt", "missing.jpg", "photos/a.png", "--model", model, "--json", "--top-k", 1, cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert [x["image"] for x in json_lines(r.stdout)] == [
        *walk,  # the folder, recursively, in train.py's order
        "photos/e.bmp", "photos/sub/deeper/d.bmp",  # `**` spans zero or more folders
        "photos/a.png", "photos/b.jpg",  # a character class
        *walk,  # `photos/**` reaches each file both directly and through its folder: listed once
        "photos/a.png",  # a repeat across arguments is kept, as a shell expansion would keep it
    ]
    for x in json_lines(r.stdout):
        assert len(x["predictions"]) == 1 and x["predictions"][0]["label"] in LABELS
    errs = errors(r.stderr)
    assert len(errs) == 4 and len(r.stderr.strip().splitlines()) == 4  # few inputs: no summary line
    assert errs[0].startswith("infer.py: error: empty: no image files in this folder or below (.bmp")
    assert errs[1].startswith("infer.py: error: nothing/*.jpg: matches no image files")
    assert errs[2].startswith("infer.py: error: photos/*.txt: matches no image files")  # only notes.txt
    assert errs[3] == "infer.py: error: missing.jpg: file not found"


class _Handler(http.server.BaseHTTPRequestHandler):
    png = b""

    def do_GET(self):
        if self.path == "/cat.png":
            self._reply(200, "image/png", self.png)
        elif self.path == "/page":
            self._reply(200, "text/html; charset=utf-8", b"<html><body>a web page, not a picture</body></html>")
        elif self.path == "/huge.jpg":  # announces 100 MB; infer.py must not try to hold it
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(100 * 2**20))
            self.end_headers()
            self.wfile.write(b"\xff\xd8" * 1000)
        elif self.path == "/trickle.png":  # a byte every 0.2 s: each read is quick, the whole is not
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(self.png)))
            self.end_headers()
            for i in range(len(self.png)):
                self.wfile.write(self.png[i : i + 1])
                self.wfile.flush()
                time.sleep(0.2)
        else:
            self.send_error(404)

    def _reply(self, code, content_type, body):
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def web(tmp_path):
    """An HTTP server on 127.0.0.1, and a socket that accepts connections but never answers."""
    local = save_image(tmp_path / "cat.png", 7)
    _Handler.png = local.read_bytes()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel completes the handshake; nobody ever reads the request
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", f"http://127.0.0.1:{silent.getsockname()[1]}", local
    finally:
        server.shutdown()
        server.server_close()
        silent.close()


def test_urls_download_with_timeout_and_clear_errors(model, web):
    base, silent, local = web
    urls = [f"{base}/cat.png", f"{base}/nope.jpg", f"{base}/page", f"{silent}/slow.jpg", f"{base}/huge.jpg",
            f"{base}/trickle.png"]
    t0 = time.monotonic()
    r = run("infer.py", local, *urls, "--model", model, "--json", "--top-k", 3, "--timeout", 1,
            env_extra={"no_proxy": "127.0.0.1", "NO_PROXY": "127.0.0.1"})  # a user's proxy must not take these
    took = time.monotonic() - t0
    assert r.returncode == 1 and "Traceback" not in r.stderr
    out = json_lines(r.stdout)
    assert [x["image"] for x in out] == [str(local), urls[0]]
    # The same picture, from disk and over HTTP: the same predictions.
    assert [p["label"] for p in out[0]["predictions"]] == [p["label"] for p in out[1]["predictions"]]
    assert [p["score"] for p in out[1]["predictions"]] == pytest.approx([p["score"] for p in out[0]["predictions"]],
                                                                        abs=1e-6)
    errs = errors(r.stderr)
    assert len(errs) == 5
    assert errs[0] == f"infer.py: error: {urls[1]}: HTTP error 404 Not Found"
    assert errs[1].startswith(f"infer.py: error: {urls[2]}: not an image file") and "text/html" in errs[1]
    assert errs[2] == f"infer.py: error: {urls[3]}: timed out after 1 s (--timeout)"
    assert errs[3].startswith(f"infer.py: error: {urls[4]}: refused, 100 MB is more than the 64 MB limit")
    assert errs[4] == f"infer.py: error: {urls[5]}: timed out after 1 s (--timeout)"  # a slow body counts too
    assert took < 20  # the silent and the slow server cost about --timeout each, not the 30 s default


def test_batches_a_bad_image_costs_only_its_own_line(model, tmp_path):
    import vitfood

    good = [save_image(tmp_path / f"g{i}.png", 20 + i) for i in range(6)]
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(save_image(tmp_path / "full.jpg", 30, fmt="JPEG").read_bytes()[:200])
    text = tmp_path / "text.png"
    text.write_text("hello")
    # --batch-size 3: [g0, truncated, g1] has the bad file in its middle; [g2, g3, text]; [g4, g5].
    images = [good[0], truncated, good[1], good[2], good[3], text, good[4], good[5]]
    # Batch size 1: the library, one image per forward pass.
    results = {1: [{"image": str(p), "predictions": vitfood.classify(str(p), model, top_k=3)} for p in good]}
    for bs in (2, 3):
        r = run("infer.py", *images, "--model", model, "--json", "--top-k", 3, "--batch-size", bs)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        errs = errors(r.stderr)
        assert len(errs) == 2 and str(truncated) in errs[0] and "cannot decode" in errs[0]
        assert str(text) in errs[1] and "not an image file" in errs[1]
        results[bs] = json_lines(r.stdout)
        assert [x["image"] for x in results[bs]] == [str(p) for p in good]
    for bs in (2, 3):
        for one, batched in zip(results[1], results[bs]):
            assert [p["label"] for p in batched["predictions"]] == [p["label"] for p in one["predictions"]]
            assert [p["score"] for p in batched["predictions"]] == pytest.approx(
                [p["score"] for p in one["predictions"]], abs=1e-5)


def test_csv_quotes_labels_and_matches_classify(model, tmp_path):
    import vitfood

    images = [save_image(tmp_path / "one.png", 1), save_image(tmp_path / "two.jpg", 2, fmt="JPEG")]
    (tmp_path / "bad.jpg").write_bytes(b"")
    r = run("infer.py", images[0], tmp_path / "bad.jpg", images[1], "--model", model, "--csv", "--top-k", 3,
            "--device", "cpu")
    assert r.returncode == 1 and errors(r.stderr) == [f"infer.py: error: {tmp_path / 'bad.jpg'}: empty file"]
    assert r.stdout.splitlines()[0] == "image,rank,label,score"
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert len(rows) == 6
    assert '"fish, chips"' in r.stdout and '"say ""cheese"""' in r.stdout  # quoted by the csv module
    expected = vitfood.classify([str(p) for p in images], model, top_k=3)
    for k, path in enumerate(images):
        mine = [row for row in rows if row["image"] == str(path)]
        assert [row["rank"] for row in mine] == ["1", "2", "3"]
        assert sorted(row["label"] for row in mine) == sorted(LABELS)
        assert [row["label"] for row in mine] == [p["label"] for p in expected[k]]
        assert [float(row["score"]) for row in mine] == pytest.approx([p["score"] for p in expected[k]], abs=1e-6)


def test_bad_flags_are_one_line_and_exit_2(model, tmp_path):
    img = save_image(tmp_path / "x.png", 3)
    r = run("infer.py", img, "--model", model, "--json", "--csv")
    assert r.returncode == 2 and "--csv: not allowed with argument --json" in r.stderr and r.stdout == ""
    r = run("infer.py", img, "--model", model, "--device", "bogus")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == "infer.py: error: --device 'bogus': not a device name (auto, cpu, cuda, cuda:N)"


def _images_with_one_bad(folder, n):
    for i in range(n):
        save_image(folder / f"{i:03d}.png", 100 + i)
    (folder / "zzz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return n + 1


def test_summary_line_on_larger_inputs(model, tmp_path):
    total = _images_with_one_bad(tmp_path / "many", 24)
    r = run("infer.py", tmp_path / "many", "--model", model, "--batch-size", 5)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    out = r.stdout.splitlines()  # text format: the path, then "  score  label" for each of the 3 labels
    assert [line for line in out if not line.startswith("  ")] == [str(tmp_path / "many" / f"{i:03d}.png")
                                                                   for i in range(24)]
    assert len(out) == 24 * 4
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2 and "zzz_broken.png" in lines[0]
    m = re.fullmatch(r"infer\.py: classified (\d+) images in ([\d.]+) s \(([\d.]+) images/s\), (\d+) failed", lines[1])
    assert m, lines[1]
    assert int(m[1]) == total - 1 and int(m[4]) == 1 and float(m[3]) > 0
    assert "%" not in r.stderr  # stderr is a pipe here: no progress bar


def test_progress_bar_only_when_stderr_is_a_terminal(model, tmp_path):
    total = _images_with_one_bad(tmp_path / "many", 60)
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "infer.py"), str(tmp_path / "many"), "--model", str(model),
                             "--json", "--batch-size", "8"], stdout=subprocess.PIPE, stderr=slave, env=env, cwd=ROOT)
    os.close(slave)
    chunks = []

    def read_terminal():
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the child closed its end
                break
            if not data:
                break
            chunks.append(data)

    reader = threading.Thread(target=read_terminal)
    reader.start()
    stdout, _ = proc.communicate(timeout=120)
    reader.join(timeout=10)
    os.close(master)
    terminal = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 1
    assert len(json_lines(stdout.decode())) == total - 1  # stdout is untouched by the bar
    assert re.search(rf"\d+/{total} ", terminal) and "img" in terminal  # tqdm's "n/total" and its unit
    assert re.search(r"infer\.py: error: \S*zzz_broken\.png", terminal)
    assert f"infer.py: classified {total - 1} images in" in terminal


def test_math_threads_follow_the_models_share_of_the_work():
    from vitfood.inference import math_threads

    # Measured on 2 cores with Food-101-size JPEGs: ViT-B's 0.5 s of math an image against 4 ms of decoding
    # keeps both threads; a tiny ViT's 8 ms gets one.
    assert math_threads(decode_cpu_seconds=0.004, model_cpu_seconds=0.5, threads=2) == 2
    assert math_threads(decode_cpu_seconds=0.004, model_cpu_seconds=0.008, threads=2) == 1
    assert math_threads(decode_cpu_seconds=0.003, model_cpu_seconds=0.0, threads=16) == 1  # never none
    assert math_threads(decode_cpu_seconds=0.001, model_cpu_seconds=0.003, threads=16) == 12
    assert math_threads(decode_cpu_seconds=0.0, model_cpu_seconds=0.0, threads=4) == 4  # nothing measured: as it was


def test_a_cpu_stream_gives_the_threads_back_and_its_answers_do_not_change(model, tmp_path, monkeypatch):
    """Past its first batches the stream sets the model's math threads from both sides' measured costs; the
    process gets its own number back when the stream ends, also when the caller stops reading early, and
    no score moves."""
    import torch

    from vitfood import inference
    from vitfood.inference import classify_stream, expand_inputs, load_classifier

    for i in range(40):
        save_image(tmp_path / "photos" / f"{i:02d}.jpg", 100 + i, fmt="JPEG")
    clf = load_classifier(model)
    inputs = expand_inputs([str(tmp_path / "photos")])
    before = torch.get_num_threads()
    one_by_one = [r.predictions for r in classify_stream(clf, inputs, top_k=3, batch_size=1)]
    assert torch.get_num_threads() == before
    asked = []
    monkeypatch.setattr(inference, "math_threads", lambda *costs: asked.append(costs) or 1)
    batched = classify_stream(clf, inputs, top_k=3, batch_size=4)
    for k, result in enumerate(batched):
        assert [p["label"] for p in result.predictions] == [p["label"] for p in one_by_one[k]]
        assert [p["score"] for p in result.predictions] == pytest.approx([p["score"] for p in one_by_one[k]],
                                                                         abs=1e-5)
        if k == 30:
            break
    # Decided once, after the warm-up batch and two measured ones, from real costs an image.
    [(decode_cpu, model_cpu, threads)] = asked
    assert 0 < decode_cpu < 1 and 0 < model_cpu < 1 and threads == before
    assert torch.get_num_threads() == 1  # still streaming
    batched.close()  # a caller that stops reading early
    assert torch.get_num_threads() == before
