"""The Snakemake workflow: lint and dry-runs are clean; the demo runs end to end through the
stages built so far; a rerun does nothing; a missing shard is the only thing redone."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.features import read_shard
from workflow_runs import SNAKEMAKE, job_counts, reference_run


def snakemake(repo: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*SNAKEMAKE, *args], cwd=cwd or repo, capture_output=True, text=True, timeout=900)


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
def test_demo_runs_end_to_end_and_reruns_only_what_is_missing(repo, tmp_path_factory):
    """On the session's second tiny run (a whole DAG from scratch, also compared byte for byte with
    the first by test_determinism): a rerun does nothing; a deleted shard is the only thing redone,
    to the same bytes, so the comparison holds whichever test reads the run first."""
    results = reference_run(tmp_path_factory, seed=0, replica=1)
    work = results.parent
    configfile = work / "tiny.yaml"

    shards = sorted((results / "features").glob("shard-*.safetensors"))
    assert [s.name for s in shards] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    images = {}
    for shard in shards:
        images.update(read_shard(shard))
    assert len(images) == 12
    for tensors in images.values():
        gh, gw = tensors["grid"].tolist()
        assert tensors["keys"].shape == (gh * gw, 48)
        assert tensors["cls"].shape == (48,)

    again = snakemake(repo, "--configfile", str(configfile), cwd=work)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Nothing to be done" in again.stdout + again.stderr

    before = [shard.read_bytes() for shard in shards]
    shards[1].unlink()
    redo = snakemake(repo, str(shards[1]), "--configfile", str(configfile), cwd=work)
    assert redo.returncode == 0, redo.stdout + redo.stderr
    assert job_counts(redo.stdout + redo.stderr) == {"extract_features": 1}
    assert [shard.read_bytes() for shard in shards] == before


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
