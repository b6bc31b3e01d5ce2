"""Applying a finished run's models to a new folder of images (README.md, "Apply the model to new
images"): through Snakemake (`snakemake apply`) and through `python -m pipeline apply`, on the shared tiny reference run
(workflow_runs.reference_run, trained once per session). Nothing is retrained; every image gets a
mask at its own size, probabilities and an overlay; bad input stops with one line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from pipeline.backbone import build_backbone
from pipeline.methods.pc2m.model import Architecture, build_network, model_payload
from pipeline.shards import read_meta
from workflow_runs import REPO, assert_one_line_error, reference_run, snakemake

# Odd sizes (width, height), two formats, one image in a sub-folder: 7 images = 2 shards of the
# tiny run's 6 images per shard.
NEW_IMAGES = {"a": (37, 23), "b": (50, 71), "c": (64, 40), "d": (31, 90), "e": (45, 45), "sub/f": (100, 17),
              "sub/g": (23, 60)}
NOT_IMAGES = ("notes.txt", "sub/table.csv")


def write_new_folder(root: Path) -> Path:
    rng = np.random.default_rng(1)
    for index, (image_id, (width, height)) in enumerate(NEW_IMAGES.items()):
        path = root / f"{image_id}.{'jpg' if index % 2 else 'png'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    for name in NOT_IMAGES:
        (root / name).write_text("not an image\n")
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(working folder, results, config file) of the finished tiny run."""
    results = reference_run(tmp_path_factory)
    return results.parent, results, results.parent / "tiny.yaml"


@pytest.fixture(scope="module")
def new_folder(tmp_path_factory) -> Path:
    return write_new_folder(tmp_path_factory.mktemp("new") / "images")


@pytest.fixture(scope="module")
def applied(run, new_folder) -> tuple[Path, str, str]:
    """`snakemake apply` on the new folder, twice: (output folder, first output, second output)."""
    work, results, configfile = run
    # the target before --config, which takes every word after it
    args = ("apply", "--configfile", str(configfile), "--config", f"apply={{images: {new_folder}, name: fresh}}")
    first = snakemake(*args, cwd=work)
    assert first.returncode == 0, first.stdout[-6000:]
    second = snakemake(*args, cwd=work)
    assert second.returncode == 0, second.stdout[-6000:]
    return results / "apply" / "fresh", first.stdout, second.stdout


def cli(*args: str | Path) -> subprocess.CompletedProcess:
    """`python -m pipeline apply ...` from the repository (so that this checkout's package runs)."""
    return subprocess.run([sys.executable, "-m", "pipeline", "apply", *map(str, args)], check=False, cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def check_outputs(out: Path, models: tuple[str, ...]) -> None:
    """Every image: a palette mask at its size and an RGB overlay per model; PC2M probabilities."""
    manifest = pd.read_csv(out / "dataset" / "manifest.csv")
    assert sorted(manifest["image_id"]) == sorted(NEW_IMAGES)
    assert manifest["shard"].nunique() == 2
    for model in models:
        for image_id, (width, height) in NEW_IMAGES.items():
            shard = int(manifest.set_index("image_id").loc[image_id, "shard"])
            mask = Image.open(out / model / "masks" / f"shard-{shard:05d}" / f"{image_id}.png")
            overlay = Image.open(out / model / "overlays" / f"shard-{shard:05d}" / f"{image_id}.png")
            assert (mask.mode, mask.size) == ("P", (width, height)), image_id
            assert (overlay.mode, overlay.size) == ("RGB", (width, height)), image_id
    probs = [read_meta(p)["image_ids"] for p in sorted((out / "model" / "probs").glob("shard-*.safetensors"))]
    assert sorted(i for ids in probs for i in ids) == sorted(NEW_IMAGES)
    ignored = pd.read_csv(out / "dataset" / "ignored.csv")["path"].map(lambda p: Path(p).name).tolist()
    assert sorted(ignored) == sorted(Path(n).name for n in NOT_IMAGES)
    shares = pd.read_csv(out / "class_shares.csv")
    for model in models:
        assert shares[model].sum() == pytest.approx(100.0, abs=0.1)
    report = (out / "report.md").read_text()
    assert "notes.txt" in report and f"images: {len(NEW_IMAGES)}" in report
    assert Image.open(out / "gallery.png").size[0] > 0


def executed(output: str) -> dict[str, int]:
    """Jobs a Snakemake run started, per rule (its 'Job stats' predate the checkpoint's jobs)."""
    return dict(Counter(re.findall(r"^(?:local)?(?:rule|checkpoint) (\w+):$", output, re.MULTILINE)))


@pytest.mark.slow
def test_snakemake_apply_segments_the_folder_without_retraining(applied):
    out, first, second = applied
    counts = executed(first)
    # one job per shard and model; the run's models are inputs, none is retrained
    assert counts == {"apply_index": 1, "apply_model": 2, "apply_deeplab": 2, "apply_report": 1, "apply": 1}, counts
    check_outputs(out, ("model", "deeplab"))
    assert executed(second) == {} and "Nothing to be done" in second, second[-3000:]


@pytest.mark.slow
def test_cli_gives_the_masks_of_the_workflow(run, new_folder, applied, tmp_path):
    _, results, configfile = run
    out = tmp_path / "out"
    result = cli("--model", results / "model" / "model.pt", "--deeplab-model", results / "deeplab" / "model.pt",
                 "--images", new_folder, "--out", out, "--config", REPO / "config.yaml",
                 configfile)
    assert result.returncode == 0, result.stderr[-4000:]
    check_outputs(out, ("model", "deeplab"))
    workflow_out = applied[0]
    for model in ("model", "deeplab"):
        ours = sorted(p.relative_to(out) for p in (out / model / "masks").rglob("*.png"))
        assert ours == sorted(p.relative_to(workflow_out) for p in (workflow_out / model / "masks").rglob("*.png"))
        for path in ours:
            assert (out / path).read_bytes() == (workflow_out / path).read_bytes(), path


def test_apply_target_without_a_folder_names_the_key(repo, tmp_path):
    result = snakemake("-n", "apply", cwd=tmp_path)
    assert result.returncode != 0
    assert "config key apply.images" in result.stdout


def configs(run) -> list[str]:
    return ["--config", str(REPO / "config.yaml"), str(run[2])]


def test_empty_folder_and_missing_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("no images\n")
    # the folder is indexed before the model is read: any existing file will do
    model = tmp_path / "model.pt"
    model.write_bytes(b"")
    config = ["--config", REPO / "config.yaml"]
    last = assert_one_line_error(cli("--model", model, "--images", empty, "--out", tmp_path / "o1", *config), empty,
                                 "apply.images")
    assert "1 other files ignored" in last
    missing = tmp_path / "nowhere"
    assert_one_line_error(cli("--model", model, "--images", missing, "--out", tmp_path / "o2", *config), missing,
                          "apply.images")


@pytest.mark.slow
def test_model_files_that_do_not_fit(run, new_folder, tmp_path):
    _, results, _ = run
    pc2m, deeplab = results / "model" / "model.pt", results / "deeplab" / "model.pt"

    out = tmp_path / "out"
    assert cli("--step", "index", "--images", new_folder, "--out", out, *configs(run)).returncode == 0

    def apply(*models: str | Path) -> subprocess.CompletedProcess:
        return cli(*models, "--step", "predict", "--shard", "0", "--out", out, *configs(run))

    missing = tmp_path / "missing.pt"
    assert_one_line_error(apply("--model", missing), missing)
    # the other kind of model file
    assert_one_line_error(apply("--model", deeplab), deeplab, "not a model trained by `train`")
    assert_one_line_error(apply("--deeplab-model", pc2m), pc2m, "not a DeepLab")

    backbone = _run_params(run)["backbone"]
    classes = torch.load(pc2m, weights_only=True)["arch"]["num_classes"]
    net = build_backbone(backbone["name"], "random", "teacher", backbone["model_kwargs"])
    # another backbone recorded in the model file
    other = tmp_path / "other-backbone.pt"
    arch = Architecture("pc2m", classes, 0, "vit_small_patch8_224.dino")
    torch.save(model_payload(build_network(net, arch), arch), other)
    assert_one_line_error(apply("--model", other), other, "vit_small_patch8_224.dino", "backbone.name")
    # another class count: DeepLab's classes must be the PC2M model's (the run's, under Snakemake)
    more = tmp_path / "more-classes.pt"
    arch = Architecture("pc2m", classes + 2, 0, backbone["name"])
    torch.save(model_payload(build_network(net, arch), arch), more)
    assert_one_line_error(apply("--model", more, "--deeplab-model", deeplab), deeplab,
                          f"{classes} classes where {classes + 2} are expected")
    # under Snakemake, the rule passes the run's class count
    params = json.dumps({**_run_params(run), "num_classes": classes + 1})
    result = cli("--step", "predict", "--shard", "0", "--model", pc2m, "--out", out, "--params", params)
    assert_one_line_error(result, pc2m, f"{classes} classes where {classes + 1} are expected")


def _run_params(run) -> dict:
    from pipeline.apply import apply_params
    from pipeline.config import load_config

    return apply_params(load_config([REPO / "config.yaml", run[2]]))


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_overlay_is_the_image_or_the_palette_at_the_ends(alpha):
    from pipeline.imageio import overlay, voc_palette

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    mask = rng.integers(0, 4, (5, 7), dtype=np.uint8)
    mask[0, 0] = 255  # ignored pixels keep the image
    expected = rgb.copy() if alpha == 0 else voc_palette()[mask]
    expected[0, 0] = rgb[0, 0]
    assert np.array_equal(overlay(rgb, mask, alpha), expected)


def test_indexing_a_folder_with_shell_syntax_in_its_name_runs_nothing(tmp_path):
    """apply.images reaches the shell quoted: the index job of a folder named with `$( )`, `;` and
    quotes lists its images and ignores the rest, and none of the embedded commands runs."""
    images = write_new_folder(tmp_path / "new $(touch pwned-images); it's")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"results": str(tmp_path / "results"), "apply": {"images": str(images)}}))
    target = tmp_path / "results" / "apply" / "new" / "dataset" / "manifest.csv"
    result = snakemake(str(target), "--configfile", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-4000:]
    assert sorted(pd.read_csv(target)["image_id"]) == sorted(NEW_IMAGES)
    ignored = pd.read_csv(target.parent / "ignored.csv")["path"].tolist()
    assert sorted(ignored) == sorted(str(images / name) for name in NOT_IMAGES)
    assert not (tmp_path / "pwned-images").exists()
