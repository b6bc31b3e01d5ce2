"""Segmentation metrics on a streaming confusion matrix (pure numpy).

Conventions
- A confusion matrix is ``K × C`` int64: rows are predicted ids (classes in the weak setting,
  clusters in the unsupervised one), columns are ground-truth classes. Pixels whose GT is the
  ignore index (255) are never counted. It is accumulated image by image with one ``np.bincount``,
  so evaluating a dataset needs O(K·C) memory, never all of its pixels (the public evaluations
  of Deep Spectral Methods / MaskContrast preallocate every pixel and loop over class pairs).
- IoU of class c = TP / (TP + FP + FN). A class whose union is 0 (absent from both the GT and the
  prediction) has IoU NaN and is left out of the mean, as in the VOC protocol (mIoU over the
  classes with a non-empty union). A class present in the GT but never predicted counts as 0.
- Unsupervised matching (paper 002 COMUS Sec. 4, the protocol Deep Spectral Methods and paper 000
  App. E use): with as many clusters as classes (or fewer), a one-to-one Hungarian matching that
  maximises the total IoU (the IoU matrix of clusters × classes, not raw pixel overlap); with
  more clusters than classes (over-clustering), a majority vote: every cluster goes to the class
  with which it has the highest IoU, so several clusters may share a class. Background takes part
  in the matching like any other class (21 classes on VOC, 81 on COCO).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from pipeline.errors import BadInputError

log = logging.getLogger(__name__)

IGNORE_INDEX = 255
# GT values are uint8, so pred * 256 + gt encodes a (pred, gt) pair without masking out the ignore
# pixels first: their column (255) is simply dropped after the bincount.
_GT_CODES = 256
UNMATCHED = -1  # a cluster that the matching gives to no class


# ---------------------------------------------------------------------------------------------
# Confusion


def image_confusion(
    pred: np.ndarray, gt: np.ndarray, num_predicted: int, num_classes: int,
    ignore: int = IGNORE_INDEX, image_id: str = "image",
) -> np.ndarray:
    """``num_predicted × num_classes`` pixel counts of one image (GT ``ignore`` pixels skipped).

    Raises BadInputError naming ``image_id`` when the sizes differ, a predicted id is outside
    0..num_predicted-1, or a GT value is neither a class nor ``ignore``.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise BadInputError(
            f"image {image_id!r}: prediction is {_size(pred)} but its ground truth is {_size(gt)}"
        )
    if gt.dtype != np.uint8:
        if gt.size and (gt.min() < 0 or gt.max() >= _GT_CODES):
            raise BadInputError(f"image {image_id!r}: ground-truth values outside 0..255")
        gt = gt.astype(np.uint8)
    codes = pred.astype(np.int64) * _GT_CODES + gt
    try:
        counts = np.bincount(codes.ravel(), minlength=num_predicted * _GT_CODES)
    except ValueError:  # bincount refuses negative values
        raise BadInputError(
            f"image {image_id!r}: negative predicted id {int(pred.min())} "
            f"(expected 0..{num_predicted - 1})"
        ) from None
    if counts.size > num_predicted * _GT_CODES:
        raise BadInputError(
            f"image {image_id!r}: predicted id {(counts.size - 1) // _GT_CODES} outside "
            f"0..{num_predicted - 1}"
        )
    counts = counts.reshape(num_predicted, _GT_CODES)
    stray = [v for v in np.flatnonzero(counts[:, num_classes:].sum(axis=0)) + num_classes if v != ignore]
    if stray:
        raise BadInputError(
            f"image {image_id!r}: ground-truth values {[int(v) for v in stray]} outside the classes "
            f"0..{num_classes - 1} ({ignore} = ignore)"
        )
    return counts[:, :num_classes].copy()


def confusion_update(
    confusion: np.ndarray, pred: np.ndarray, gt: np.ndarray, ignore: int = IGNORE_INDEX,
    image_id: str = "image",
) -> np.ndarray:
    """Add one image to ``confusion`` (in place) and return the image's own confusion."""
    num_predicted, num_classes = confusion.shape
    counts = image_confusion(pred, gt, num_predicted, num_classes, ignore, image_id)
    confusion += counts
    return counts


def _size(array: np.ndarray) -> str:
    return "x".join(str(n) for n in array.shape[::-1]) if array.ndim == 2 else str(array.shape)


# ---------------------------------------------------------------------------------------------
# IoU and accuracy


def per_class_iou(confusion: np.ndarray) -> np.ndarray:
    """IoU of each GT class from an R × C confusion whose first C rows predict the classes 0..C-1
    (rows beyond C are predictions that belong to no class, e.g. unmatched clusters: they only
    add to the false negatives). NaN where the union is empty."""
    rows, num_classes = confusion.shape
    if rows < num_classes:
        raise ValueError(f"confusion has {rows} rows, fewer than its {num_classes} classes")
    confusion = confusion.astype(np.float64)
    true_positive = np.diag(confusion[:num_classes])
    union = confusion.sum(axis=0) + confusion[:num_classes].sum(axis=1) - true_positive
    return np.divide(true_positive, union, out=np.full(num_classes, np.nan), where=union > 0)


def per_class_precision_recall(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision TP / (TP + FP) and recall TP / (TP + FN) of each GT class, from a confusion in
    class space (rows predicted, columns GT; paper 003 Tables 2 and 5 report their means over the
    classes). NaN where a class is never predicted (precision) or absent from the GT (recall)."""
    num_classes = confusion.shape[1]
    confusion = confusion.astype(np.float64)
    true_positive = np.diag(confusion[:num_classes])
    predicted = confusion[:num_classes].sum(axis=1)
    actual = confusion.sum(axis=0)
    precision = np.divide(true_positive, predicted, out=np.full(num_classes, np.nan), where=predicted > 0)
    recall = np.divide(true_positive, actual, out=np.full(num_classes, np.nan), where=actual > 0)
    return precision, recall


def mean_over_classes(values: np.ndarray) -> float:
    """Mean over the classes whose value is defined (NaN when there is none)."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan


def mean_iou(iou: np.ndarray) -> float:
    """Mean over the classes with a defined IoU (NaN when there is none)."""
    return mean_over_classes(iou)


def pixel_accuracy(confusion: np.ndarray) -> float:
    """Correct pixels / all non-ignored pixels, for a confusion in class space (R × C, R ≥ C)."""
    num_classes = confusion.shape[1]
    total = confusion.sum()
    return float(np.trace(confusion[:num_classes]) / total) if total else math.nan


def iou_matrix(confusion: np.ndarray) -> np.ndarray:
    """IoU of every predicted id (rows) with every GT class (columns) of a K × C confusion."""
    overlap = confusion.astype(np.float64)
    union = overlap.sum(axis=1, keepdims=True) + overlap.sum(axis=0, keepdims=True) - overlap
    return np.divide(overlap, union, out=np.zeros_like(overlap), where=union > 0)


# ---------------------------------------------------------------------------------------------
# Unsupervised matching: cluster -> class mappings (arrays of length K, UNMATCHED = -1)


def hungarian_mapping(confusion: np.ndarray) -> np.ndarray:
    """One-to-one matching maximising the summed IoU; clusters beyond the number of classes (only
    when the caller forces Hungarian with K > C) stay UNMATCHED."""
    rows, cols = linear_sum_assignment(iou_matrix(confusion), maximize=True)
    mapping = np.full(confusion.shape[0], UNMATCHED, dtype=np.int64)
    mapping[rows] = cols
    return mapping


def majority_vote_mapping(confusion: np.ndarray) -> np.ndarray:
    """Each cluster -> the class it has the highest IoU with (COMUS over-clustering, Table 8)."""
    return iou_matrix(confusion).argmax(axis=1).astype(np.int64)


def match_clusters(confusion: np.ndarray, method: str = "auto") -> tuple[np.ndarray, str]:
    """(mapping, method used). ``auto``: Hungarian when K ≤ C, majority vote when K > C."""
    num_clusters, num_classes = confusion.shape
    if method == "auto":
        method = "hungarian" if num_clusters <= num_classes else "majority"
    if method == "hungarian":
        return hungarian_mapping(confusion), method
    if method == "majority":
        return majority_vote_mapping(confusion), method
    raise ValueError(f"unknown matching {method!r} (auto, hungarian, majority)")


def remap_confusion(confusion: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """(C+1) × C confusion in class space: row c sums the clusters mapped to class c, the last row
    the UNMATCHED clusters (their pixels are misses of their GT class)."""
    num_classes = confusion.shape[1]
    rows = np.where(mapping == UNMATCHED, num_classes, mapping)
    remapped = np.zeros((num_classes + 1, num_classes), dtype=confusion.dtype)
    np.add.at(remapped, rows, confusion)
    return remapped


def clusters_of_class(mapping: np.ndarray, num_classes: int) -> list[list[int]]:
    """For each class, the predicted ids mapped to it (ascending)."""
    owners: list[list[int]] = [[] for _ in range(num_classes)]
    for cluster, cls in enumerate(mapping.tolist()):
        if cls != UNMATCHED:
            owners[cls].append(cluster)
    return owners


# ---------------------------------------------------------------------------------------------
# mIoU_shape (paper 000, Appendix F)


def image_shape_iou(counts: np.ndarray) -> float | None:
    """mIoU_shape of one image from its own K × C confusion (ignore pixels already excluded).

    Appendix F: drop the class ids; the GT masks and the predicted masks of the image are two
    sets of binary masks; every (GT mask, predicted mask) pair is an edge of a bipartite graph
    weighted by their IoU (eq. 15); the maximum-weight matching is solved ("the max cost ...,
    which does not imply the max match of the vertices"), and the image scores the average of the
    matched IoUs. The appendix leaves the denominator implicit; we average over the image's
    non-empty GT masks, so a GT mask left unmatched (fewer predicted masks) counts 0, while extra
    predicted masks cost nothing beyond the pixels they take from matched ones. Empty masks (a
    class or cluster without pixels in this image) are not vertices. None when the image has no
    GT pixel outside the ignore index (it does not enter the dataset mean).
    """
    counts = counts[counts.sum(axis=1) > 0][:, counts.sum(axis=0) > 0]
    num_gt_masks = counts.shape[1]
    if num_gt_masks == 0:
        return None
    ious = iou_matrix(counts)
    rows, cols = linear_sum_assignment(ious, maximize=True)
    return float(ious[rows, cols].sum() / num_gt_masks)


# ---------------------------------------------------------------------------------------------
# COCO-style counts (paper 002 COMUS, Table 3)


@dataclass(frozen=True)
class DiscoveryCounts:
    threshold: float
    discovered: int  # classes with IoU >= threshold
    miou_discovered: float
    with_cluster: int  # classes with IoU > 0
    miou_with_cluster: float


def discovery_counts(iou: np.ndarray, threshold: float = 0.2) -> DiscoveryCounts:
    """How many classes are "discovered" (IoU ≥ threshold, COMUS: 20%) and "have a cluster"
    (IoU > 0), with the mean IoU over each subset (NaN IoUs, absent classes, are neither)."""
    finite = iou[np.isfinite(iou)]
    discovered = finite[finite >= threshold]
    with_cluster = finite[finite > 0]
    return DiscoveryCounts(
        threshold=threshold,
        discovered=int(discovered.size),
        miou_discovered=mean_iou(discovered),
        with_cluster=int(with_cluster.size),
        miou_with_cluster=mean_iou(with_cluster),
    )
