"""COCO (2014 layout): instance annotations -> semantic label PNGs, and indexing.

Conversion choices (the usual ones for COCO semantic segmentation in weakly/unsupervised work):
- classes: 0 background, then the categories in ascending category-id order as 1..K
  (81 classes for COCO's 80 categories);
- instances are drawn largest area first, so small objects lying on big ones stay visible;
- crowd regions (``iscrowd``, RLE) get 255 = ignore: they mix many objects and background, so
  no single class is right for their pixels. They are drawn before the instances, so a pixel of
  an individually annotated instance keeps its class. A class present only as a crowd therefore
  does not appear in the image's labels (labels come from the masks);
- images without annotations are kept, all background.
Masks are drawn at the size the JSON gives for the image (the stored pixel grid).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.atomic import write_json
from pipeline.datasets.common import IGNORE_INDEX, Dataset, Entry, absolute, config_path, existing_dir, require_entries
from pipeline.errors import BadInputError, ConfigError
from pipeline.imageio import write_label_png

log = logging.getLogger(__name__)

SECTION = "dataset.coco"
SPLITS = ("train", "val")
CATEGORIES_FILE = "categories.json"


def _load_coco(annotations_json: Path):
    from pycocotools.coco import COCO

    if not annotations_json.is_file():
        raise BadInputError(f"{annotations_json}: annotations file not found")
    try:
        # pycocotools reports its progress on stdout, which belongs to the caller: silence it.
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(annotations_json))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise BadInputError(f"{annotations_json}: not a COCO instances file ({exc!r})") from None


def semantic_mask(coco, image_id: int, class_of_category: dict[int, int]) -> np.ndarray:
    """uint8 H x W label mask of one image (see the module docstring for the drawing order)."""
    info = coco.imgs[image_id]
    mask = np.zeros((info["height"], info["width"]), dtype=np.uint8)
    annotations = coco.imgToAnns.get(image_id, [])
    crowds = [a for a in annotations if a.get("iscrowd", 0)]
    instances = sorted((a for a in annotations if not a.get("iscrowd", 0)),
                       key=lambda a: a.get("area", 0.0), reverse=True)
    for annotation in crowds:
        mask[coco.annToMask(annotation).astype(bool)] = IGNORE_INDEX
    for annotation in instances:
        mask[coco.annToMask(annotation).astype(bool)] = class_of_category[annotation["category_id"]]
    return mask


def convert_coco_annotations(annotations_json: Path, out_dir: Path, threads: int) -> None:
    """Write <file_name stem>.png per image into out_dir, then categories.json (completion)."""
    annotations_json, out_dir = Path(annotations_json), Path(out_dir)
    (out_dir / CATEGORIES_FILE).unlink(missing_ok=True)  # a stale one would fake completion
    coco = _load_coco(annotations_json)
    category_ids = sorted(coco.cats)
    if len(category_ids) + 1 > IGNORE_INDEX:
        raise BadInputError(f"{annotations_json}: {len(category_ids)} categories do not fit 8 bit")
    class_of_category = {cat: index for index, cat in enumerate(category_ids, start=1)}
    image_ids = sorted(coco.imgs)
    file_names = [coco.imgs[i]["file_name"] for i in image_ids]

    def convert(image_id: int) -> None:
        file_name = coco.imgs[image_id]["file_name"]
        try:
            mask = semantic_mask(coco, image_id, class_of_category)
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise BadInputError(
                f"{annotations_json}: bad annotation of image {file_name} ({exc!r})"
            ) from None
        write_label_png(out_dir / f"{Path(file_name).stem}.png", mask)

    out_dir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for _ in tqdm(pool.map(convert, image_ids), total=len(image_ids), desc="coco masks",
                      unit="img", file=sys.stderr):
            pass
    write_json(out_dir / CATEGORIES_FILE, {
        "names": ["background"] + [coco.cats[c]["name"] for c in category_ids],
        "category_ids": category_ids,
        "annotations": str(annotations_json),
        "file_names": sorted(file_names),
    })
    log.info("%d COCO masks from %s in %s", len(image_ids), annotations_json, out_dir)


def _read_categories(masks_dir: Path) -> dict:
    path = masks_dir / CATEGORIES_FILE
    if not path.is_file():
        raise BadInputError(f"{path}: missing; the COCO mask conversion did not finish")
    return json.loads(path.read_text(encoding="utf-8"))


def index_coco(cfg: dict, coco_masks: dict[str, str | os.PathLike]) -> Dataset:
    """Entries of the train and val images listed by the converted masks' categories.json."""
    root = existing_dir(config_path(cfg, "root", SECTION), f"{SECTION}.root")
    names: list[str] | None = None
    entries = []
    for split in SPLITS:
        if split not in coco_masks:
            raise ConfigError(f"index params coco_masks lack the {split!r} mask folder")
        masks_dir = absolute(coco_masks[split])
        categories = _read_categories(masks_dir)
        if names is not None and categories["names"] != names:
            raise BadInputError(f"{masks_dir / CATEGORIES_FILE}: categories differ from train's")
        names = categories["names"]
        images = existing_dir(root / cfg.get(f"{split}_images", f"{split}2014"),
                              f"{SECTION}.{split}_images")
        entries.extend(
            Entry(image_id=Path(name).stem, image_path=images / name, split=split,
                  mask_path=masks_dir / f"{Path(name).stem}.png")
            for name in categories["file_names"]
        )
    return Dataset("coco", names, require_entries(entries, str(root)))
