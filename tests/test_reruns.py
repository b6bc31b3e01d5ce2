"""What reruns when something changes, on one finished tiny run of a folder dataset (images in
train/ and val/, masks, a labels CSV, backbone weights from a file; ~2 min), checked by dry runs:

- nothing changed -> nothing runs;
- a result-relevant key of a stage -> exactly that stage and what depends on it (job counts),
  including the keys Snakemake itself never tracked (params built by functions: the index,
  DeepLab training, evaluation) -- deeplab.iterations and the folder's classes as named regressions;
- a speed-only key -> nothing;
- a replaced weights file, an edited labels CSV, mask or image -> the stages they feed;
- another working directory sees the same rerun state, and cannot run while a run holds the
  results folder;
- `--forcerun RULE --until RULE` redoes exactly that rule's jobs;
- added images rerun only the shard they land in (and the dataset-level stages).
The last two really run, so they come last.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
import yaml

from pipeline.datasets.demo import generate_demo
from workflow_runs import SNAKEMAKE, job_counts

pytestmark = pytest.mark.slow

TINY_MODEL = {"depth": 2, "embed_dim": 48, "num_heads": 3}
TINY = {
    "dataset": {"kind": "folder", "images_per_shard": 4},
    "backbone": {"model_kwargs": TINY_MODEL},
    "features": {"batch_size": 4, "num_workers": 0},
    "train": {"epochs": 2, "global_size": 64, "local_size": 32, "batch_size": 4, "num_workers": 0},
    "predict": {"max_size": 96, "num_workers": 0},
    "deeplab": {"iterations": 4, "batch_size": 2, "crop_size": 32, "checkpoint_every": 2, "log_every": 2,
                "num_workers": 0},
}
FRONT = {"dataset_index", "extract_features", "spectral_segments", "segment_features", "pseudo_labels",
         "pseudo_label_report"}
UPSTREAM_OF_CRF = FRONT | {"train_model", "predict_model"}


def index_reruns(counts: dict[str, int]) -> bool:
    """A dry run where the index reruns shows it and some of the dataset-level jobs; the shard jobs
    are planned once the new index exists (the index is a checkpoint), and then all rerun, since
    every one of them reads the new manifest."""
    return counts.get("dataset_index") == 1 and counts.get("report") == 1


def snakemake(work: Path, configfile: Path, *args: str) -> subprocess.CompletedProcess:
    # targets and flags first: --configfile takes every word after it
    cmd = [*SNAKEMAKE, *args, "--configfile", str(configfile)]
    return subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=900)


def write_config(path: Path, base: dict, **changes) -> Path:
    config = yaml.safe_load(yaml.safe_dump(base))
    for section, values in changes.items():
        target = config.setdefault(section, {})
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(target.get(key), dict):
                target[key] = {**target[key], **value}
            else:
                target[key] = value
    path.write_text(yaml.safe_dump(config))
    return path


def planned(work: Path, configfile: Path) -> dict[str, int]:
    plan = snakemake(work, configfile, "-n")
    assert plan.returncode == 0, plan.stdout[-3000:] + plan.stderr[-3000:]
    return {k: v for k, v in job_counts(plan.stdout + plan.stderr).items() if k != "all"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("reruns")
    generate_demo(work / "demo", seed=5, n_train=6, n_val=2, width=80, height=64)
    data = work / "data"
    for kind in ("images", "masks"):
        shutil.copytree(work / "demo" / kind, data / kind)
    (data / "labels.csv").write_text("image_id,labels\ntrain/train_0000,1\n")
    weights = work / "weights.pth"
    torch.manual_seed(0)
    torch.save(timm.create_model("vit_small_patch16_224.dino", num_classes=0, **TINY_MODEL).state_dict(), weights)
    base = {**TINY, "results": str(work / "results")}
    base["dataset"] = {**TINY["dataset"], "folder": {
        "images": str(data / "images"), "masks": str(data / "masks"), "labels": str(data / "labels.csv"),
        "class_names": ["background", "disc", "square", "triangle", "cross"]}}
    base["backbone"] = {**TINY["backbone"], "weights": str(weights)}
    configfile = write_config(work / "tiny.yaml", base)
    first = snakemake(work, configfile)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
    return work, configfile, base


def test_rerun_with_nothing_changed_runs_nothing(finished_run):
    work, configfile, _ = finished_run
    again = snakemake(work, configfile)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Nothing to be done" in again.stdout + again.stderr


def test_changed_crf_parameter_reruns_crf_and_downstream_only(finished_run):
    work, _, base = finished_run
    counts = planned(work, write_config(work / "crf.yaml", base, crf={"iterations": 3}))
    assert counts == {"dense_crf": 2, "evaluate_split": 3, "train_deeplab": 1, "predict_deeplab": 1, "report": 1}
    assert not UPSTREAM_OF_CRF & set(counts)


def test_changed_pseudo_label_parameter_keeps_features_and_segments(finished_run):
    work, _, base = finished_run
    counts = planned(work, write_config(work / "pl.yaml", base, pseudo_labels={"keep_fraction": 0.8}))
    assert counts.get("pseudo_labels") == 1 and counts.get("train_model") == 1, counts
    assert not {"dataset_index", "extract_features", "spectral_segments", "segment_features"} & set(counts)


def test_regression_deeplab_iterations_retrain_deeplab(finished_run):
    """Once only re-predicted with the model trained for the old number of iterations."""
    work, _, base = finished_run
    counts = planned(work, write_config(work / "it.yaml", base, deeplab={"iterations": 3}))
    assert counts == {"train_deeplab": 1, "predict_deeplab": 1, "evaluate_split": 1, "report": 1}
    counts = planned(work, write_config(work / "bb.yaml", base, deeplab={"backbone": "resnet34"}))
    assert counts == {"train_deeplab": 1, "predict_deeplab": 1, "evaluate_split": 1, "report": 1}


def test_another_methods_settings_retrain_nothing(finished_run):
    """The run trains PC2M: tuning CSRM, its CAM baseline, RCM+MAM or ViT-PCM plans no job."""
    work, _, base = finished_run
    other = {"csrm": {"lr": 0.01}, "cam": {"lr": 0.2}, "rcm_mam": {"lr": 0.02}, "vitpcm": {"dropout": 0.3}}
    assert planned(work, write_config(work / "other.yaml", base, train=other)) == {}


def test_regression_the_folders_classes_rerun_the_index_and_everything(finished_run):
    """Once "Nothing to be done" (the index's params were a function)."""
    work, _, base = finished_run
    names = ["background", "a", "b", "c", "d"]
    counts = planned(work, write_config(work / "cls.yaml", base, dataset={"folder": {"class_names": names}}))
    assert index_reruns(counts), counts
    counts = planned(work, write_config(work / "shards.yaml", base, dataset={"images_per_shard": 3}))
    assert counts["dataset_index"] == 1 and counts["report"] == 1, counts


@pytest.mark.parametrize("key,value", [("matching", "majority"), ("discovered_iou", 0.5)])
def test_evaluation_keys_rerun_the_evaluations(finished_run, key, value):
    work, _, base = finished_run
    counts = planned(work, write_config(work / f"ev-{key}.yaml", base, evaluate={key: value}))
    assert counts == {"evaluate_split": 5, "report": 1}


def test_speed_only_keys_rerun_nothing(finished_run):
    work, _, base = finished_run
    changed = write_config(
        work / "speed.yaml", base,
        features={"num_workers": 1, "batch_size": 2, "device": "cpu"},
        spectral={"batch_size": 3, "device": "cpu"},
        segment_features={"batch_size": 5},
        train={"num_workers": 1, "keep_checkpoints": 1, "device": "cpu", "views_on": "workers"},
        predict={"batch_size": 3, "num_workers": 1, "device": "cpu"},
        deeplab={"log_every": 1, "checkpoint_every": 1, "num_workers": 1, "device": "cpu"},
    )
    assert planned(work, changed) == {}


def replace_keeping(path: Path, content: bytes, check) -> None:
    """Write ``content`` to ``path`` (so it is newer than every output, as a replaced file is),
    call ``check()``, then put the old bytes and times back (so the file counts as unchanged again
    for the tests after this one)."""
    old, stat = path.read_bytes(), path.stat()
    try:
        path.write_bytes(content)
        check()
    finally:
        path.write_bytes(old)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_replaced_weights_rerun_features_segments_and_training(finished_run):
    work, configfile, _ = finished_run
    weights = work / "weights.pth"
    other = work / "other.pth"
    torch.manual_seed(1)
    torch.save(timm.create_model("vit_small_patch16_224.dino", num_classes=0, **TINY_MODEL).state_dict(), other)

    def check():
        counts = planned(work, configfile)
        assert {k: counts.get(k) for k in ("extract_features", "segment_features", "train_model")} == {
            "extract_features": 2, "segment_features": 2, "train_model": 1}, counts
        assert "dataset_index" not in counts

    replace_keeping(weights, other.read_bytes(), check)


@pytest.mark.parametrize("what", ["labels CSV", "mask", "image"])
def test_edited_dataset_files_rerun_the_index_and_what_follows(finished_run, what):
    work, configfile, _ = finished_run
    data = work / "data"
    path = {"labels CSV": data / "labels.csv", "mask": data / "masks" / "val" / "val_0001.png",
            "image": data / "images" / "train" / "train_0003.png"}[what]
    content = {"labels CSV": b"image_id,labels\ntrain/train_0000,2\n",
               "mask": (data / "masks" / "val" / "val_0000.png").read_bytes(),
               "image": (data / "images" / "train" / "train_0002.png").read_bytes()}[what]
    def check():
        counts = planned(work, configfile)
        assert index_reruns(counts), (what, counts)

    replace_keeping(path, content, check)


def test_another_working_directory_sees_the_same_rerun_state(finished_run, tmp_path):
    """Rerun state lives with the results, not in the working directory's .snakemake/."""
    _, configfile, base = finished_run
    assert planned(tmp_path, configfile) == {}
    counts = planned(tmp_path, write_config(tmp_path / "crf.yaml", base, crf={"iterations": 3}))
    assert counts.get("dense_crf") == 2, counts


def test_a_second_run_on_the_same_results_folder_is_refused(repo, finished_run, tmp_path):
    work, configfile, base = finished_run
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pipeline.stage_settings import hold_results_lock; "
         "hold_results_lock(sys.argv[1], sys.argv[2]); print('held', flush=True); time.sleep(120)",
         base["results"], str(work)],
        cwd=repo, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = snakemake(tmp_path, configfile, "--forcerun", "report")
        assert refused.returncode != 0
        output = refused.stdout + refused.stderr
        lines = [line for line in output.splitlines() if "is in use by another snakemake run" in line]
        assert len(lines) == 1 and f"pid {holder.pid}" in lines[0] and str(work) in lines[0], output[-3000:]
        assert "Traceback" not in output
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    assert planned(tmp_path, configfile) == {}  # the lock went with the process


def test_forcerun_until_redoes_exactly_one_stage(finished_run):
    """Last of the module: it really reruns the CRF, which leaves the downstream stages older."""
    work, configfile, _ = finished_run
    masks = sorted((work / "results" / "crf" / "masks").glob("shard-*"))
    before = {p: p.stat().st_mtime_ns for p in (work / "results" / "model").rglob("*") if p.is_file()}
    redo = snakemake(work, configfile, "--forcerun", "dense_crf", "--until", "dense_crf")
    assert redo.returncode == 0, redo.stderr[-3000:]
    assert job_counts(redo.stdout + redo.stderr) == {"dense_crf": len(masks)}
    assert len(masks) == 2 and all(m.is_dir() for m in masks)
    # upstream outputs untouched
    assert before == {p: p.stat().st_mtime_ns for p in (work / "results" / "model").rglob("*") if p.is_file()}


def test_added_images_rerun_only_their_shard_and_the_dataset_level_stages(finished_run):
    """Last of the module (it really runs): 3 new train images land in a new shard; the 2 shards of
    the 8 indexed images keep their features, segments and crops. Dataset-level stages (clustering,
    training) rerun, and with the new model every shard's prediction, as they must."""
    work, configfile, _ = finished_run
    results = work / "results"
    shard_files = {stage: sorted((results / stage).glob("shard-*.safetensors"))
                   for stage in ("features", "spectral", "segment_features")}
    before = {p: p.stat().st_mtime_ns for files in shard_files.values() for p in files}
    generate_demo(work / "more", seed=9, n_train=3, n_val=0, width=72, height=56)
    for path in sorted((work / "more" / "images" / "train").glob("*.png")):
        shutil.copy(path, work / "data" / "images" / "train" / f"new_{path.name}")
    run = snakemake(work, configfile)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ran = Counter(re.findall(r"^(?:local)?(?:rule|checkpoint) (\w+):$", run.stdout + run.stderr, flags=re.MULTILINE))
    assert {k: ran[k] for k in ("dataset_index", "extract_features", "spectral_segments", "segment_features")} == {
        "dataset_index": 1, "extract_features": 1, "spectral_segments": 1, "segment_features": 1}, ran
    assert ran["pseudo_labels"] == 1 and ran["train_model"] == 1 and ran["predict_model"] == 3, ran
    assert before == {p: p.stat().st_mtime_ns for p in before}  # the old shards untouched
    manifest = pd.read_csv(results / "dataset" / "manifest.csv")
    assert sorted(manifest.loc[manifest["image_id"].str.contains("new_"), "shard"]) == [2, 2, 2]

    # an image replaced in place by one of the same size reruns its shard's features only
    replaced = work / "data" / "images" / "train" / "train_0001.png"
    shard = int(manifest.set_index("image_id").loc["train/train_0001", "shard"])
    replaced.write_bytes((work / "data" / "images" / "train" / "train_0002.png").read_bytes())
    plan = snakemake(work, configfile, "-n")
    assert job_counts(plan.stdout + plan.stderr).get("dataset_index") == 1
    rerun = snakemake(work, configfile, "features")
    output = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, output[-3000:]
    ran = Counter(re.findall(r"^(?:local)?(?:rule|checkpoint) (\w+):$", output, flags=re.MULTILINE))
    assert ran["dataset_index"] == 1 and ran["extract_features"] == 1, ran
    assert f"features/shard-{shard:05d}.safetensors" in output
