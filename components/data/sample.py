"""Procedural sample datasets in the exact official on-disk formats (Cityscapes gtFine, ADE20K).

Scenes are structured and learnable: a street (sky on top, buildings with windows along the sides,
sidewalks, a road with lane marks towards a vanishing point, trees, poles with signs and lights, cars,
people, riders, the ego vehicle at the bottom) or a room / outdoor view for ADE20K. Every class has its
own colour and texture, plus illumination changes and noise. Each scene is a back-to-front list of
polygons; the label files are rendered from those polygons and the image is painted with the same
PIL polygon fill, so image and label agree pixel for pixel. Deterministic for a given seed.

Cityscapes: `leftImg8bit/<split>/<city>/<city>_<seq:06d>_<frame:06d>_leftImg8bit.png` (RGB PNG) and
`gtFine/<split>/<city>/<...>_gtFine_{polygons.json,labelIds.png,color.png,instanceIds.png}`, the PNGs
made by cityscapesscripts' own json2labelImg / json2instanceImg from the JSON.
ADE20K: `ADEChallengeData2016/{images,annotations}/{training,validation}/ADE_{train,val}_%08d.{jpg,png}`,
annotations uint8 with 0 = other, 1..150 = the classes (mmseg order).
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import cv2
import numpy as np
from cityscapesscripts.helpers.annotation import Annotation
from cityscapesscripts.preparation.json2instanceImg import createInstanceImage
from cityscapesscripts.preparation.json2labelImg import json2labelImg
from PIL import Image, ImageDraw

from components.data.classes import ADE20K_CLASSES, ADE20K_PALETTE
from components.data.io import FILE_MODE, atomic_dir

CITIES = {"train": ("aachen", "bochum", "bremen"), "val": ("frankfurt", "lindau", "munster")}
ANNOTATED_FRAME = 19  # the Cityscapes frame carrying the fine annotation
_SPLIT_IDS = {"train": 0, "val": 1}
_ZIP_DATE = (2016, 1, 1, 0, 0, 0)  # fixed member dates: the same seed gives byte-identical archives

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


# --- Cityscapes ------------------------------------------------------------------------------------

FACADES = ((150, 120, 100), (185, 175, 155), (120, 112, 112), (205, 195, 175), (110, 88, 80), (160, 150, 140))
CAR_COLORS = ((30, 40, 120), (150, 20, 20), (200, 200, 205), (25, 25, 28), (60, 90, 60), (170, 160, 40))
CLOTHES = ((30, 30, 60), (90, 30, 30), (40, 70, 40), (70, 70, 70), (140, 110, 60), (20, 20, 20))
SKIN = (225, 185, 150)


def cityscapes_scene(rng: np.random.Generator, height: int, width: int) -> list[tuple[str, Polygon, Texture]]:
    """Back-to-front (label, polygon, texture) of one street scene; labels are official Cityscapes names."""
    H, W = height, width
    objs: list[tuple[str, Polygon, Texture]] = []
    hy = int(H * rng.uniform(0.36, 0.46))  # horizon
    vx = int(W * rng.uniform(0.42, 0.58))  # vanishing point
    yl, yr = (
        hy + H * rng.uniform(0.08, 0.2),
        hy + H * rng.uniform(0.08, 0.2),
    )  # far sidewalk edge at x=0 / x=W
    rl, rr = rng.uniform(0.05, 0.25), rng.uniform(0.75, 0.95)  # road edges at the bottom

    def edge(x: float) -> float:  # where facades meet the sidewalk
        return hy + (yl - hy) * (vx - x) / vx if x < vx else hy + (yr - hy) * (x - vx) / (W - vx)

    def depth(y: float) -> float:  # 0 at the horizon, 1 at the bottom row
        return max((y - hy) / (H - hy), 0.02)

    def road_x(y: float, side: float) -> float:
        return vx + (W * side - vx) * depth(y)

    # the sky reaches down to the lowest facade foot so low walls / hedges leave no gap
    objs.append(
        ("sky", rect(0, 0, W, max(yl, yr) + 4), vertical_gradient((90, 140, 215), (200, 220, 240), hy))
    )

    # facades: buildings (mostly), walls, hedges; each quad shrinks towards the vanishing point
    for side in (-1, 1):
        x = 0.0 if side < 0 else float(W)
        stop = vx - 0.03 * W if side < 0 else vx + 0.03 * W
        while (x < stop) if side < 0 else (x > stop):
            bw = W * rng.uniform(0.06, 0.16)
            x1 = min(x + bw, stop) if side < 0 else max(x - bw, stop)
            kind = rng.choice(["building"] * 6 + ["vegetation", "wall", "fence"])
            hb = H * rng.uniform(0.25, 0.55) if kind == "building" else H * rng.uniform(0.04, 0.12)

            def top(xx, hb=hb):
                return edge(xx) - hb * (0.25 + 0.75 * abs(vx - xx) / (vx if xx < vx else W - vx))

            poly = [
                [int(x), int(top(x))],
                [int(x1), int(top(x1))],
                [int(x1), int(edge(x1)) + 3],
                [int(x), int(edge(x)) + 3],
            ]
            if kind == "building":
                cell = (int(H * rng.uniform(0.035, 0.06)), int(W * rng.uniform(0.02, 0.035)))
                tex = with_windows(flat(FACADES[rng.integers(len(FACADES))], 4, 10), (55, 65, 85), cell)
            elif kind == "vegetation":
                tex = flat((65, 115, 40), 22, 18)
            elif kind == "wall":
                tex = flat((165, 160, 150), 3, 6)
            else:
                tex = with_grid(flat((140, 120, 95), 4, 4), (60, 55, 50), (0, 6), 2)
            objs.append((kind, poly, tex))
            x = x1

    # ground: sidewalk everywhere below the facades, the road on top of it, an optional terrain strip
    sidewalk = [[0, int(yl)], [vx, hy], [W - 1, int(yr)], [W - 1, H - 1], [0, H - 1]]
    objs.append(("sidewalk", sidewalk, with_grid(flat((178, 160, 168), 4, 5), (135, 125, 130), (9, 17))))
    if rng.random() < 0.5:
        xt = W * rng.uniform(0.0, 0.08)
        objs.append(
            (
                "terrain",
                [
                    [int(xt), int(edge(xt)) + 2],
                    [vx - 2, hy + 2],
                    [int(road_x(H, rl)) - int(0.06 * W), H - 1],
                    [0, H - 1],
                ],
                flat((145, 160, 85), 14, 10),
            )
        )
    road = [[vx - 3, hy], [vx + 3, hy], [int(W * rr), H - 1], [int(W * rl), H - 1]]
    mid = (rl + rr) / 2

    asphalt = flat((88, 88, 94), 6, 6)

    def road_texture(c: Canvas, y0, y1, x0, x1):
        out = asphalt(c, y0, y1, x0, x1).copy()
        yy, xx = np.mgrid[y0:y1, x0:x1]
        d = np.clip((yy - hy) / (H - hy), 0, 1)
        centre = vx + (W * mid - vx) * d
        dash = (np.sqrt(np.maximum(yy - hy, 0)) * 1.3).astype(int) % 2 == 0
        out[(np.abs(xx - centre) < 1 + d * W * 0.006) & dash] = (225, 225, 220)
        return out

    objs.append(("road", road, road_texture))
    if rng.random() < 0.4:  # a parking strip (an ignored class, as in the real labels)
        y0p = hy + (H - hy) * rng.uniform(0.3, 0.5)
        objs.append(
            (
                "parking",
                [
                    [int(road_x(y0p, rl)), int(y0p)],
                    [int(road_x(y0p, rl)) + 12, int(y0p)],
                    [int(road_x(H, rl + 0.1)), H - 1],
                    [int(road_x(H, rl)), H - 1],
                ],
                flat((150, 128, 130), 5, 5),
            )
        )

    # things, sorted far to near by the row they stand on
    things: list[tuple[float, list[tuple[str, Polygon, Texture]]]] = []
    for _ in range(rng.integers(1, 6)):  # cars on the road
        yb = hy + (H - hy) * rng.uniform(0.12, 0.85)
        s = depth(yb)
        w, h = W * 0.2 * s, W * 0.2 * s * rng.uniform(0.42, 0.55)
        x0 = rng.uniform(road_x(yb, rl), max(road_x(yb, rr) - w, road_x(yb, rl) + 1))
        kind = "car" if rng.random() < 0.85 else str(rng.choice(["truck", "bus"]))
        if kind != "car":
            w, h = w * 1.4, h * 2.0
        body = [
            [int(x0), int(yb)],
            [int(x0), int(yb - 0.55 * h)],
            [int(x0 + 0.18 * w), int(yb - h)],
            [int(x0 + 0.82 * w), int(yb - h)],
            [int(x0 + w), int(yb - 0.55 * h)],
            [int(x0 + w), int(yb)],
        ]
        color = (
            CAR_COLORS[rng.integers(len(CAR_COLORS))]
            if kind == "car"
            else ((200, 170, 30), (30, 80, 130))[int(kind == "bus")]
        )
        parts = [(kind, body, with_band(flat(color, 4, 4), (45, 55, 65), 0.08, 0.4))]
        if kind == "car" and rng.random() < 0.5:  # license plates are labelled but never drawn (id -1)
            parts.append(
                (
                    "license plate",
                    rect(x0 + 0.4 * w, yb - 0.22 * h, x0 + 0.6 * w, yb - 0.1 * h),
                    flat((235, 235, 235), 2, 2),
                )
            )
        things.append((yb, parts))
    for _ in range(rng.integers(0, 6)):  # people on the sidewalks
        yb = hy + (H - hy) * rng.uniform(0.15, 0.95)
        s = depth(yb)
        left = rng.random() < 0.5
        lo, hi = (0, road_x(yb, rl) - 4) if left else (road_x(yb, rr) + 4, W)
        if hi - lo < 4:
            continue
        xc, ph = rng.uniform(lo, hi), H * 0.42 * s
        pw = ph * 0.32
        body = [
            [int(xc - pw / 2), int(yb - 0.85 * ph)],
            [int(xc + pw / 2), int(yb - 0.85 * ph)],
            [int(xc + pw / 3), int(yb)],
            [int(xc), int(yb - 0.35 * ph)],
            [int(xc - pw / 3), int(yb)],
        ]
        head = ngon(rng, xc, yb - 0.92 * ph, ph * 0.08, ph * 0.08, 8)
        things.append(
            (
                yb,
                [
                    ("person", body, flat(CLOTHES[rng.integers(len(CLOTHES))], 6, 6)),
                    ("person", head, flat(SKIN, 4, 3)),
                ],
            )
        )
    for _ in range(rng.integers(0, 3)):  # riders on bicycles / motorcycles at the road side
        yb = hy + (H - hy) * rng.uniform(0.2, 0.9)
        s = depth(yb)
        xc = road_x(yb, rl) + W * 0.05 * s if rng.random() < 0.5 else road_x(yb, rr) - W * 0.05 * s
        r = H * 0.06 * s
        vehicle = "bicycle" if rng.random() < 0.6 else "motorcycle"
        wheel_tex = flat((25, 25, 25) if vehicle == "motorcycle" else (110, 20, 30), 3, 3)
        parts = [
            (vehicle, ngon(rng, xc - 1.3 * r, yb - r, r, r, 12), wheel_tex),
            (vehicle, ngon(rng, xc + 1.3 * r, yb - r, r, r, 12), wheel_tex),
            (vehicle, rect(xc - 1.3 * r, yb - 1.6 * r, xc + 1.3 * r, yb - 0.8 * r), wheel_tex),
            (
                "rider",
                [
                    [int(xc - 0.5 * r), int(yb - 1.5 * r)],
                    [int(xc + 0.5 * r), int(yb - 1.5 * r)],
                    [int(xc + 0.4 * r), int(yb - 3.6 * r)],
                    [int(xc - 0.4 * r), int(yb - 3.6 * r)],
                ],
                flat(CLOTHES[rng.integers(len(CLOTHES))], 6, 6),
            ),
            ("rider", ngon(rng, xc, yb - 4.0 * r, 0.4 * r, 0.4 * r, 8), flat(SKIN, 4, 3)),
        ]
        things.append((yb, parts))
    for _ in range(rng.integers(1, 5)):  # poles with a sign or a traffic light, trees
        yb = hy + (H - hy) * rng.uniform(0.1, 0.9)
        s = depth(yb)
        xc = road_x(yb, rl) - W * 0.02 * s if rng.random() < 0.5 else road_x(yb, rr) + W * 0.02 * s
        pw, ph = max(W * 0.008 * s, 1.5), H * 0.85 * s
        if rng.random() < 0.3:  # a tree: trunk and crown are both vegetation
            crown = ngon(rng, xc, yb - ph * 0.85, W * 0.06 * s, ph * 0.25, 16, jitter=0.25)
            things.append(
                (
                    yb,
                    [
                        ("vegetation", rect(xc - pw, yb - ph * 0.7, xc + pw, yb), flat((80, 60, 40), 6, 4)),
                        ("vegetation", crown, flat((55, 110, 35), 25, 20)),
                    ],
                )
            )
            continue
        parts = [("pole", rect(xc - pw / 2, yb - ph, xc + pw / 2, yb), flat((125, 125, 130), 3, 3))]
        if rng.random() < 0.6:
            r = W * 0.018 * s + 1
            shape = ngon(rng, xc, yb - ph, r, r, int(rng.choice([3, 4, 8])))
            color = ((235, 235, 235), (30, 60, 180), (220, 40, 40), (240, 200, 0))[rng.integers(4)]
            parts.append(("traffic sign", shape, flat(color, 3, 3)))
        else:
            lw, lh = W * 0.012 * s + 1, H * 0.07 * s + 2
            lit = ((230, 40, 30), (40, 220, 80), (240, 180, 20))[rng.integers(3)]
            parts.append(
                (
                    "traffic light",
                    rect(xc - lw, yb - ph, xc + lw, yb - ph + lh),
                    with_band(flat((35, 35, 35), 3, 2), lit, 0.15, 0.4),
                )
            )
        things.append((yb, parts))
    for _ in range(rng.integers(0, 3)):  # clutter of ignored classes on the sidewalk
        yb = hy + (H - hy) * rng.uniform(0.2, 0.9)
        s = depth(yb)
        xc = rng.uniform(0, max(road_x(yb, rl) - 5, 1))
        size = W * 0.03 * s + 2
        kind = str(rng.choice(["static", "dynamic"]))
        things.append((yb, [(kind, rect(xc - size, yb - size, xc + size, yb), flat((100, 95, 110), 8, 8))]))
    for _, parts in sorted(things, key=lambda t: t[0]):
        objs.extend(parts)

    # the ego vehicle's bonnet along the bottom edge
    e = H * rng.uniform(0.04, 0.08)
    objs.append(
        (
            "ego vehicle",
            [
                [0, H - 1],
                [0, int(H - e)],
                [int(W * 0.25), int(H - 1.6 * e)],
                [int(W * 0.75), int(H - 1.6 * e)],
                [W - 1, int(H - e)],
                [W - 1, H - 1],
            ],
            flat((22, 22, 26), 3, 6),
        )
    )
    return [(label, clip_polygon(poly, W, H), tex) for label, poly, tex in objs]


def render(
    objs: Iterable[tuple[object, Polygon, Texture]], rng: np.random.Generator, height: int, width: int
) -> np.ndarray:
    canvas = Canvas(rng, height, width)
    for _, poly, tex in objs:
        canvas.fill(poly, tex)
    return canvas.finish(rng)


def write_cityscapes(
    root: Path,
    seed: int,
    train: int,
    val: int,
    height: int = 256,
    width: int = 512,
    cities: dict | list | None = None,
) -> None:
    """Write a Cityscapes-format sample under `root` (leftImg8bit/, gtFine/), replacing it atomically."""
    counts = {"train": train, "val": val}
    cities = _cities(cities)
    with atomic_dir(root) as tmp:
        for split, count in counts.items():
            for i in range(count):
                city = cities[split][i % len(cities[split])]
                name = f"{city}_{i // len(cities[split]):06d}_{ANNOTATED_FRAME:06d}"
                rng = np.random.default_rng([seed, 0, _SPLIT_IDS[split], i])
                objs = cityscapes_scene(rng, height, width)
                image_dir = tmp / "leftImg8bit" / split / city
                gt_dir = tmp / "gtFine" / split / city
                image_dir.mkdir(parents=True, exist_ok=True)
                gt_dir.mkdir(parents=True, exist_ok=True)
                Image.fromarray(render(objs, rng, height, width)).save(image_dir / f"{name}_leftImg8bit.png")
                polygons = {
                    "imgHeight": height,
                    "imgWidth": width,
                    "objects": [{"label": label, "polygon": poly} for label, poly, _ in objs],
                }
                json_path = gt_dir / f"{name}_gtFine_polygons.json"
                json_path.write_text(json.dumps(polygons, indent=4))
                json2labelImg(str(json_path), str(gt_dir / f"{name}_gtFine_labelIds.png"), "ids")
                json2labelImg(str(json_path), str(gt_dir / f"{name}_gtFine_color.png"), "color")
                write_instance_ids(json_path, gt_dir / f"{name}_gtFine_instanceIds.png")


def write_instance_ids(json_path: Path, out: Path) -> None:
    """cityscapesscripts' json2instanceImg, saved as the official 16-bit PNG (its own save needs an old
    Pillow that still wrote 32-bit mode 'I' images as PNG)."""
    annotation = Annotation()
    annotation.fromJsonFile(str(json_path))
    ids = np.asarray(createInstanceImage(annotation, "ids"), dtype=np.int64)
    Image.fromarray(ids.astype(np.uint16)).save(out)


def _cities(cities: dict | list | tuple | None) -> dict[str, tuple[str, ...]]:
    if cities is None:
        return CITIES
    if isinstance(cities, dict):
        return {split: tuple(cities.get(split, CITIES[split])) for split in CITIES}
    return {split: tuple(cities) for split in CITIES}


# --- ADE20K ----------------------------------------------------------------------------------------

ADE_INDEX = {name: i + 1 for i, name in enumerate(ADE20K_CLASSES)}  # annotation value (0 = other)
ADE_TEXTURES = {
    "wall": flat((205, 195, 180), 3, 8),
    "ceiling": flat((235, 235, 230), 2, 4),
    "floor": with_grid(flat((150, 105, 70), 5, 8), (110, 75, 50), (0, 14)),
    "windowpane": with_grid(flat((170, 205, 235), 3, 10), (240, 240, 240), (0, 0)),
    "door": flat((120, 80, 50), 4, 6),
    "painting": flat((60, 120, 160), 18, 25),
    "bed": with_band(flat((230, 225, 210), 4, 4), (180, 60, 60), 0.5, 1.0),
    "table": flat((140, 95, 55), 4, 5),
    "chair": flat((90, 60, 40), 4, 4),
    "cabinet": with_grid(flat((185, 160, 120), 3, 5), (120, 100, 80), (0, 20), 2),
    "curtain": with_grid(flat((150, 40, 60), 5, 5), (120, 30, 45), (0, 7), 2),
    "lamp": flat((250, 235, 170), 3, 3),
    "rug": with_grid(flat((130, 40, 40), 8, 8), (200, 170, 60), (10, 10), 2),
    "plant": flat((50, 120, 40), 22, 15),
    "sky": flat((120, 170, 230), 2, 14),
    "mountain": flat((110, 105, 120), 8, 14),
    "building": with_windows(flat((170, 150, 130), 4, 8), (60, 70, 90), (18, 12)),
    "tree": flat((50, 100, 35), 24, 18),
    "road": flat((95, 95, 100), 6, 6),
    "grass": flat((80, 150, 60), 14, 10),
    "sidewalk": with_grid(flat((180, 170, 165), 4, 4), (140, 130, 125), (8, 16)),
    "car": with_band(flat((40, 60, 150), 4, 4), (45, 55, 65), 0.08, 0.4),
    "person": flat((60, 40, 80), 6, 6),
    "water": flat((40, 90, 140), 6, 20),
    "sofa": flat((80, 90, 120), 5, 5),
}


def _ade_texture(name: str) -> Texture:
    if name in ADE_TEXTURES:
        return ADE_TEXTURES[name]
    return (
        flat(ADE20K_PALETTE[ADE_INDEX[name] - 1], 5, 5)
        if name in ADE_INDEX
        else flat((128, 128, 128), 30, 20)
    )


def ade20k_scene(rng: np.random.Generator, height: int, width: int) -> list[tuple[int, Polygon, Texture]]:
    """Back-to-front (annotation value, polygon, texture): a room or an outdoor view."""
    H, W = height, width
    objs: list[tuple[str, Polygon]] = []
    if rng.random() < 0.5:  # a room
        cy, fy, ix = H * rng.uniform(0.12, 0.22), H * rng.uniform(0.55, 0.68), W * rng.uniform(0.1, 0.22)
        objs += [
            ("wall", rect(0, 0, W, H)),
            ("ceiling", [[0, 0], [W, 0], [int(W - ix), int(cy)], [int(ix), int(cy)]]),
            ("floor", [[int(ix), int(fy)], [int(W - ix), int(fy)], [W, H], [0, H]]),
        ]
        wx = rng.uniform(ix + 5, W * 0.5)
        objs.append(("windowpane", rect(wx, cy + H * 0.08, wx + W * 0.2, fy - H * 0.15)))
        if rng.random() < 0.6:
            objs.append(("curtain", rect(wx - W * 0.06, cy + H * 0.04, wx, fy - H * 0.05)))
        dx = rng.uniform(W * 0.55, W - ix - W * 0.12)
        objs.append(("door", rect(dx, cy + H * 0.12, dx + W * 0.1, fy)))
        if rng.random() < 0.5:
            objs.append(("painting", rect(W * 0.3, cy + H * 0.1, W * 0.42, cy + H * 0.22)))
        if rng.random() < 0.5:
            objs.append(
                (
                    "rug",
                    [
                        [int(W * 0.3), int(fy + H * 0.1)],
                        [int(W * 0.7), int(fy + H * 0.1)],
                        [int(W * 0.8), int(H * 0.95)],
                        [int(W * 0.2), int(H * 0.95)],
                    ],
                )
            )
        furniture = rng.choice(["bed", "table", "sofa", "cabinet"], size=rng.integers(1, 3), replace=False)
        for k, name in enumerate(furniture):
            x0 = W * (0.08 + 0.45 * k) + rng.uniform(0, W * 0.1)
            y1 = H * rng.uniform(0.8, 0.97)
            objs.append((str(name), rect(x0, y1 - H * 0.22, x0 + W * 0.35, y1)))
        if rng.random() < 0.6:
            cx = rng.uniform(W * 0.1, W * 0.9)
            objs.append(("chair", rect(cx, H * 0.6, cx + W * 0.08, H * 0.85)))
        if rng.random() < 0.5:
            cx = rng.uniform(W * 0.05, W * 0.9)
            objs += [("plant", ngon(rng, cx, H * 0.7, W * 0.05, H * 0.08, 10, jitter=0.3))]
        objs.append(("lamp", ngon(rng, W * rng.uniform(0.3, 0.7), cy + H * 0.03, W * 0.05, H * 0.03, 8)))
    else:  # an outdoor view
        hy = H * rng.uniform(0.35, 0.55)
        objs += [("sky", rect(0, 0, W, hy + 2))]
        peaks = np.linspace(0, W, int(rng.integers(3, 7)))
        ridge = [[int(x), int(hy - H * rng.uniform(0.05, 0.2))] for x in peaks]
        objs.append(("mountain", [[0, int(hy) + 2]] + ridge + [[W, int(hy) + 2]]))
        x = rng.uniform(-W * 0.1, W * 0.2)
        while x < W:
            bw = W * rng.uniform(0.12, 0.25)
            if rng.random() < 0.6:
                objs.append(("building", rect(x, hy - H * rng.uniform(0.1, 0.35), x + bw, hy + 4)))
            else:
                objs.append(("tree", ngon(rng, x + bw / 2, hy - H * 0.08, bw / 2, H * 0.12, 14, jitter=0.2)))
            x += bw * rng.uniform(1.0, 1.6)
        ground = str(rng.choice(["grass", "water", "grass"]))
        objs.append((ground, rect(0, hy, W, H)))
        objs.append(
            (
                "road",
                [[int(W * 0.4), int(hy)], [int(W * 0.55), int(hy)], [int(W * 0.9), H], [int(W * 0.1), H]],
            )
        )
        objs.append(
            (
                "sidewalk",
                [
                    [int(W * 0.9), H],
                    [int(W * 0.55), int(hy)],
                    [int(W * 0.6), int(hy)],
                    [W, int(H * 0.9)],
                    [W, H],
                ],
            )
        )
        for _ in range(rng.integers(0, 3)):
            yb = rng.uniform(hy + (H - hy) * 0.3, H * 0.95)
            s = (yb - hy) / (H - hy)
            x0 = rng.uniform(W * 0.15, W * 0.6)
            objs.append(("car", rect(x0, yb - H * 0.12 * s, x0 + W * 0.25 * s, yb)))
        for _ in range(rng.integers(0, 3)):
            yb = rng.uniform(hy + (H - hy) * 0.3, H * 0.95)
            s = (yb - hy) / (H - hy)
            xc = rng.uniform(0, W)
            objs.append(("person", rect(xc, yb - H * 0.3 * s, xc + W * 0.05 * s, yb)))
    for _ in range(rng.integers(0, 3)):  # unlabelled clutter ("other" = 0)
        cx, cy = rng.uniform(0, W), rng.uniform(0, H)
        objs.append(("other", ngon(rng, cx, cy, W * 0.04, H * 0.04, 6, jitter=0.3)))
    return [(ADE_INDEX.get(name, 0), clip_polygon(poly, W, H), _ade_texture(name)) for name, poly in objs]


def write_ade20k(root: Path, seed: int, train: int, val: int, height: int = 256, width: int = 256) -> None:
    """Write `root/ADEChallengeData2016/...` (images jpg, annotations png), replacing `root` atomically.
    Image widths vary around `width` (×0.75..1.33) like ADE20K's mixed aspect ratios."""
    counts = {"training": train, "validation": val}
    scenes = []
    with atomic_dir(root) as tmp:
        top = tmp / "ADEChallengeData2016"
        for folder, count in counts.items():
            split = "train" if folder == "training" else "val"
            (top / "images" / folder).mkdir(parents=True, exist_ok=True)
            (top / "annotations" / folder).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                rng = np.random.default_rng([seed, 1, _SPLIT_IDS[split], i])
                w = int(round(width * rng.uniform(0.75, 1.33) / 2) * 2)
                objs = ade20k_scene(rng, height, w)
                name = f"ADE_{split}_{i + 1:08d}"
                annotation = Image.new("L", (w, height), 0)
                draw = ImageDraw.Draw(annotation)
                for value, poly, _ in objs:
                    draw.polygon([tuple(p) for p in poly], fill=value)
                image = render(objs, rng, height, w)
                Image.fromarray(image).save(top / "images" / folder / f"{name}.jpg", quality=92)
                annotation.save(top / "annotations" / folder / f"{name}.png")
                scenes.append(f"{name} {'bedroom' if objs[0][0] == ADE_INDEX['wall'] else 'street'}")
        (top / "sceneCategories.txt").write_text("\n".join(scenes) + "\n")


# --- archives and atomic output --------------------------------------------------------------------


def write_zip(
    archive: Path, root: Path, members: Iterable[str], extra: dict[str, bytes] | None = None
) -> None:
    """Zip the folders `members` (relative to root) into `archive`, stored with their paths, atomically."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{archive.name}.", suffix=".tmp", dir=archive.parent)
    os.fchmod(fd, FILE_MODE)  # mkstemp makes 0600 files
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
            for name, data in sorted((extra or {}).items()):
                zf.writestr(zipfile.ZipInfo(name, _ZIP_DATE), data)
            for member in members:
                for path in sorted((root / member).rglob("*")):
                    if path.is_file():
                        info = zipfile.ZipInfo(path.relative_to(root).as_posix(), _ZIP_DATE)
                        zf.writestr(info, path.read_bytes())
        os.replace(tmp, archive)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_cityscapes_archives(root: Path, dest: Path) -> None:
    """The two official archives of a Cityscapes-format folder: leftImg8bit_trainvaltest.zip and
    gtFine_trainvaltest.zip, each with its top-level folder plus README / license.txt like the real ones."""
    extra = {"README": b"Cityscapes-format sample (generated)\n", "license.txt": b"generated sample data\n"}
    write_zip(dest / "leftImg8bit_trainvaltest.zip", root, ["leftImg8bit"], extra)
    write_zip(dest / "gtFine_trainvaltest.zip", root, ["gtFine"], extra)


def write_ade20k_archive(root: Path, dest: Path) -> None:
    write_zip(dest / "ADEChallengeData2016.zip", root, ["ADEChallengeData2016"])
