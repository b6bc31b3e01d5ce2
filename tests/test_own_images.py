"""A user's own images through the real command line (Snakemake), end to end.

- Real photographs (scikit-image's bundled photos) in a folder without masks or labels, one
  split, through a tiny DINOv2 (patch 14, so the default-style sizes are rounded): the whole DAG
  ends in exit 0, every image gets a mask from every stage, no evaluation job exists, and the
  report describes what was found.
- A folder with train/ and val/ sub-folders and masks for some images only, built stage target
  by stage target from an empty results folder: each target makes its stage and nothing after it;
  the evaluations score exactly the images that have a mask.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.datasets.demo import generate_demo
from pipeline.imageio import load_mask
from test_patch14 import TINY_DINOV2
from workflow_runs import snakemake, tiny_config, write_config

pytestmark = pytest.mark.slow

# Seven real photographs of different sizes and aspect ratios (two greyscale), shrunk so that the
# tiny DAG stays fast; odd sizes on purpose.
PHOTOS = {"astronaut": 0.17, "coffee": 0.15, "chelsea": 0.21, "rocket": 0.13, "camera": 0.15, "coins": 0.25,
          "immunohistochemistry": 0.17}


def jobs_run(output: str) -> Counter:
    """Jobs a Snakemake run executed, by rule (its 'Job stats' table is planned before the
    dataset_index checkpoint, so it misses the shard jobs: count the job headers instead)."""
    return Counter(re.findall(r"^(?:local)?(?:rule|checkpoint) (\w+):$", output, flags=re.MULTILINE))


def write_photos(folder: Path) -> dict[str, tuple[int, int]]:
    """The photos as JPEG/PNG files; returns {image_id: (width, height)}."""
    import skimage.data

    sizes = {}
    for index, (name, scale) in enumerate(PHOTOS.items()):
        image = Image.fromarray(getattr(skimage.data, name)())
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.LANCZOS)
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{name}.{'jpg' if index % 2 else 'png'}")
        sizes[name] = image.size
    return sizes


@pytest.fixture(scope="module")
def photo_run(tmp_path_factory):
    """One unsupervised run on the photo folder (no masks, no labels, one split); its JPEGs
    decoded by the DataLoader workers (``decode: workers``, a worker process for the features)."""
    work = tmp_path_factory.mktemp("photos")
    sizes = write_photos(work / "photos")
    (work / "photos" / "notes.txt").write_text("a file that is not an image")
    config = tiny_config(
        work / "results",
        dataset={"kind": "folder", "images_per_shard": 4,
                 "folder": {"images": str(work / "photos"), "num_classes": 3}},
        backbone=TINY_DINOV2,
        features={"decode": "workers", "num_workers": 1},
        predict={"decode": "workers"},
    )
    result = snakemake("--configfile", str(write_config(work / "photos.yaml", config)), cwd=work)
    return work / "results", sizes, result


def test_a_folder_without_ground_truth_ends_with_masks_for_every_image_and_a_report(photo_run):
    results, sizes, result = photo_run
    assert result.returncode == 0, result.stdout[-6000:]
    counts = jobs_run(result.stdout)
    assert "evaluate_split" not in counts and counts["predict_deeplab"] == 1, counts
    assert counts["predict_model"] == counts["dense_crf"] == 2, counts
    # every image, every stage, at the image's size (one split: DeepLab predicts it all)
    for folder in ("model/masks", "crf/masks", "deeplab/masks"):
        found = {p.stem: p for p in (results / folder).glob("*/*.png")}
        assert set(found) == set(sizes), folder
        for image_id, path in found.items():
            assert load_mask(path).shape == sizes[image_id][::-1], (folder, image_id)
    assert not list(results.glob("eval/*.json"))
    reports = results / "reports"
    for name in ("summary.md", "summary.csv", "clusters.csv", "gallery.png", "training.png", "qualitative.png",
                 "per_class_iou.png", "alpha.png"):
        assert (reports / name).is_file(), name
    clusters = pd.read_csv(reports / "clusters.csv")
    assert list(clusters["id"]) == [0, 1, 2]  # background + (num_classes 3 - 1) clusters
    assert clusters["pixel_share"].sum() == pytest.approx(1.0)
    # the table counts the DeepLab masks: recount them here
    pixels = np.zeros(len(clusters), np.int64)
    for path in (results / "deeplab" / "masks").glob("*/*.png"):
        pixels += np.bincount(load_mask(path).ravel(), minlength=len(clusters))[: len(clusters)]
    assert clusters["pixel_share"].to_numpy() == pytest.approx(pixels / pixels.sum())
    summary = (reports / "summary.md").read_text(encoding="utf-8")
    assert "No ground-truth masks: nothing is scored" in summary and "| mIoU" not in summary
    skipped = pd.read_csv(results / "dataset" / "skipped.csv")
    assert [Path(p).name for p in skipped["path"]] == ["notes.txt"]


def test_a_patch_14_backbone_rounds_the_view_and_crop_sizes_and_says_so(photo_run):
    results, _, result = photo_run
    assert result.returncode == 0, result.stdout[-6000:]
    train_log = (results / "logs" / "train_model.log").read_text()
    assert "train.global_size: 64 is not a multiple of 14 (patch size 14); using 70" in train_log
    crops_logs = "".join(p.read_text() for p in (results / "logs" / "segment_features").glob("*.log"))
    assert "segment_features.crop_size: 32 is not a multiple of 14 (patch size 14); using 28" in crops_logs


def test_the_html_report_of_a_run_without_ground_truth(photo_run):
    """The README's `snakemake --report report.html` on the finished run."""
    results, _, _ = photo_run
    work = results.parent
    result = snakemake("--configfile", str(work / "photos.yaml"), "--report", str(work / "report.html"), cwd=work)
    assert result.returncode == 0, result.stdout[-4000:]
    html = (work / "report.html").read_text(errors="replace")
    assert "gallery.png" in html and "clusters.csv" in html


@pytest.fixture(scope="module")
def split_folder(tmp_path_factory) -> tuple[Path, dict]:
    """Demo images re-filed as a user's folder: train/ and val/ sub-folders, masks for some only."""
    work = tmp_path_factory.mktemp("splits")
    demo = work / "demo"
    generate_demo(demo, seed=3, n_train=8, n_val=4, width=64, height=48)
    images, masks = work / "images", work / "masks"
    with_mask = {"train": {"train_0000", "train_0002", "train_0005"}, "val": {"val_0001", "val_0003"}}
    for split in ("train", "val"):
        for path in sorted((demo / "images" / split).glob("*.png")):
            (images / split).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, images / split / path.name)
            if path.stem in with_mask[split]:
                (masks / split).mkdir(parents=True, exist_ok=True)
                shutil.copy(demo / "masks" / split / path.name, masks / split / path.name)
    names = json.loads((demo / "meta.json").read_text())["names"]
    folder = {"images": str(images), "masks": str(masks), "class_names": names}
    return work, {"folder": folder, "with_mask": with_mask}


STAGE_TARGETS = [
    # target, a path (glob under results) it must make; the later targets' paths must not exist yet
    ("index", "dataset/manifest.csv"),
    ("features", "features/shard-*.safetensors"),
    ("segments", "segment_features/shard-*.safetensors"),
    ("pseudo_labels", "pseudo_labels/image_labels.csv"),
    ("train", "model/model.pt"),
    ("masks", "model/masks/shard-*/**/*.png"),
    ("crf", "crf/masks/shard-*/**/*.png"),
    ("deeplab", "deeplab/masks/val/**/*.png"),
    ("evaluate", "eval/*.json"),
    ("report", "reports/summary.md"),
]


def test_stage_targets_from_empty_results_build_their_stage_and_nothing_after(split_folder):
    work, facts = split_folder
    results = work / "results"
    config = tiny_config(results, dataset={"kind": "folder", "images_per_shard": 5, "folder": facts["folder"]})
    configfile = str(write_config(work / "splits.yaml", config))
    for position, (target, made) in enumerate(STAGE_TARGETS):
        result = snakemake(target, "--configfile", configfile, cwd=work)
        assert result.returncode == 0, f"{target}:\n{result.stdout[-5000:]}"
        assert jobs_run(result.stdout), f"{target} ran no job"
        assert list(results.glob(made)), f"{target} made no {made}"
        for _, later in STAGE_TARGETS[position + 1:]:
            assert not list(results.glob(later)), f"{target} also made {later}"
    # a second `report` has nothing left to do
    again = snakemake("report", "--configfile", configfile, cwd=work)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout, again.stdout[-3000:]


def test_mixed_folder_evaluates_only_the_images_with_masks(split_folder):
    """Runs after the stage targets (same results): each evaluation scored exactly the masked images."""
    work, facts = split_folder
    evals = work / "results" / "eval"
    scored = {path.stem: json.loads(path.read_text())["images"] for path in evals.glob("*.json")}
    train, val = len(facts["with_mask"]["train"]), len(facts["with_mask"]["val"])
    assert scored == {"model-train": train, "crf-train": train, "model-val": val, "crf-val": val,
                      "deeplab-val": val}
    summary = (work / "results" / "reports" / "summary.md").read_text(encoding="utf-8")
    assert f"train 8 ({train} with GT masks), val 4 ({val} with GT masks)" in summary
    assert f"BPM (PC2M, train) on {train}" in summary and f"DeepLab (PC2M, val) on {val}" in summary
    manifest = pd.read_csv(work / "results" / "dataset" / "manifest.csv")
    assert set(manifest["image_id"].str.split("/").str[0]) == {"train", "val"}
