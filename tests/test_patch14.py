"""A DINOv2 backbone (14 px patches; tiny, random weights) through the real command line at
config.yaml's default sizes, which are not multiples of 14, and through the whole workflow; a
size no multiple can fix stops the workflow before any job runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import shards
from pipeline.datasets import read_manifest
from pipeline.features import read_shard
from pipeline.imageio import load_mask, load_rgb
from workflow_runs import REPO, snakemake, tiny_config, write_config

TINY_DINOV2 = {"name": "vit_small_patch14_dinov2", "model_kwargs": {"depth": 1, "embed_dim": 24, "num_heads": 2}}


def cli(*args) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], cwd=REPO, capture_output=True,
                            text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> tuple[Path, dict, dict[str, str]]:
    """demo-data -> index -> extract-features -> train (PC2M and ViT-PCM) -> predict, every size at
    config.yaml's default; only the data, epochs and workers are made small."""
    work = tmp_path_factory.mktemp("patch14-cli")
    config = yaml.safe_load((REPO / "config.yaml").read_text(encoding="utf-8"))
    config["backbone"].update(TINY_DINOV2)
    config["dataset"]["demo"].update(n_train=8, n_val=2)
    config["train"].update(epochs=1, batch_size=4, num_workers=0)
    config["features"].update(num_workers=0)
    config["predict"].update(num_workers=0)
    backbone, seed, mode = config["backbone"], config["seed"], "weak"
    manifest, classes = work / "dataset" / "manifest.csv", work / "dataset" / "classes.json"

    cli("demo-data", "--out", work / "demo", "--params", json.dumps({"seed": seed, "demo": config["dataset"]["demo"]}))
    cli("index", "--out-dir", work / "dataset", "--params", json.dumps(
        {"dataset": config["dataset"], "on_bad_input": "error", "seed": seed, "demo_root": str(work / "demo")}))
    cli("extract-features", "--manifest", manifest, "--shard", 0, "--out", work / "features.safetensors",
        "--params", json.dumps({"backbone": backbone, "features": config["features"], "seed": seed}))
    logs = {}
    for method in ("pc2m", "vitpcm"):
        train = {**config["train"], "method": method}
        logs[method] = cli("train", "--manifest", manifest, "--classes", classes, "--out-dir", work / method,
                           "--params", json.dumps({"backbone": backbone, "train": train, "mode": mode, "seed": seed})
                           ).stderr
    cli("predict", "--manifest", manifest, "--shard", 0, "--model", work / "pc2m" / "model.pt",
        "--out-probs", work / "probs.safetensors", "--out-masks", work / "masks",
        "--params", json.dumps({"backbone": backbone, "predict": config["predict"], "mode": mode}))
    return work, config, logs


def test_features_at_the_default_max_size_are_on_a_14_px_grid(cli_run):
    work, config, _ = cli_run
    demo = config["dataset"]["demo"]
    features = read_shard(work / "features.safetensors")
    assert len(features) == demo["n_train"] + demo["n_val"]
    for tensors in features.values():
        # 192 x 144 (under max_size 512), cropped to multiples of 14.
        assert tensors["grid"].tolist() == [demo["height"] // 14, demo["width"] // 14]
        assert tensors["keys"].shape == (demo["height"] // 14 * (demo["width"] // 14), 24)


@pytest.mark.parametrize(("method", "lines"), [
    ("pc2m", ["train.global_size: 128 is not a multiple of 14 (patch size 14); using 126",
              "train.local_size: 64 is not a multiple of 14 (patch size 14); using 70"]),
    ("vitpcm", ["train.global_size: 128 is not a multiple of 28 (2 x patch size 14); using 140",
                "train.vitpcm.crop_size: 48 is not a multiple of 14 (patch size 14); using 42"]),
])
def test_training_rounds_the_default_views_and_says_so(cli_run, method, lines):
    work, _, logs = cli_run
    for line in lines:
        assert line in logs[method]
    assert json.loads((work / method / "done.json").read_text())["epochs"] == 1


def test_prediction_at_the_default_max_size_covers_every_image(cli_run):
    work, _, _ = cli_run
    probs = shards.read_images(work / "probs.safetensors", names={"probs"})
    images = read_manifest(work / "dataset" / "manifest.csv").set_index("image_id")["image_path"]
    assert sorted(probs) == sorted(images.index)
    for image_id, tensors in probs.items():
        # max_size 192, padded up to multiples of 14: 154 x 196.
        assert tensors["probs"].shape[1:] == (154 // 14, 196 // 14)
        assert load_mask(work / "masks" / f"{image_id}.png").shape == load_rgb(images[image_id]).shape[:2]


def test_an_impossible_size_stops_the_workflow_before_any_job(tmp_path):
    config = tiny_config(tmp_path / "results", backbone=TINY_DINOV2, train={"local_size": 10})
    result = snakemake("--configfile", str(write_config(tmp_path / "bad.yaml", config)), cwd=tmp_path)
    assert result.returncode != 0
    expected = "invalid configuration: train.local_size: 10 is smaller than one patch of the backbone (patch size 14)"
    errors = [line for line in result.stdout.splitlines() if "train.local_size" in line]
    assert errors == [expected], result.stdout[-3000:]
    assert not (tmp_path / "results").exists()
