from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline import metrics
from pipeline.datasets import MANIFEST_COLUMNS
from pipeline.errors import BadInputError
from pipeline.evaluate import evaluate_masks
from pipeline.imageio import write_label_png


def confusion_of(pred, gt, num_predicted, num_classes):
    confusion = np.zeros((num_predicted, num_classes), dtype=np.int64)
    metrics.confusion_update(confusion, np.array(pred, np.uint8), np.array(gt, np.uint8))
    return confusion


def blocks(rng: np.random.Generator, height: int, width: int, num_classes: int) -> np.ndarray:
    """Structured GT: rectangles of random classes on background, a 255 border."""
    gt = np.zeros((height, width), np.uint8)
    for _ in range(4):
        y, x = rng.integers(0, height - 8), rng.integers(0, width - 8)
        gt[y : y + rng.integers(4, 12), x : x + rng.integers(4, 12)] = rng.integers(1, num_classes)
    gt[0, :] = 255
    return gt


# ---------------------------------------------------------------------------------------------
# Hand-computed values


def test_confusion_iou_accuracy_by_hand():
    gt = [[0, 0, 1], [1, 255, 1]]
    pred = [[0, 1, 1], [1, 2, 0]]  # the 2 sits on an ignored pixel: never counted
    confusion = confusion_of(pred, gt, 4, 4)
    expected = np.zeros((4, 4), np.int64)
    expected[0, 0], expected[1, 0], expected[1, 1], expected[0, 1] = 1, 1, 2, 1
    np.testing.assert_array_equal(confusion, expected)
    iou = metrics.per_class_iou(confusion)
    assert iou[0] == pytest.approx(1 / 3)  # TP 1, GT 2, predicted 2
    assert iou[1] == pytest.approx(2 / 4)  # TP 2, GT 3, predicted 3
    assert math.isnan(iou[2]) and math.isnan(iou[3])  # union 0: left out of the mean
    assert metrics.mean_iou(iou) == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert metrics.pixel_accuracy(confusion) == pytest.approx(3 / 5)


def test_class_predicted_but_absent_from_gt_counts_zero():
    confusion = confusion_of([[0, 2], [1, 1]], [[0, 0], [1, 1]], 3, 3)
    iou = metrics.per_class_iou(confusion)
    np.testing.assert_allclose(iou, [0.5, 1.0, 0.0])
    assert metrics.mean_iou(iou) == pytest.approx(0.5)


def test_confusion_update_accumulates_and_returns_image_counts():
    confusion = np.zeros((2, 2), np.int64)
    first = metrics.confusion_update(confusion, np.ones((2, 2), np.uint8), np.ones((2, 2), np.uint8))
    metrics.confusion_update(confusion, np.zeros((1, 3), np.uint8), np.array([[0, 1, 255]], np.uint8))
    np.testing.assert_array_equal(first, [[0, 0], [0, 4]])
    np.testing.assert_array_equal(confusion, [[1, 1], [0, 4]])


# ---------------------------------------------------------------------------------------------
# Unsupervised matching


def test_permuted_prediction_is_perfect_unsupervised_and_poor_weak():
    rng = np.random.default_rng(0)
    num_classes = 5
    permutation = np.array([3, 0, 4, 1, 2], np.uint8)
    confusion = np.zeros((num_classes, num_classes), np.int64)
    for _ in range(6):
        gt = blocks(rng, 32, 40, num_classes)
        pred = permutation[np.where(gt == 255, 0, gt)]
        metrics.confusion_update(confusion, pred, gt)
    weak = metrics.mean_iou(metrics.per_class_iou(confusion))
    mapping, used = metrics.match_clusters(confusion)
    unsupervised = metrics.per_class_iou(metrics.remap_confusion(confusion, mapping))
    assert used == "hungarian"
    np.testing.assert_array_equal(mapping[permutation], np.arange(num_classes))
    assert metrics.mean_iou(unsupervised) == pytest.approx(1.0)
    assert weak < 0.3


def test_majority_vote_with_two_clusters_per_class_is_perfect():
    rng = np.random.default_rng(1)
    num_classes = 4
    gt = blocks(rng, 40, 40, num_classes)
    half = (np.arange(40)[None, :] >= 20).astype(np.uint8)
    pred = np.where(gt == 255, 0, gt) * 2 + half  # cluster 2c and 2c+1 both belong to class c
    confusion = confusion_of(pred, gt, 2 * num_classes, num_classes)
    mapping, used = metrics.match_clusters(confusion)
    present = confusion.sum(axis=1) > 0
    assert used == "majority"
    np.testing.assert_array_equal(mapping[present], (np.arange(2 * num_classes) // 2)[present])
    remapped = metrics.remap_confusion(confusion, mapping)
    assert metrics.mean_iou(metrics.per_class_iou(remapped)) == pytest.approx(1.0)
    assert metrics.pixel_accuracy(remapped) == pytest.approx(1.0)


def test_forced_hungarian_with_extra_clusters_counts_unmatched_pixels_as_misses():
    # class 0: clusters 0 (3 px) and 2 (1 px); class 1: cluster 1 (4 px).
    confusion = np.array([[3, 0], [0, 4], [1, 0]])
    mapping = metrics.hungarian_mapping(confusion)
    np.testing.assert_array_equal(mapping, [0, 1, metrics.UNMATCHED])
    iou = metrics.per_class_iou(metrics.remap_confusion(confusion, mapping))
    np.testing.assert_allclose(iou, [3 / 4, 1.0])


def test_remap_confusion_sums_clusters_of_a_class():
    confusion = np.array([[2, 1], [3, 0], [0, 5]])
    remapped = metrics.remap_confusion(confusion, np.array([0, 0, 1]))
    np.testing.assert_array_equal(remapped, [[5, 1], [0, 5], [0, 0]])
    assert metrics.clusters_of_class(np.array([0, 0, 1]), 2) == [[0, 1], [2]]


# ---------------------------------------------------------------------------------------------
# mIoU_shape and discovery counts


def test_image_shape_iou_by_hand():
    gt = np.zeros((4, 4), np.uint8)
    gt[:, 2:] = 1
    pred = np.full((4, 4), 5, np.uint8)
    pred[:, 3] = 7  # ids ignored: only the masks matter
    counts = metrics.image_confusion(pred, gt, 8, 2)
    # gt0 ~ pred5: 8/12; gt1 ~ pred7: 4/8; the crossed matching (4/16 + 0) loses.
    assert metrics.image_shape_iou(counts) == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_image_shape_iou_unmatched_gt_mask_counts_zero_and_empty_image_is_none():
    gt = np.zeros((4, 4), np.uint8)
    gt[:, 2:] = 1
    one_mask = metrics.image_confusion(np.zeros((4, 4), np.uint8), gt, 1, 2)
    assert metrics.image_shape_iou(one_mask) == pytest.approx(0.5 / 2)
    all_ignored = metrics.image_confusion(np.zeros((2, 2), np.uint8), np.full((2, 2), 255, np.uint8), 1, 2)
    assert metrics.image_shape_iou(all_ignored) is None


def test_discovery_counts():
    counts = metrics.discovery_counts(np.array([0.5, 0.2, 0.1, 0.0, np.nan]), threshold=0.2)
    assert (counts.discovered, counts.with_cluster) == (2, 3)
    assert counts.miou_discovered == pytest.approx(0.35)
    assert counts.miou_with_cluster == pytest.approx(0.8 / 3)


# ---------------------------------------------------------------------------------------------
# Errors name the image


def test_size_mismatch_names_the_image():
    with pytest.raises(BadInputError, match="'cat/7'.*3x2.*2x2"):
        metrics.image_confusion(np.zeros((2, 3), np.uint8), np.zeros((2, 2), np.uint8), 2, 2, image_id="cat/7")


def test_predicted_id_out_of_range_names_the_image():
    pred = np.array([[0, 9]], np.uint8)
    with pytest.raises(BadInputError, match="'img1'.*predicted id 9"):
        metrics.image_confusion(pred, np.zeros((1, 2), np.uint8), 3, 3, image_id="img1")
    with pytest.raises(BadInputError, match="'img2'.*negative"):
        metrics.image_confusion(np.array([[-1, 0]]), np.zeros((1, 2), np.uint8), 3, 3, image_id="img2")


def test_gt_value_out_of_range_names_the_image():
    with pytest.raises(BadInputError, match=r"'img3'.*\[7\]"):
        metrics.image_confusion(np.zeros((1, 2), np.uint8), np.array([[0, 7]], np.uint8), 3, 3, image_id="img3")


# ---------------------------------------------------------------------------------------------
# The evaluation stage


@pytest.fixture()
def tiny_dataset(tmp_path):
    """Three val images with GT (one id has a sub-folder), one train image, 4 classes."""
    rng = np.random.default_rng(2)
    rows, gts = [], {}
    for image_id, split in (("a", "val"), ("sub/b", "val"), ("c", "val"), ("d", "train")):
        gt = blocks(rng, 24, 32, 4)
        mask_path = tmp_path / "gt" / f"{image_id}.png"
        write_label_png(mask_path, gt)
        gts[image_id] = gt
        # The GT mask follows its image's EXIF orientation, so evaluation reads the image header.
        image_path = tmp_path / "images" / f"{image_id}.png"
        image_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(image_path)
        rows.append({"image_id": image_id, "image_path": str(image_path),
                     "mask_path": str(mask_path), "labels": "", "has_labels": True, "split": split,
                     "width": 32, "height": 24, "shard": 0})
    pd.DataFrame(rows, columns=MANIFEST_COLUMNS).to_csv(tmp_path / "manifest.csv", index=False)
    (tmp_path / "classes.json").write_text(json.dumps(
        {"names": ["background", "one", "two", "three"], "num_classes": 4, "ignore_index": 255}))
    return tmp_path, gts


def write_predictions(folder, gts, transform, skip=()):
    for image_id, gt in gts.items():
        if image_id not in skip:
            write_label_png(folder / f"{image_id}.png", transform(np.where(gt == 255, 0, gt)).astype(np.uint8))


def test_evaluate_masks_unsupervised_and_weak(tiny_dataset):
    root, gts = tiny_dataset
    permutation = np.array([2, 3, 0, 1])
    write_predictions(root / "pred", gts, lambda gt: permutation[gt])
    args = (root / "pred", root / "manifest.csv", root / "classes.json", "val")
    unsupervised = evaluate_masks(*args, "unsupervised", root / "u.json", root / "u.csv")
    weak = evaluate_masks(*args, "weak", root / "w.json", root / "w.csv")

    assert unsupervised["images"] == 3 and unsupervised["matching"] == "hungarian"
    assert unsupervised["miou"] == pytest.approx(1.0)
    assert unsupervised["pixel_accuracy"] == pytest.approx(1.0)
    assert unsupervised["mapping"] == np.argsort(permutation).tolist()
    assert weak["miou"] < 0.3 and weak["matching"] == "none"
    # Shape ignores ids, so it is perfect in both modes.
    assert unsupervised["miou_shape"] == pytest.approx(1.0) == weak["miou_shape"]
    saved = json.loads((root / "u.json").read_text())
    assert saved["miou"] == pytest.approx(1.0) and np.array(saved["confusion"]).shape == (4, 4)
    table = pd.read_csv(root / "u.csv", keep_default_na=False)
    assert list(table.columns) == ["class_id", "class_name", "iou", "matched_ids", "gt_pixels"]
    assert table["matched_ids"].astype(str).tolist() == [str(k) for k in permutation]
    val_gt = np.concatenate([gts[i].ravel() for i in ("a", "sub/b", "c")])
    assert table["gt_pixels"].tolist() == np.bincount(val_gt[val_gt != 255], minlength=4).tolist()


def test_evaluate_masks_over_clustering(tiny_dataset):
    root, gts = tiny_dataset
    write_predictions(root / "pred", gts, lambda gt: gt * 2 + (np.arange(gt.shape[1]) % 2))
    summary = evaluate_masks(root / "pred", root / "manifest.csv", root / "classes.json", "val",
                             "unsupervised", root / "s.json", root / "s.csv", num_predicted_classes=8)
    assert summary["matching"] == "majority"
    assert summary["miou"] == pytest.approx(1.0)
    assert summary["discovered"] == 4 == summary["with_cluster"]


def test_evaluate_masks_missing_prediction_names_the_image(tiny_dataset):
    root, gts = tiny_dataset
    write_predictions(root / "pred", gts, lambda gt: gt, skip={"sub/b"})
    with pytest.raises(BadInputError, match="'sub/b'"):
        evaluate_masks(root / "pred", root / "manifest.csv", root / "classes.json", "val", "weak",
                       root / "s.json", root / "s.csv")
    assert not (root / "s.json").exists()


def test_evaluate_masks_size_mismatch_names_the_image(tiny_dataset):
    root, gts = tiny_dataset
    write_predictions(root / "pred", gts, lambda gt: gt)
    write_label_png(root / "pred" / "c.png", np.zeros((10, 10), np.uint8))
    with pytest.raises(BadInputError, match="'c'.*10x10.*32x24"):
        evaluate_masks(root / "pred", root / "manifest.csv", root / "classes.json", "val", "weak",
                       root / "s.json", root / "s.csv")


def test_evaluate_masks_finds_predictions_across_several_folders(tiny_dataset):
    root, gts = tiny_dataset
    write_predictions(root / "shard0", gts, lambda gt: gt, skip={"c"})
    write_predictions(root / "shard1", {"c": gts["c"]}, lambda gt: gt)
    summary = evaluate_masks([root / "shard0", root / "shard1"], root / "manifest.csv",
                             root / "classes.json", "val", "weak", root / "s.json", root / "s.csv")
    assert summary["images"] == 3 and summary["miou"] == pytest.approx(1.0)


def test_precision_and_recall_per_class_by_hand():
    # rows predicted, columns GT: class 0 predicted 5 times (4 right), class 1 predicted 3 times
    # (2 right), class 2 never predicted but present once in the GT
    confusion = np.array([[4, 1, 0], [1, 2, 0], [0, 0, 0], [0, 0, 1]])  # last row: an unmatched id
    precision, recall = metrics.per_class_precision_recall(confusion)
    np.testing.assert_allclose(precision[:2], [4 / 5, 2 / 3])
    assert np.isnan(precision[2])
    np.testing.assert_allclose(recall, [4 / 5, 2 / 3, 0 / 1])
    assert metrics.mean_over_classes(precision) == pytest.approx((4 / 5 + 2 / 3) / 2)
