"""Inference: the minimal argmax `predict`, `classify`, which returns the pipeline's top-k format,
and what infer.py needs for many inputs: `expand_inputs` (folders, globs, URLs) and `classify_stream`
(batches, decoded by a few threads while the model runs, one result per input, in input order).
With a GPU decoder (`vitfood.gpu_decode`) the stream decodes JPEGs in batches on the GPU instead.

Imports neither transformers, datasets nor torchvision, so a cold `python infer.py photo.jpg`
costs little more than importing torch.
"""

from __future__ import annotations

import glob
import os
import queue
import re
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vitfood import gpu_decode  # no torchvision: that comes with a decoder, made only for the GPU path
from vitfood.distributed import autocast, usable_cores
from vitfood.errors import VitfoodError
from vitfood.hub import resolve_model_dir
from vitfood.model import ViT, load_model
from vitfood.paths import DEFAULT_OUTPUT_DIR as DEFAULT_MODEL_DIR
from vitfood.paths import extensions_text, images_under, is_image_name
from vitfood.preprocess import BadImageError, Preprocessing, load_preprocessing, load_rgb


@dataclass
class Classifier:
    model: ViT
    prep: Preprocessing
    labels: list[str]
    device: torch.device

    def logits(self, images: list) -> torch.Tensor:
        """Paths, bytes or PIL images -> float32 logits [N, classes]."""
        return self.logits_of_pixels(np.stack([self.pixels(im) for im in images]))

    def pixels(self, image) -> np.ndarray:
        """Decode and resize one image (path, bytes or PIL image) -> uint8 [H, W, 3]. Thread-safe."""
        return self.prep.eval_resize(load_rgb(image))

    def logits_of_pixels(self, pixels: np.ndarray, precision: str = "fp32") -> torch.Tensor:
        """uint8 [N, H, W, 3] from `pixels` -> float32 logits [N, classes]; bf16/fp16 run under autocast."""
        return self.logits_of_batch(torch.from_numpy(pixels), precision)

    @torch.no_grad()
    def logits_of_batch(self, batch: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """uint8 [N, H, W, 3] on any device (the GPU decoder's are on the model's already) -> float32 logits."""
        x = self.prep.normalize(batch.to(self.device))
        with autocast(self.device, precision):
            return self.model(x).float()


_loaded: dict[tuple[str, str], Classifier] = {}


def load_classifier(model_dir: str | Path = DEFAULT_MODEL_DIR, device: str = "cpu") -> Classifier:
    """Load a trained model once per (folder, device); later calls reuse it."""
    key = (str(Path(model_dir).expanduser().resolve()) if Path(model_dir).expanduser().exists() else str(model_dir), device)
    if key not in _loaded:
        path = resolve_model_dir(str(model_dir))
        model, _ = load_model(path)  # labels=None: the checkpoint's own trained head
        prep = load_preprocessing(path, model.arch.image_size)
        dev = torch.device(device)
        _loaded[key] = Classifier(model.to(dev).eval(), prep, model.arch.labels, dev)
    return _loaded[key]


def predict(image, model_dir: str | Path = DEFAULT_MODEL_DIR) -> str:
    """The label of one image: preprocess, forward, argmax, id2label."""
    clf = load_classifier(model_dir)
    return clf.labels[int(clf.logits([image])[0].argmax())]


def topk_predictions(logits: torch.Tensor, labels: list[str], k: int) -> list[list[dict]]:
    """Softmax scores, highest first: [{"label", "score"}, ...] per row, as transformers' pipeline."""
    probs = logits.softmax(dim=-1)
    scores, ids = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return [[{"label": labels[i], "score": s} for s, i in zip(row_s.tolist(), row_i.tolist())]
            for row_s, row_i in zip(scores, ids)]


def classify(images, model_dir: str | Path = DEFAULT_MODEL_DIR, top_k: int = 5, batch_size: int = 32,
             device: str = "cpu"):
    """Top-k labels with softmax scores. One image -> a list of dicts; a list of images -> a list of those."""
    clf = load_classifier(model_dir, device)
    single = not isinstance(images, (list, tuple))
    batch = [images] if single else list(images)
    out: list[list[dict]] = []
    for i in range(0, len(batch), batch_size):
        out += topk_predictions(clf.logits(batch[i : i + batch_size]), clf.labels, top_k)
    return out[0] if single else out


# ---------------------------------------------------------------- infer.py: many inputs

MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024  # a URL's body is held in memory: refuse anything larger
_URL = re.compile(r"^https?://", re.IGNORECASE)
_GLOB_MAGIC = re.compile(r"[*?[]")


def is_url(arg: str) -> bool:
    return bool(_URL.match(arg))


class NoImagesError(VitfoodError):
    """A folder or glob argument that holds no image files."""

    def __init__(self, arg: str, message: str):
        super().__init__(message)
        self.arg = arg


def expand_inputs(args: Iterable[str]) -> list[str | NoImagesError]:
    """infer.py's arguments -> the images to classify, in argument order.

    A URL (http, https) stays as is; a folder becomes the image files in it and below; an argument
    that is no existing path but holds `*`, `?` or `[` is a glob (`**` spans folders), expanded
    sorted, keeping image files and searching matched folders. Within one argument a file is listed
    once; across arguments repeats are kept, as when the shell expands the pattern. Anything else
    is taken as an image file (a missing one fails when it is read). A folder or glob without images
    becomes a NoImagesError in its place.
    """
    out: list[str | NoImagesError] = []
    for arg in args:
        if is_url(arg):
            out.append(arg)
        elif os.path.isdir(arg):
            out += images_under(arg) or [NoImagesError(
                arg, f"{arg}: no image files in this folder or below ({extensions_text()})")]
        elif _GLOB_MAGIC.search(arg) and not os.path.lexists(arg):
            found: dict[str, None] = {}  # ordered set: `**` can reach a file twice (itself, and via its folder)
            for m in sorted(glob.glob(arg, recursive=True)):
                if os.path.isdir(m):
                    found.update(dict.fromkeys(images_under(m)))
                elif is_image_name(m):
                    found[m] = None
            out += list(found) or [NoImagesError(arg, f"{arg}: matches no image files ({extensions_text()})")]
        else:
            out.append(arg)
    return out


def fetch_url(url: str, timeout: float, max_bytes: int = MAX_DOWNLOAD_BYTES) -> tuple[bytes, str]:
    """GET an http(s) URL -> (body, Content-Type). Any failure is one BadImageError naming the URL.

    `timeout` bounds the connection, each wait for data, and (checked between reads) the whole download.
    """
    import http.client
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    req = urllib.request.Request(url, headers={"User-Agent": "vitfood-infer/1", "Accept": "image/*,*/*;q=0.5"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise BadImageError(f"{url}: refused, {int(length) / 2**20:.0f} MB is more than the "
                                    f"{max_bytes / 2**20:.0f} MB limit for a downloaded image")
            chunks, size = [], 0
            while chunk := resp.read1(1 << 16):  # read1: returns what one recv brings, so the deadline is checked
                chunks.append(chunk)
                size += len(chunk)
                if size > max_bytes:
                    raise BadImageError(f"{url}: refused, larger than the {max_bytes / 2**20:.0f} MB limit "
                                        f"for a downloaded image")
                if time.monotonic() > deadline:
                    raise TimeoutError
            return b"".join(chunks), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        raise BadImageError(f"{url}: HTTP error {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError):
            raise BadImageError(f"{url}: timed out after {timeout:g} s (--timeout)") from None
        raise BadImageError(f"{url}: cannot download ({e.reason})") from None
    except TimeoutError:
        raise BadImageError(f"{url}: timed out after {timeout:g} s (--timeout)") from None
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise BadImageError(f"{url}: cannot download ({type(e).__name__}: {e})") from None


def decode_source(clf: Classifier, source: str, timeout: float) -> np.ndarray:
    """A path or URL -> the model's uint8 pixels; BadImageError naming the path or URL otherwise."""
    content_type = ""
    try:
        if not is_url(source):
            return clf.pixels(source)
        body, content_type = fetch_url(source, timeout)
        return clf.pixels(body)
    except BadImageError as e:
        if not is_url(source) or str(e).startswith(source):
            raise
        why = str(e).removeprefix("<image bytes>: ")
        sent = f" (the server sent {content_type})" if content_type and not content_type.startswith("image/") else ""
        raise BadImageError(f"{source}: {why}{sent}") from None
    except (MemoryError, RecursionError):
        raise
    except Exception as e:  # a decoder's own bug on a hostile file: still only this image's loss
        raise BadImageError(f"{source}: cannot decode ({type(e).__name__}: {e})") from None


@dataclass
class Result:
    """One line of infer.py's output: an image and its top-k predictions, or why it has none."""

    image: str
    predictions: list[dict] | None = None
    error: VitfoodError | None = None


def decode_threads() -> int:
    """Threads that read and decode images while the model runs (PIL and urllib release the GIL)."""
    return max(1, min(8, usable_cores()))  # no more than the cores: they share them with the model's own threads


class _DecodePool:
    """A few daemon threads running jobs as Futures. Unlike ThreadPoolExecutor's threads, they never
    hold up the exit: Ctrl-C while a server is silent ends infer.py at once, not after --timeout."""

    def __init__(self, threads: int):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = threads
        for i in range(threads):
            threading.Thread(target=self._work, name=f"vitfood-decode-{i}", daemon=True).start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            if future.set_running_or_notify_cancel():  # False: cancelled while it waited
                try:
                    future.set_result(fn(*args))
                except BaseException as e:
                    future.set_exception(e)

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future

    def close(self) -> None:
        for _ in range(self._threads):
            self._jobs.put(None)


def compile_model(clf: Classifier) -> None:
    """torch.compile the model's blocks in place, as train.py does: one compilation serves all of them.
    Seconds up front (and once more for the first batch of another size), for faster batches on a GPU."""
    for block in clf.model.blocks:
        block.compile()


def _collect(batch: list, jobs: list) -> tuple[list[Result], dict[int, object]]:
    """A batch's read-ahead jobs -> a Result per entry (errors filled in) and {entry: what its job gave}."""
    results: list[Result] = []
    ready: dict[int, object] = {}
    for entry, job in zip(batch, jobs):
        if isinstance(job, NoImagesError):
            results.append(Result(job.arg, error=job))
            continue
        try:
            ready[len(results)] = job.result()
            results.append(Result(entry))
        except BadImageError as e:
            results.append(Result(entry, error=e))
    return results, ready


def _cancel(jobs) -> None:
    for job in jobs:
        if isinstance(job, Future):
            job.cancel()


# classify_stream's two ways of turning a batch of inputs into pixels. start(batch) sets its reading and decoding
# going (called a batch ahead); finish(batch, started) -> (a Result per entry, the entries with pixels, their
# uint8 [N, H, W, 3] pixels); cancel(started) drops what has not begun; close() ends their own threads.


class _PilBatches:
    """The CPU path: every image read, decoded and resized by PIL in the pool's threads, on its own."""

    def __init__(self, clf: Classifier, pool: _DecodePool, timeout: float):
        self.clf, self.pool, self.timeout = clf, pool, timeout
        self.decode_cpu_seconds: list[float] = []  # one entry per image, appended by the pool's threads
        self.measuring = False  # while a _CoreShare needs the decoding's costs

    def start(self, batch: list) -> list[Future | NoImagesError]:
        return [x if isinstance(x, NoImagesError) else self.pool.submit(self._decode, x) for x in batch]

    def _decode(self, source: str) -> np.ndarray:
        started = time.thread_time()
        try:
            return decode_source(self.clf, source, self.timeout)
        finally:
            if self.measuring:
                self.decode_cpu_seconds.append(time.thread_time() - started)

    def finish(self, batch: list, jobs: list) -> tuple[list[Result], list[int], torch.Tensor | None]:
        results, ready = _collect(batch, jobs)
        return results, list(ready), torch.from_numpy(np.stack(list(ready.values()))) if ready else None

    def cancel(self, jobs: list) -> None:
        _cancel(jobs)

    def close(self) -> None:
        pass


@dataclass
class _Jpeg:
    """A file the GPU decoder takes: its bytes, and what it will decode to (for sizing the decoder's calls)."""

    source: str
    data: torch.Tensor  # uint8 [bytes] on the CPU
    pixels: int


def _read_ahead(clf: Classifier, source: str, timeout: float):
    """A pool job of the GPU path: a JPEG the GPU takes -> its bytes; any other input -> its pixels, decoded
    here by the CPU path (or its BadImageError)."""
    if not is_url(source) and (data := gpu_decode.read_jpeg(source)) is not None:
        route = gpu_decode.route(data)
        if route.where == "gpu":
            return _Jpeg(source, torch.frombuffer(data, dtype=torch.uint8), route.pixels)
    return decode_source(clf, source, timeout)


class _GpuBatches:
    """The GPU path: the pool's threads read each file and route it; JPEGs the GPU takes are decoded and
    resized in batches by `decoder` on one thread of its own, so batch k+1 is decoded while the model
    runs batch k; the others are decoded by the CPU path in the pool's threads, as in `_PilBatches`."""

    def __init__(self, clf: Classifier, pool: _DecodePool, timeout: float, decoder):
        self.clf, self.pool, self.timeout, self.decoder = clf, pool, timeout, decoder
        self.gpu = _DecodePool(1)
        self.handoff = gpu_decode.stream_handoff(clf.device)  # the decoding thread's own CUDA stream; None on the CPU

    def start(self, batch: list) -> tuple[list, Future]:
        jobs = [x if isinstance(x, NoImagesError) else self.pool.submit(_read_ahead, self.clf, x, self.timeout)
                for x in batch]
        return jobs, self.gpu.submit(self._assemble, batch, jobs)

    def finish(self, batch: list, started: tuple[list, Future]):
        results, good, pixels, event = started[1].result()
        if event is not None:  # on the model's thread: its stream waits until the batch is made
            pixels = self.handoff.received(pixels, event)
        return results, good, pixels

    def cancel(self, started: tuple[list, Future]) -> None:
        _cancel([*started[0], started[1]])

    def close(self) -> None:
        self.gpu.close()

    def _assemble(self, batch: list, jobs: list) -> tuple[list[Result], list[int], torch.Tensor | None, object]:
        """On the decoder's thread: the batch's Results, its good images' pixels on the model's device, and the
        event the model's stream waits on before reading them (None on the CPU)."""
        results, ready = _collect(batch, jobs)
        with self.handoff.producing() if self.handoff else nullcontext():
            good, pixels = self._decode(results, ready)
            event = self.handoff.sent() if self.handoff and pixels is not None else None
        return results, good, pixels, event

    def _decode(self, results: list[Result], ready: dict) -> tuple[list[int], torch.Tensor | None]:
        """The GPU's JPEGs decoded in chunks, the rest's pixels joined to them -> (the entries with pixels, their
        batch); an image no decoder takes gets its error in `results`."""
        jpegs = [i for i, v in ready.items() if isinstance(v, _Jpeg)]
        for chunk in gpu_decode.chunks_by_pixels([ready[i].pixels for i in jpegs]):
            rows = [jpegs[k] for k in chunk]
            sources = [ready[i].source for i in rows]
            decoded = gpu_decode.decode_each(self.decoder, [ready[i].data for i in rows],
                                             lambda k: self._on_cpu(sources[k]))
            for i, pixels in zip(rows, decoded):
                if isinstance(pixels, BadImageError):
                    results[i].error = pixels
                    del ready[i]
                else:
                    ready[i] = pixels
        if not ready:
            return [], None
        return list(ready), self._stack(list(ready.values()))

    def _on_cpu(self, source: str):
        """The CPU path for a JPEG the GPU decoder refused: its pixels, or the BadImageError naming it."""
        try:
            return decode_source(self.clf, source, self.timeout)
        except BadImageError as e:
            return e

    def _stack(self, rows: list) -> torch.Tensor:
        """Device tensors and CPU-decoded arrays (uint8 [H, W, 3]) -> one uint8 batch on the device, in order;
        the arrays travel to the device together."""
        on_cpu = [k for k, r in enumerate(rows) if isinstance(r, np.ndarray)]
        if on_cpu:
            moved = torch.from_numpy(np.stack([rows[k] for k in on_cpu])).to(self.clf.device)
            for k, pixels in zip(on_cpu, moved):
                rows[k] = pixels
        return torch.stack(rows)


def math_threads(decode_cpu_seconds: float, model_cpu_seconds: float, threads: int) -> int:
    """The model's math threads while the pool decodes on the same CPU cores, from each side's CPU
    seconds an image: its share of `threads` follows its share of the work, at least one.

    A math thread the model keeps busy-waits between kernels, taking a core from the decoders. On 2
    cores with Food-101-size JPEGs (4 ms of decoding an image), ViT-B's 0.5 CPU seconds of math an
    image keep both threads; a tiny ViT's 8 ms get one, which ran the stream 1.2x faster
    (benchmarks/RESULTS.md).
    """
    total = decode_cpu_seconds + model_cpu_seconds
    if total <= 0:
        return threads
    return max(1, min(threads, round(threads * model_cpu_seconds / total)))


class _CoreShare:
    """On the CPU: after the first batches, gives the model as many math threads as its share of the
    work calls for (`math_threads`), and the process its own number back when the stream ends.

    torch's thread count belongs to the whole process: two streams at once in one process share it, and
    the one that ends first leaves it as the other set it; each gives back only what it set itself.
    """

    MEASURED_BATCHES = 2  # after the first, whose time includes the kernels' one-off set-up

    def __init__(self, stage: _PilBatches):
        self.stage, self.model_seconds, self.images, self.batches = stage, 0.0, 0, 0
        self.threads_before, self.threads_set = torch.get_num_threads(), None
        stage.measuring = True

    def model_ran(self, seconds: float, images: int) -> None:
        self.batches += 1
        if self.batches == 1:
            return
        self.model_seconds, self.images = self.model_seconds + seconds, self.images + images
        if self.batches == 1 + self.MEASURED_BATCHES:
            self.stage.measuring = False
            decoded = self.stage.decode_cpu_seconds
            # Wall time x threads: the model's CPU seconds at most (its threads also wait on one another).
            model_cpu = self.model_seconds / self.images * self.threads_before
            self.threads_set = math_threads(sum(decoded) / len(decoded), model_cpu, self.threads_before)
            torch.set_num_threads(self.threads_set)

    def close(self) -> None:
        if self.threads_set is not None and torch.get_num_threads() == self.threads_set:
            torch.set_num_threads(self.threads_before)


def classify_stream(clf: Classifier, inputs: list[str | NoImagesError], top_k: int = 5, batch_size: int = 32,
                    timeout: float = 30.0, precision: str = "fp32",
                    threads: int | None = None, decoder=None) -> Iterator[Result]:
    """Classify `expand_inputs`' list in batches -> one Result per entry, in order.

    Every image is read and decoded on its own, so a bad one costs only its own Result; the good
    ones of a batch go through the model together. The next batch is decoded while this one runs,
    so at most two batches of pixels are held.

    `decoder` (`vitfood.gpu_decode.TorchJpegDecoder` or a stand-in): JPEGs that `gpu_decode.route` sends
    to the GPU are decoded and resized by it, a batch at a time; None: every image by PIL.
    """
    batches = [inputs[i : i + batch_size] for i in range(0, len(inputs), batch_size)]
    pool = _DecodePool(threads or decode_threads())
    stage = _PilBatches(clf, pool, timeout) if decoder is None else _GpuBatches(clf, pool, timeout, decoder)
    share = _CoreShare(stage) if decoder is None and clf.device.type == "cpu" else None
    current = pending = None
    try:
        pending = stage.start(batches[0]) if batches else None
        for k, batch in enumerate(batches):
            current, pending = pending, stage.start(batches[k + 1]) if k + 1 < len(batches) else None
            results, good, pixels = stage.finish(batch, current)
            if good:
                model_started = time.perf_counter()
                logits = clf.logits_of_batch(pixels, precision)
                if share:
                    share.model_ran(time.perf_counter() - model_started, len(good))
                for i, preds in zip(good, topk_predictions(logits, clf.labels, top_k)):
                    results[i].predictions = preds
            yield from results
    finally:  # also on an early exit (Ctrl-C, a closed pipe): skip what is still queued
        for started in (current, pending):
            if started:
                stage.cancel(started)
        stage.close()
        pool.close()
        if share:
            share.close()
