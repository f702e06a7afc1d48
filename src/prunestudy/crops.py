"""Cropping COCO images into the study's uint8 squares (the data stage's inner loop).

Each image is decoded once for all of its crops, at 1/2, 1/4 or 1/8 scale (JPEG draft mode)
when every crop of it is being shrunk that much; crops are squares around a box (or the whole
image, letterboxed), padded with :data:`PAD_RGB` where they leave the image and resized with
LANCZOS (down) or BILINEAR (up); `workers` processes crop chunks of consecutive images.
`prunestudy.data` chooses what to crop and writes the results.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import threading

import numpy as np
from PIL import ExifTags, Image, ImageOps

from . import machine

#: Constant fill for the parts of a crop square outside the image: the ImageNet
#: mean colour (0.485, 0.456, 0.406) * 255, rounded.  Image-independent, so a
#: crop never leaks global image statistics.
PAD_RGB = (124, 116, 104)


DOWNSCALE_FILTER = Image.Resampling.LANCZOS


UPSCALE_FILTER = Image.Resampling.BILINEAR


DRAFT_SCALES = (8, 4, 2)  # JPEG DCT scaling Pillow can decode at, largest first


CHUNK_IMAGES = 32  # images per task handed to a worker process


def crop_square(bbox, context: float) -> tuple[int, int, int, int]:
    """Integer square (x0, y0, x1, y1), x1/y1 exclusive, around a COCO box [x, y, w, h].

    Side ``max(w, h) * (1 + 2 * context)`` rounded to whole pixels (at least 1),
    centred on the box centre (top-left rounded half up).  May extend beyond the image.
    """
    x, y, w, h = (float(v) for v in bbox)
    side = max(1, math.floor(max(w, h) * (1 + 2 * context) + 0.5))
    x0 = math.floor(x + w / 2 - side / 2 + 0.5)
    y0 = math.floor(y + h / 2 - side / 2 + 0.5)
    return x0, y0, x0 + side, y0 + side


def image_square(width: int, height: int) -> tuple[int, int, int, int]:
    """The square holding the whole image, centred (letterbox), for ``label_mode='image'``."""
    side = max(width, height)
    x0, y0 = (width - side) // 2, (height - side) // 2
    return x0, y0, x0 + side, y0 + side


def load_image(path, width: int, height: int, reduce: float = 1.0) -> Image.Image:
    """Decode an image file as RGB in the frame of the json's ``width`` x ``height``.

    EXIF orientation is applied (``ImageOps.exif_transpose``) unless that makes the
    size differ from the json's, in which case the image is kept as stored (COCO
    boxes refer to the json's frame).  Any mode (L, CMYK, P, RGBA, ...) becomes
    RGB; transparent pixels are composited onto :data:`PAD_RGB`.  Raises
    ValueError if neither frame matches the json's size.

    ``reduce`` >= 2 lets a JPEG decode at 1/2, 1/4 or 1/8 scale (draft mode), the largest
    that is at most ``reduce``; the returned image then has ``img.info['decode_scale']`` > 1
    and is that many times smaller than the json's frame.
    """
    with Image.open(path) as raw:
        stored = raw.size
        orientation = raw.getexif().get(ExifTags.Base.Orientation, 1)
        upright = (stored[1], stored[0]) if orientation in (5, 6, 7, 8) else stored
        turn = orientation != 1 and upright == (width, height)
        if not turn and stored != (width, height):
            raise ValueError(f"{path}: image is {stored[0]}x{stored[1]} but the annotation "
                             f"file says {width}x{height}")
        # draft only upright images: a turned draft would put the partial edge block on the other side
        scale = _draft(raw, reduce if orientation == 1 else 1)
        raw.load()
        img = ImageOps.exif_transpose(raw) if turn else raw
        img = _to_rgb(img)
        img.info["decode_scale"] = scale
        return img


def _draft(raw: Image.Image, reduce: float) -> int:
    """Ask a JPEG for DCT-domain downscaling by the largest of 8, 4, 2 that is <= reduce."""
    if raw.format != "JPEG" or reduce < 2:
        return 1
    scale = next(s for s in DRAFT_SCALES + (1,) if s <= reduce)
    if scale == 1:
        return 1
    w, h = raw.size
    # Pillow picks the largest of 1/2/4/8 with size // request >= it; the result is ceil(size / scale)
    raw.draft(raw.mode if raw.mode in ("CMYK",) else "RGB", (max(1, w // scale), max(1, h // scale)))
    got = next((s for s in DRAFT_SCALES if raw.size == (math.ceil(w / s), math.ceil(h / s))), 1)
    return got


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        background = Image.new("RGBA", img.size, PAD_RGB + (255,))
        return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def crop_and_resize(img: Image.Image, crop: tuple[int, int, int, int], size: int) -> np.ndarray:
    """uint8 (size, size, 3) array of the square ``crop`` of an RGB image.

    Parts of the square outside the image are :data:`PAD_RGB`.  Resized with
    LANCZOS when the square is larger than ``size``, BILINEAR otherwise.
    """
    x0, y0, x1, y1 = crop
    side = x1 - x0
    ix0, iy0 = max(x0, 0), max(y0, 0)
    ix1, iy1 = min(x1, img.width), min(y1, img.height)
    if (ix0, iy0, ix1, iy1) == (x0, y0, x1, y1):
        square = img.crop(crop)
    else:
        square = Image.new("RGB", (side, side), PAD_RGB)
        if ix1 > ix0 and iy1 > iy0:
            square.paste(img.crop((ix0, iy0, ix1, iy1)), (ix0 - x0, iy0 - y0))
    if side != size:
        square = square.resize((size, size), DOWNSCALE_FILTER if side > size else UPSCALE_FILTER)
    return np.asarray(square, dtype=np.uint8)


def crop_scaled(img: Image.Image, crop: tuple[int, int, int, int], size: int, scale: int) -> np.ndarray:
    """:func:`crop_and_resize` for an image decoded at 1/``scale`` of the frame ``crop`` is given in.

    The square keeps its exact (fractional) place in the smaller image: Pillow resamples the
    box ``crop / scale`` straight to ``size`` (LANCZOS), padding with :data:`PAD_RGB` outside.
    """
    if scale == 1:
        return crop_and_resize(img, crop, size)
    bx0, by0, bx1, by1 = (v / scale for v in crop)
    fx0, fy0, fx1, fy1 = math.floor(bx0), math.floor(by0), math.ceil(bx1), math.ceil(by1)
    inside = (max(fx0, 0), max(fy0, 0), min(fx1, img.width), min(fy1, img.height))
    if inside == (fx0, fy0, fx1, fy1):
        canvas = img.crop(inside)
    else:
        canvas = Image.new("RGB", (fx1 - fx0, fy1 - fy0), PAD_RGB)
        if inside[2] > inside[0] and inside[3] > inside[1]:
            canvas.paste(img.crop(inside), (inside[0] - fx0, inside[1] - fy0))
    box = (bx0 - fx0, by0 - fy0, bx1 - fx0, by1 - fy0)
    return np.asarray(canvas.resize((size, size), DOWNSCALE_FILTER, box=box), dtype=np.uint8)


def _crop_chunk(task: tuple) -> tuple:
    """Worker: crop every sample of a run of consecutive images.

    ``task`` = (start, count, image_size, [(image_id, path, width, height, [crop, ...]), ...]);
    the crops of the chunk are rows ``start .. start+count-1`` in order. Returns
    (start, rows uint8 (count, S, S, 3), scales, bad) where ``bad`` lists
    (image_id, first_row, n_rows, reason, detail) for images that could not be read.
    """
    start, count, size, images = task
    rows = np.empty((count, size, size, 3), dtype=np.uint8)
    scales = np.ones(count, dtype=np.int8)
    bad, i = [], 0
    for image_id, path, width, height, crops in images:
        try:
            reduce = min(c[2] - c[0] for c in crops) / size
            img = load_image(path, width, height, reduce=reduce)
            scale = img.info["decode_scale"]
            for j, crop in enumerate(crops):
                rows[i + j] = crop_scaled(img, crop, size, scale)
            scales[i : i + len(crops)] = scale
        except FileNotFoundError:
            bad.append((image_id, i, len(crops), "missing_file", "no such file"))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            reason = "size_mismatch" if "annotation file says" in str(e) else "corrupt_image"
            bad.append((image_id, i, len(crops), reason, f"{type(e).__name__}: {e}"[:300]))
        i += len(crops)
    return start, rows, scales, bad


def _chunks(tasks: list, size: int, per_chunk: int = CHUNK_IMAGES):
    """Group per-image tasks into runs of consecutive images (contiguous rows)."""
    start = 0
    for k in range(0, len(tasks), per_chunk):
        part = tasks[k : k + per_chunk]
        count = sum(len(t[4]) for t in part)
        yield (start, count, size, part)
        start += count


def default_workers() -> int:
    """All CPU cores this process may use."""
    return machine.usable_cpus()


def _start_method() -> str:
    """fork while this process has one thread (cheap, no re-import of __main__); forkserver
    otherwise: forking a threaded process can deadlock the child on a lock another thread held (a
    Jupyter kernel runs threads; PyTorch starts one at import; pytest-xdist's channel runs one that
    `threading` does not list, and a forked crop worker once hung a test run there). Threads are
    counted by the OS (/proc/self/task), not by `threading`. forkserver costs about 0.6 s more per
    pool here (1.3 s against 1.9 s for the coco-sample's crops)."""
    methods = multiprocessing.get_all_start_methods()
    if _threads() == 1 and "fork" in methods:
        return "fork"
    return "forkserver" if "forkserver" in methods else "spawn"


def _threads() -> int:
    """This process's threads, native ones included (Linux); elsewhere those `threading` knows."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def _map_chunks(chunks: list, workers: int):
    """Results of _crop_chunk for every chunk, in any order; a process pool when it pays off."""
    if workers <= 1 or len(chunks) <= 1:
        yield from map(_crop_chunk, chunks)
        return
    ctx = multiprocessing.get_context(_start_method())
    with quiet_pool(ctx, min(workers, len(chunks))) as pool:
        yield from pool.imap_unordered(_crop_chunk, chunks)


def _ignore_sigint() -> None:
    """A pool worker: Ctrl-C ignored (its parent stops it), SIGTERM back to the default, so that
    Pool.terminate ends it whatever handler the parent had (the command line's SIGTERM handler,
    inherited by a forked worker, turned SIGTERM into an ignored SIGINT: the pool's exit then waited
    for ever; it hung a test run in synth's pool)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def quiet_pool(ctx, processes: int):
    """``ctx.Pool(processes)`` whose workers never take Ctrl-C. A terminal's Ctrl-C reaches the whole
    process group: the parent (the data stage's kernel) stops and terminates the pool (SIGTERM,
    silent), while workers that took SIGINT themselves would each print a KeyboardInterrupt traceback.
    SIGINT is blocked in this thread while the pool starts, so its workers (and its forkserver, and
    the threads that replace workers) are born with it blocked, even while they import; then they
    ignore it. (synth draws the embedded set with such a pool too.)"""
    block = hasattr(signal, "pthread_sigmask")
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if block else None
    try:
        return ctx.Pool(processes, initializer=_ignore_sigint)
    finally:
        if block:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
