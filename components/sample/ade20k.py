"""ADE20K-format sample: rooms and outdoor views written in the official SceneParsing layout.

`ADEChallengeData2016/{images,annotations}/{training,validation}/ADE_{train,val}_%08d.{jpg,png}`,
annotations uint8 with 0 = other, 1..150 = the classes (mmseg order).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from components.atomic import atomic_dir
from components.learning.data.datasets.ade20k import CLASSES as ADE20K_CLASSES
from components.learning.data.datasets.ade20k import PALETTE as ADE20K_PALETTE
from components.sample.draw import (
    SPLIT_IDS,
    Polygon,
    Texture,
    clip_polygon,
    flat,
    ngon,
    rect,
    render,
    with_band,
    with_grid,
    with_windows,
)

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
                rng = np.random.default_rng([seed, 1, SPLIT_IDS[split], i])
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

