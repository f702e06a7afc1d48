"""Drawing primitives of the synthetic dataset (:mod:`prunestudy.synth`) and the scene composer.

Shapes of the ten categories, polygon placement and clipping, COCO polygons, noise,
backgrounds, blur, colours, distractor clutter, painting one shape, box overlap rules and
:func:`_scene`, which renders one image and its annotations from one random stream.  The
order in which these functions draw from that stream is part of the dataset format: any
change to it changes the output and must bump ``synth.FORMAT_VERSION``.
"""

from __future__ import annotations

import colorsys
import functools
import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

#: The ten category names, in category-id order (ids 1..10).
CATEGORIES: list[str] = [
    "circle",
    "square",
    "triangle",
    "pentagon",
    "hexagon",
    "star",
    "cross",
    "diamond",
    "heart",
    "crescent",
]

# Mildly unbalanced, fixed class frequencies (relative weights, category-id order).
_CLASS_WEIGHTS = np.array([1.30, 1.20, 1.15, 1.00, 1.00, 0.95, 0.90, 0.85, 0.80, 0.75])
_CLASS_P = _CLASS_WEIGHTS / _CLASS_WEIGHTS.sum()

# Scene statistics (sizes in pixels at image_size=160; scaled with image_size). Tuned so that the
# seed CNN at the seed's settings (batch 32, lr 1e-4, 10 epochs) on 1000 train images (about
# 4,500 crops) ends near 60% test accuracy: learnable, far from 100%.
_OBJ_MIN, _OBJ_MAX = 3, 8  # annotated (non-crowd) shapes per image
_SIZE_LO, _SIZE_HI = 18.0, 70.0  # object diameter (circumscribed circle)
_P_TINY = 0.07  # chance a shape is tiny
_TINY_LO, _TINY_HI = 7.0, 14.0  # tiny diameters (absolute px) -> boxes < 16 px
_P_CROWD = 0.07  # chance an image holds one crowd group
_P_LOW_CONTRAST = 0.08  # chance a shape's colour is near the local background
_P_CLASS_COLOUR = 0.75  # otherwise, chance it comes from its category's palette (a hue band)
_CLASS_HUE_JITTER = 0.06  # half-width of that hue band (hues of categories are 0.1 apart)
_LOW_CONTRAST_DELTA = (25.0, 50.0)  # ... within this RGB distance scale
_P_HOLLOW = 0.03  # chance a shape is drawn as a thick outline only
_P_TRANSLUCENT = 0.1  # chance a shape is partly transparent
_BG_DISTRACTORS = (1, 6)  # unannotated clutter under the shapes (min, max count)
_FG_DISTRACTORS = (0, 2)  # thin clutter drawn over the shapes
_BLOTCH_AMP = (8.0, 30.0)  # background colour-blotch amplitude
_TEXTURE_AMP = (4.0, 18.0)  # background stripes/checker/grain amplitude
_FILL_NOISE = (5.0, 20.0)  # noise std of textured shape fills
_SS = 2  # supersampling factor for anti-aliasing

# Scene layout rules (fractions): how much of a shape must lie inside the image,
# and how much of one shape's box another one may cover.
_MIN_INSIDE = 0.6
_MAX_COVER = 0.35


# --------------------------------------------------------------------------- shapes


def _regular(n: int, phase: float) -> np.ndarray:
    t = phase + 2.0 * np.pi * np.arange(n) / n
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _unit_shape(k: int, rng: np.random.Generator) -> np.ndarray:
    """Polygon (N, 2) of category index ``k``, centred on its box, circumradius 1.

    Image convention: x right, y down.  Shapes with a free parameter (star depth,
    cross arm width, diamond ratio, crescent thickness) draw it from ``rng``.
    """
    name = CATEGORIES[k]
    if name == "circle":
        pts = _regular(40, 0.0)
    elif name == "square":
        pts = _regular(4, np.pi / 4)
    elif name == "triangle":
        pts = _regular(3, -np.pi / 2)
    elif name == "pentagon":
        pts = _regular(5, -np.pi / 2)
    elif name == "hexagon":
        pts = _regular(6, 0.0)
    elif name == "star":
        inner = rng.uniform(0.38, 0.55)
        r = np.where(np.arange(10) % 2 == 0, 1.0, inner)
        t = -np.pi / 2 + np.pi * np.arange(10) / 5
        pts = np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
    elif name == "cross":
        a = rng.uniform(0.28, 0.45)
        pts = np.array(
            [(a, 1), (a, a), (1, a), (1, -a), (a, -a), (a, -1),
             (-a, -1), (-a, -a), (-1, -a), (-1, a), (-a, a), (-a, 1)],
            dtype=float,
        )
    elif name == "diamond":
        h = rng.uniform(0.5, 0.68)
        pts = np.array([(0, -1), (h, 0), (0, 1), (-h, 0)], dtype=float)
    elif name == "heart":
        t = np.linspace(0.0, 2.0 * np.pi, 48, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([x, y], axis=1)
    elif name == "crescent":
        r2 = rng.uniform(0.78, 0.92)  # inner (cut-away) circle radius
        d = rng.uniform(0.30, 0.50)  # its offset to the right
        xi = (1.0 - r2 * r2 + d * d) / (2.0 * d)
        yi = math.sqrt(max(1.0 - xi * xi, 1e-9))
        phi0 = math.atan2(yi, xi)
        outer = np.linspace(phi0, 2 * np.pi - phi0, 30)
        psi_top = math.atan2(yi, xi - d)
        psi_bot = math.atan2(-yi, xi - d) + 2 * np.pi
        inner = np.linspace(psi_bot, psi_top, 24)[1:-1]
        pts = np.concatenate(
            [
                np.stack([np.cos(outer), np.sin(outer)], axis=1),
                np.stack([d + r2 * np.cos(inner), r2 * np.sin(inner)], axis=1),
            ]
        )
    else:  # pragma: no cover - CATEGORIES and this table are kept in sync
        raise AssertionError(name)
    pts = pts - (pts.min(axis=0) + pts.max(axis=0)) / 2.0
    return pts / np.sqrt((pts**2).sum(axis=1)).max()


def _place(unit: np.ndarray, diameter: float, aspect: float, angle: float, cx: float, cy: float) -> np.ndarray:
    """Aspect-jitter (in the shape's own frame), rotate, scale and translate."""
    p = unit * np.array([aspect, 1.0 / aspect]) * (diameter / 2.0)
    c, s = math.cos(angle), math.sin(angle)
    return p @ np.array([[c, s], [-s, c]]) + np.array([cx, cy])


def _polygon_area(p: np.ndarray) -> float:
    x, y = p[:, 0], p[:, 1]
    s = float(np.dot(x[:-1], y[1:]) - np.dot(y[:-1], x[1:])) + float(x[-1] * y[0] - y[-1] * x[0])
    return abs(s) / 2.0


def _clip(poly: np.ndarray, w: float, h: float) -> np.ndarray:
    """Sutherland-Hodgman clip of a (possibly non-convex) polygon to [0,w]x[0,h]."""
    if poly.min() >= 0 and poly[:, 0].max() <= w and poly[:, 1].max() <= h:
        return poly
    for axis, bound, keep_below in ((0, 0.0, False), (0, w, True), (1, 0.0, False), (1, h, True)):
        if len(poly) == 0:
            break
        v = poly[:, axis] - bound
        inside = v <= 0 if keep_below else v >= 0
        out: list[np.ndarray] = []
        n = len(poly)
        for i in range(n):
            j = (i + 1) % n
            if inside[i]:
                out.append(poly[i])
            if inside[i] != inside[j]:
                t = v[i] / (v[i] - v[j])
                q = poly[i] + t * (poly[j] - poly[i])
                q[axis] = bound
                out.append(q)
        poly = np.array(out) if out else np.zeros((0, 2))
    return poly


def _to_coco_polygon(poly: np.ndarray, w: int, h: int) -> np.ndarray | None:
    """Clip, round to 2 decimals and drop repeated vertices; None if degenerate."""
    p = np.round(_clip(poly, float(w), float(h)), 2)
    if len(p) == 0:
        return None
    keep = np.any(p != np.roll(p, 1, axis=0), axis=1)
    p = p[keep]
    if len(p) < 3 or _polygon_area(p) < 1.0:
        return None
    return p


# --------------------------------------------------------------------------- rendering


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1], shape (size, size, channels), float32."""
    small = rng.integers(0, 256, (cells, cells, channels), dtype=np.uint8)
    img = Image.fromarray(small if channels == 3 else small[:, :, 0])
    arr = np.asarray(img.resize((size, size), Image.BICUBIC), dtype=np.float32)
    if channels == 1:
        arr = arr[:, :, None]
    return arr * np.float32(1 / 127.5) - np.float32(1.0)


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / np.float32(size)
    return yy, xx


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Float32 (size, size, 3) background: gradient + blotches + texture + grain."""
    yy, xx = _grid(size)
    c0 = rng.uniform(0, 255, 3).astype(np.float32)
    c1 = np.clip(c0 + rng.normal(0, 70, 3), 0, 255).astype(np.float32)
    th = rng.uniform(0, 2 * np.pi)
    cth, sth = math.cos(th), math.sin(th)
    # xx, yy in [0, 1): normalise the projection to [0, 1] analytically
    t = xx * np.float32(cth) + yy * np.float32(sth) - np.float32(min(cth, 0.0) + min(sth, 0.0))
    t *= np.float32(1.0 / max(abs(cth) + abs(sth), 1e-6))
    bg = c0 + t[:, :, None] * (c1 - c0)
    # colour blotches
    bg += _smooth_noise(rng, size, int(rng.integers(3, 9)), 3) * np.float32(rng.uniform(*_BLOTCH_AMP))
    # texture: stripes, checker or fine blotchy grain, plus per-pixel grain
    kind = rng.integers(0, 4)
    amp = np.float32(rng.uniform(*_TEXTURE_AMP))
    tex = rng.standard_normal((size, size), dtype=np.float32) * np.float32(rng.uniform(1, 6))
    if kind == 0:
        f = rng.uniform(4, 18)
        a = rng.uniform(0, np.pi)
        tex += amp * np.sin(
            xx * np.float32(2 * np.pi * f * math.cos(a))
            + yy * np.float32(2 * np.pi * f * math.sin(a))
            + np.float32(rng.uniform(0, 6.3))
        )
    elif kind == 1:
        f = np.float32(2 * np.pi * rng.uniform(3, 10))
        tex += amp * np.float32(0.6) * np.sign(np.sin(f * xx) * np.sin(f * yy))
    elif kind == 2:
        tex += _smooth_noise(rng, size, int(rng.integers(12, 40)), 1)[:, :, 0] * amp
    # kind == 3: grain only
    bg += tex[:, :, None]
    return bg


def _blur3(arr: np.ndarray, a: float) -> np.ndarray:
    """Separable blur with kernel [a, 1-2a, a] along both image axes (edges replicated)."""
    a32, c32 = np.float32(a), np.float32(1.0 - 2.0 * a)
    out = arr * c32
    out[1:] += arr[:-1] * a32
    out[:-1] += arr[1:] * a32
    out[0] += arr[0] * a32
    out[-1] += arr[-1] * a32
    res = out * c32
    res[:, 1:] += out[:, :-1] * a32
    res[:, :-1] += out[:, 1:] * a32
    res[:, 0] += out[:, 0] * a32
    res[:, -1] += out[:, -1] * a32
    return res


def _rand_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))  # type: ignore[return-value]


def _draw_distractors(draw: ImageDraw.ImageDraw, rng: np.random.Generator, S: int, n: int, thin: bool) -> None:
    """Unannotated clutter at supersampled size S: lines, strokes, arcs, blobs, dots."""
    for _ in range(n):
        kind = rng.integers(0, 3 if thin else 6)
        col = _rand_colour(rng)
        wmax = 5 if thin else 10
        if kind == 0:  # straight line
            p = rng.uniform(-0.1 * S, 1.1 * S, 4)
            draw.line([(p[0], p[1]), (p[2], p[3])], fill=col, width=int(rng.integers(1, wmax)))
        elif kind == 1:  # random-walk stroke
            k = int(rng.integers(3, 7))
            start = rng.uniform(0, S, 2)
            steps = rng.normal(0, 0.12 * S, (k, 2))
            pts = np.cumsum(np.vstack([start, steps]), axis=0)
            draw.line([tuple(q) for q in pts], fill=col, width=int(rng.integers(1, wmax)), joint="curve")
        elif kind == 2:  # arc
            c = rng.uniform(0, S, 2)
            r = rng.uniform(0.05, 0.35) * S
            a0 = rng.uniform(0, 360)
            draw.arc(
                [c[0] - r, c[1] - r, c[0] + r, c[1] + r],
                a0,
                a0 + rng.uniform(40, 200),
                fill=col,
                width=int(rng.integers(1, wmax)),
            )
        elif kind == 3:  # irregular blob
            c = rng.uniform(0, S, 2)
            r = rng.uniform(0.03, 0.15) * S
            t = np.linspace(0, 2 * np.pi, 28, endpoint=False)
            rad = np.ones_like(t)
            for harmonic in (2, 3, 4, 5):
                rad += rng.uniform(0, 0.25) * np.cos(harmonic * t + rng.uniform(0, 6.3))
            pts = np.stack([c[0] + r * rad * np.cos(t), c[1] + r * rad * np.sin(t)], axis=1)
            draw.polygon([tuple(q) for q in pts], fill=col)
        elif kind == 4:  # scatter of dots
            for q in rng.uniform(0, S, (int(rng.integers(3, 12)), 2)):
                r = rng.uniform(1, 4)
                draw.ellipse([q[0] - r, q[1] - r, q[0] + r, q[1] + r], fill=col)
        else:  # rectangle-ish bar / band
            c = rng.uniform(0, S, 2)
            L, Wd = rng.uniform(0.1, 0.5) * S, rng.uniform(2, 12)
            a = rng.uniform(0, np.pi)
            d = np.array([math.cos(a), math.sin(a)])
            nrm = np.array([-d[1], d[0]])
            pts = [
                c + L / 2 * d + Wd / 2 * nrm,
                c + L / 2 * d - Wd / 2 * nrm,
                c - L / 2 * d - Wd / 2 * nrm,
                c - L / 2 * d + Wd / 2 * nrm,
            ]
            draw.polygon([tuple(q) for q in pts], fill=col)


def _paint_shape(canvas: Image.Image, bg: np.ndarray, poly1x: np.ndarray, k: int, rng: np.random.Generator) -> None:
    """Draw one shape (polygon in 1x image coordinates) onto the supersampled canvas."""
    S = canvas.size[0]
    # continuous 1x coordinate x -> PIL pixel-centre coordinate at supersampled scale
    p = poly1x * _SS - 0.5
    x0 = max(int(math.floor(p[:, 0].min())) - 1, 0)
    y0 = max(int(math.floor(p[:, 1].min())) - 1, 0)
    x1 = min(int(math.ceil(p[:, 0].max())) + 2, S)
    y1 = min(int(math.ceil(p[:, 1].max())) + 2, S)
    if x1 <= x0 or y1 <= y0:
        return
    w, h = x1 - x0, y1 - y0
    pts = [(float(a - x0), float(b - y0)) for a, b in p]

    # colour: random, or close to the local background (low contrast)
    if rng.random() < _P_LOW_CONTRAST:
        cx = min(max((x0 + x1) // (2 * _SS), 0), bg.shape[1] - 1)
        cy = min(max((y0 + y1) // (2 * _SS), 0), bg.shape[0] - 1)
        base = bg[cy, cx] + rng.normal(0, 1, 3) * rng.uniform(*_LOW_CONTRAST_DELTA)
        col = np.clip(base, 0, 255)
    elif rng.random() < _P_CLASS_COLOUR:  # like real objects, categories have typical colours
        hue = (k / len(CATEGORIES) + rng.uniform(-_CLASS_HUE_JITTER, _CLASS_HUE_JITTER)) % 1.0
        col = 255.0 * np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.45, 1.0), rng.uniform(0.35, 1.0)))
    else:
        col = rng.uniform(0, 255, 3)

    style = rng.random()  # < _P_HOLLOW: hollow, then solid / gradient / textured fill
    opacity = 255 if rng.random() >= _P_TRANSLUCENT else int(rng.integers(150, 255))
    mask = Image.new("L", (w, h), 0)
    mdraw = ImageDraw.Draw(mask)
    if style < _P_HOLLOW:  # hollow: thick outline only
        mdraw.line(pts + [pts[0]], fill=opacity, width=int(rng.integers(3, 8)), joint="curve")
    else:
        mdraw.polygon(pts, fill=opacity)
    if style < 0.55:  # solid fill (also used by hollow shapes)
        fill = Image.new("RGB", (w, h), tuple(int(v) for v in col))
    elif style < 0.8:  # linear gradient fill
        c2 = np.clip(col + rng.normal(0, 60, 3), 0, 255)
        a = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = xx * math.cos(a) + yy * math.sin(a)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        arr = col[None, None, :] + t[:, :, None] * (c2 - col)[None, None, :]
        fill = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    else:  # textured / noisy fill
        arr = col[None, None, :] + rng.normal(0, rng.uniform(*_FILL_NOISE), (h, w, 1))
        fill = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    canvas.paste(fill, (x0, y0), mask)
    if style >= _P_HOLLOW and rng.random() < 0.25:  # contrasting outline
        ImageDraw.Draw(canvas).line(
            [(a + x0, b + y0) for a, b in pts] + [(pts[0][0] + x0, pts[0][1] + y0)],
            fill=_rand_colour(rng),
            width=int(rng.integers(1, 5)),
            joint="curve",
        )


def _box(poly: np.ndarray) -> tuple[float, float, float, float]:
    lo, hi = poly.min(axis=0), poly.max(axis=0)
    return float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])


def _overlap_ok(box: tuple[float, float, float, float], boxes: list[tuple[float, float, float, float]]) -> bool:
    ax0, ay0, ax1, ay1 = box
    a_area = max((ax1 - ax0) * (ay1 - ay0), 1e-6)
    for bx0, by0, bx1, by1 in boxes:
        iw = min(ax1, bx1) - max(ax0, bx0)
        ih = min(ay1, by1) - max(ay0, by0)
        if iw <= 0 or ih <= 0:
            continue
        inter = iw * ih
        b_area = max((bx1 - bx0) * (by1 - by0), 1e-6)
        if inter > _MAX_COVER * b_area or inter > 0.8 * a_area:
            return False
    return True


def _scene(rng: np.random.Generator, size: int) -> tuple[Image.Image, list[dict[str, Any]]]:
    """Render one image; return it and its annotations (without ids)."""
    scale = size / 160.0
    lo = max(16.0, _SIZE_LO * scale)
    hi = max(lo + 4.0, _SIZE_HI * scale)
    S = size * _SS

    bg = _background(rng, size)  # at 1x: smooth enough, 4x cheaper; upscaled below
    canvas = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8)).resize((S, S), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    _draw_distractors(draw, rng, S, int(rng.integers(_BG_DISTRACTORS[0], _BG_DISTRACTORS[1] + 1)), thin=False)

    # plan objects: (category, list of full polygons, iscrowd)
    plans: list[tuple[int, list[np.ndarray], int]] = []
    boxes: list[tuple[float, float, float, float]] = []
    n_obj = int(rng.integers(_OBJ_MIN, _OBJ_MAX + 1))
    crowd_slot = int(rng.integers(0, n_obj + 1)) if rng.random() < _P_CROWD else -1
    for slot in range(n_obj + 1):
        if slot == crowd_slot:
            k = int(rng.choice(len(CATEGORIES), p=_CLASS_P))
            m = rng.uniform(6.0, 11.0)
            gx, gy = int(rng.integers(2, 5)), int(rng.integers(2, 4))
            cell = m * rng.uniform(1.2, 1.6)
            rw, rh = gx * cell, gy * cell
            if rw > size - 3 or rh > size - 3:  # a crowd group that cannot fit a small image
                continue
            for _try in range(10):
                ox, oy = rng.uniform(1, size - rw - 1), rng.uniform(1, size - rh - 1)
                region = (ox, oy, ox + rw, oy + rh)
                if _overlap_ok(region, boxes):
                    break
            else:
                continue
            members = []
            for i in range(gx):
                for j in range(gy):
                    if rng.random() < 0.2 and len(members) + (gx * gy - i * gy - j) > 3:
                        continue
                    d = m * rng.uniform(0.8, 1.0)
                    jit = (cell - d) / 2
                    cx = ox + (i + 0.5) * cell + rng.uniform(-jit, jit)
                    cy = oy + (j + 0.5) * cell + rng.uniform(-jit, jit)
                    members.append(
                        _place(
                            _unit_shape(k, rng),
                            d,
                            math.exp(rng.uniform(-0.15, 0.15)),
                            rng.uniform(0, 2 * np.pi),
                            cx,
                            cy,
                        )
                    )
            plans.append((k, members, 1))
            boxes.append(region)
            continue
        if slot == n_obj:
            continue
        k = int(rng.choice(len(CATEGORIES), p=_CLASS_P))
        if rng.random() < _P_TINY:
            diameter = rng.uniform(_TINY_LO, _TINY_HI)
        else:
            diameter = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        unit = _unit_shape(k, rng)
        aspect = math.exp(rng.uniform(-0.22, 0.22))
        angle = rng.uniform(0, 2 * np.pi)
        full_area = _polygon_area(_place(unit, diameter, aspect, angle, 0, 0))
        for _try in range(12):
            cx, cy = rng.uniform(0, size, 2)
            poly = _place(unit, diameter, aspect, angle, cx, cy)
            clipped = _clip(poly, size, size)
            if len(clipped) < 3 or _polygon_area(clipped) < _MIN_INSIDE * full_area:
                continue
            b = _box(clipped)
            if _overlap_ok(b, boxes):
                plans.append((k, [poly], 0))
                boxes.append(b)
                break

    anns: list[dict[str, Any]] = []
    for k, polys, crowd in plans:
        segs: list[np.ndarray] = []
        for poly in polys:
            _paint_shape(canvas, bg, poly, k, rng)
            cp = _to_coco_polygon(poly, size, size)
            if cp is not None:
                segs.append(cp)
        if not segs:
            continue
        allp = np.concatenate(segs)
        x0, y0 = float(allp[:, 0].min()), float(allp[:, 1].min())
        x1, y1 = float(allp[:, 0].max()), float(allp[:, 1].max())
        anns.append(
            {
                "category_id": k + 1,
                "segmentation": [[float(v) for v in s.reshape(-1)] for s in segs],
                "area": round(sum(_polygon_area(s) for s in segs), 2),
                "bbox": [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)],
                "iscrowd": crowd,
            }
        )

    _draw_distractors(draw, rng, S, int(rng.integers(_FG_DISTRACTORS[0], _FG_DISTRACTORS[1] + 1)), thin=True)

    arr = np.asarray(canvas.reduce(_SS), dtype=np.float32)  # box-filter downsample = anti-aliasing
    if rng.random() < 0.6:  # slight separable 3-tap blur
        arr = _blur3(arr, float(rng.uniform(0.08, 0.25)))
    arr += rng.standard_normal((size, size, 1), dtype=np.float32) * np.float32(rng.uniform(1.5, 7.0))
    img = Image.fromarray(np.clip(arr + np.float32(0.5), 0, 255).astype(np.uint8))
    return img, anns
