"""infer.py's GPU path: JPEGs decoded in batches by the GPU's JPEG decoder (nvJPEG, through torchvision)
and resized there with the checkpoint's filter.

- `route`: which files the GPU may take. Pure: it reads only the JPEG's header (and its last two bytes).
  The GPU gets a file only when its header shows nothing that PIL would show differently (rotation,
  colour model, progressive coding; nvJPEG's own rounding against libjpeg's is unmeasured); everything else (PNG, WebP, progressive, greyscale or CMYK JPEGs, EXIF-rotated photos,
  truncated or corrupt files) goes to the CPU path, which decodes it as it always has, or names the
  file in its error.
- `TorchJpegDecoder`: the "decoder" the stream calls, a batch of JPEG bytes in, the model's uint8
  pixels out. On a CUDA device it is the GPU path; on the CPU (torchvision's libjpeg-turbo decode and
  the same resize) it is the stand-in that tests the GPU path's logic and agreement without a GPU.
- `decode_each`: a batch through a decoder, retried image by image when the decoder refuses it as a
  whole (nvJPEG fails the batch for one bad file), so one bad file never costs its neighbours.
- `StreamHandoff`: the decoding thread's own CUDA stream, and the hand-over of its pixels to the thread
  that runs the model (an event to wait on, the tensor recorded on the model's stream).

Imports no torchvision until a decoder is made: `infer.py photo.jpg` on the CPU never needs it.
"""

from __future__ import annotations

import re
import struct
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image

from vitfood.errors import VitfoodError, first_line
from vitfood.preprocess import Preprocessing

# ---------------------------------------------------------------- routing


class Route(NamedTuple):
    where: str  # "gpu" or "cpu"
    why: str  # for "cpu": what the GPU decoder would get wrong or cannot take; "" for "gpu"
    pixels: int = 0  # width x height, for "gpu": what decoding it will take of the GPU's memory


_SOI = b"\xff\xd8"
_EOI = b"\xff\xd9"
_SOS = 0xDA
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # C4, C8, CC are not frames
_PROGRESSIVE = {0xC2, 0xC6, 0xCA, 0xCE}
_NO_LENGTH = {0x01, *range(0xD0, 0xD8)}  # TEM and the restart markers stand alone
_EXIF = b"Exif\0\0"
_XMP = b"http://ns.adobe.com/xap/1.0/\x00"
_XMP_ORIENTATION = re.compile(rb'tiff:Orientation(="|>)([0-9])')  # the pattern Pillow's getexif reads


def _cpu(why: str) -> Route:
    return Route("cpu", why)


@dataclass
class _Header:
    """What `route` needs of a JPEG's segments before its first scan."""

    frame_marker: int = 0  # SOF0 (0xC0) for baseline
    frame: bytes = b""  # the SOF segment: precision, height, width, components
    jfif: bool = False
    adobe_transform: int | None = None
    exif_blocks: int = 0
    orientation: int | None = 1  # None: an EXIF block that cannot be read
    xmp_rotated: bool = False


def _read_header(data: bytes | bytearray) -> _Header | str:
    """The marker segments from SOI to the first scan -> a _Header, or why they cannot be read."""
    h = _Header()
    pos = 2
    while True:
        while pos + 1 < len(data) and data[pos] == 0xFF and data[pos + 1] == 0xFF:
            pos += 1  # fill bytes
        if pos + 4 > len(data):
            return "header cut short"
        if data[pos] != 0xFF:
            return "corrupt header"
        marker = data[pos + 1]
        if marker == _SOS:
            return h if h.frame else "no frame header"
        if marker in _NO_LENGTH:
            pos += 2
            continue
        length = data[pos + 2] << 8 | data[pos + 3]
        segment = data[pos + 4 : pos + 2 + length]
        if length < 2 or marker == _EOI[1]:
            return "corrupt header"
        if len(segment) != length - 2:
            return "header cut short"
        if marker in _SOF:
            if h.frame or len(segment) < 6:
                return "corrupt frame header"
            h.frame_marker, h.frame = marker, bytes(segment)
        elif marker == 0xE0 and segment.startswith(b"JFIF\0"):
            h.jfif = True
        elif marker == 0xE1 and segment.startswith(_EXIF):
            h.exif_blocks += 1  # Pillow joins several: `route` leaves such files to it
            h.orientation = _exif_orientation(segment[len(_EXIF):])
        elif marker == 0xE1 and segment.startswith(_XMP):
            m = _XMP_ORIENTATION.search(segment)
            h.xmp_rotated = bool(m) and m[2] != b"1"  # Pillow's fallback when EXIF has no orientation
        elif marker == 0xEE and segment.startswith(b"Adobe") and len(segment) >= 12:
            h.adobe_transform = segment[11]
        pos += 2 + length


def route(data: bytes | bytearray) -> Route:
    """Where a file is decoded: "gpu" only for an 8-bit baseline YCbCr JPEG that is shown as stored.

    `data` is the whole file; only the segments before the image data are read, and the last two bytes.
    Longer than 60 lines on purpose: one flat list of checks, one per way the GPU's decode could differ
    from PIL's, reads better in one place than scattered over helpers.
    """
    if not data.startswith(_SOI + b"\xff"):
        return _cpu("not a JPEG")
    h = _read_header(data)
    if isinstance(h, str):
        return _cpu(h)
    if h.frame_marker in _PROGRESSIVE:
        return _cpu("progressive JPEG")
    if h.frame_marker != 0xC0:
        return _cpu(f"not a baseline JPEG (SOF{h.frame_marker - 0xC0})")
    sof = h.frame
    precision, height, width, components = sof[0], sof[1] << 8 | sof[2], sof[3] << 8 | sof[4], sof[5]
    if precision != 8:
        return _cpu(f"{precision}-bit samples")
    if components != 3 or len(sof) < 6 + 3 * components:
        return _cpu("greyscale" if components == 1 else "CMYK" if components == 4 else f"{components} components")
    ids, sampling = sof[6:15:3], sof[7:15:3]  # each component: id, sampling factors, table
    if h.adobe_transform == 0 or (not h.jfif and h.adobe_transform is None and ids == b"RGB"):
        return _cpu("RGB-coded, not YCbCr")  # libjpeg's own test; nvJPEG would convert it as YCbCr
    if sampling[1] != 0x11 or sampling[2] != 0x11:
        return _cpu("unusual chroma sampling")
    if width == 0 or height == 0:
        return _cpu("no size in the frame header")
    if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
        return _cpu("very large")  # Pillow's decompression-bomb policy decides
    if h.exif_blocks > 1 or h.orientation is None:
        return _cpu("unreadable EXIF")
    if h.orientation != 1:
        return _cpu(f"EXIF orientation {h.orientation}")
    if h.xmp_rotated:
        return _cpu("XMP orientation")
    if not data.endswith(_EOI):
        return _cpu("no end marker (truncated, or data after the picture)")
    return Route("gpu", "", width * height)


def _exif_orientation(tiff: bytes | bytearray) -> int | None:
    """IFD0's Orientation tag of an EXIF block (1 when absent); None when the block cannot be read."""
    try:
        order = {b"II*\0": "<", b"MM\0*": ">"}[bytes(tiff[:4])]
        (ifd,) = struct.unpack_from(order + "I", tiff, 4)
        (count,) = struct.unpack_from(order + "H", tiff, ifd)
        for k in range(count):
            entry = ifd + 2 + 12 * k
            tag, kind, n = struct.unpack_from(order + "HHI", tiff, entry)
            if tag == 0x0112:
                return struct.unpack_from(order + "H", tiff, entry + 8)[0] if (kind, n) == (3, 1) else None
        return 1
    except (KeyError, struct.error):
        return None


def read_jpeg(path: str) -> bytearray | None:
    """A file's bytes when it starts as a JPEG does; None for any other file, or one that cannot be read
    (the CPU path then reads it, and names it in its error). A bytearray: torch.frombuffer wants it writable."""
    try:
        with open(path, "rb") as f:
            if f.read(2) != _SOI:
                return None
            f.seek(0)
            return bytearray(f.read())
    except OSError:
        return None


# ---------------------------------------------------------------- decode and resize

# PIL filter -> torch's. LANCZOS, HAMMING and BOX have no torch counterpart: the nearest in sharpness.
_TORCH_MODE = {
    Image.Resampling.NEAREST: "nearest-exact",  # the pixel under the centre, as PIL's (bar float rounding)
    Image.Resampling.BILINEAR: "bilinear",
    Image.Resampling.BICUBIC: "bicubic",  # both use a = -0.5 with antialiasing
    Image.Resampling.LANCZOS: "bicubic",
    Image.Resampling.HAMMING: "bilinear",
    Image.Resampling.BOX: "bilinear",
}

DECODE_PIXELS_PER_CALL = 128 * 2**20  # a decoder call holds 3 bytes a pixel decoded, 12 while resizing


def _resample(x: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    """float [N, 3, h, w] holding 8-bit values -> [N, 3, height, width], rounded to 8-bit values.

    PIL resizes in two passes, rounding to 8 bits in between, horizontally first in its classic code
    (Pillow 13 sometimes runs the vertical pass first). The same two passes here, horizontal first,
    keep most pixels equal to PIL's and the rest a level or two off; torch's one 2-D pass is off on
    more pixels, by up to 5 levels with bicubic.
    """
    kwargs = {} if mode == "nearest-exact" else {"antialias": True, "align_corners": False}
    if x.shape[-1] != width:
        x = F.interpolate(x, size=(x.shape[-2], width), mode=mode, **kwargs).round_().clamp_(0, 255)
    if x.shape[-2] != height:
        x = F.interpolate(x, size=(height, width), mode=mode, **kwargs).round_().clamp_(0, 255)
    return x


def resize_to_model(images: Sequence[torch.Tensor], prep: Preprocessing) -> torch.Tensor:
    """Decoded pictures (uint8 [3, h, w], any sizes, on one device) -> uint8 [N, H, W, 3], as eval_resize.

    Pictures of one size are resized together: a folder of photos from one camera costs a few kernels.
    """
    out = torch.empty((len(images), prep.height, prep.width, 3), dtype=torch.uint8, device=images[0].device)
    by_size: dict[tuple, list[int]] = defaultdict(list)
    for i, im in enumerate(images):
        by_size[tuple(im.shape)].append(i)
    mode = _TORCH_MODE[Image.Resampling(prep.resample)]
    for (_, h, w), rows in by_size.items():
        rw, rh, left, top = prep.resize_box(w, h)
        x = _resample(torch.stack([images[i] for i in rows]).float(), rh, rw, mode)
        # The centre crop of a shortest_edge resize; negative padding crops, positive fills with black as PIL's crop.
        x = F.pad(x, (-left, left + prep.width - rw, -top, top + prep.height - rh))
        out[rows] = x.permute(0, 2, 3, 1).to(torch.uint8)
    return out


class TorchJpegDecoder:
    """JPEG bytes (uint8 tensors on the CPU) -> the model's uint8 pixels [N, H, W, 3] on `device`.

    torchvision's decode_jpeg: nvJPEG on a CUDA device (batched, on the GPU's hardware decoder where
    it has one), libjpeg-turbo on the CPU; then `resize_to_model`. Raises for the whole batch when
    any of its images fails. Thread-safe (torchvision serialises its CUDA decoder).
    """

    def __init__(self, prep: Preprocessing, device: torch.device | str):
        import warnings

        # torchvision 0.29 deprecates its image codecs for TorchCodec; they still work, and infer.py's stderr
        # is for the user's images.
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                                category=DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

        self.prep, self.device = prep, torch.device(device)
        self._decode, self._rgb = decode_jpeg, ImageReadMode.RGB

    def __call__(self, encoded: list[torch.Tensor]) -> torch.Tensor:
        if self.device.type == "cuda":
            # torchvision allocates nvJPEG's outputs on this thread's stream but writes them on a stream of its
            # own, which does not wait for this one: memory that this stream's queued kernels (the previous
            # call's resize) still read must be free before it can be handed to nvJPEG.
            torch.cuda.current_stream(self.device).synchronize()
        return resize_to_model(self._decode(encoded, mode=self._rgb, device=self.device), self.prep)


def decode_each(decoder: Callable[[list[torch.Tensor]], torch.Tensor], encoded: list[torch.Tensor],
                fallback: Callable[[int], object]) -> list:
    """Each image's pixels (uint8 [H, W, 3]) in order, through `decoder` as one batch.

    When the decoder refuses the batch, each image is tried alone, and one it refuses alone is
    `fallback(i)`'s (the CPU path): a bad file costs its own decode, never its neighbours'.
    """
    if len(encoded) > 1:
        try:
            return list(decoder(encoded))
        except Exception:  # noqa: BLE001 - nvJPEG says only that the batch failed: find the file below
            pass
    out = []
    for i, one in enumerate(encoded):
        try:
            out.append(decoder([one])[0])
        except Exception:  # noqa: BLE001 - any refusal (corrupt data, out of memory) is this image's alone
            out.append(fallback(i))
    return out


class StreamHandoff:
    """Pixels decoded on the GPU by a background thread, handed to the thread that runs the model (issue 17, 1.5).

    The caching allocator reuses freed memory at once for a new tensor on the same stream, trusting that
    stream's order; nvJPEG writes on a stream of torchvision's own, outside that order. Were the decoding
    thread on the model's stream, nvJPEG could be handed memory that the model's queued kernels still read:
    silently wrong pixels. So each decoding thread works on its own stream (`producing`), records an event
    when its batch is made (`sent`), and the consumer's stream waits on that event, with the batch recorded
    as used there (`received`) so that its memory is not reused before the consumer's kernels are done.
    `cuda` is torch.cuda; the tests pass a fake one that records the calls.
    """

    def __init__(self, device: torch.device, cuda=torch.cuda):
        self.device, self.cuda = device, cuda
        self._local = threading.local()  # each decoding thread its own stream

    def _stream(self):
        if getattr(self._local, "stream", None) is None:
            self._local.stream = self.cuda.Stream(self.device)
        return self._local.stream

    @contextmanager
    def producing(self):
        """The calling thread's own stream made current for the work inside."""
        with self.cuda.stream(self._stream()):
            yield

    def sent(self):
        """An event recorded on the calling thread's stream after the batch's work, for the consumer to wait on."""
        event = self.cuda.Event()
        event.record(self._stream())
        return event

    def received(self, pixels: torch.Tensor, event) -> torch.Tensor:
        """On the consumer's thread: its stream waits for the event; the tensor is marked as used there."""
        consumer = self.cuda.current_stream(self.device)
        consumer.wait_event(event)
        pixels.record_stream(consumer)
        return pixels


def stream_handoff(device: torch.device) -> StreamHandoff | None:
    """The hand-over of decoded pixels between threads on a CUDA device; None on the CPU, where there are no streams."""
    return StreamHandoff(device) if device.type == "cuda" else None


def chunks_by_pixels(pixels: list[int], budget: int = DECODE_PIXELS_PER_CALL) -> list[range]:
    """Consecutive index ranges whose pixels sum to at most `budget` (at least one image each): a batch
    of 256 phone photos is decoded a few at a time, a batch of 256 Food-101 photos in one call."""
    out, start, total = [], 0, 0
    for i, p in enumerate(pixels):
        if i > start and total + p > budget:
            out.append(range(start, i))
            start, total = i, 0
        total += p
    if start < len(pixels):
        out.append(range(start, len(pixels)))
    return out


# ---------------------------------------------------------------- --decoder


def decoder_kind(flag: str, device: torch.device) -> str:
    """--decoder auto|gpu|cpu on this device -> "gpu" or "cpu"; auto: gpu when the model runs on a CUDA GPU."""
    if flag == "gpu" and device.type != "cuda":
        where = ("the model runs on the CPU (--device cpu)" if torch.cuda.is_available()
                 else "no CUDA GPU is available here")
        raise VitfoodError(f"--decoder gpu: decodes on a CUDA GPU, but {where}; use --decoder cpu or auto")
    return "gpu" if flag == "gpu" or (flag == "auto" and device.type == "cuda") else "cpu"


def make_decoder(flag: str, prep: Preprocessing, device: torch.device) -> tuple[TorchJpegDecoder | None, str]:
    """--decoder -> (the GPU decoder, or None for the CPU path; a note for stderr, or "").

    The GPU decoder is tried once on a small JPEG, which also starts nvJPEG before the timed work. When it
    fails (torchvision built without nvJPEG, a driver problem), auto says so and decodes on the CPU; gpu is
    an error.
    """
    if decoder_kind(flag, device) == "cpu":
        return None, ""
    if not prep.gpu_resizable:  # Lanczos, box, hamming: the GPU's resize would give other pixels than eval_resize
        why = f"the checkpoint's resample filter {Image.Resampling(prep.resample).name} has no GPU resize here"
        if flag == "gpu":
            raise VitfoodError(f"--decoder gpu: {why}; use --decoder cpu")
        return None, f"decoding on the CPU: {why}"
    import io

    photo = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 120, 40)).save(photo, "JPEG")
    try:
        decoder = TorchJpegDecoder(prep, device)
        decoder([torch.frombuffer(bytearray(photo.getvalue()), dtype=torch.uint8)])
    except Exception as e:  # noqa: BLE001 - whatever stops it, the CPU path still works
        why = f"the GPU's JPEG decoder does not work here ({first_line(e)})"
        if flag == "gpu":
            raise VitfoodError(f"--decoder gpu: {why}; use --decoder cpu") from None
        return None, f"decoding on the CPU: {why}"
    return decoder, ""
