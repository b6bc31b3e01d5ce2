"""PASCAL VOC 2012, optionally with the SBD-augmented training masks (``trainaug``).

The manifest's split column holds the role (``train`` / ``val``); which list fed each role is
recorded in classes.json under ``source_splits``. ``trainaug`` takes its masks from
``dataset.voc.sbd_masks`` (SegmentationClassAug) and its ids from ``dataset.voc.trainaug_list``;
every other list name is ``ImageSets/Segmentation/<name>.txt`` with SegmentationClass masks.
Image labels come from the masks (unique values minus background 0 and ignore 255).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.datasets.common import Dataset, Entry, config_path, existing_dir, require_entries
from pipeline.errors import BadInputError

SECTION = "dataset.voc"
CLASS_NAMES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
]


def parse_list_line(line: str) -> str | None:
    """The image id of one list line, or None for a blank line.

    Accepts ``2007_000032`` and the common trainaug format
    ``/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png`` (the id is the stem
    of the first path; masks are taken from the configured folder, not from the second path).
    """
    tokens = line.split()
    if not tokens:
        return None
    return Path(tokens[0]).stem if "/" in tokens[0] or "." in tokens[0] else tokens[0]


def read_id_list(path: Path) -> list[str]:
    if not path.is_file():
        raise BadInputError(f"{path}: image list not found")
    lines = path.read_text(encoding="utf-8").splitlines()
    return [image_id for image_id in map(parse_list_line, lines) if image_id is not None]


def split_sources(cfg: dict, root: Path, list_name: str) -> tuple[Path, Path]:
    """(id list file, mask folder) of a VOC list name."""
    if list_name == "trainaug":
        return (config_path(cfg, "trainaug_list", SECTION),
                existing_dir(config_path(cfg, "sbd_masks", SECTION), f"{SECTION}.sbd_masks"))
    return (root / "ImageSets" / "Segmentation" / f"{list_name}.txt",
            existing_dir(root / "SegmentationClass", "VOC SegmentationClass"))


def index_voc(cfg: dict) -> Dataset:
    root = existing_dir(config_path(cfg, "root", SECTION), f"{SECTION}.root")
    images = existing_dir(root / "JPEGImages", "VOC JPEGImages")
    roles = {"train": str(cfg.get("train_split") or "trainaug"),
             "val": str(cfg.get("val_split") or "val")}
    entries = []
    for role, list_name in roles.items():
        list_path, masks = split_sources(cfg, root, list_name)
        entries.extend(
            Entry(image_id=image_id, image_path=images / f"{image_id}.jpg", split=role,
                  mask_path=masks / f"{image_id}.png")
            for image_id in read_id_list(list_path)
        )
    return Dataset("voc", list(CLASS_NAMES), require_entries(entries, str(root)),
                   extra={"source_splits": roles})
