"""Regenerating one stage of a finished run (one tiny demo run shared by every check, ~2 min):
nothing changed -> nothing runs; a changed stage parameter reruns that stage and what depends on
it, never what is upstream; `--forcerun RULE --until RULE` redoes exactly that rule's jobs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from workflow_runs import job_counts

pytestmark = pytest.mark.slow

TINY = {
    "dataset": {"images_per_shard": 4, "demo": {"n_train": 6, "n_val": 2, "width": 80, "height": 64}},
    "backbone": {"model_kwargs": {"depth": 2, "embed_dim": 48, "num_heads": 3}},
    "features": {"batch_size": 4, "num_workers": 0},
    "train": {"epochs": 2, "global_size": 64, "local_size": 32, "batch_size": 4, "num_workers": 0},
    "predict": {"max_size": 96, "num_workers": 0},
    "deeplab": {"iterations": 4, "batch_size": 2, "crop_size": 32, "checkpoint_every": 2, "log_every": 2,
                "num_workers": 0},
}
UPSTREAM_OF_CRF = {"demo_data", "dataset_index", "extract_features", "spectral_segments", "segment_features",
                   "pseudo_labels", "pseudo_label_report", "train_pc2m", "predict_pc2m"}


def snakemake(repo: Path, work: Path, configfile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "--cores", "2",
           "--configfile", str(configfile), *args]
    return subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=900)


def write_config(path: Path, results: Path, **changes) -> Path:
    config = {**TINY, "results": str(results)}
    for section, values in changes.items():
        config[section] = {**config.get(section, {}), **values}
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def finished_run(repo, tmp_path_factory):
    work = tmp_path_factory.mktemp("reruns")
    configfile = write_config(work / "tiny.yaml", work / "results")
    first = snakemake(repo, work, configfile)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
    return work, configfile


def test_rerun_with_nothing_changed_runs_nothing(repo, finished_run):
    work, configfile = finished_run
    again = snakemake(repo, work, configfile)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Nothing to be done" in again.stdout + again.stderr


def test_changed_crf_parameter_reruns_crf_and_downstream_only(repo, finished_run):
    work, _ = finished_run
    changed = write_config(work / "crf-changed.yaml", work / "results", crf={"iterations": 3})
    plan = snakemake(repo, work, changed, "-n")
    assert plan.returncode == 0, plan.stderr[-3000:]
    counts = job_counts(plan.stdout + plan.stderr)
    # 2 shards; evaluation of crf on train and val, and of deeplab (trained on the CRF masks) on val
    assert {k: v for k, v in counts.items() if k != "all"} == {
        "dense_crf": 2, "evaluate_split": 3, "train_deeplab": 1, "predict_deeplab": 1, "report": 1}, counts
    assert not UPSTREAM_OF_CRF & set(counts)


def test_changed_pseudo_label_parameter_keeps_features_and_segments(repo, finished_run):
    work, _ = finished_run
    changed = write_config(work / "pl-changed.yaml", work / "results", pseudo_labels={"keep_fraction": 0.8})
    plan = snakemake(repo, work, changed, "-n")
    assert plan.returncode == 0, plan.stderr[-3000:]
    counts = job_counts(plan.stdout + plan.stderr)
    assert counts.get("pseudo_labels") == 1 and counts.get("train_pc2m") == 1, counts
    assert not {"demo_data", "dataset_index", "extract_features", "spectral_segments", "segment_features"} & set(counts)


def test_forcerun_until_redoes_exactly_one_stage(repo, finished_run):
    """Last of the module: it really reruns the CRF, which leaves the downstream stages older."""
    work, configfile = finished_run
    masks = sorted((work / "results" / "crf" / "masks").glob("shard-*"))
    before = {p: p.stat().st_mtime_ns for p in (work / "results" / "pc2m").rglob("*") if p.is_file()}
    redo = snakemake(repo, work, configfile, "--forcerun", "dense_crf", "--until", "dense_crf")
    assert redo.returncode == 0, redo.stderr[-3000:]
    assert job_counts(redo.stdout + redo.stderr) == {"dense_crf": len(masks)}
    assert len(masks) == 2 and all(m.is_dir() for m in masks)
    # upstream outputs untouched
    assert before == {p: p.stat().st_mtime_ns for p in (work / "results" / "pc2m").rglob("*") if p.is_file()}
