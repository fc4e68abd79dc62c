"""Cityscapes-format sample: street scenes written in the official gtFine layout.

A street: sky on top, buildings with windows along the sides, sidewalks, a road with lane marks towards a
vanishing point, trees, poles with signs and lights, cars, people, riders, the ego vehicle at the bottom.
`leftImg8bit/<split>/<city>/<city>_<seq:06d>_<frame:06d>_leftImg8bit.png` (RGB PNG) and
`gtFine/<split>/<city>/<...>_gtFine_{polygons.json,labelIds.png,color.png,instanceIds.png}`, the PNGs
made by cityscapesscripts' own json2labelImg / json2instanceImg from the JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from cityscapesscripts.helpers.annotation import Annotation
from cityscapesscripts.preparation.json2instanceImg import createInstanceImage
from cityscapesscripts.preparation.json2labelImg import json2labelImg
from PIL import Image

from components.atomic import atomic_dir
from components.sample.draw import (
    SPLIT_IDS,
    Canvas,
    Polygon,
    Texture,
    clip_polygon,
    flat,
    ngon,
    rect,
    render,
    vertical_gradient,
    with_band,
    with_grid,
    with_windows,
)

CITIES = {"train": ("aachen", "bochum", "bremen"), "val": ("frankfurt", "lindau", "munster")}
ANNOTATED_FRAME = 19  # the Cityscapes frame carrying the fine annotation

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
                rng = np.random.default_rng([seed, 0, SPLIT_IDS[split], i])
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
