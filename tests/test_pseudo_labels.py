"""Pseudo multi-labels: assembling maps and label sets, scoring against GT, and the stage end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline import shards
from pipeline.datasets import MANIFEST_COLUMNS
from pipeline.errors import BadInputError, ConfigError, PipelineError
from pipeline.imageio import write_label_png
from pipeline.pseudo_label_report import (
    add_pseudo_map,
    map_scores,
    multilabel_scores,
    report_pseudo_labels,
    upsample_nearest,
)
from pipeline.pseudo_labels import PseudoLabelSettings, assemble, cluster_crops, run_pseudo_labels

PARAMS = {
    "method": "kmeans", "num_clusters": 3, "keep_fraction": 1.0, "n_neighbors": 5,
    "kmeans_iterations": 50, "kmeans_restarts": 3,
}


# ---------------------------------------------------------------------------------------------
# assemble


def test_cluster_zero_never_merges_into_background():
    segments = np.array([[0, 1], [2, 2]])
    result = assemble(
        ["img"], {"img": segments},
        crop_image_ids=["img", "img"], crop_segment_ids=np.array([1, 2]),
        cluster_of_crop=np.array([0, 2]), kept=np.array([True, True]),
    )["img"]
    assert result.labels == (1, 3)
    assert result.has_labels
    assert result.pseudo_map.dtype == np.uint8
    assert result.pseudo_map.tolist() == [[0, 1], [3, 3]]


def test_filtered_crops_are_ignored_and_an_image_without_kept_crops_has_no_labels():
    maps = {"a": np.array([[1, 2, 3, 0]]), "b": np.array([[0, 1]])}
    result = assemble(
        ["a", "b"], maps,
        crop_image_ids=["a", "a", "b"], crop_segment_ids=np.array([1, 2, 1]),
        cluster_of_crop=np.array([4, 0, 1]), kept=np.array([True, False, False]),
    )
    # a: segment 2 filtered -> 255 and not a label; segment 3 has no crop feature -> 255
    assert result["a"].labels == (5,)
    assert result["a"].pseudo_map.tolist() == [[5, 255, 255, 0]]
    assert result["b"].labels == () and not result["b"].has_labels
    assert result["b"].pseudo_map.tolist() == [[0, 255]]


def test_a_crop_of_a_segment_missing_from_the_map_is_an_error():
    with pytest.raises(BadInputError, match=r"'img'.*segment\(s\) \[7\]"):
        assemble(["img"], {"img": np.array([[0, 1]])}, ["img"], np.array([7]), np.array([0]), np.array([True]))


# ---------------------------------------------------------------------------------------------
# scoring


def test_label_f1_equals_hand_computed_values():
    # 2 foreground classes, 2 clusters. Co-occurrence favours cluster 2 -> class 1, cluster 1 -> class 2.
    pseudo = [[2], [2, 1], [1], []]
    truth = [[1], [1], [2], [2]]
    scores = multilabel_scores(pseudo, truth, num_clusters=2, num_classes=3)
    assert scores.cluster_of_class == {1: 2, 2: 1}
    # mapped predictions: [1], [1, 2], [2], [] -> class 1: tp 2 fp 0 fn 0; class 2: tp 1 fp 1 fn 1
    np.testing.assert_allclose(scores.f1, [1.0, 0.5])
    assert scores.macro[2] == pytest.approx(0.75)
    assert scores.micro[2] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))  # 2tp / (2tp + fp + fn)


def test_map_iou_equals_hand_computed_values():
    # classes 0 (bg), 1, 2; pseudo-classes 1, 2; one ignore prediction, one ignore GT pixel
    gt = np.array([[0, 0, 1, 1], [2, 2, 2, 255]], dtype=np.uint8)
    pred = np.array([[0, 2, 2, 2], [1, 1, 255, 1]], dtype=np.uint8)
    confusion = np.zeros((4, 3), dtype=np.int64)
    add_pseudo_map(confusion, pred, gt)
    assert confusion.sum() == 7  # the 255 GT pixel is skipped
    scores = map_scores(confusion)
    assert scores.cluster_of_class == {1: 2, 2: 1}
    # bg: tp 1, gt 2, pred 1 -> 1/2. class 1 (cluster 2): tp 2, gt 2, pred 3 -> 2/3.
    # class 2 (cluster 1): tp 2, gt 3 (one unpredicted), pred 2 -> 2/3.
    np.testing.assert_allclose(scores.iou, [0.5, 2 / 3, 2 / 3])
    assert scores.miou == pytest.approx((0.5 + 4 / 3) / 3)


def test_a_permutation_of_ground_truth_scores_perfectly():
    rng = np.random.default_rng(0)
    permutation = {1: 3, 2: 1, 3: 2}  # class -> pseudo-class
    truth = [sorted(rng.choice([1, 2, 3], size=rng.integers(1, 3), replace=False).tolist()) for _ in range(20)]
    pseudo = [[permutation[c] for c in labels] for labels in truth]
    scores = multilabel_scores(pseudo, truth, num_clusters=3, num_classes=4)
    assert scores.macro[2] == 1.0 and scores.micro[2] == 1.0
    confusion = np.zeros((5, 4), dtype=np.int64)
    for _ in range(5):
        gt = rng.integers(0, 4, size=(6, 7)).astype(np.uint8)
        pred = np.vectorize(lambda c: permutation.get(c, 0))(gt).astype(np.uint8)
        add_pseudo_map(confusion, pred, gt)
    assert map_scores(confusion).miou == 1.0


def test_upsampling_with_and_without_geometry():
    patch_map = np.array([[1, 2], [3, 4]], dtype=np.uint8)
    assert upsample_nearest(patch_map, 4, 2).tolist() == [[1, 2], [1, 2], [3, 4], [3, 4]]
    # 50x70 image resized by 0.5 to 25x35, cropped to 16x32 (patch 16: grid 1x2). The cropped-away
    # bottom rows and right columns take the nearest patch.
    geometry = [0.5, 25, 35, 16, 32]
    up = upsample_nearest(np.array([[5, 6]], dtype=np.uint8), 50, 70, geometry)
    assert up.shape == (50, 70)
    # resized x = (col + .5) / 2; patch 0 covers resized x < 16, i.e. original col < 31.5
    assert (up[:, :32] == 5).all() and (up[:, 32:] == 6).all()


# ---------------------------------------------------------------------------------------------
# clustering dispatch and parameters


@pytest.mark.filterwarnings("ignore:Graph is not fully connected")
def test_cluster_crops_both_methods_recover_prototypes():
    rng = np.random.default_rng(0)
    prototypes = rng.normal(size=(3, 64))
    truth = np.repeat(np.arange(3), 20)
    features = (prototypes[truth] * rng.uniform(0.5, 3.0, size=(60, 1))  # scale: cosine ignores it
                + 0.05 * rng.normal(size=(60, 64))).astype(np.float16)
    for method in ("kmeans", "spectral"):
        clusters, kept, distances = cluster_crops(features, {**PARAMS, "method": method, "keep_fraction": 0.8}, seed=0)
        assert len({(c, t) for c, t in zip(clusters, truth)}) == 3, method
        assert kept.sum() == 48  # 16 of each cluster of 20
        assert distances[kept].max() <= distances[~kept].max()


def test_settings_errors_name_the_key():
    with pytest.raises(ConfigError, match="pseudo_labels.method"):
        PseudoLabelSettings.from_params({**PARAMS, "method": "dbscan"})
    with pytest.raises(ConfigError, match=r"pseudo_labels.num_clusters.*1\.\.254"):
        PseudoLabelSettings.from_params({**PARAMS, "num_clusters": 255})
    with pytest.raises(ConfigError, match="lack key.*keep_fraction"):
        PseudoLabelSettings.from_params({k: v for k, v in PARAMS.items() if k != "keep_fraction"})


def test_cluster_crops_names_images_with_nan_features():
    features = np.ones((4, 8), dtype=np.float32)
    features[2] = np.nan
    with pytest.raises(PipelineError, match=r"1 of 4 .*images: img2"):
        cluster_crops(features, PARAMS, seed=0, row_names=["img0", "img1", "img2", "img2"])


# ---------------------------------------------------------------------------------------------
# the stage, end to end on synthetic shards

GRID = (4, 6)
PATCH = 8


def synthetic_dataset(root: Path, with_masks: bool = True) -> dict:
    """12 train images + 2 val images (in no shard). Each train image has 1-2 foreground segments
    of classes 1..3; each segment's CLS feature is its class prototype plus noise. Masks are the
    segment maps at pixel resolution (patch 8)."""
    rng = np.random.default_rng(1)
    prototypes = rng.normal(size=(4, 32))
    spectral, crops, rows = {}, {}, []
    for index in range(12):
        image_id = f"train/{index:02d}"
        classes = rng.choice([1, 2, 3], size=1 + index % 2, replace=False)
        segments = np.zeros(GRID, dtype=np.int64)
        segments[:, 1:3] = 1
        if len(classes) == 2:
            segments[:, 4:6] = 2
        spectral[f"{image_id}/segments"] = torch.from_numpy(segments)
        spectral[f"{image_id}/geometry"] = torch.tensor([1.0, 32, 48, 32, 48])
        features = prototypes[classes] + 0.05 * rng.normal(size=(len(classes), 32))
        crops[f"{image_id}/cls"] = torch.from_numpy(features).half()
        crops[f"{image_id}/segment_ids"] = torch.arange(1, len(classes) + 1, dtype=torch.int64)
        mask_path, image_path = "", f"/img/{index}.jpg"
        if with_masks:
            class_map = np.concatenate([[0], classes]).astype(np.uint8)[segments]
            mask = np.kron(class_map, np.ones((PATCH, PATCH), dtype=np.uint8))
            mask_path = str(root / "masks" / f"{index:02d}.png")
            write_label_png(mask_path, mask)
            # A GT mask follows its image's EXIF orientation: the report reads the image header.
            image_path = str(root / "images" / f"{index:02d}.png")
            write_label_png(image_path, np.zeros_like(mask))
        rows.append([image_id, image_path, mask_path, " ".join(map(str, sorted(classes))),
                     with_masks, "train", 48, 32, index // 6])
    for index in range(2):
        rows.append([f"val/{index}", f"/img/v{index}.jpg", "", "", False, "val", 48, 32, 2])
    # two shards of each kind, split at different images, to exercise the lookup across shards
    for kind, tensors, first in (("spectral", spectral, 5), ("crops", crops, 8)):
        for shard, part in enumerate((lambda i, first=first: i < first, lambda i, first=first: i >= first)):
            chosen = {k: v for k, v in tensors.items() if part(int(k.split("/")[1]))}
            save_file(chosen, str(root / f"{kind}_{shard}.safetensors"))
    pd.DataFrame(rows, columns=MANIFEST_COLUMNS).to_csv(root / "manifest.csv", index=False)
    (root / "classes.json").write_text(json.dumps(
        {"names": ["background", "a", "b", "c"] if with_masks else None,
         "num_classes": 4 if with_masks else None}))
    return {
        "segment_feature_shards": [root / "crops_0.safetensors", root / "crops_1.safetensors"],
        "spectral_shards": [root / "spectral_0.safetensors", root / "spectral_1.safetensors"],
        "manifest_path": root / "manifest.csv",
    }


def test_run_pseudo_labels_end_to_end_and_report(tmp_path):
    inputs = synthetic_dataset(tmp_path)
    out = tmp_path / "pseudo"
    run_pseudo_labels(**inputs, out_dir=out, params=PARAMS, seed=0, threads=1)

    labels = pd.read_csv(out / "image_labels.csv", keep_default_na=False, dtype={"labels": str})
    assert list(labels.columns) == ["image_id", "labels", "has_labels"]
    assert labels["image_id"].tolist() == [f"train/{i:02d}" for i in range(12)]  # no val image
    assert labels["has_labels"].all()
    crops = pd.read_csv(out / "crops.csv")
    assert list(crops.columns) == ["image_id", "segment_id", "cluster", "distance", "kept"]
    assert len(crops) == 18 and crops["cluster"].between(1, 3).all() and crops["kept"].all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_clusters"] == 3 and summary["crops"] == 18 and sum(summary["cluster_sizes"]) == 18

    maps = shards.read_images(out / "maps.safetensors", images={"train/03"})["train/03"]
    pseudo_map = maps["pseudo_map"].numpy()
    assert pseudo_map.dtype == np.uint8 and pseudo_map.shape == GRID
    assert (pseudo_map[:, 0] == 0).all() and (pseudo_map[:, 1:3] > 0).all()
    assert set(np.unique(pseudo_map)) - {0} == set(map(int, labels["labels"][3].split()))
    with safe_open(str(out / "maps.safetensors"), framework="pt") as fh:
        assert json.loads(fh.metadata()["num_clusters"]) == 3

    report_pseudo_labels(out, inputs["manifest_path"], tmp_path / "classes.json",
                         tmp_path / "report.csv", tmp_path / "report.md")
    report = pd.read_csv(tmp_path / "report.csv")
    summary_rows = report.set_index("class_name")
    assert summary_rows.loc["macro", "f1"] == 1.0 and summary_rows.loc["micro", "f1"] == 1.0
    assert summary_rows.loc["macro", "iou"] == 1.0  # mIoU: clusters are a permutation of classes
    assert "| class_id |" in (tmp_path / "report.md").read_text()

    # same inputs and seed: identical artifacts
    again = tmp_path / "again"
    run_pseudo_labels(**inputs, out_dir=again, params=PARAMS, seed=0, threads=1)
    for name in ("image_labels.csv", "crops.csv", "maps.safetensors"):
        assert (out / name).read_bytes() == (again / name).read_bytes(), name


def test_run_with_filtering_marks_images_without_kept_crops(tmp_path):
    inputs = synthetic_dataset(tmp_path)
    out = tmp_path / "pseudo"
    run_pseudo_labels(**inputs, out_dir=out, params={**PARAMS, "keep_fraction": 0.5}, seed=0, threads=1)
    crops = pd.read_csv(out / "crops.csv")
    labels = pd.read_csv(out / "image_labels.csv", keep_default_na=False, dtype={"labels": str})
    kept_images = set(crops.loc[crops["kept"], "image_id"])
    assert set(labels.loc[labels["has_labels"], "image_id"]) == kept_images
    assert (labels.loc[~labels["has_labels"], "labels"] == "").all()
    assert crops["kept"].sum() < len(crops)


def test_report_without_ground_truth_says_so(tmp_path):
    inputs = synthetic_dataset(tmp_path, with_masks=False)
    out = tmp_path / "pseudo"
    run_pseudo_labels(**inputs, out_dir=out, params=PARAMS, seed=0, threads=1)
    report_pseudo_labels(out, inputs["manifest_path"], tmp_path / "classes.json",
                         tmp_path / "report.csv", tmp_path / "report.md")
    assert "No ground truth" in (tmp_path / "report.md").read_text()
    assert pd.read_csv(tmp_path / "report.csv").empty


def test_missing_train_image_in_the_shards_is_named(tmp_path):
    inputs = synthetic_dataset(tmp_path)
    with pytest.raises(BadInputError, match=r"7 train image\(s\) lack segments .*'train/05'"):
        run_pseudo_labels(**{**inputs, "spectral_shards": inputs["spectral_shards"][:1]},
                          out_dir=tmp_path / "pseudo", params=PARAMS, seed=0, threads=1)
    assert not (tmp_path / "pseudo" / "image_labels.csv").exists()


def test_too_few_crops_for_the_clusters_is_a_clear_error(tmp_path):
    inputs = synthetic_dataset(tmp_path)
    with pytest.raises(PipelineError, match=r"only 18 crops .*num_clusters=20"):
        run_pseudo_labels(**inputs, out_dir=tmp_path / "pseudo", params={**PARAMS, "num_clusters": 20},
                          seed=0, threads=1)
