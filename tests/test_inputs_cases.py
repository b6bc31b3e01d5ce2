"""Inputs that used to crash late or mislead (issue 11), each through the real command line.

Each case ends in one line naming the file or config key, before any expensive stage wherever the
config alone tells (``snakemake -n`` refuses it), or in correct output. Helpers and the one-line
contract come from tests/test_bad_inputs.py and tests/workflow_runs.py.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.datasets import read_manifest
from test_bad_inputs import (
    CONFIG,
    TIMEOUT,
    TINY_BACKBONE,
    assert_ok,
    cli,
    features_params,
    index,
    index_params,
    write_image,
    write_manifest,
)
from workflow_runs import SNAKEMAKE, assert_one_line_error


def run_snakemake(work: Path, config: dict, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``snakemake --configfile`` from ``work``: stdout and stderr together in ``stdout``."""
    configfile = work / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    return subprocess.run([*SNAKEMAKE, "--configfile", str(configfile), *args], cwd=work, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT, env={**os.environ, **(env or {})})


def assert_refused_at_parse_time(result: subprocess.CompletedProcess, *names: str) -> str:
    """Snakemake stopped before planning any job, with one 'invalid configuration' line naming ``names``."""
    output = result.stdout
    assert result.returncode != 0, output[-3000:]
    assert "Traceback" not in output and "Job stats" not in output, output[-3000:]
    line = next(line for line in output.splitlines() if line.startswith("invalid configuration: "))
    for name in names:
        assert name in line, f"{name!r} not named in: {line}"
    return line


def folder_config(images: str | Path, **folder) -> dict:
    return {"results": "results", "dataset": {"kind": "folder", "folder": {"images": str(images), **folder}}}


def skipped_rows(out: Path) -> list[list[str]]:
    with open(out / "skipped.csv", encoding="utf-8", newline="") as fh:
        return list(csv.reader(fh))[1:]


# ---------------------------------------------------------------------------------------------
# File names: too long for the files named after them, not UTF-8, links


def test_file_name_too_long_for_derived_files_is_refused_at_the_index(tmp_path):
    """A 240-byte stem: fine as an image, but `predict` writes `.<stem>.png.<8>.partial` (> 255)."""
    images = tmp_path / "images"
    write_image(images / "good.png")
    long = write_image(images / f"{'x' * 240}.png")
    out = tmp_path / "dataset"
    assert "233" in assert_one_line_error(index({"images": images}, out), long)
    assert not (out / "manifest.csv").exists()

    assert_ok(index({"images": images}, out, on_bad_input="skip"))
    assert read_manifest(out / "manifest.csv")["image_id"].tolist() == ["good"]
    assert [row[1] for row in skipped_rows(out)] == [str(long)]


def test_file_name_at_the_limit_is_indexed(tmp_path):
    images = tmp_path / "images"
    write_image(images / f"{'y' * 233}.png")
    out = tmp_path / "dataset"
    assert_ok(index({"images": images}, out))
    assert read_manifest(out / "manifest.csv")["image_id"].tolist() == ["y" * 233]


def test_file_name_not_utf8_is_named_printably_or_skipped(tmp_path):
    images = tmp_path / "images"
    write_image(images / "good.png")
    raw = os.fsencode(images) + b"/caf\xe9.png"
    shutil.copyfile(images / "good.png", raw)
    out = tmp_path / "dataset"
    printable = f"{images}/caf\\xe9.png"
    assert "UTF-8" in assert_one_line_error(index({"images": images}, out), printable)

    assert_ok(index({"images": images}, out, on_bad_input="skip"))
    assert read_manifest(out / "manifest.csv")["image_id"].tolist() == ["good"]
    assert [row[:2] for row in skipped_rows(out)] == [["caf\\xe9", printable]]


def test_symlinked_folders_are_followed_and_loops_listed(tmp_path):
    """A linked sub-folder is indexed like a real one; a link back up the tree and a second link to a
    folder already searched are listed in skipped.csv, not followed (no hang, no duplicate ids)."""
    images, elsewhere = tmp_path / "images", tmp_path / "elsewhere"
    write_image(images / "top.png")
    write_image(elsewhere / "linked.png")
    (images / "linked").symlink_to(elsewhere, target_is_directory=True)
    (images / "again").symlink_to(elsewhere, target_is_directory=True)
    (images / "sub").mkdir()
    (images / "sub" / "up").symlink_to("..", target_is_directory=True)
    out = tmp_path / "dataset"
    assert_ok(cli("index", "--params", index_params({"images": images}), "--out-dir", out, timeout=60))
    assert read_manifest(out / "manifest.csv")["image_id"].tolist() == ["again/linked", "top"]
    reasons = {Path(row[1]).name: row[2] for row in skipped_rows(out)}
    assert "same folder as" in reasons["linked"] and "symbolic link loop" in reasons["up"]


def test_symlink_loop_and_broken_link_are_named_as_such(tmp_path):
    images = tmp_path / "images"
    write_image(images / "good.png")
    (images / "a.png").symlink_to("b.png")
    (images / "b.png").symlink_to("a.png")
    assert "symbolic link loop" in assert_one_line_error(index({"images": images}, tmp_path / "d1"), images / "a.png")
    (images / "a.png").unlink()
    (images / "b.png").unlink()
    (images / "gone.png").symlink_to(tmp_path / "nowhere.png")
    last = assert_one_line_error(index({"images": images}, tmp_path / "d2"), images / "gone.png")
    assert "broken symbolic link" in last and "nowhere.png" in last


def test_folder_of_gifs_lists_the_accepted_extensions(tmp_path):
    images = tmp_path / "images"
    for name in ("a.gif", "b.gif"):
        write_image(images / name, fmt="GIF")
    last = assert_one_line_error(index({"images": images}, tmp_path / "dataset"), images)
    assert ".jpg" in last and ".png" in last and "2 other files" in last


# ---------------------------------------------------------------------------------------------
# Labels


def test_labels_csv_whose_ids_carry_the_extension(tmp_path):
    images = tmp_path / "images"
    write_image(images / "a.jpg")
    write_image(images / "b.jpg")
    labels = tmp_path / "labels.csv"
    labels.write_text("image_id,labels\na.jpg,1 2\nb.jpg,1\n")
    folder = {"images": images, "labels": labels, "class_names": ["background", "cat", "dog"]}
    last = assert_one_line_error(index(folder, tmp_path / "dataset"), labels)
    assert "'a.jpg'" in last and "'a'" in last and "without extension" in last


def test_weak_mode_without_labelled_train_images_stops_at_the_index(tmp_path):
    """Through the workflow: the index rule's params carry the mode (common.smk index_params)."""
    images = tmp_path / "images"
    for name in ("a", "b", "c"):
        write_image(images / f"{name}.png")
    config = folder_config(images, class_names=["background", "cat"])
    result = run_snakemake(tmp_path, {**config, "mode": "weak"}, "--until", "dataset_index")
    assert result.returncode != 0 and "Error in rule dataset_index" in result.stdout, result.stdout[-3000:]
    log = (tmp_path / "results" / "logs" / "dataset_index.log").read_text()
    assert "Traceback" not in log
    last = log.strip().splitlines()[-1]
    assert last.startswith("error: config key mode is weak") and "no image of split 'train'" in last
    assert not (tmp_path / "results" / "dataset" / "manifest.csv").exists()


# ---------------------------------------------------------------------------------------------
# Config checks before any job


def test_results_inside_the_images_folder_is_refused(tmp_path):
    (tmp_path / "photos").mkdir()
    config = {**folder_config("photos", num_classes=3), "results": "photos/run1"}
    assert_refused_at_parse_time(run_snakemake(tmp_path, config, "-n"), "results", "dataset.folder.images")


@pytest.mark.parametrize("results", ["/", "~", "~/", "HOME/..", "~nosuchuser/x"])
def test_results_at_a_root_or_home_is_refused(tmp_path, results):
    home = tmp_path / "home"
    home.mkdir()
    config = {"results": results.replace("HOME", str(home))}
    assert_refused_at_parse_time(run_snakemake(tmp_path, config, "-n", env={"HOME": str(home)}), "results")


def test_results_under_home_is_expanded(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    result = run_snakemake(tmp_path, {"results": "~/runs/x"}, "-n", env={"HOME": str(home)})
    assert result.returncode == 0, result.stdout[-3000:]
    assert f"{home}/runs/x/dataset/manifest.csv" in result.stdout
    assert not (tmp_path / "~").exists()


def test_unsupervised_folder_without_a_cluster_count_is_refused(tmp_path):
    (tmp_path / "photos").mkdir()
    config = {**folder_config("photos"), "mode": "unsupervised"}
    assert_refused_at_parse_time(run_snakemake(tmp_path, config, "-n"), "pseudo_labels.num_clusters",
                                 "dataset.folder.num_classes", "dataset.folder.class_names")
    config["pseudo_labels"] = {"num_clusters": 4}
    assert run_snakemake(tmp_path, config, "-n").returncode == 0


def test_gpus_requested_on_a_machine_without_gpus(tmp_path):
    """Locally refused before any job; under SLURM (jobs may get GPUs the submit host lacks), or when
    the user states the GPUs (`--resources gpu=N`), accepted."""
    no_gpu = {"CUDA_VISIBLE_DEVICES": ""}
    config = {"results": "results", "compute": {"gpus_per_job": 1}}
    assert_refused_at_parse_time(run_snakemake(tmp_path, config, "-n", env=no_gpu), "compute.gpus_per_job")
    assert_refused_at_parse_time(run_snakemake(tmp_path, {**config, "compute": {"train_gpus": 2}}, "-n", env=no_gpu),
                                 "compute.train_gpus")
    for args in (("--executor", "slurm", "--jobs", "2"), ("--resources", "gpu=1")):
        result = run_snakemake(tmp_path, config, "-n", *args, env=no_gpu)
        assert result.returncode == 0, result.stdout[-3000:]


# ---------------------------------------------------------------------------------------------
# Stages given the wrong file or partial parameters


def _tiny_manifest(tmp_path: Path) -> Path:
    image = write_image(tmp_path / "a.png", size=(32, 32))
    return write_manifest(tmp_path / "manifest.csv", [{"image_id": "a", "image_path": image, "width": 32,
                                                       "height": 32}])


def test_model_file_of_another_stage_says_what_it_is(tmp_path):
    from pipeline.backbone import build_backbone
    from pipeline.deeplab.model import DeepLab, trained_payload
    from pipeline.methods.pc2m.model import Architecture, build_network, model_payload

    manifest = _tiny_manifest(tmp_path)
    pc2m = tmp_path / "pc2m.pt"
    net = build_backbone(TINY_BACKBONE["name"], "random", "teacher", TINY_BACKBONE["model_kwargs"])
    torch.save(model_payload(build_network(net, Architecture("pc2m", 3, 0)), Architecture("pc2m", 3, 0)), pc2m)
    result = cli("predict-deeplab", "--manifest", manifest, "--split", "train", "--model", pc2m, "--out-masks",
                 tmp_path / "masks", "--params", json.dumps({"deeplab": {**CONFIG["deeplab"], "num_workers": 0}}))
    assert "a PC2M model" in assert_one_line_error(result, pc2m)

    deeplab = tmp_path / "deeplab.pt"
    torch.save(trained_payload(DeepLab("resnet18", 3)), deeplab)
    params = json.dumps({"backbone": TINY_BACKBONE, "predict": {**CONFIG["predict"], "num_workers": 0},
                         "mode": "weak"})
    result = cli("predict", "--manifest", manifest, "--shard", "0", "--model", deeplab, "--out-probs",
                 tmp_path / "p.safetensors", "--out-masks", tmp_path / "m", "--params", params)
    assert "a DeepLab model" in assert_one_line_error(result, deeplab)


@pytest.mark.parametrize("stage,params,key", [
    ("predict-deeplab", {"deeplab": {"test_flip": False}}, "deeplab.test_scales"),
    ("predict", {"backbone": TINY_BACKBONE, "mode": "weak", "predict": {"max_size": 64}}, "predict.flip"),
    ("predict", {"mode": "weak", "predict": {**CONFIG["predict"], "num_workers": 0}}, "backbone"),
])
def test_partial_params_name_the_missing_key(tmp_path, stage, params, key):
    manifest = _tiny_manifest(tmp_path)
    model = tmp_path / "model.pt"
    model.write_bytes(b"never read: the params are checked first")
    where = ["--split", "train", "--out-masks", tmp_path / "m"] if stage == "predict-deeplab" else \
        ["--shard", "0", "--out-probs", tmp_path / "p.safetensors", "--out-masks", tmp_path / "m"]
    result = cli(stage, "--manifest", manifest, "--model", model, *where, "--params", json.dumps(params))
    assert "--params lack key" in assert_one_line_error(result, key)


# ---------------------------------------------------------------------------------------------
# A moved working folder


def test_moved_working_folder_still_finds_its_images(tmp_path):
    """Index through the workflow, move the whole working folder, run a stage on the moved manifest
    (from another folder: the manifest's relative paths are relative to the manifest itself)."""
    before, after = tmp_path / "before", tmp_path / "after"
    write_image(before / "images" / "a.png", size=(32, 32))
    write_image(before / "images" / "b.png", size=(40, 32))
    config = folder_config("images", num_classes=3)
    result = run_snakemake(before, config, "--until", "dataset_index")
    assert result.returncode == 0, result.stdout[-3000:]
    before.rename(after)
    manifest = after / "results" / "dataset" / "manifest.csv"
    assert read_manifest(manifest)["image_path"].tolist() == [str(after / "images" / n) for n in ("a.png", "b.png")]
    out = after / "results" / "features" / "shard-00000.safetensors"
    assert_ok(cli("extract-features", "--manifest", manifest, "--shard", "0", "--out", out,
                  "--params", features_params()))
    assert out.is_file()
