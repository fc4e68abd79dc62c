"""Painting of the procedural sample scenes: a Canvas, textures, polygons.

Each scene is a back-to-front list of polygons; the label files are rendered from those polygons and the
image is painted with the same PIL polygon fill, so image and label agree pixel for pixel. Every class has
its own colour and texture, plus illumination changes and noise. Deterministic for a given rng.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import cv2
import numpy as np
from PIL import Image, ImageDraw

# rng stream of an image: np.random.default_rng([seed, dataset (0 Cityscapes, 1 ADE20K), SPLIT_IDS[split], i])
SPLIT_IDS = {"train": 0, "val": 1}

Polygon = list[list[int]]
Texture = Callable[["Canvas", int, int, int, int], np.ndarray]


# --- painting --------------------------------------------------------------------------------------


class Canvas:
    """An RGB float image plus shared noise fields; `fill` paints a polygon with a texture."""

    def __init__(self, rng: np.random.Generator, height: int, width: int):
        self.h, self.w = height, width
        self.rng = rng
        self.img = np.zeros((height, width, 3), np.float32)
        self.fine = rng.standard_normal((height, width), dtype=np.float32)
        small = rng.standard_normal((max(2, height // 24), max(2, width // 24)), dtype=np.float32)
        self.coarse = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)

    def fill(self, polygon: Polygon, texture: Texture) -> None:
        mask_img = Image.new("L", (self.w, self.h), 0)
        ImageDraw.Draw(mask_img).polygon([tuple(p) for p in polygon], fill=1)  # same fill as json2labelImg
        mask = np.asarray(mask_img, dtype=bool)
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        if rows.size == 0:
            return
        y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        sub = mask[y0:y1, x0:x1]
        region = self.img[y0:y1, x0:x1]
        tex = np.broadcast_to(texture(self, y0, y1, x0, x1), region.shape)
        region[sub] = tex[sub]

    def finish(self, rng: np.random.Generator) -> np.ndarray:
        """Global illumination and colour cast, sensor noise, 8-bit."""
        img = self.img * rng.uniform(0.75, 1.2) + rng.uniform(-12, 12, size=3).astype(np.float32)
        img += rng.standard_normal(img.shape, dtype=np.float32) * 3.0
        return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def flat(color, fine: float = 5.0, coarse: float = 8.0) -> Texture:
    col = np.asarray(color, np.float32)

    def tex(c: Canvas, y0, y1, x0, x1):
        return col + (c.fine[y0:y1, x0:x1] * fine + c.coarse[y0:y1, x0:x1] * coarse)[..., None]

    return tex


def with_grid(base: Texture, line_color, period: tuple[int, int], line: int = 1) -> Texture:
    """Tiles / slats: lines every period (py, px) pixels; a 0 period means no lines in that direction."""
    col = np.asarray(line_color, np.float32)

    def tex(c: Canvas, y0, y1, x0, x1):
        out = base(c, y0, y1, x0, x1).copy()
        yy, xx = np.mgrid[y0:y1, x0:x1]
        on = np.zeros(yy.shape, bool)
        if period[0]:
            on |= yy % period[0] < line
        if period[1]:
            on |= xx % period[1] < line
        out[on] = col
        return out

    return tex


def with_windows(base: Texture, glass, cell: tuple[int, int], frac=(0.55, 0.5)) -> Texture:
    """A facade: a grid of windows (cell (h, w) pixels, window = frac of the cell)."""
    col = np.asarray(glass, np.float32)

    def tex(c: Canvas, y0, y1, x0, x1):
        out = base(c, y0, y1, x0, x1).copy()
        yy, xx = np.mgrid[0 : y1 - y0, 0 : x1 - x0]
        ch, cw = max(cell[0], 3), max(cell[1], 3)
        on = ((yy % ch) >= ch * (1 - frac[0]) / 2) & ((yy % ch) < ch * (1 + frac[0]) / 2)
        on &= ((xx % cw) >= cw * (1 - frac[1]) / 2) & ((xx % cw) < cw * (1 + frac[1]) / 2)
        on &= yy >= ch // 2  # no windows glued to the roof line
        out[on] = col + c.coarse[y0:y1, x0:x1][on][:, None] * 15
        return out

    return tex


def with_band(base: Texture, color, top: float, bottom: float) -> Texture:
    """A horizontal band (fractions of the painted height), e.g. car windows."""
    col = np.asarray(color, np.float32)

    def tex(c: Canvas, y0, y1, x0, x1):
        out = base(c, y0, y1, x0, x1).copy()
        h = y1 - y0
        out[int(h * top) : int(h * bottom)] = col
        return out

    return tex


def vertical_gradient(top_color, bottom_color, y_bottom: int, coarse: float = 10.0) -> Texture:
    a, b = np.asarray(top_color, np.float32), np.asarray(bottom_color, np.float32)

    def tex(c: Canvas, y0, y1, x0, x1):
        t = np.clip(np.arange(y0, y1, dtype=np.float32) / max(y_bottom, 1), 0, 1)[:, None, None]
        clouds = np.clip(c.coarse[y0:y1, x0:x1], 0, None)[..., None] * coarse
        return a * (1 - t) + b * t + clouds

    return tex


# --- geometry helpers ------------------------------------------------------------------------------


def rect(x0: float, y0: float, x1: float, y1: float) -> Polygon:
    return [[int(x0), int(y0)], [int(x1), int(y0)], [int(x1), int(y1)], [int(x0), int(y1)]]


def ngon(
    rng: np.random.Generator, cx: float, cy: float, rx: float, ry: float, n: int = 12, jitter: float = 0.0
) -> Polygon:
    angles = np.linspace(0, 2 * np.pi, n, endpoint=False)
    radius = 1 + rng.uniform(-jitter, jitter, n) if jitter else np.ones(n)
    return [
        [int(cx + rx * r * np.cos(a)), int(cy + ry * r * np.sin(a))]
        for a, r in zip(angles, radius, strict=True)
    ]


def clip_polygon(polygon: Polygon, width: int, height: int) -> Polygon:
    return [[min(max(x, 0), width - 1), min(max(y, 0), height - 1)] for x, y in polygon]


# --- a scene ---------------------------------------------------------------------------------------


def render(
    objs: Iterable[tuple[object, Polygon, Texture]], rng: np.random.Generator, height: int, width: int
) -> np.ndarray:
    canvas = Canvas(rng, height, width)
    for _, poly, tex in objs:
        canvas.fill(poly, tex)
    return canvas.finish(rng)
