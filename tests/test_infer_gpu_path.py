"""infer.py's GPU path, tested without a GPU: the routing of files, the decoder's retries, and the whole stream
with the CPU stand-in of the GPU decoder (torchvision's decode_jpeg on the CPU, then the same torch resize).

What only a GPU can show (nvJPEG's own pixels and speed) is measured by `bench_infer.py folder` on one.
"""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import CLASSES, ROOT, draw_image, make_checkpoint, make_image_folder, run
from vitfood import gpu_decode
from vitfood.cli import infer_main
from vitfood.config import TrainConfig
from vitfood.gpu_decode import TorchJpegDecoder, chunks_by_pixels, decode_each, route
from vitfood.inference import classify_stream, expand_inputs, load_classifier
from vitfood.preprocess import BadImageError, Preprocessing, load_rgb
from vitfood.train_loop import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny ViT trained to tell the three drawn classes apart (about 2 s): confident, as a real model is,
    and like ViT-B/16 made of 16-pixel patches (64 px images: 16 of them)."""
    root = tmp_path_factory.mktemp("gpu-path")
    backbone = make_checkpoint(root / "backbone", image_size=64, patch_size=16)
    folder = make_image_folder(root / "images", per_class=40, seed=1)
    train(TrainConfig(model=str(backbone), dataset=str(folder), output_dir=str(root / "out"), epochs=8,
                      batch_size=16, eval_batch_size=64, grad_accum_steps=1, learning_rate=3e-3, weight_decay=0.01,
                      num_workers=0, logging_steps=100))
    return root / "out"


def photo(seed: int, size=(70, 50)) -> Image.Image:
    return draw_image(CLASSES[seed % 3], np.random.default_rng(seed), size)


def encode(img: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **options)
    return out.getvalue()


def with_exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return encode(photo(3), exif=exif)


def with_frame_marker(data: bytes, marker: int) -> bytes:
    """A baseline JPEG relabelled with another frame type (Pillow writes only baseline and progressive)."""
    return data.replace(b"\xff\xc0", bytes([0xFF, marker]), 1)


def undefined_quant_table() -> bytes:
    """A JPEG with a sound header that no decoder can decode: its first component's quantisation table is missing."""
    data = bytearray(encode(photo(4)))
    sof = data.index(b"\xff\xc0")
    data[sof + 12] = 3  # after the marker, length, precision, size, component count, id and sampling
    return bytes(data)


def tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decoded_as_stored(data: bytes) -> np.ndarray:
    """torchvision's CPU decode: libjpeg-turbo, as PIL's, without PIL's EXIF rotation or colour-space handling."""
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(tensor(data), mode=ImageReadMode.RGB).permute(1, 2, 0).numpy()


# ---------------------------------------------------------------- routing

GPU_FILES = {
    "baseline 4:2:0": lambda: encode(photo(0)),
    "baseline 4:4:4": lambda: encode(photo(1), subsampling=0),
    "baseline 4:2:2, quality 40": lambda: encode(photo(2), subsampling=1, quality=40),
    "optimised Huffman tables": lambda: encode(photo(5), optimize=True),
    "restart markers": lambda: encode(photo(6), restart_marker_blocks=2),
    "EXIF orientation 1": lambda: with_exif_orientation(1),
}

CPU_FILES = {  # name: (the file, what the route says)
    "PNG": (lambda: encode(photo(0), "PNG"), "not a JPEG"),
    "WebP": (lambda: encode(photo(0), "WEBP"), "not a JPEG"),
    "GIF": (lambda: encode(photo(0), "GIF"), "not a JPEG"),
    "text": (lambda: b"a note, not a picture", "not a JPEG"),
    "empty": (lambda: b"", "not a JPEG"),
    "CMYK JPEG": (lambda: encode(photo(0).convert("CMYK")), "CMYK"),
    "greyscale JPEG": (lambda: encode(photo(0).convert("L")), "greyscale"),
    "progressive JPEG": (lambda: encode(photo(0), progressive=True), "progressive"),
    "EXIF-rotated JPEG": (lambda: with_exif_orientation(6), "EXIF orientation 6"),
    "XMP-rotated JPEG": (lambda: encode(photo(0), xmp=b'<rdf:Description tiff:Orientation="8"/>'), "XMP orientation"),
    "RGB-coded JPEG": (lambda: encode(photo(0), keep_rgb=True), "RGB-coded"),
    "extended sequential JPEG": (lambda: with_frame_marker(encode(photo(0)), 0xC1), "not a baseline JPEG (SOF1)"),
    "lossless JPEG": (lambda: with_frame_marker(encode(photo(0)), 0xC3), "not a baseline JPEG (SOF3)"),
    "cut in the header": (lambda: encode(photo(0))[:150], "header cut short"),
    "cut in the picture": (lambda: encode(photo(0))[:-100], "no end marker"),
    "data after the picture": (lambda: encode(photo(0)) + b"trailer", "no end marker"),
    "SOI then junk": (lambda: b"\xff\xd8\xff" + b"\x00" * 50, "corrupt header"),
}


@pytest.mark.parametrize("name", GPU_FILES)
def test_route_sends_baseline_jpegs_to_the_gpu_and_they_decode_to_pils_picture(name):
    data = GPU_FILES[name]()
    r = route(data)
    assert r == ("gpu", "", 70 * 50)
    # What the route promises: libjpeg-turbo without PIL's extras (torchvision's CPU decode) gives PIL's picture.
    assert np.array_equal(decoded_as_stored(data), np.asarray(load_rgb(data)))


@pytest.mark.parametrize("name", CPU_FILES)
def test_route_sends_everything_else_to_the_cpu_path(name):
    make, why = CPU_FILES[name]
    data = make()
    r = route(data)
    assert r.where == "cpu" and why in r.why, r
    try:  # and the CPU path either decodes it or names the problem
        load_rgb(data)
    except BadImageError:
        assert name in ("text", "empty", "cut in the header", "cut in the picture", "SOI then junk", "lossless JPEG")


def test_route_of_an_exif_rotated_jpeg_matters():
    # Why it goes to PIL: decoded as stored, the photo lies on its side.
    data = with_exif_orientation(6)
    assert decoded_as_stored(data).shape == (50, 70, 3) and np.asarray(load_rgb(data)).shape == (70, 50, 3)


def test_read_jpeg(tmp_path):
    (tmp_path / "a.jpg").write_bytes(encode(photo(0)))
    (tmp_path / "b.png").write_bytes(encode(photo(0), "PNG"))
    assert gpu_decode.read_jpeg(str(tmp_path / "a.jpg")) == bytearray(encode(photo(0)))
    assert gpu_decode.read_jpeg(str(tmp_path / "b.png")) is None
    assert gpu_decode.read_jpeg(str(tmp_path / "missing.jpg")) is None  # the CPU path names the problem
    assert gpu_decode.read_jpeg(str(tmp_path)) is None


# ---------------------------------------------------------------- decoder: retries, chunks, resize


def test_a_batch_the_decoder_refuses_is_retried_one_by_one():
    calls = []

    def decoder(batch):  # refuses any batch that holds image 2, as nvJPEG fails a batch for one bad file
        calls.append([int(t) for t in batch])
        if 2 in calls[-1]:
            raise RuntimeError("Error while decoding JPEG images")
        return torch.stack(batch) * 10

    images = [torch.tensor(i) for i in range(5)]
    out = decode_each(decoder, images, fallback=lambda i: f"cpu {i}")
    assert [o if isinstance(o, str) else int(o) for o in out] == [0, 10, "cpu 2", 30, 40]
    assert calls == [[0, 1, 2, 3, 4], [0], [1], [2], [3], [4]]

    calls.clear()
    assert decode_each(decoder, [torch.tensor(2)], fallback=lambda i: "cpu") == ["cpu"]
    assert calls == [[2]]  # one image: tried once, not twice
    assert decode_each(decoder, [], fallback=lambda i: "cpu") == []


def test_chunks_by_pixels():
    assert chunks_by_pixels([]) == []
    assert chunks_by_pixels([1, 1, 1], budget=2) == [range(0, 2), range(2, 3)]
    assert chunks_by_pixels([5, 1, 1], budget=2) == [range(0, 1), range(1, 3)]  # too big alone: a chunk of its own
    assert chunks_by_pixels([512 * 512] * 256) == [range(0, 256)]  # a Food-101 batch: one decoder call


PREPS = {  # name: (preprocessing, most levels off PIL's, mean levels off)
    "bilinear": (Preprocessing(32, 32), 2, 0.1),
    "bicubic, up and down": (Preprocessing(224, 224, resample=Image.Resampling.BICUBIC), 8, 0.1),
    "shortest edge, centre crop": (Preprocessing(32, 32, shortest_edge=40, resample=Image.Resampling.BICUBIC), 2, 0.1),
    "crop larger than the resize": (Preprocessing(64, 64, shortest_edge=50), 2, 0.1),
}


@pytest.mark.parametrize("name", PREPS)
def test_stand_in_resize_matches_eval_resize(name):
    prep, most, mean = PREPS[name]
    rng = np.random.default_rng(7)
    datas = []
    for k in range(40):
        size = (int(rng.integers(8, 400)), int(rng.integers(8, 400)))
        datas.append(encode(draw_image(CLASSES[k % 3], rng, size), quality=int(rng.integers(40, 100)),
                            subsampling=int(rng.integers(0, 3))))
    out = TorchJpegDecoder(prep, "cpu")([tensor(d) for d in datas])
    assert out.dtype == torch.uint8 and tuple(out.shape) == (40, prep.height, prep.width, 3)
    diffs = [np.abs(prep.eval_resize(load_rgb(d)).astype(int) - o.numpy()) for d, o in zip(datas, out)]
    assert max(d.max() for d in diffs) <= most
    assert np.mean([d.mean() for d in diffs]) < mean


# ---------------------------------------------------------------- the stream


class StandIn:
    """The GPU decoder's CPU stand-in, recording each call (its images' names, and whether it succeeded);
    it refuses batches holding a file of `refuse`, as nvJPEG refuses a file that PIL takes."""

    def __init__(self, prep, names: dict[bytes, str], refuse=()):
        self.decoder = TorchJpegDecoder(prep, "cpu")
        self.names, self.refuse = names, set(refuse)
        self.calls: list[tuple[list[str], bool]] = []

    def __call__(self, encoded):
        names = [self.names[bytes(t.numpy())] for t in encoded]
        try:
            if self.refuse & set(names):
                raise RuntimeError("Error while decoding JPEG images: nvJPEG refused one")
            out = self.decoder(encoded)
        except Exception:
            self.calls.append((names, False))
            raise
        self.calls.append((names, True))
        return out


def write_files(folder, files: dict[str, bytes]) -> dict[bytes, str]:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {data: name for name, data in files.items()}


def test_stream_routes_retries_keeps_order_and_names_bad_files(trained, tmp_path):
    clf = load_classifier(trained)
    files = {
        "a.jpg": encode(photo(10)),  # GPU
        "b.png": encode(photo(11), "PNG"),  # CPU
        "c.jpg": encode(photo(12), subsampling=0),  # GPU
        "d.jpg": encode(photo(13), progressive=True),  # CPU
        "e.jpg": with_exif_orientation(6),  # CPU
        "f.jpg": encode(photo(14))[:-200],  # CPU, which names it: cut short
        "g.jpg": encode(photo(15), quality=60),  # GPU; the stand-in refuses it, as nvJPEG may: PIL decodes it
        "h.jpg": undefined_quant_table(),  # GPU, which refuses it; PIL too: named
        "i.jpg": encode(photo(16).convert("CMYK")),  # CPU
        "j.jpg": encode(photo(17).convert("L")),  # CPU
        "k.jpg": encode(photo(18, (40, 90))),  # GPU
    }
    names = write_files(tmp_path / "photos", files)
    (tmp_path / "empty").mkdir()
    args = [str(tmp_path / "photos" / n) for n in files] + [str(tmp_path / "missing.jpg"), str(tmp_path / "empty")]
    inputs = expand_inputs(args)
    stand_in = StandIn(clf.prep, names, refuse={"g.jpg"})

    pil = list(classify_stream(clf, inputs, top_k=3, batch_size=4))
    gpu = list(classify_stream(clf, inputs, top_k=3, batch_size=4, decoder=stand_in))

    assert [r.image for r in gpu] == [r.image for r in pil] == args  # the input order, errors in their places
    assert [str(r.error) if r.error else None for r in gpu] == [str(r.error) if r.error else None for r in pil]
    failed = [os.path.basename(r.image) for r in gpu if r.error]
    assert failed == ["f.jpg", "h.jpg", "missing.jpg", "empty"]
    assert "cannot decode" in str(gpu[7].error) and str(tmp_path / "photos" / "h.jpg") in str(gpu[7].error)
    # Batches of 4: [a b c d] [e f g h] [i j k missing] [empty]. The second batch's decode fails as a whole,
    # then g and h alone; both then go to PIL, which decodes g and names h.
    assert stand_in.calls == [(["a.jpg", "c.jpg"], True), (["g.jpg", "h.jpg"], False), (["g.jpg"], False),
                              (["h.jpg"], False), (["k.jpg"], True)]
    on_gpu = {"a.jpg", "c.jpg", "k.jpg"}
    for mine, theirs in zip(gpu, pil):
        if mine.error:
            continue
        assert [p["label"] for p in mine.predictions] == [p["label"] for p in theirs.predictions]
        tolerance = 0.01 if os.path.basename(mine.image) in on_gpu else 1e-6  # the CPU-routed: PIL's own pixels
        assert [p["score"] for p in mine.predictions] == pytest.approx([p["score"] for p in theirs.predictions],
                                                                       abs=tolerance)


def test_the_next_batch_is_read_and_decoded_while_the_model_runs(trained, tmp_path, monkeypatch):
    clf = load_classifier(trained)
    files = {f"{i}.jpg": encode(photo(20 + i)) for i in range(6)}
    names = write_files(tmp_path, files)
    paths = [str(tmp_path / n) for n in files]
    batch_of = {p: i // 2 for i, p in enumerate(paths)}  # batches of 2: three of them
    read_batch1, decoded_batch1 = threading.Event(), threading.Event()
    seen = {}

    real_read = gpu_decode.read_jpeg

    def read(path):
        if batch_of[path] == 1:
            read_batch1.set()
        return real_read(path)

    stand_in = StandIn(clf.prep, names)

    def decoder(encoded):
        if not stand_in.calls:  # decoding batch 0: batch 1's files are being read meanwhile
            seen["read ahead"] = read_batch1.wait(10)
        else:
            decoded_batch1.set()
        return stand_in(encoded)

    real_logits = clf.logits_of_batch

    def logits(batch, precision="fp32"):
        if "decoded ahead" not in seen:  # the model on batch 0: batch 1 is decoded meanwhile
            seen["decoded ahead"] = decoded_batch1.wait(10)
        return real_logits(batch, precision)

    monkeypatch.setattr(gpu_decode, "read_jpeg", read)
    monkeypatch.setattr(clf, "logits_of_batch", logits)
    results = list(classify_stream(clf, paths, batch_size=2, threads=2, decoder=decoder))
    assert seen == {"read ahead": True, "decoded ahead": True}
    assert [r.image for r in results] == paths and all(r.predictions for r in results)
    assert [len(names) for names, ok in stand_in.calls] == [2, 2, 2]


class FakeCuda:
    """torch.cuda's streams and events as `StreamHandoff` uses them, on the CPU: every call logged with its thread.
    Each thread's current stream is its own, as in CUDA; "default" until a `stream(...)` block sets another."""

    def __init__(self):
        self.log: list[tuple] = []
        self._current = threading.local()
        fake = self

        class Stream:
            def __init__(self, device):
                self.name = f"side {sum(e[0] == 'new stream' for e in fake.log)}"
                fake.note("new stream", self.name)

            def wait_event(self, event):
                fake.note("wait", self.name, event.name)

        class Event:
            def __init__(self):
                self.name = None

            def record(self, stream):
                self.name = f"event {sum(e[0] == 'record' for e in fake.log)}"
                fake.note("record", stream.name, self.name)

        self.Stream, self.Event = Stream, Event
        self.default = Stream.__new__(Stream)  # the stream every thread starts on, not made by the code under test
        self.default.name = "default"

    def note(self, *what) -> None:
        self.log.append((*what, threading.current_thread().name))

    def current_stream(self, device=None):
        return getattr(self._current, "stream", self.default)

    @contextlib.contextmanager
    def stream(self, s):
        before = self.current_stream()
        self._current.stream = s
        try:
            yield
        finally:
            self._current.stream = before


def test_the_gpu_path_hands_each_batch_over_between_streams(trained, tmp_path, monkeypatch):
    """Issue 17, 1.5: the decoding thread decodes on a stream of its own, records an event after the batch is
    made, and the model's stream waits on that event, the batch recorded as used there, before the model reads it."""
    clf = load_classifier(trained)
    files = {f"{i}.jpg": encode(photo(40 + i)) for i in range(5)}
    files["5.png"] = encode(photo(45), "PNG")  # a CPU-decoded image joins the batch on the decoding thread's stream
    names = write_files(tmp_path, files)
    paths = [str(tmp_path / n) for n in files]
    cuda = FakeCuda()
    monkeypatch.setattr(gpu_decode, "stream_handoff", lambda device: gpu_decode.StreamHandoff(device, cuda))
    stand_in = StandIn(clf.prep, names)

    def decoder(encoded):
        cuda.note("decode", cuda.current_stream().name)
        return stand_in(encoded)

    real_logits, batches = clf.logits_of_batch, []

    def logits(batch, precision="fp32"):
        cuda.note("model", cuda.current_stream().name)
        batches.append(batch)
        return real_logits(batch, precision)

    monkeypatch.setattr(clf, "logits_of_batch", logits)
    monkeypatch.setattr(torch.Tensor, "record_stream",
                        lambda t, stream: cuda.note("record_stream", stream.name, t.data_ptr()), raising=False)
    results = list(classify_stream(clf, paths, batch_size=2, decoder=decoder))
    assert [r.image for r in results] == paths and all(r.predictions for r in results)

    main = threading.current_thread().name
    made = [e for e in cuda.log if e[0] == "new stream"]
    assert len(made) == 1 and made[0][-1] != main  # the decoding thread's own stream, made once, on that thread
    side, decoding_thread = made[0][1], made[0][-1]
    for what, *rest in cuda.log:  # each call on the right thread and stream
        if what in ("decode", "record"):
            assert rest[0] == side and rest[-1] == decoding_thread, (what, rest)
        if what in ("model", "wait", "record_stream"):
            assert rest[0] == "default" and rest[-1] == main, (what, rest)
    # Per batch, in order: decoded, its event recorded on the side stream, the model's stream waits on it and
    # records the batch as used there, then the model runs. The decoding of batch k+1 may interleave.
    consumer = [e[:-1] for e in cuda.log if e[-1] == main]
    events = [e[2] for e in cuda.log if e[0] == "record"]
    assert consumer == [step for k, batch in enumerate(batches) for step in
                        (("wait", "default", events[k]), ("record_stream", "default", batch.data_ptr()),
                         ("model", "default"))]
    for k, event in enumerate(events):  # batch k's decoding (2 images, or 1 JPEG + the PNG) before its event
        recorded = cuda.log.index(("record", side, event, decoding_thread))
        decodes_before = sum(e[0] == "decode" for e in cuda.log[:recorded])
        assert decodes_before == k + 1
    assert len(events) == len(batches) == 3


def drawn_jpegs(folder, n: int, seed: int) -> list[str]:
    """Varied JPEGs of the three classes: 12 to 300 px a side (smaller and larger than the model's 64),
    any aspect, quality 30 to 100, chroma 4:4:4, 4:2:2 or 4:2:0."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        size = (int(rng.integers(12, 301)), int(rng.integers(12, 301)))
        path = folder / f"{i:04d}.jpg"
        draw_image(CLASSES[i % 3], rng, size).save(path, quality=int(rng.integers(30, 101)),
                                                   subsampling=int(rng.integers(0, 3)))
        paths.append(str(path))
    return paths


AGREEMENT_PREPS = {  # the checkpoint's own preprocessor_config.json, then two others on the same weights
    "bilinear (the checkpoint's)": None,
    "bicubic": {"size": {"height": 64, "width": 64}, "resample": 3},
    "shortest edge 72, centre crop 64": {"size": {"shortest_edge": 72}, "do_center_crop": True,
                                         "crop_size": {"height": 64, "width": 64}, "resample": 2},
}


@pytest.mark.parametrize("name", AGREEMENT_PREPS)
def test_gpu_path_stand_in_agrees_with_the_pil_path(trained, tmp_path, name):
    model = trained
    if AGREEMENT_PREPS[name] is not None:
        model = tmp_path / "model"
        shutil.copytree(trained, model, ignore=shutil.ignore_patterns("checkpoints"))
        (model / "preprocessor_config.json").write_text(json.dumps(AGREEMENT_PREPS[name]))
    clf = load_classifier(model)
    paths = drawn_jpegs(tmp_path / "photos", 300, seed=3)
    decoder = StandIn(clf.prep, {})
    decoder.names = {(tmp_path / "photos" / os.path.basename(p)).read_bytes(): p for p in paths}
    pil = list(classify_stream(clf, paths, top_k=3, batch_size=32))
    gpu = list(classify_stream(clf, paths, top_k=3, batch_size=32, decoder=decoder))
    assert sum(len(names) for names, ok in decoder.calls) == len(paths)  # every one went the GPU way
    assert all(r.predictions for r in pil + gpu)
    same = sum(a.predictions[0]["label"] == b.predictions[0]["label"] for a, b in zip(pil, gpu))
    assert same >= 0.995 * len(paths)
    for a, b in zip(pil, gpu):  # the top-1 label's score, and every other class's, within 0.01
        theirs = {p["label"]: p["score"] for p in b.predictions}
        assert max(abs(p["score"] - theirs[p["label"]]) for p in a.predictions) <= 0.01
    # A confident model, so that the agreement means something: most scores far from a tie.
    assert np.median([r.predictions[0]["score"] for r in pil]) > 0.6


# ---------------------------------------------------------------- infer.py


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_decoder_gpu_without_cuda_is_one_line(tmp_path):
    img = tmp_path / "x.jpg"
    img.write_bytes(encode(photo(0)))
    # The model folder does not exist: the flag is checked first, before any loading.
    r = run("infer.py", img, "--model", tmp_path / "no-model", "--decoder", "gpu")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == ("infer.py: error: --decoder gpu: decodes on a CUDA GPU, but no CUDA GPU is "
                                "available here; use --decoder cpu or auto")


def test_infer_main_runs_the_gpu_path_with_the_stand_in(trained, tmp_path, monkeypatch, capsys):
    files = {"a.jpg": encode(photo(30)), "b.png": encode(photo(31), "PNG"), "c.jpg": encode(photo(32))[:-300],
             "d.jpg": encode(photo(33))}
    names = write_files(tmp_path, files)
    made = {}

    def make_decoder(flag, prep, device):
        assert flag == "gpu" and device.type == "cpu"
        made["decoder"] = StandIn(prep, names)
        return made["decoder"], ""

    monkeypatch.setattr(gpu_decode, "decoder_kind", lambda flag, device: "gpu")  # as on a CUDA machine
    monkeypatch.setattr(gpu_decode, "make_decoder", make_decoder)
    paths = [str(tmp_path / n) for n in files]
    code = infer_main([*paths, "--model", str(trained), "--json", "--top-k", "2", "--decoder", "gpu",
                       "--batch-size", "3"])
    out, err = capsys.readouterr()
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"infer.py: error: {paths[2]}: cannot decode")
    assert [json.loads(line)["image"] for line in out.splitlines()] == [paths[0], paths[1], paths[3]]
    assert made["decoder"].calls == [(["a.jpg"], True), (["d.jpg"], True)]


def test_compile_gives_the_eager_results(trained, tmp_path, capsys):
    model = tmp_path / "model"  # a copy: compiling changes the loaded model in place, kept for this folder only
    shutil.copytree(trained, model, ignore=shutil.ignore_patterns("checkpoints"))
    paths = drawn_jpegs(tmp_path / "photos", 5, seed=9)
    runs = []
    for flags in ([], ["--compile"]):
        assert infer_main([*paths, "--model", str(model if flags else trained), "--json", "--top-k", "3", *flags]) == 0
        runs.append([json.loads(line) for line in capsys.readouterr().out.splitlines()])
    for eager, compiled in zip(*runs):
        assert [p["label"] for p in compiled["predictions"]] == [p["label"] for p in eager["predictions"]]
        assert [p["score"] for p in compiled["predictions"]] == pytest.approx(
            [p["score"] for p in eager["predictions"]], abs=1e-4)


@pytest.mark.bench
def test_bench_infer_folder_smoke(tmp_path):
    jsonl = tmp_path / "results.jsonl"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_infer.py"), "folder", "--smoke",
                        "--work", str(tmp_path), "--jsonl", str(jsonl)], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    jobs = ["vitfood infer.py, CPU decode (PIL)", "transformers.pipeline"]
    if torch.cuda.is_available():
        jobs = ["vitfood infer.py, GPU decode", jobs[0], "transformers.pipeline, bf16 autocast"]
    assert [row["job"] for row in rows] == jobs
    for row in rows:
        assert row["images"] == 22 and row["batch"] == 8 and row["images/s"] > 0 and row["model"] == "ViT-tiny"
    assert rows[-1]["vs pipeline"] == 1.0
    table = [line for line in r.stdout.splitlines() if line.startswith("|")]
    assert table[0] == "| job | model | images | batch | seconds | images/s | vs pipeline |"
    assert len(table) == 2 + len(rows) and r.stdout.rstrip().endswith(table[-1])
