"""COMUS (paper 002, Algorithm 1): proposals from a saliency folder or the spectral foreground,
pseudo-masks proposal x (cluster + 1), and the demo DAG through two self-training rounds."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline import shards
from pipeline.comus import (
    keep_large_components,
    proposal_box,
    pseudo_mask,
    run_proposals,
    run_pseudo_masks,
    saliency_proposal,
    spectral_proposal,
)
from pipeline.datasets import MANIFEST_COLUMNS
from pipeline.imageio import load_mask, write_label_png
from workflow_runs import SNAKEMAKE, tiny_config, write_config

TINY_VIT = {"depth": 2, "embed_dim": 48, "num_heads": 3}


# ---------------------------------------------------------------------------------------------
# Proposals


def test_saliency_threshold_keeps_pixels_above_theta_and_drops_small_components():
    saliency = np.zeros((20, 20), np.uint8)
    saliency[2:10, 2:10] = 200  # 64 px above 0.5 * 255
    saliency[15:17, 15:17] = 255  # 4 px: 1% of 400 px, under min 2%
    saliency[12:20, 0:8] = 100  # 64 px under θ
    proposal = saliency_proposal(saliency, (20, 20), threshold=0.5, min_fraction=0.02)
    expected = np.zeros((20, 20), bool)
    expected[2:10, 2:10] = True
    np.testing.assert_array_equal(proposal, expected)
    # at θ = 0.3 the 100-valued block (39%) joins; a minimum of 0 keeps the 4 px speck
    assert saliency_proposal(saliency, (20, 20), 0.3, 0.02).sum() == 128
    assert saliency_proposal(saliency, (20, 20), 0.5, 0.0).sum() == 68


def test_saliency_map_of_another_size_is_resized_to_the_image():
    saliency = np.zeros((10, 10), np.uint8)
    saliency[:, 5:] = 255
    proposal = saliency_proposal(saliency, (20, 40), 0.5, 0.0)
    assert proposal.shape == (20, 40) and proposal[:, 21:].all() and not proposal[:, :19].any()


def test_components_are_eight_connected():
    binary = np.zeros((6, 6), bool)
    binary[1, 1] = binary[2, 2] = binary[3, 3] = True  # one diagonal component of 3 px
    assert keep_large_components(binary, 3 / 36).sum() == 3
    assert keep_large_components(binary, 4 / 36).sum() == 0


def test_spectral_proposal_is_the_foreground_of_the_segments_on_the_image():
    segments = torch.tensor([[0, 0, 2, 2], [0, 1, 1, 0]])  # 2 x 4 patches of 8 px: a 16 x 32 input
    geometry = torch.tensor([0.5, 16.0, 32.0, 16.0, 32.0])  # the image was 32 x 64, halved
    proposal = spectral_proposal(segments, geometry, (32, 64), 0.0)
    expected = np.kron((segments.numpy() != 0), np.ones((16, 16), bool))  # each patch is 16 x 16 image px
    np.testing.assert_array_equal(proposal, expected)
    assert proposal_box(proposal) == (0, 16, 32, 64)
    assert proposal_box(np.zeros((3, 3), bool)) is None


def _write_manifest(root, ids, size=(40, 48)):
    rows = []
    rng = np.random.default_rng(0)
    for image_id in ids:
        path = root / "images" / f"{image_id}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
        rows.append({column: "" for column in MANIFEST_COLUMNS} | {"image_id": image_id, "image_path": str(path),
                                                                  "has_labels": False, "split": "train",
                                                                  "width": size[1], "height": size[0], "shard": 0})
    rows.append(rows[-1] | {"image_id": "val_a", "split": "val"})  # never proposed: not train
    manifest = root / "manifest.csv"
    pd.DataFrame(rows, columns=MANIFEST_COLUMNS).to_csv(manifest, index=False)
    return manifest


def comus_params(saliency_dir, **comus) -> dict:
    return {
        "comus": {"saliency_dir": str(saliency_dir), "saliency_threshold": 0.5, "min_object_fraction": 0.05,
                  "crop_size": 32, "first_round_list": None} | comus,
        "backbone": {"name": "vit_small_patch16_224.dino", "weights": "random", "checkpoint_key": "teacher",
                     "model_kwargs": TINY_VIT},
        "features": {"device": "cpu"},
        "seed": 0,
    }


def test_proposals_from_a_saliency_folder_crop_and_list_images_without_one(tmp_path):
    manifest = _write_manifest(tmp_path, ["a", "b", "c"])
    saliency = tmp_path / "saliency"
    saliency.mkdir()
    big = np.zeros((40, 48), np.uint8)
    big[5:25, 10:30] = 255  # 400 px of 1920: kept
    write_label_png(saliency / "a.png", big)
    speck = np.zeros((40, 48), np.uint8)
    speck[0:3, 0:3] = 255  # 9 px, under 5%: no proposal
    write_label_png(saliency / "b.png", speck)
    # c has no saliency map at all
    out = tmp_path / "proposals"
    run_proposals(manifest, [], out, comus_params(saliency), threads=1)

    assert sorted(p.name for p in (out / "masks").iterdir()) == ["a.png"]
    np.testing.assert_array_equal(load_mask(out / "masks" / "a.png"), (big > 0).astype(np.uint8))
    boxes = pd.read_csv(out / "proposals.csv")
    assert boxes.to_dict("records") == [{"image_id": "a", "y0": 5, "x0": 10, "y1": 25, "x1": 30, "pixels": 400}]
    missing = pd.read_csv(out / "without_proposal.csv").set_index("image_id")["reason"]
    assert sorted(missing.index) == ["b", "c"]
    assert "min_object_fraction" in missing["b"] and "no saliency map" in missing["c"]
    features = shards.read_images(out / "features.safetensors")
    assert list(features) == ["a"] and features["a"]["cls"].shape == (48,)
    # the first-round list keeps only the images it names
    listed = tmp_path / "first.txt"
    listed.write_text("b\nc\n")
    run_proposals(manifest, [], tmp_path / "listed", comus_params(saliency, first_round_list=str(listed)), 1)
    assert not list((tmp_path / "listed" / "masks").iterdir())
    assert sorted(pd.read_csv(tmp_path / "listed" / "without_proposal.csv")["image_id"]) == ["b", "c"]


# ---------------------------------------------------------------------------------------------
# Pseudo-masks


def test_pseudo_mask_gives_the_proposal_cluster_plus_one_and_background_zero():
    proposal = np.array([[0, 1, 1], [0, 1, 0]], np.uint8)
    np.testing.assert_array_equal(pseudo_mask(proposal, 0), proposal)
    np.testing.assert_array_equal(pseudo_mask(proposal, 4), proposal * 5)
    assert pseudo_mask(proposal, 4).dtype == np.uint8


def test_pseudo_masks_cluster_filter_and_write_ids(tmp_path):
    """Two obvious clusters of 4 proposals; keeping 3 of 4 drops the farthest of each, whose
    images get no pseudo-mask and leave the training set; the others' masks are proposal x id."""
    proposals = tmp_path / "proposals"
    (proposals / "masks").mkdir(parents=True)
    rng = np.random.default_rng(0)
    centres = {0: np.eye(8)[0], 1: np.eye(8)[1]}
    features, groups = {}, {}
    for index in range(8):
        group = index % 2
        image_id = f"img{index}"
        offset = 0.05 * (index // 2)
        features[image_id] = {"cls": torch.tensor(centres[group] + offset * np.eye(8)[2 + group], dtype=torch.float32)}
        groups[image_id] = group
        mask = np.zeros((6, 7), np.uint8)
        mask[rng.integers(0, 3):, rng.integers(0, 3):] = 1
        write_label_png(proposals / "masks" / f"{image_id}.png", mask)
    shards.write_shard(proposals / "features.safetensors", shards.per_image_tensors(features),
                       {"image_ids": sorted(features)})
    pd.DataFrame({"image_id": ["lost"], "reason": ["no saliency map"]}).to_csv(proposals / "without_proposal.csv",
                                                                            index=False)
    params = {"method": "spectral", "num_clusters": 2, "keep_fraction": 0.75, "n_neighbors": 3,
              "kmeans_iterations": 10, "kmeans_restarts": 2}
    run_pseudo_masks(proposals, tmp_path / "pseudo_masks", tmp_path, params, seed=0, threads=1)

    table = pd.read_csv(tmp_path / "clusters.csv").set_index("image_id")
    # the clusters are the two groups (ids 1..2 in either order)
    assert {frozenset(table.index[table["cluster"] == c]) for c in (1, 2)} == {
        frozenset(i for i, g in groups.items() if g == group) for group in (0, 1)}
    # filtering (in the spectral embedding): the farthest of each cluster from its centre leaves
    dropped = set(table.index[~table["kept"]])
    assert dropped == set(table.groupby("cluster")["distance"].idxmax())
    assert set(pd.read_csv(tmp_path / "training_images.csv")["image_id"]) == set(table.index) - dropped
    written = {p.stem for p in (tmp_path / "pseudo_masks").glob("*.png")}
    assert written == set(table.index) - dropped
    for image_id in written:
        proposal = load_mask(proposals / "masks" / f"{image_id}.png")
        np.testing.assert_array_equal(load_mask(tmp_path / "pseudo_masks" / f"{image_id}.png"),
                                      proposal * table.loc[image_id, "cluster"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["method"] == "comus" and summary["num_classes"] == 3 and summary["num_clusters"] == 2
    assert summary["images_kept"] == 6 and summary["images_without_proposal"] == 1
    assert sorted(summary["cluster_sizes"]) == [4, 4] and sorted(summary["kept_cluster_sizes"]) == [3, 3]


# ---------------------------------------------------------------------------------------------
# The demo DAG: spectral proposals, two self-training rounds, the report


@pytest.mark.slow
def test_comus_demo_runs_two_self_training_rounds_to_the_report(tmp_path):
    config = tiny_config(tmp_path / "results")
    config["dataset"]["images_per_shard"] = 12  # one shard: fewer feature / spectral jobs
    config["comus"] = {"enabled": True, "crop_size": 32, "rounds": 2, "epochs": [1, 1], "min_object_fraction": 0.0}
    # half of each cluster, so that 8 images in 4 clusters surely lose some (0.8 of 4 rounds up to 4)
    config["pseudo_labels"] = {"method": "spectral", "keep_fraction": 0.5, "n_neighbors": 4}
    configfile = write_config(tmp_path / "config.yaml", config)
    start = time.monotonic()
    run = subprocess.run([*SNAKEMAKE, "--configfile", str(configfile)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=900)
    seconds = time.monotonic() - start
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    print(f"COMUS demo DAG: {seconds:.0f} s")
    ran = re.findall(r"^(?:local)?rule (\w+):$", run.stdout + run.stderr, flags=re.MULTILINE)
    counts = {name: ran.count(name) for name in set(ran)}
    assert counts["comus_proposals"] == 1 and counts["comus_pseudo_masks"] == 1
    assert counts["comus_train_round"] == 2 and counts["comus_predict_round"] == 4  # 2 rounds x (train, val)
    assert "train_model" not in counts and "pseudo_labels" not in counts and "train_deeplab" not in counts
    results = tmp_path / "results"
    clusters = pd.read_csv(results / "comus" / "clusters.csv")
    kept = set(clusters.loc[clusters["kept"], "image_id"])
    assert 0 < len(kept) < 8  # 80% of each cluster: some of the 8 train images leave the training set
    assert {p.stem for p in (results / "comus" / "pseudo_masks").glob("*.png")} == kept
    # round 1 learnt from the pseudo-masks of the kept images, round 2 from round 1's predictions of
    # every train image
    first = json.loads((results / "comus" / "round1" / "done.json").read_text())
    second = json.loads((results / "comus" / "round2" / "done.json").read_text())
    assert first["masks"] == [str(results / "comus" / "pseudo_masks")] and first["images"] == len(kept)
    assert second["masks"] == [str(results / "comus" / "round1" / "masks" / "train")] and second["images"] == 8
    assert len(list((results / "comus" / "round1" / "masks" / "train").glob("*.png"))) == 8
    summary = (results / "reports" / "summary.md").read_text()
    assert summary.startswith("# COMUS results") and "`comus.enabled: true`" in summary
    for column in ("COMUS round 1 (train)", "COMUS round 2 (train)", "COMUS round 1 (val)", "COMUS round 2 (val)"):
        assert column in summary
    assert "DeepLab verification: recipe `v3plus`" in summary
    table = pd.read_csv(results / "reports" / "summary.csv")
    assert [c for c in table.columns if c.startswith("COMUS")] == [
        "COMUS round 1 (train)", "COMUS round 2 (train)", "COMUS round 1 (val)", "COMUS round 2 (val)"]


def test_comus_with_a_saliency_folder_runs_to_the_report_without_the_feature_stages(tmp_path):
    """The VOC preset's configuration (comus.saliency_dir) through Snakemake: maps of another size
    than the images, one train image without a map (it leaves the set, listed); no feature,
    spectral or clustering job runs. The maps stand in for an unsupervised saliency network's: made
    here from the demo's masks, which the pipeline itself never reads in this mode."""
    config = tiny_config(tmp_path / "results")
    config["dataset"]["images_per_shard"] = 12
    config["comus"] = {"enabled": True, "crop_size": 32, "rounds": 1, "epochs": [1], "min_object_fraction": 0.0,
                       "saliency_dir": str(tmp_path / "saliency")}
    config["pseudo_labels"] = {"method": "spectral", "keep_fraction": 0.8, "n_neighbors": 4}
    configfile = write_config(tmp_path / "config.yaml", config)
    index = subprocess.run([*SNAKEMAKE, "index", "--configfile", str(configfile)], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert index.returncode == 0, index.stdout[-3000:] + index.stderr[-3000:]
    dataset = tmp_path / "results" / "dataset"
    manifest = pd.read_csv(dataset / "manifest.csv", keep_default_na=False)
    train = manifest[manifest["split"] == "train"]
    (tmp_path / "saliency").mkdir()
    for row in train.iloc[1:].itertuples():
        mask = load_mask(dataset / row.mask_path)
        salient = Image.fromarray((((mask > 0) & (mask != 255)) * 255).astype(np.uint8))
        salient.resize((mask.shape[1] // 2, mask.shape[0] // 2)).save(tmp_path / "saliency" / f"{row.image_id}.png")
    run = subprocess.run([*SNAKEMAKE, "--configfile", str(configfile)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ran = set(re.findall(r"^(?:local)?rule (\w+):$", run.stdout + run.stderr, flags=re.MULTILINE))
    assert {"comus_proposals", "comus_pseudo_masks", "comus_train_round", "report"} <= ran
    assert not ran & {"extract_features", "spectral_segments", "segment_features", "pseudo_labels"}
    results = tmp_path / "results"
    missing = pd.read_csv(results / "comus" / "proposals" / "without_proposal.csv")
    assert missing["image_id"].tolist() == [train["image_id"].iloc[0]]
    kept = set(pd.read_csv(results / "comus" / "clusters.csv").query("kept")["image_id"])
    assert kept and train["image_id"].iloc[0] not in kept
    assert "COMUS round 1 (val)" in (results / "reports" / "summary.md").read_text()


def test_config_checks_comus_keys():
    from pipeline.config import check_config, load_config
    from pipeline.errors import ConfigError

    config = load_config([str(Path(__file__).resolve().parents[1] / "config.yaml")])
    config["comus"]["enabled"] = True
    check_config(config)  # the demo: unsupervised, 2 rounds of [10, 5] epochs
    with pytest.raises(ConfigError, match="comus.epochs"):
        check_config({**config, "comus": {**config["comus"], "rounds": 1}})
    with pytest.raises(ConfigError, match="unsupervised"):
        check_config({**config, "mode": "weak"})
