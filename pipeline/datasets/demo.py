"""Synthetic demo dataset: shapes that differ in outline, colour and texture on muted backgrounds.

Our own design (no paper): four foreground classes, each separable by shape AND colour AND
texture, so both colour-based and structure-based features can find them:

    1 disc      red     with light dots
    2 square    green   with dark stripes
    3 triangle  blue    with a checkerboard
    4 cross     yellow  with per-pixel noise

Every image holds 1-3 objects (later ones drawn on top, each left at least
``MIN_VISIBLE_FRACTION`` visible) on a smooth, randomly coloured background. Each image has its
own random generator seeded by (seed, split, index), so the files do not depend on how many
other images are generated, and the same seed gives byte-identical PNGs.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.atomic import atomic_path, write_json
from pipeline.datasets.common import Dataset, Entry, absolute, require_entries
from pipeline.errors import BadInputError
from pipeline.imageio import write_label_png

log = logging.getLogger(__name__)

CLASS_NAMES = ["background", "disc", "square", "triangle", "cross"]
SPLITS = ("train", "val")
MAX_OBJECTS = 3
# An object hidden under later ones would be a label with (almost) no pixels: keep it visible.
MIN_VISIBLE_FRACTION = 0.4
_PLACEMENT_TRIES = 20

# Base colour and texture colour per class (RGB); jittered a little per object.
_CLASS_COLOURS = {
    1: ((205, 45, 40), (255, 175, 160)),
    2: ((45, 165, 60), (15, 85, 25)),
    3: ((45, 70, 205), (150, 170, 255)),
    4: ((225, 200, 40), (225, 200, 40)),
}


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), index])


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Smooth low-frequency noise in muted colours plus a little grain (float RGB)."""
    base = rng.uniform(70, 150, size=3)
    grid = base + rng.normal(0.0, 18.0, size=(3, 4, 3))  # a coarse 4x3 grid of nearby colours
    coarse = Image.fromarray(np.clip(grid, 0, 255).astype(np.uint8), mode="RGB")
    smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), np.float64)
    return smooth + rng.normal(0.0, 4.0, size=(height, width, 3))


def _local_coords(
    xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, angle: float
) -> tuple[np.ndarray, np.ndarray]:
    cos, sin = np.cos(angle), np.sin(angle)
    dx, dy = xx - cx, yy - cy
    return cos * dx + sin * dy, -sin * dx + cos * dy


def _shape_mask(cls: int, u: np.ndarray, v: np.ndarray, size: float) -> np.ndarray:
    if cls == 1:
        return u**2 + v**2 <= size**2
    if cls == 2:
        return np.maximum(np.abs(u), np.abs(v)) <= size * 0.8
    if cls == 3:
        # Equilateral triangle with circumradius `size`: inside all three edge half-planes.
        inside = np.ones(u.shape, dtype=bool)
        for k in range(3):
            normal = 2 * np.pi * k / 3 + np.pi / 2
            inside &= np.cos(normal) * u + np.sin(normal) * v <= size / 2
        return inside
    arm = size * 0.3
    return ((np.abs(u) <= size) & (np.abs(v) <= arm)) | ((np.abs(v) <= size) & (np.abs(u) <= arm))


def _texture(cls: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Fraction (0..1) of the texture colour mixed into the base colour, per pixel."""
    if cls == 1:
        period = 7.0
        du, dv = np.mod(u, period) - period / 2, np.mod(v, period) - period / 2
        return (du**2 + dv**2 <= (period / 4) ** 2).astype(np.float64)
    if cls == 2:
        return (np.mod(u, 8.0) < 3.0).astype(np.float64)
    if cls == 3:
        return ((np.floor(u / 5.0) + np.floor(v / 5.0)) % 2).astype(np.float64)
    return np.zeros(u.shape)


def _object_pixels(
    cls: int, u: np.ndarray, v: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    base, accent = (np.array(c, dtype=np.float64) for c in _CLASS_COLOURS[cls])
    jitter = rng.normal(0.0, 10.0, size=3)
    mix = _texture(cls, u, v)[..., None]
    colour = base + jitter + mix * (accent - base)
    if cls == 4:
        colour = colour + rng.normal(0.0, 28.0, size=u.shape)[..., None]
    return colour


def _draw_image(
    rng: np.random.Generator, width: int, height: int, first_class: int
) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 image, uint8 label mask) with 1..MAX_OBJECTS objects."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    image = _background(rng, width, height)
    mask = np.zeros((height, width), dtype=np.uint8)
    owners = np.zeros((height, width), dtype=np.int64)  # which object (1-based) owns a pixel
    areas: list[int] = []
    n_objects = int(rng.integers(1, MAX_OBJECTS + 1))
    short_side = min(width, height)
    for k in range(n_objects):
        # The first object's class cycles over images so every class occurs in every split.
        cls = first_class if k == 0 else int(rng.integers(1, len(CLASS_NAMES)))
        for _ in range(_PLACEMENT_TRIES):
            size = rng.uniform(0.14, 0.3) * short_side
            cx = rng.uniform(size, width - size)
            cy = rng.uniform(size, height - size)
            u, v = _local_coords(xx, yy, cx, cy, rng.uniform(0, 2 * np.pi))
            shape = _shape_mask(cls, u, v, size)
            new_owners = np.where(shape, k + 1, owners)
            if _all_visible(new_owners, areas):
                break
        else:
            break  # no room left that keeps earlier objects visible: fewer objects
        owners = new_owners
        areas.append(int(shape.sum()))
        image[shape] = _object_pixels(cls, u, v, rng)[shape]
        mask[shape] = cls
    return np.clip(np.round(image), 0, 255).astype(np.uint8), mask


def _all_visible(owners: np.ndarray, areas: list[int]) -> bool:
    counts = np.bincount(owners.ravel(), minlength=len(areas) + 2)
    return all(counts[i + 1] >= MIN_VISIBLE_FRACTION * area for i, area in enumerate(areas))


def _write_rgb_png(path: Path, image: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(image, mode="RGB").save(tmp, format="PNG")


def generate_demo(
    out_dir: Path, seed: int, n_train: int, n_val: int, width: int, height: int
) -> None:
    """Write images/<split>/<id>.png, masks/<split>/<id>.png, then meta.json (completion mark)."""
    out_dir = Path(out_dir)
    meta_path = out_dir / "meta.json"
    # An older meta.json would make a half-written folder look complete.
    meta_path.unlink(missing_ok=True)
    image_ids: dict[str, list[str]] = {}
    for split, count in zip(SPLITS, (n_train, n_val)):
        image_ids[split] = []
        for index in range(count):
            image_id = f"{split}_{index:04d}"
            first_class = index % (len(CLASS_NAMES) - 1) + 1
            image, mask = _draw_image(_image_rng(seed, split, index), width, height, first_class)
            _write_rgb_png(out_dir / "images" / split / f"{image_id}.png", image)
            write_label_png(out_dir / "masks" / split / f"{image_id}.png", mask)
            image_ids[split].append(image_id)
    meta = {"names": CLASS_NAMES, "seed": seed, "width": width, "height": height,
            "images": image_ids}
    write_json(meta_path, meta)
    log.info("demo dataset: %d train + %d val images in %s", n_train, n_val, out_dir)


def index_demo(demo_root: str | os.PathLike) -> Dataset:
    """Entries listed by the demo folder's meta.json (written last, so it marks completion)."""
    root = absolute(demo_root)
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        raise BadInputError(f"{meta_path}: missing; the demo folder is incomplete")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    entries = [
        Entry(
            image_id=image_id,
            image_path=root / "images" / split / f"{image_id}.png",
            split=split,
            mask_path=root / "masks" / split / f"{image_id}.png",
        )
        for split, ids in meta["images"].items()
        for image_id in ids
    ]
    return Dataset("demo", list(meta["names"]), require_entries(entries, str(root)))
