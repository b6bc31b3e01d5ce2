"""How good are the pseudo-labels? Only when the dataset has ground truth for its train split.

Two measures, each after its own one-to-one Hungarian matching of pseudo-classes to classes
(clusters have no names; paper 000 Sec. 4 maps pseudo-labels to GT labels by Hungarian matching):

- Pseudo multi-label F1 (paper 000 Appendix: 53 macro / 51 micro on VOC trainaug). Clusters
  1..k are matched to foreground classes 1..C-1 on the cluster×class co-occurrence of image-level
  labels (number of images where both appear), then sklearn's macro and micro F1 over the
  foreground classes. Every GT-labelled train image counts; an image whose crops were all
  filtered out predicts the empty set. Classes with no GT image and no prediction are left out of
  the macro mean. Clusters left unmatched (k > C-1) predict nothing.
- mIoU of the pseudo maps (COMUS / Deep Spectral protocol): each gh×gw map is upsampled with
  nearest neighbour to its mask's H×W, a confusion matrix (background, clusters 1..k,
  "unpredicted" for 255; × GT classes) is accumulated image by image with np.bincount over the
  non-255 GT pixels, clusters are matched to foreground classes on its IoU matrix, background 0
  stays class 0. Unpredicted pixels and pixels of unmatched clusters count as misses.

Upsampling: when the maps file carries the image's ``geometry`` (resize scale and sizes from
``pipeline.features``), pixel (y, x) of the original image takes the patch that covers its
resized position, and pixels cropped away at the bottom/right take the nearest patch. Without
geometry the map is stretched over the whole mask (an approximation when the features stage
cropped or padded).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors import safe_open
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import precision_recall_fscore_support
from tqdm import tqdm

from pipeline import metrics, shards
from pipeline.atomic import atomic_path, write_text
from pipeline.datasets import parse_labels, read_classes, read_manifest
from pipeline.datasets.common import BACKGROUND, IGNORE_INDEX
from pipeline.errors import BadInputError
from pipeline.imageio import load_mask
from pipeline.tables import markdown_table

log = logging.getLogger(__name__)

REPORT_COLUMNS = [
    "class_id", "class_name", "label_cluster", "precision", "recall", "f1", "support",
    "map_cluster", "iou",
]


# ---------------------------------------------------------------------------------------------
# Matching and metrics (pure)


def hungarian_match(score: np.ndarray) -> dict[int, int]:
    """One-to-one row -> column assignment maximising the total ``score`` (rows × columns)."""
    rows, cols = linear_sum_assignment(score, maximize=True)
    return {int(r): int(c) for r, c in zip(rows, cols)}


def indicator(label_sets: Sequence[Sequence[int]], num_columns: int, what: str) -> np.ndarray:
    """n × num_columns 0/1 matrix; label j (1..num_columns, 0 is background) sets column j - 1."""
    matrix = np.zeros((len(label_sets), num_columns), dtype=np.int64)
    for row, labels in enumerate(label_sets):
        for label in labels:
            if not 1 <= label <= num_columns:
                raise BadInputError(f"{what} label {label} outside 1..{num_columns}")
            matrix[row, label - 1] = 1
    return matrix


@dataclass(frozen=True)
class LabelScores:
    cluster_of_class: dict[int, int]  # foreground class id -> matched pseudo-class id
    precision: np.ndarray  # per foreground class 1..C-1 (NaN where undefined)
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray  # GT images per class
    macro: tuple[float, float, float]  # precision, recall, F1
    micro: tuple[float, float, float]


def multilabel_scores(
    pseudo_labels: Sequence[Sequence[int]], gt_labels: Sequence[Sequence[int]],
    num_clusters: int, num_classes: int,
) -> LabelScores:
    """Match pseudo-classes 1..k to foreground classes 1..C-1 on image-level co-occurrence, then
    score the mapped pseudo multi-labels against the GT multi-labels."""
    predicted = indicator(pseudo_labels, num_clusters, "pseudo")
    truth = indicator(gt_labels, num_classes - 1, "ground-truth")
    match = hungarian_match(predicted.T @ truth)  # cluster column -> class column
    mapped = np.zeros_like(truth)
    for cluster_col, class_col in match.items():
        mapped[:, class_col] = predicted[:, cluster_col]
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, mapped, average=None, zero_division=np.nan
    )

    def average(kind: str) -> tuple[float, float, float]:
        p, r, f, _ = precision_recall_fscore_support(truth, mapped, average=kind, zero_division=np.nan)
        return float(p), float(r), float(f)

    return LabelScores(
        cluster_of_class={class_col + 1: cluster_col + 1 for cluster_col, class_col in match.items()},
        precision=precision, recall=recall, f1=f1, support=support,
        macro=average("macro"), micro=average("micro"),
    )


def patch_index(length: int, cells: int, resized: float | None = None, covered: float | None = None) -> np.ndarray:
    """For each of ``length`` pixels along one side, the index of the map cell (of ``cells``) that
    holds its centre. With geometry, the side was resized to ``resized`` pixels and the map covers
    the first ``covered`` of them; otherwise the map spans the whole side."""
    centres = np.arange(length, dtype=np.float64) + 0.5
    if resized is None:
        index = np.floor(centres * cells / length)
    else:
        index = np.floor(centres * (resized / length) / (covered / cells))
    return np.clip(index, 0, cells - 1).astype(np.int64)


def upsample_nearest(pseudo_map: np.ndarray, height: int, width: int,
                     geometry: Sequence[float] | None = None) -> np.ndarray:
    """Nearest-neighbour upsampling of a gh×gw map to height×width (see the module docstring)."""
    gh, gw = pseudo_map.shape
    if geometry is None:
        rows, cols = patch_index(height, gh), patch_index(width, gw)
    else:
        _, resized_h, resized_w, final_h, final_w = (float(v) for v in geometry)
        rows = patch_index(height, gh, resized_h, final_h)
        cols = patch_index(width, gw, resized_w, final_w)
    return pseudo_map[rows[:, None], cols[None, :]]


@dataclass(frozen=True)
class MapScores:
    cluster_of_class: dict[int, int]  # foreground class -> matched pseudo-class
    iou: np.ndarray  # per class 0..C-1 (NaN: class absent from GT and predictions)
    miou: float


def map_scores(confusion: np.ndarray) -> MapScores:
    """Hungarian-match pseudo-classes 1..k to foreground classes on IoU (background fixed to
    background), then the per-class IoU of the mapped prediction (pipeline.metrics).

    ``confusion`` is (k+2) × C: rows 0 background, 1..k pseudo-classes, k+1 unpredicted (255)."""
    k = confusion.shape[0] - 2
    foreground = metrics.iou_matrix(confusion)[1 : k + 1, 1:]
    match = hungarian_match(foreground)  # cluster row (0-based) -> fg class col (0-based)
    mapping = np.full(confusion.shape[0], metrics.UNMATCHED, dtype=np.int64)
    mapping[BACKGROUND] = BACKGROUND
    for cluster, cls in match.items():
        mapping[cluster + 1] = cls + 1
    iou = metrics.per_class_iou(metrics.remap_confusion(confusion, mapping))
    return MapScores(
        cluster_of_class={cls + 1: cluster + 1 for cluster, cls in match.items()},
        iou=iou,
        miou=metrics.mean_iou(iou),
    )


# ---------------------------------------------------------------------------------------------
# The report


def report_pseudo_labels(pseudo_dir: Path, manifest_path: Path, classes_path: Path,
                         out_csv: Path, out_md: Path) -> None:
    """Score the pseudo-labels of ``pseudo_dir`` against the train split's ground truth."""
    pseudo_dir = Path(pseudo_dir)
    classes = read_classes(classes_path)
    num_classes = classes.get("num_classes")
    summary = json.loads((pseudo_dir / "summary.json").read_text(encoding="utf-8"))
    num_clusters = int(summary["num_clusters"])
    manifest = read_manifest(manifest_path)
    train = manifest[manifest["split"] == "train"]
    labelled = train[train["has_labels"]]
    with_masks = train[train["mask_path"] != ""]
    if num_classes is None or labelled.empty:
        _write_no_ground_truth(out_csv, out_md, summary)
        return
    names = classes.get("names") or [str(i) for i in range(num_classes)]

    pseudo = pd.read_csv(pseudo_dir / "image_labels.csv", dtype={"image_id": str, "labels": str},
                         keep_default_na=False, na_filter=False)
    pseudo_of = dict(zip(pseudo["image_id"], pseudo["labels"]))
    missing = [i for i in labelled["image_id"] if i not in pseudo_of]
    if missing:
        raise BadInputError(
            f"{pseudo_dir / 'image_labels.csv'}: no pseudo-labels for {len(missing)} train image(s) "
            f"of {manifest_path} (e.g. {missing[0]!r}); re-run the pseudo-label stage"
        )
    labels = multilabel_scores(
        [parse_labels(pseudo_of[i]) for i in labelled["image_id"]],
        [parse_labels(text) for text in labelled["labels"]],
        num_clusters, num_classes,
    )
    maps = None
    if not with_masks.empty:
        confusion = accumulate_confusion(pseudo_dir / "maps.safetensors", with_masks, num_clusters, num_classes)
        maps = map_scores(confusion)

    frame = report_frame(names, labels, maps)
    with atomic_path(out_csv) as tmp:
        frame.to_csv(tmp, index=False)
    write_text(out_md, report_markdown(frame, summary, labels, maps, len(labelled), len(with_masks)))
    log.info(
        "pseudo-labels vs GT: macro F1 %.1f, micro F1 %.1f%s", 100 * labels.macro[2], 100 * labels.micro[2],
        "" if maps is None else f", mIoU {100 * maps.miou:.1f}",
    )


def accumulate_confusion(maps_path: Path, rows: pd.DataFrame, num_clusters: int, num_classes: int) -> np.ndarray:
    """Streaming (k+2) × C confusion of the upsampled pseudo maps against the GT masks: one
    image's map is read at a time (safetensors reads a tensor on demand), so memory does not grow
    with the number of images (COCO: 82k maps)."""
    shards.read_meta(maps_path)  # a missing or corrupt file: a BadInputError naming it
    confusion = np.zeros((num_clusters + 2, num_classes), dtype=np.int64)
    with safe_open(str(maps_path), framework="np") as fh:
        stored = set(fh.keys())
        for image_id, image_path, mask_path in tqdm(zip(rows["image_id"], rows["image_path"], rows["mask_path"]),
                                                    total=len(rows), desc="score maps", unit="img", file=sys.stderr):
            if f"{image_id}/pseudo_map" not in stored:
                raise BadInputError(f"{maps_path}: no pseudo map for train image {image_id!r}")
            gt = load_mask(mask_path, image_path)
            geometry = fh.get_tensor(f"{image_id}/geometry").tolist() if f"{image_id}/geometry" in stored else None
            pred = upsample_nearest(fh.get_tensor(f"{image_id}/pseudo_map"), *gt.shape, geometry=geometry)
            add_pseudo_map(confusion, pred, gt, image_id)
    return confusion


def add_pseudo_map(confusion: np.ndarray, pred: np.ndarray, gt: np.ndarray, image_id: str = "image") -> None:
    """Add one image to the (k+2) × C confusion; filtered-out regions (255 in the pseudo map)
    count in the "unpredicted" row k+1, GT 255 pixels are skipped."""
    unpredicted = confusion.shape[0] - 1
    metrics.confusion_update(confusion, np.where(pred == IGNORE_INDEX, unpredicted, pred), gt, image_id=image_id)


def report_frame(names: Sequence[str], labels: LabelScores, maps: MapScores | None) -> pd.DataFrame:
    """Per-class rows (background: IoU only), then 'macro' (IoU column: mIoU) and 'micro' rows."""

    def map_columns(cls: int) -> dict:
        if maps is None:
            return {}
        cluster = BACKGROUND if cls == BACKGROUND else maps.cluster_of_class.get(cls)
        return {"map_cluster": cluster, "iou": maps.iou[cls]}

    rows = [{"class_id": BACKGROUND, "class_name": names[BACKGROUND], **map_columns(BACKGROUND)}]
    for cls in range(1, len(names)):
        rows.append({
            "class_id": cls, "class_name": names[cls],
            "label_cluster": labels.cluster_of_class.get(cls),
            "precision": labels.precision[cls - 1], "recall": labels.recall[cls - 1],
            "f1": labels.f1[cls - 1], "support": int(labels.support[cls - 1]),
            **map_columns(cls),
        })
    rows.append({"class_name": "macro", "precision": labels.macro[0], "recall": labels.macro[1],
                 "f1": labels.macro[2], **({"iou": maps.miou} if maps is not None else {})})
    rows.append({"class_name": "micro", "precision": labels.micro[0], "recall": labels.micro[1],
                 "f1": labels.micro[2]})
    frame = pd.DataFrame(rows, columns=REPORT_COLUMNS)
    for column in ("class_id", "label_cluster", "support", "map_cluster"):
        frame[column] = frame[column].astype("Int64")
    return frame


def report_markdown(frame: pd.DataFrame, summary: dict, labels: LabelScores, maps: MapScores | None,
                    n_labelled: int, n_masks: int) -> str:
    head = [
        "# Pseudo-labels vs ground truth (train split)",
        "",
        f"{summary['method']}, k = {summary['num_clusters']}, keep_fraction {summary['keep_fraction']}: "
        f"{summary['images_with_labels']}/{summary['images']} images keep a pseudo-label, "
        f"{summary['crops_kept']}/{summary['crops']} crops kept.",
        "",
        f"- Pseudo multi-label F1 over {n_labelled} GT-labelled images: macro {100 * labels.macro[2]:.1f}, "
        f"micro {100 * labels.micro[2]:.1f} (paper 000 Appendix, VOC trainaug: 53 macro / 51 micro).",
        "- Pseudo-map mIoU: not available (no masks)." if maps is None
        else f"- Pseudo-map mIoU over {n_masks} masks: {100 * maps.miou:.1f} (background included).",
        "",
        "Clusters are matched to classes by the Hungarian algorithm: `label_cluster` on image-label "
        "co-occurrence (for F1), `map_cluster` on pixel IoU (for IoU). Scores in %.",
        "",
        "",
    ]
    return "\n".join(head) + markdown_table(frame)


def _write_no_ground_truth(out_csv: Path, out_md: Path, summary: dict) -> None:
    with atomic_path(out_csv) as tmp:
        pd.DataFrame(columns=REPORT_COLUMNS).to_csv(tmp, index=False)
    write_text(
        out_md,
        "# Pseudo-labels vs ground truth (train split)\n\n"
        "No ground truth: the train split has no image labels or masks, so the pseudo-labels "
        f"cannot be scored. {summary['images_with_labels']}/{summary['images']} images keep a "
        f"pseudo-label; cluster sizes: {summary['cluster_sizes']}.\n",
    )
    log.info("no ground truth for the train split: wrote an empty pseudo-label report")
