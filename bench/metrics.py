"""Streaming evaluation (``pipeline.metrics``) against the public reference approach, in one run.

Reference (Deep Spectral Methods / MaskContrast evaluation, re-written here from its description):
every valid pixel of the dataset is copied into two preallocated float32 arrays, the IoU of each
(cluster, class) pair is computed with three full passes (TP, FP, FN), Hungarian matching, the
predictions are remapped, then per-class IoU with three more passes per class.
Streaming: one ``np.bincount`` per image into a K × C confusion, matching on the confusion.

Data: VOC-val-sized synthetic masks generated in memory with a seeded rng: 1,449 images of
500 × 375, 21 classes, objects with 255 boundary bands like VOC; predictions are the GT under a
fixed class permutation, shifted by a few pixels, with 10% of pixels set to random clusters.
A pool of distinct image pairs is generated once and cycled, so the inputs cost the same for both
methods and neither run pays for generation.

Memory: peak of ``tracemalloc`` during each run (numpy reports its buffers to tracemalloc), i.e.
what the evaluation itself allocates, not the process RSS. Time: wall clock of the same run.
The reference is slow (441 class pairs × 3 passes over every pixel), so it runs on
``--reference-images`` images and its time and memory are extrapolated linearly to the full
dataset (both are linear in the number of pixels); the output says so.

    python bench/metrics.py
    python bench/metrics.py --reference-images 1449     # the whole reference (minutes, ~4 GB)
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
from scipy.optimize import linear_sum_assignment

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import print_and_append
from pipeline import metrics

IGNORE = 255
Pair = tuple[np.ndarray, np.ndarray]  # (prediction, GT), uint8 H × W


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1449, help="dataset size (VOC val: 1,449)")
    parser.add_argument("--size", default="500x375", help="image WIDTHxHEIGHT")
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--reference-images", type=int, default=40,
                        help="images the reference runs on; extrapolated linearly to --images")
    parser.add_argument("--pool", type=int, default=64, help="distinct synthetic image pairs, cycled")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="append the table to this Markdown file")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Synthetic data


def synthetic_gt(rng: np.random.Generator, height: int, width: int, num_classes: int) -> np.ndarray:
    """Background with 1-4 filled ellipses/rectangles of random classes; 5 px 255 bands on their
    boundaries (VOC marks object outlines as ignore)."""
    gt = np.zeros((height, width), np.uint8)
    for _ in range(rng.integers(1, 5)):
        cls = int(rng.integers(1, num_classes))
        cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
        ax, ay = int(rng.integers(20, width // 3)), int(rng.integers(20, height // 3))
        if rng.random() < 0.5:
            cv2.ellipse(gt, (cx, cy), (ax, ay), float(rng.uniform(0, 180)), 0, 360, cls, -1)
        else:
            cv2.rectangle(gt, (cx - ax, cy - ay), (cx + ax, cy + ay), cls, -1)
    kernel = np.ones((5, 5), np.uint8)
    boundary = cv2.dilate(gt, kernel) != cv2.erode(gt, kernel)
    gt[boundary] = IGNORE
    return gt


def synthetic_prediction(rng: np.random.Generator, gt: np.ndarray, permutation: np.ndarray) -> np.ndarray:
    """GT classes renamed by ``permutation``, shifted a few pixels, 10% random cluster noise."""
    pred = permutation[np.where(gt == IGNORE, 0, gt)]
    pred = np.roll(pred, (int(rng.integers(-4, 5)), int(rng.integers(-4, 5))), axis=(0, 1))
    noisy = rng.random(gt.shape) < 0.1
    pred[noisy] = rng.integers(0, len(permutation), int(noisy.sum()))
    return pred.astype(np.uint8)


def make_pool(count: int, height: int, width: int, num_classes: int, seed: int) -> list[Pair]:
    rng = np.random.default_rng(seed)
    permutation = rng.permutation(num_classes).astype(np.uint8)
    pool = []
    for _ in range(count):
        gt = synthetic_gt(rng, height, width, num_classes)
        pool.append((synthetic_prediction(rng, gt, permutation), gt))
    return pool


def dataset(pool: list[Pair], images: int) -> Iterator[Pair]:
    for index in range(images):
        yield pool[index % len(pool)]


# ---------------------------------------------------------------------------------------------
# The two evaluations (both: Hungarian on IoU, then per-class IoU of the remapped prediction)


def streaming(pairs: Iterator[Pair], num_classes: int, with_shape: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(IoU matrix clusters × classes, per-class IoU after matching) with pipeline.metrics."""
    confusion = np.zeros((num_classes, num_classes), np.int64)
    for index, (pred, gt) in enumerate(pairs):
        counts = metrics.confusion_update(confusion, pred, gt, image_id=str(index))
        if with_shape:
            metrics.image_shape_iou(counts)
    mapping, _ = metrics.match_clusters(confusion, "hungarian")
    return metrics.iou_matrix(confusion), metrics.per_class_iou(metrics.remap_confusion(confusion, mapping))


def reference(pairs: list[Pair], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The public approach: all valid pixels in preallocated arrays, IoU class pair by pair."""
    height, width = pairs[0][1].shape
    flat_pred = np.zeros(len(pairs) * height * width, np.float32)
    flat_gt = np.zeros(len(pairs) * height * width, np.float32)
    used = 0
    for pred, gt in pairs:
        valid = gt != IGNORE
        count = int(valid.sum())
        flat_pred[used : used + count] = pred[valid]
        flat_gt[used : used + count] = gt[valid]
        used += count
    flat_pred, flat_gt = flat_pred[:used], flat_gt[:used]

    def pair_iou(pred_values: np.ndarray, cluster: int, cls: int) -> float:
        tp = ((pred_values == cluster) * (flat_gt == cls)).sum()
        fp = ((pred_values == cluster) * (flat_gt != cls)).sum()
        fn = ((pred_values != cluster) * (flat_gt == cls)).sum()
        return float(tp) / max(float(tp + fp + fn), 1e-8)

    ious = np.array([[pair_iou(flat_pred, k, c) for c in range(num_classes)] for k in range(num_classes)])
    rows, cols = linear_sum_assignment(ious, maximize=True)
    remapped = np.zeros_like(flat_pred)
    for cluster, cls in zip(rows, cols):
        remapped[flat_pred == cluster] = cls
    return ious, np.array([pair_iou(remapped, c, c) for c in range(num_classes)])


def measure(run: Callable[[], tuple[np.ndarray, np.ndarray]]) -> tuple[float, int, tuple[np.ndarray, np.ndarray]]:
    """(seconds, tracemalloc peak bytes, result) of one run."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    start = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return seconds, peak, result


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    n, n_ref, c = args.images, min(args.reference_images, args.images), args.classes
    pool = make_pool(args.pool, height, width, c, args.seed)

    t_stream, m_stream, (ious_stream, iou_stream) = measure(lambda: streaming(dataset(pool, n), c))
    t_stream4, m_stream4, _ = measure(lambda: streaming(dataset(pool, 4 * n), c))
    t_shape, m_shape, _ = measure(lambda: streaming(dataset(pool, n), c, with_shape=True))
    t_small, m_small, (ious_small, iou_small) = measure(lambda: streaming(dataset(pool, n_ref), c))
    t_ref, m_ref, (ious_ref, iou_ref) = measure(lambda: reference(list(dataset(pool, n_ref)), c))

    # Same numbers on the subset both ran on: the streaming confusion is exact, not approximate.
    np.testing.assert_allclose(ious_small, ious_ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(iou_small, iou_ref, rtol=1e-9, atol=1e-12)

    scale = n / n_ref
    t_ref_full, m_ref_full = t_ref * scale, m_ref * scale
    note = "measured" if n_ref == n else f"extrapolated ×{scale:.2f} from {n_ref} images"
    load = os.getloadavg()
    mb = 1024 ** 2
    lines = [
        f"## Evaluation: streaming confusion vs per-pixel reference ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}; numpy {np.__version__}. Synthetic masks "
        f"{width}×{height}, {c} classes, pool of {args.pool} pairs cycled. Memory = tracemalloc peak "
        "of the run. Reference and streaming agree on the IoU matrix and per-class IoU "
        f"(checked on {n_ref} images); mIoU after matching on {n} images: {100 * metrics.mean_iou(iou_stream):.2f}.",
        "",
        "| method | images | time (s) | peak memory (MiB) | images/s |",
        "|---|---:|---:|---:|---:|",
        f"| reference (all pixels, class pairs) | {n_ref} | {t_ref:.1f} | {m_ref / mb:.0f} | {n_ref / t_ref:.1f} |",
        f"| reference, {note} | {n} | {t_ref_full:.0f} | {m_ref_full / mb:.0f} | {n_ref / t_ref:.1f} |",
        f"| streaming | {n_ref} | {t_small:.2f} | {m_small / mb:.2f} | {n_ref / t_small:.0f} |",
        f"| streaming | {n} | {t_stream:.2f} | {m_stream / mb:.2f} | {n / t_stream:.0f} |",
        f"| streaming | {4 * n} | {t_stream4:.2f} | {m_stream4 / mb:.2f} | {4 * n / t_stream4:.0f} |",
        f"| streaming + mIoU_shape (the stage's work) | {n} | {t_shape:.2f} | {m_shape / mb:.2f} | {n / t_shape:.0f} |",
        "",
        f"Speed-up on {n} images: ×{t_ref_full / t_stream:.0f} (reference {note}); memory ×"
        f"{m_ref_full / m_stream:.0f} less; streaming memory at {n} vs {4 * n} images: "
        f"{m_stream / mb:.2f} vs {m_stream4 / mb:.2f} MiB (does not grow with the dataset).",
        "",
    ]
    text = "\n".join(lines)
    print_and_append(text, args.out)


if __name__ == "__main__":
    main()
