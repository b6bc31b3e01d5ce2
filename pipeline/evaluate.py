"""Evaluation stage: score a folder of predicted label PNGs against the GT masks of one split.

Streams over the manifest rows of the split that have a GT mask: each prediction and GT mask is
decoded, added to a K × C confusion (``pipeline.metrics``), and dropped, so memory does not grow
with the dataset. ``weak``: predicted ids are class ids (no matching). ``unsupervised``: predicted
ids are clusters, mapped to classes on the dataset confusion (Hungarian on IoU when K ≤ C,
majority vote when K > C; see ``pipeline.metrics``). mIoU_shape (paper 000 App. F) is computed per
image from the raw predicted ids in both modes.

Outputs: a per-class CSV (class id, name, IoU, the predicted ids mapped to it, GT pixels) and a
JSON summary (mIoU, pixel accuracy, mIoU_shape, COCO-style discovered/with-cluster counts, the
raw confusion matrix and the mapping). Scores are fractions in [0, 1]; undefined values are null.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline import metrics
from pipeline.atomic import atomic_path, write_json
from pipeline.datasets import read_classes, read_manifest
from pipeline.errors import BadInputError, ConfigError
from pipeline.imageio import load_mask, mask_in_folders

log = logging.getLogger(__name__)

CSV_COLUMNS = ["class_id", "class_name", "iou", "matched_ids", "gt_pixels"]
MODES = ("weak", "unsupervised")


@dataclass(frozen=True)
class Accumulated:
    confusion: np.ndarray  # K × C, rows predicted ids, columns GT classes
    shape_sum: float  # sum of per-image mIoU_shape
    shape_images: int  # images with at least one GT pixel
    images: int


def evaluate_masks(
    mask_dir: Path | Sequence[Path],
    manifest_path: Path,
    classes_path: Path,
    split: str,
    mode: str,
    out_json: Path,
    out_csv: Path,
    num_predicted_classes: int | None = None,
    *,
    matching: str = "auto",
    discovered_iou: float = 0.2,
) -> dict:
    """Score ``<mask_dir>/{image_id}.png`` for every image of ``split`` that has a GT mask; write
    ``out_csv`` and ``out_json``; return the summary. ``mask_dir`` may be several folders (e.g.
    one per shard): each image is looked up in them in order.

    ``num_predicted_classes`` (unsupervised only): number of predicted ids K (0..K-1); default
    the number of classes. ``matching``: auto | hungarian | majority (unsupervised only).
    ``discovered_iou``: IoU at which a class counts as discovered (COMUS, paper 002: 0.2).
    """
    if mode not in MODES:
        raise ConfigError(f"evaluation mode must be one of {MODES}, not {mode!r}")
    classes = read_classes(classes_path)
    num_classes = classes.get("num_classes")
    if not num_classes:
        raise BadInputError(f"{classes_path}: no classes, so there is no ground truth to evaluate")
    names = classes.get("names") or [str(i) for i in range(num_classes)]
    ignore = int(classes.get("ignore_index", metrics.IGNORE_INDEX))
    num_predicted = _num_predicted(mode, num_predicted_classes, num_classes)

    manifest = read_manifest(manifest_path)
    rows = manifest[(manifest["split"] == split) & (manifest["mask_path"] != "")]
    if rows.empty:
        raise BadInputError(f"{manifest_path}: no image of split {split!r} has a ground-truth mask")
    mask_dirs = [Path(mask_dir)] if isinstance(mask_dir, (str, Path)) else [Path(d) for d in mask_dir]

    acc = accumulate(rows, mask_dirs, num_predicted, num_classes, ignore, manifest_path)
    summary = summarise(acc, mode, matching, discovered_iou)
    summary.update({"split": split, "mode": mode, "num_classes": num_classes,
                    "num_predicted_classes": num_predicted})
    frame = per_class_frame(summary, names, acc.confusion.sum(axis=0))
    with atomic_path(out_csv) as tmp:
        frame.to_csv(tmp, index=False)
    write_json(out_json, _json_safe(summary))
    log.info(
        "%s %s: mIoU %.1f, pixel accuracy %.1f, mIoU_shape %.1f over %d images (matching: %s)",
        mode, split, 100 * summary["miou"], 100 * summary["pixel_accuracy"],
        100 * summary["miou_shape"], acc.images, summary["matching"],
    )
    return summary


def _num_predicted(mode: str, num_predicted_classes: int | None, num_classes: int) -> int:
    if mode == "weak":
        if num_predicted_classes not in (None, num_classes):
            raise ConfigError(
                f"weak evaluation predicts the {num_classes} classes themselves, not "
                f"{num_predicted_classes} ids"
            )
        return num_classes
    if num_predicted_classes is None:
        return num_classes
    if num_predicted_classes < 1 or num_predicted_classes > metrics.IGNORE_INDEX:
        raise ConfigError(f"num_predicted_classes must be 1..255, not {num_predicted_classes}")
    return int(num_predicted_classes)


def find_prediction(mask_dirs: Sequence[Path], image_id: str, manifest_path: Path) -> Path:
    """The first ``<dir>/{image_id}.png``; BadInputError naming the image when none exists."""
    path = mask_in_folders(mask_dirs, image_id)
    if path is not None:
        return path
    where = ", ".join(str(folder / f"{image_id}.png") for folder in mask_dirs)
    raise BadInputError(f"no prediction for image {image_id!r} of {manifest_path} (expected {where})")


def accumulate(rows: pd.DataFrame, mask_dirs: Sequence[Path], num_predicted: int, num_classes: int,
               ignore: int, manifest_path: Path) -> Accumulated:
    """One pass over the images: dataset confusion and the per-image mIoU_shape sum."""
    confusion = np.zeros((num_predicted, num_classes), dtype=np.int64)
    shape_sum, shape_images = 0.0, 0
    triples = zip(rows["image_id"], rows["image_path"], rows["mask_path"])
    for image_id, image_path, mask_path in tqdm(triples, total=len(rows), desc="evaluate", unit="img",
                                                file=sys.stderr):
        pred = load_mask(find_prediction(mask_dirs, image_id, manifest_path))
        gt = load_mask(mask_path, image_path)
        counts = metrics.confusion_update(confusion, pred, gt, ignore=ignore, image_id=image_id)
        shape = metrics.image_shape_iou(counts)
        if shape is not None:
            shape_sum += shape
            shape_images += 1
    return Accumulated(confusion, shape_sum, shape_images, len(rows))


def summarise(acc: Accumulated, mode: str, matching: str, discovered_iou: float) -> dict:
    """Scores of the accumulated confusion; unsupervised ids are first mapped to classes."""
    num_predicted, num_classes = acc.confusion.shape
    if mode == "weak":
        mapping, used = np.arange(num_classes), "none"
        in_class_space = acc.confusion
    else:
        mapping, used = metrics.match_clusters(acc.confusion, matching)
        in_class_space = metrics.remap_confusion(acc.confusion, mapping)
    iou = metrics.per_class_iou(in_class_space)
    precision, recall = metrics.per_class_precision_recall(in_class_space)
    counts = metrics.discovery_counts(iou, discovered_iou)
    return {
        "images": acc.images,
        "matching": used,
        "miou": metrics.mean_iou(iou),
        "pixel_accuracy": metrics.pixel_accuracy(in_class_space),
        "precision": metrics.mean_over_classes(precision),
        "recall": metrics.mean_over_classes(recall),
        "miou_shape": acc.shape_sum / acc.shape_images if acc.shape_images else math.nan,
        "miou_shape_images": acc.shape_images,
        "iou": iou.tolist(),
        "discovered_iou": counts.threshold,
        "discovered": counts.discovered,
        "miou_discovered": counts.miou_discovered,
        "with_cluster": counts.with_cluster,
        "miou_with_cluster": counts.miou_with_cluster,
        # mapping[k] = class of predicted id k (-1: unmatched); identity in the weak mode.
        "mapping": mapping.tolist(),
        "confusion": acc.confusion.tolist(),
    }


def per_class_frame(summary: dict, names: Sequence[str], gt_pixels: np.ndarray) -> pd.DataFrame:
    owners = metrics.clusters_of_class(np.asarray(summary["mapping"]), len(names))
    return pd.DataFrame({
        "class_id": range(len(names)),
        "class_name": list(names),
        "iou": summary["iou"],
        "matched_ids": [" ".join(str(k) for k in ids) for ids in owners],
        "gt_pixels": gt_pixels.astype(np.int64),
    }, columns=CSV_COLUMNS)


def _json_safe(value):
    """NaN (undefined score) -> null: JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value
