"""The final report on a tiny synthetic results tree (evaluations made by pipeline.evaluate)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.atomic import write_json
from pipeline.compare import eval_jsons_in
from pipeline.datasets import MANIFEST_COLUMNS, read_manifest
from pipeline.errors import BadInputError
from pipeline.evaluate import evaluate_masks
from pipeline.imageio import write_label_png
from pipeline.report import METRIC_ROWS, build_report, column_name, paper_name, qualitative_figure, qualitative_images

NAMES = ["background", "cat", "dog"]
TRAIN_IDS = ["t0", "t1"]
VAL_IDS = ["v1", "v0", "v2"]  # unsorted on purpose: the figure takes sorted ids
STAGES = ("model", "crf")
H, W = 6, 8


def gt_mask(index: int, split: str) -> np.ndarray:
    """Left half background, right half cat; dog only on train, so on val it is absent from GT."""
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[:, W // 2 :] = 1
    if split == "train":
        mask[: H // 2, W // 2 :] = 2
    mask[0, 0] = 255 if index == 0 else 0
    return mask


def predicted_mask(index: int, split: str, stage: str) -> np.ndarray:
    """The GT with a stage-dependent band wrong, so every column has different scores."""
    mask = gt_mask(index, split)
    mask[mask == 255] = 0
    band = 1 if stage == "model" else 2
    mask[:, W // 2 - band : W // 2] = 1
    return mask


@pytest.fixture()
def tree(tmp_path: Path) -> dict:
    return make_tree(tmp_path)


def make_tree(tmp_path: Path) -> dict:
    """results/{dataset,eval,model,crf}: manifest, classes, masks, weak-mode evaluations, logs."""
    results = tmp_path / "results"
    rows = []
    for split, ids in (("train", TRAIN_IDS), ("val", VAL_IDS)):
        for index, image_id in enumerate(ids):
            image = results / "data" / "images" / f"{image_id}.png"
            image.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((H, W, 3), 40 * index, dtype=np.uint8)).save(image)
            mask = results / "data" / "masks" / f"{image_id}.png"
            write_label_png(mask, gt_mask(index, split))
            for stage in STAGES:
                write_label_png(results / stage / "masks" / "shard-00000" / f"{image_id}.png",
                                predicted_mask(index, split, stage))
            rows.append({"image_id": image_id, "image_path": str(image), "mask_path": str(mask),
                         "labels": "1", "has_labels": True, "split": split, "width": W, "height": H,
                         "shard": 0})
    manifest = results / "dataset" / "manifest.csv"
    manifest.parent.mkdir(parents=True)
    pd.DataFrame(rows, columns=MANIFEST_COLUMNS).to_csv(manifest, index=False)
    classes = results / "dataset" / "classes.json"
    write_json(classes, {"kind": "demo", "num_classes": len(NAMES), "names": NAMES, "background": 0,
                         "ignore_index": 255})
    mask_dirs = {stage: [results / stage / "masks" / "shard-00000"] for stage in STAGES}
    for stage in STAGES:
        for split in ("train", "val"):
            evaluate_masks(mask_dirs[stage], manifest, classes, split, "weak",
                           results / "eval" / f"{stage}-{split}.json", results / "eval" / f"{stage}-{split}.csv")
    pd.DataFrame({
        "epoch": [0, 1], "unfrozen_blocks": [0, 5], "lr": [1e-3, 1e-4], "epsilon": [0.1, 0.105],
        "loss": [2.0, 1.5], "mce": [1.0, 0.8], "match": [1.0, 0.7], "seconds": [1.0, 1.0],
        "js_alpha_change": [2e-3, 1e-4], "js_alpha_gt": [0.05, 0.04],
    }).to_csv(results / "model" / "history.csv", index=False)
    pd.DataFrame({"epoch": [0, 1, 2], "class_0": [0.6, 0.55, 0.5], "class_1": [0.2, 0.25, 0.3],
                  "class_2": [0.2, 0.2, 0.2]}).to_csv(results / "model" / "alpha.csv", index=False)
    write_json(results / "model" / "done.json", {"method": "pc2m", "num_classes": len(NAMES)})
    return {"results": results, "manifest": manifest, "classes": classes, "mask_dirs": mask_dirs,
            "out": tmp_path / "report"}


def run_report(tree: dict, **overrides) -> pd.DataFrame:
    results = tree["results"]
    arguments = {
        "eval_jsons": eval_jsons_in(results / "eval"), "manifest_path": tree["manifest"],
        "classes_path": tree["classes"], "history_csv": results / "model" / "history.csv",
        "done_json": results / "model" / "done.json",
        "stage_mask_dirs": {stage: {"train": dirs, "val": dirs} for stage, dirs in tree["mask_dirs"].items()},
        "out_dir": tree["out"], "params": {"qualitative_images": 2, "mode": "weak"},
    }
    arguments.update(overrides)
    return build_report(**arguments)


def test_tables_hold_each_evaluation_in_percent_with_one_decimal(tree):
    run_report(tree)
    summary = pd.read_csv(tree["out"] / "summary.csv")
    markdown = (tree["out"] / "summary.md").read_text(encoding="utf-8")
    assert list(summary.columns) == ["class_id", "class", "BPM (PC2M, train)", "BPM+CRF (PC2M, train)",
                                     "PC2M (val)", "PC2M+CRF (val)"]
    assert list(summary["class"]) == NAMES + ["mIoU", "pixel accuracy", "precision", "recall", "mIoU_shape"]
    table = markdown[markdown.index("| class_id"):].splitlines()
    for stage, split, column in (("model", "train", "BPM (PC2M, train)"), ("crf", "val", "PC2M+CRF (val)")):
        result = json.loads((tree["results"] / "eval" / f"{stage}-{split}.json").read_text())
        expected = result["iou"] + [result[key] for key in METRIC_ROWS.values()]
        position = list(summary.columns).index(column)
        for row, value in enumerate(expected):
            cell = table[2 + row].strip("|").split("|")[position].strip()
            if value is None:
                assert math.isnan(summary.at[row, column]) and cell == "–"
            else:
                assert summary.at[row, column] == pytest.approx(round(100 * value, 1))
                assert cell == f"{100 * value:.1f}"
    # dog is absent from the val GT and predictions: undefined, not 0.
    assert json.loads((tree["results"] / "eval" / "model-val.json").read_text())["iou"][2] is None
    assert "- Mode: weak" in markdown and "val 3 (3 with GT masks)" in markdown
    assert "Unsupervised" not in markdown


def test_columns_are_the_evaluations_given(tree):
    evals = tree["results"] / "eval"
    shutil.copy(evals / "model-val.json", evals / "deeplab-val.json")
    jsons = [path for path in eval_jsons_in(evals) if path.name != "crf-train.json"]
    run_report(tree, eval_jsons=jsons)
    summary = pd.read_csv(tree["out"] / "summary.csv")
    assert list(summary.columns)[2:] == ["BPM (PC2M, train)", "PC2M (val)", "PC2M+CRF (val)",
                                    "DeepLab (PC2M, val)"]
    assert "BPM+CRF" not in (tree["out"] / "summary.md").read_text(encoding="utf-8")


def test_figures_are_png_files_and_nothing_partial_is_left(tree):
    run_report(tree)
    for name in ("per_class_iou.png", "alpha.png", "qualitative.png"):
        with Image.open(tree["out"] / name) as image:
            assert image.format == "PNG"
            image.verify()
    assert not list(tree["out"].glob(".*partial"))
    assert sorted(p.name for p in tree["out"].iterdir()) == [
        "alpha.png", "clusters.csv", "gallery.png", "per_class_iou.png", "qualitative.png", "summary.csv",
        "summary.md", "training.png"]


def expected_found(tree: dict, stage: str) -> tuple[np.ndarray, np.ndarray]:
    """Pixels per predicted id and images holding it, counted here from the masks themselves."""
    pixels, images = np.zeros(len(NAMES), np.int64), np.zeros(len(NAMES), np.int64)
    for split, ids in (("train", TRAIN_IDS), ("val", VAL_IDS)):
        for index, _ in enumerate(ids):
            counts = np.bincount(predicted_mask(index, split, stage).ravel(), minlength=len(NAMES))
            pixels += counts
            images += counts > 0
    return pixels, images


def test_without_ground_truth_the_report_shows_what_was_found(tree):
    """No evaluation at all (a folder without masks): exit cleanly with every output, the clusters
    table of the final stage counted right, and no score anywhere."""
    run_report(tree, eval_jsons=[])
    for name in ("per_class_iou.png", "alpha.png", "qualitative.png", "gallery.png", "training.png"):
        with Image.open(tree["out"] / name) as image:
            image.verify()
    clusters = pd.read_csv(tree["out"] / "clusters.csv")
    pixels, images = expected_found(tree, "crf")  # the last stage given
    assert list(clusters["name"]) == NAMES
    assert list(clusters["images"]) == list(images)
    assert clusters["pixel_share"].to_numpy() == pytest.approx(pixels / pixels.sum())
    assert clusters["image_share"].to_numpy() == pytest.approx(images / (len(TRAIN_IDS) + len(VAL_IDS)))
    markdown = (tree["out"] / "summary.md").read_text(encoding="utf-8")
    assert "No ground-truth masks: nothing is scored" in markdown and "mIoU" not in markdown
    assert "What was found: classes of the final masks (crf)" in markdown
    assert list(pd.read_csv(tree["out"] / "summary.csv").columns) == ["class_id", "class"]


def test_with_ground_truth_the_report_says_how_many_images_each_column_scored(tree):
    run_report(tree)
    markdown = (tree["out"] / "summary.md").read_text(encoding="utf-8")
    assert "BPM (PC2M, train) on 2, BPM+CRF (PC2M, train) on 2, PC2M (val) on 3, PC2M+CRF (val) on 3" in markdown
    assert "What was found" in markdown


def test_the_final_stage_is_the_last_of_the_pipeline_that_wrote_masks(tree):
    dirs = tree["mask_dirs"]
    run_report(tree, stage_mask_dirs={"crf": {"val": dirs["crf"]}, "model": {"train": dirs["model"],
                                                                              "val": dirs["model"]}})
    clusters = pd.read_csv(tree["out"] / "clusters.csv")
    # crf over val only: 3 images
    assert clusters["image_share"].max() == pytest.approx(1.0) and clusters.at[1, "images"] == len(VAL_IDS)


def test_a_stage_without_the_mask_of_a_shown_image_is_an_error_naming_it(tree):
    (tree["mask_dirs"]["crf"][0] / "v0.png").unlink()  # v0 is the first sorted val image
    with pytest.raises(BadInputError, match=r"stage 'crf'.*'v0'"):
        run_report(tree)
    assert not (tree["out"] / "qualitative.png").exists()


def test_unsupervised_report_notes_the_matching_and_the_pseudo_label_scores(tree):
    evals = tree["results"] / "eval"
    for path in eval_jsons_in(evals):
        result = json.loads(path.read_text())
        write_json(path, {**result, "mode": "unsupervised", "matching": "hungarian"})
    pseudo = tree["results"] / "reports" / "pseudo_labels.csv"
    pseudo.parent.mkdir()
    pd.DataFrame({"class_name": ["background", "cat", "dog", "macro", "micro"],
                  "f1": [None, 0.5, 0.4, 0.474, 0.485],
                  "iou": [0.8, 0.1, 0.2, 0.222, None]}).to_csv(pseudo, index=False)
    run_report(tree, pseudo_labels_csv=pseudo, params={"mode": "unsupervised"})
    markdown = (tree["out"] / "summary.md").read_text(encoding="utf-8")
    assert "clusters, matched to classes" in markdown
    assert "- PC2M (val): mIoU " in markdown and "(matching hungarian); " in markdown
    assert "classes discovered" in markdown
    assert "multi-label F1 macro 47.4, micro 48.5" in markdown and "pseudo-map mIoU 22.2" in markdown


def test_unsupervised_headline_leads_with_the_miou_over_all_classes(tree):
    """One cluster everywhere (a degenerate model) discovers only the background, whose IoU is high:
    the mean over discovered classes beats every real model, so the line must lead with the mean
    over all classes, the table's number, and say which mean is which."""
    results, manifest = tree["results"], tree["manifest"]
    one_cluster = results / "degenerate"
    for image_id in VAL_IDS:
        write_label_png(one_cluster / f"{image_id}.png", np.zeros((H, W), dtype=np.uint8))
    shutil.rmtree(results / "eval")
    evaluate_masks([one_cluster], manifest, tree["classes"], "val", "unsupervised",
                   results / "eval" / "model-val.json", results / "eval" / "model-val.csv", num_predicted_classes=3)
    result = json.loads((results / "eval" / "model-val.json").read_text())
    assert result["discovered"] == 1 and result["miou_discovered"] > result["miou"]
    table = run_report(tree, params={"mode": "unsupervised"})
    line = next(line for line in (tree["out"] / "summary.md").read_text(encoding="utf-8").splitlines()
                if line.startswith("- PC2M (val):"))
    overall = f"{100 * result['miou']:.1f}"
    assert line.startswith(f"- PC2M (val): mIoU {overall} over all {result['num_classes']} classes")
    assert f"{table.set_index('class').loc['mIoU', 'PC2M (val)']:.1f}" == overall  # the table's number
    assert f"mIoU over those 1 only: {100 * result['miou_discovered']:.1f}" in line
    figure = qualitative_figure(read_manifest(manifest), manifest, "val", ["v0"], {"model": [one_cluster]},
                                "unsupervised")
    title = figure._suptitle.get_text()
    assert title.startswith("Unsupervised:") and title.count("'") == 0  # no stray quote at the end


def test_mixed_modes_are_refused(tree):
    path = tree["results"] / "eval" / "crf-val.json"
    write_json(path, {**json.loads(path.read_text()), "mode": "unsupervised"})
    with pytest.raises(BadInputError, match="mix modes"):
        run_report(tree, params={"mode": None})


def test_qualitative_images_are_the_first_sorted_val_ids_with_gt_first():
    manifest = pd.DataFrame({"image_id": ["b", "a", "c", "t"], "split": ["val", "val", "val", "train"],
                             "mask_path": ["m", "", "m", "m"]})
    assert qualitative_images(manifest, 2) == ("val", ["b", "c"])
    assert qualitative_images(manifest, 9) == ("val", ["b", "c", "a"])
    assert qualitative_images(manifest[manifest["split"] == "train"], 4) == ("train", ["t"])


def test_paper_names():
    assert [paper_name(s, "train") for s in ("model", "crf")] == ["BPM", "BPM+CRF"]
    assert [paper_name(s, "val") for s in ("model", "crf", "deeplab")] == ["PC2M", "PC2M+CRF", "DeepLab"]
    assert paper_name("other", "val") == "other"
    # other methods name their own masks on both splits
    assert [paper_name(s, "train", "rcm_mam") for s in ("model", "crf")] == ["RCM+MAM", "RCM+MAM+CRF"]
    assert paper_name("model", "val", "vitpcm") == "ViT-PCM"


def test_column_names_say_the_method_the_run_where_needed_and_the_split():
    # the method where the paper's name lacks it: whose pseudo-masks (BPM), whose masks trained DeepLab
    assert column_name("model", "train", "vitpcm") == "BPM (ViT-PCM, train)"
    assert column_name("affinity", "train") == "BPM+RW (PC2M, train)"
    assert column_name("deeplab", "val", "vitpcm") == "DeepLab (ViT-PCM, val)"
    assert column_name("crf", "val", "vitpcm") == "ViT-PCM+CRF (val)"
    assert column_name("model", "train", "csrm") == "CSRM (train)"  # CSRM's train masks are no BPM
    assert column_name("crf", "val", "cam") == "CAM baseline+CRF (val)"
    assert column_name("deeplab", "val", "pc2m", "run-b") == "DeepLab (PC2M, run-b, val)"
    assert column_name("model", "val", "pc2m", "run-b") == "PC2M (run-b, val)"


def test_report_says_which_deeplab_recipe_ran(tree, tmp_path):
    done = tmp_path / "deeplab-done.json"
    write_json(done, {"recipe": "v2", "network": "DeepLab-v2 resnet101 (ASPP 6/12/18/24)"})
    run_report(tree, deeplab_done=done)
    markdown = (tree["out"] / "summary.md").read_text(encoding="utf-8")
    assert "- DeepLab verification: recipe `v2`, DeepLab-v2 resnet101 (ASPP 6/12/18/24)." in markdown


def test_report_names_the_method_and_plots_no_areas_for_a_method_without_them(tree):
    write_json(tree["results"] / "model" / "done.json", {"method": "rcm_mam", "num_classes": len(NAMES)})
    summary = run_report(tree)
    markdown = (tree["out"] / "summary.md").read_text(encoding="utf-8")
    assert markdown.startswith("# RCM+MAM results") and "`train.method: rcm_mam`" in markdown
    assert "RCM+MAM (train)" in summary.columns and "RCM+MAM+CRF (val)" in summary.columns
    assert (tree["out"] / "alpha.png").is_file()  # a message, not PC2M's stale alpha.csv


def test_comus_rounds_are_named_and_ordered_by_round():
    assert [paper_name(f"comus_round{r}", "val", "comus") for r in (1, 2, 10)] == [
        "COMUS round 1", "COMUS round 2", "COMUS round 10"]
    assert column_name("comus_round2", "train", "comus") == "COMUS round 2 (train)"
    from pipeline.report import StageEval, column_order

    evals = [StageEval(stage, split, {}) for stage in ("comus_round10", "comus_round2", "comus_round1")
             for split in ("val", "train")]
    assert [(e.stage, e.split) for e in column_order(evals)] == [
        (f"comus_round{r}", split) for split in ("train", "val") for r in (1, 2, 10)]


def test_comus_report_without_a_patch_classifier_history(tree):
    """COMUS's run has no model/history.csv: its summary.json is the done file, the rounds the stages."""
    results = tree["results"]
    write_json(results / "comus" / "summary.json", {"method": "comus", "num_classes": len(NAMES)})
    for stage, target in (("model", "comus_round1"), ("crf", "comus_round2")):
        for suffix in ("json", "csv"):
            for split in ("train", "val"):
                (results / "eval" / f"{stage}-{split}.{suffix}").rename(results / "eval" / f"{target}-{split}.{suffix}")
    dirs = {"comus_round1": tree["mask_dirs"]["model"], "comus_round2": tree["mask_dirs"]["crf"]}
    summary = run_report(tree, history_csv=None, done_json=results / "comus" / "summary.json",
                         stage_mask_dirs={stage: {"train": d, "val": d} for stage, d in dirs.items()})
    markdown = (tree["out"] / "summary.md").read_text(encoding="utf-8")
    assert markdown.startswith("# COMUS results") and "`comus.enabled: true`" in markdown
    assert [c for c in summary.columns if c.startswith("COMUS")] == [
        "COMUS round 1 (train)", "COMUS round 2 (train)", "COMUS round 1 (val)", "COMUS round 2 (val)"]
    assert (tree["out"] / "training.png").is_file() and (tree["out"] / "alpha.png").is_file()
