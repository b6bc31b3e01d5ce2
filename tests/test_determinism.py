"""Determinism on CPU: two runs of the demo with the same seed give byte-identical pseudo-labels,
masks and metrics; another seed changes them.

The demo's images are themselves drawn from the seed, so a second check retrains PC2M from the
same pseudo-labels with another seed (same data): the weights must differ, i.e. the seed reaches
the training and is not only the data generator's.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from workflow_runs import REPO, digests, reference_run, snakemake, tiny_config, write_config

pytestmark = pytest.mark.slow

# Targets of the other-seed run: enough to hold pseudo-labels, PC2M masks and their metrics.
OTHER_SEED_TARGETS = ("pseudo_labels/summary.json", "eval/model-train.json", "eval/model-val.json")


def test_same_seed_gives_identical_bytes(tmp_path_factory):
    """The second run is made from scratch in another working folder (test_workflow reruns in it too)."""
    first = reference_run(tmp_path_factory, seed=0)
    second = reference_run(tmp_path_factory, seed=0, replica=1)
    assert first != second

    a, b = digests(first), digests(second)
    for kind in ("pseudo_labels/", "model/masks/", "crf/masks/", "deeplab/masks/", "eval/", "reports/summary.csv"):
        assert any(k.startswith(kind) for k in a), f"nothing compared under {kind}"
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []


def test_another_seed_changes_pseudo_labels_masks_and_metrics(tmp_path_factory):
    first = reference_run(tmp_path_factory, seed=0)
    work = tmp_path_factory.mktemp("other-seed")
    results = work / "results"
    config = write_config(work / "tiny.yaml", tiny_config(results, seed=1))
    result = snakemake(*(str(results / t) for t in OTHER_SEED_TARGETS), "--configfile", str(config), cwd=work)
    assert result.returncode == 0, result.stdout[-6000:]

    a, b = digests(first), digests(results)
    for prefix in ("pseudo_labels/image_labels.csv", "pseudo_labels/maps.safetensors", "eval/model-val.json"):
        assert a[prefix] != b[prefix], prefix
    masks = [k for k in b if k.startswith("model/masks/")]
    assert masks and any(a.get(k) != b[k] for k in masks)


def test_another_seed_on_the_same_data_trains_other_weights(tmp_path_factory):
    first = reference_run(tmp_path_factory, seed=0)
    out = tmp_path_factory.mktemp("retrain") / "pc2m"
    config = tiny_config(first, seed=1)
    defaults = yaml.safe_load((REPO / "config.yaml").read_text())
    params = {"backbone": {**defaults["backbone"], **config["backbone"]},
              "train": {**defaults["train"], **config["train"]}, "mode": "unsupervised", "seed": 1}
    result = subprocess.run([sys.executable, "-m", "pipeline", "train",
                             "--manifest", str(first / "dataset/manifest.csv"),
                             "--classes", str(first / "dataset/classes.json"),
                             "--labels", str(first / "pseudo_labels/image_labels.csv"), "--out-dir", str(out),
                             "--params", json.dumps(params), "--threads", "2"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    seed0 = torch.load(first / "model/model.pt", weights_only=True)["model"]
    seed1 = torch.load(out / "model.pt", weights_only=True)["model"]
    assert seed0.keys() == seed1.keys()
    assert any(not torch.equal(seed0[k], seed1[k]) for k in seed0)
