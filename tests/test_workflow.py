"""The Snakemake workflow: lint and dry-runs are clean; the demo runs end to end through the
stages built so far; a rerun does nothing; a missing shard is the only thing redone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.features import read_shard
from workflow_runs import job_counts


def snakemake(repo: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "--cores", "2", *args]
    return subprocess.run(cmd, cwd=cwd or repo, capture_output=True, text=True, timeout=900)


def test_lint_is_clean(repo):
    result = snakemake(repo, "--lint")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Congratulations" in result.stdout + result.stderr


def test_dry_run_of_default_config(repo, tmp_path):
    result = snakemake(repo, "-n", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "dataset_index" in result.stdout


def test_config_typo_stops_the_run_naming_the_key(repo, tmp_path):
    result = snakemake(repo, "-n", "--config", "sed=1", cwd=tmp_path)
    assert result.returncode != 0
    assert "unknown config key sed" in result.stdout + result.stderr


def tiny_demo_config(tmp_path: Path) -> Path:
    config = {
        "results": str(tmp_path / "results"),
        "dataset": {"images_per_shard": 4, "demo": {"n_train": 6, "n_val": 2, "width": 80, "height": 64}},
        "backbone": {"model_kwargs": {"depth": 2, "embed_dim": 48, "num_heads": 3}},
        "features": {"batch_size": 4, "num_workers": 0},
        "train": {"epochs": 2, "global_size": 64, "local_size": 32, "batch_size": 4, "num_workers": 0},
        "predict": {"max_size": 96, "num_workers": 0},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_demo_runs_end_to_end_and_reruns_only_what_is_missing(repo, tmp_path):
    configfile = tiny_demo_config(tmp_path)
    first = snakemake(repo, "--configfile", str(configfile), cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr

    shards = sorted((tmp_path / "results" / "features").glob("shard-*.safetensors"))
    assert [s.name for s in shards] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    images = {}
    for shard in shards:
        images.update(read_shard(shard))
    assert len(images) == 8
    for tensors in images.values():
        gh, gw = tensors["grid"].tolist()
        assert tensors["keys"].shape == (gh * gw, 48)
        assert tensors["cls"].shape == (48,)

    again = snakemake(repo, "--configfile", str(configfile), cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Nothing to be done" in again.stdout + again.stderr

    before = shards[0].read_bytes()
    shards[1].unlink()
    redo = snakemake(repo, str(shards[1]), "--configfile", str(configfile), cwd=tmp_path)
    assert redo.returncode == 0, redo.stdout + redo.stderr
    assert job_counts(redo.stdout + redo.stderr) == {"extract_features": 1}
    assert shards[1].exists()
    assert shards[0].read_bytes() == before


@pytest.mark.slow
def test_weak_mode_runs_end_to_end_without_the_unsupervised_stages(repo, tmp_path):
    configfile = tiny_demo_config(tmp_path)
    config = yaml.safe_load(configfile.read_text())
    config.update(mode="weak", deeplab={"iterations": 10, "crop_size": 64, "batch_size": 4, "num_workers": 0})
    configfile.write_text(yaml.safe_dump(config))
    run = snakemake(repo, "--configfile", str(configfile), cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    counts = job_counts(run.stdout + run.stderr)
    # labels come from the dataset: no features, segments or pseudo-labels are computed
    assert not {"extract_features", "spectral_segments", "pseudo_labels"} & set(counts)
    assert counts["train_model"] == 1 and counts["report"] == 1
    summary = (tmp_path / "results" / "reports" / "summary.md").read_text()
    assert "Mode: weak" in summary and "DeepLab (PC2M, val)" in summary
