"""The report beside other methods' runs on the same dataset (config key report.compare_with):
merged columns from hand-made evaluation folders, refusals of runs that cannot be compared, and
the workflow wiring on a copy of the session's finished tiny run (no new pipeline run)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from test_report import NAMES, make_tree, run_report

from pipeline.atomic import write_json
from pipeline.errors import BadInputError, ConfigError
from pipeline.report import per_class_iou_figure
from workflow_runs import job_counts, reference_run, snakemake, tiny_config, write_config

VAL = {"model": [0.9, 0.5, None], "crf": [0.92, 0.6, None], "deeplab": [0.95, 0.7, None]}
TRAIN = {"model": [0.8, 0.4, 0.3], "crf": [0.85, 0.45, 0.35]}


def evaluation(iou: list, images: int, mode: str = "weak", **extra) -> dict:
    """An evaluation summary as pipeline.evaluate writes it (the keys the report reads)."""
    scores = [v for v in iou if v is not None]
    return {"iou": iou, "miou": sum(scores) / len(scores), "pixel_accuracy": 0.9, "precision": 0.8, "recall": 0.7,
            "miou_shape": 0.6, "images": images, "mode": mode, "num_classes": len(iou), "split": "?", **extra}


def other_run(folder: Path, method: str, shift: float, **extra) -> Path:
    """A finished run's results folder as the report reads it: model/done.json and eval/*.json,
    its IoUs those of VAL/TRAIN lowered by ``shift`` (so every column differs)."""
    write_json(folder / "model" / "done.json", {"method": method, "num_classes": len(NAMES)})
    for split, stages, images in (("val", VAL, 3), ("train", TRAIN, 2)):
        for stage, iou in stages.items():
            lowered = [None if v is None else round(v - shift, 4) for v in iou]
            write_json(folder / "eval" / f"{stage}-{split}.json", evaluation(lowered, images, **extra))
    return folder


@pytest.fixture()
def tree(tmp_path: Path) -> dict:
    """test_report's tiny results tree (PC2M, weak mode, model and crf evaluated on train and val)."""
    return make_tree(tmp_path)


def table(tree: dict, *folders: Path) -> pd.DataFrame:
    return run_report(tree, params={"mode": "weak", "qualitative_images": 2,
                                    "compare_with": [str(folder) for folder in folders]})


def test_compared_columns_stand_beside_this_runs_with_their_values(tree, tmp_path):
    vitpcm = other_run(tmp_path / "vitpcm-run", "vitpcm", 0.1)
    rcm = other_run(tmp_path / "rcm-run", "rcm_mam", 0.2)
    summary = table(tree, vitpcm, rcm)
    # train then val; per stage this run (PC2M) first, then the compared runs in the order given
    assert list(summary.columns)[2:] == [
        "BPM (PC2M, train)", "BPM (ViT-PCM, train)", "RCM+MAM (train)",
        "BPM+CRF (PC2M, train)", "BPM+CRF (ViT-PCM, train)", "RCM+MAM+CRF (train)",
        "PC2M (val)", "ViT-PCM (val)", "RCM+MAM (val)",
        "PC2M+CRF (val)", "ViT-PCM+CRF (val)", "RCM+MAM+CRF (val)",
        "DeepLab (ViT-PCM, val)", "DeepLab (RCM+MAM, val)"]
    rows = summary.set_index("class")
    # each compared cell is its JSON's value in % with one decimal
    assert list(rows.loc[NAMES, "ViT-PCM+CRF (val)"].iloc[:2]) == [82.0, 50.0]
    assert list(rows.loc[NAMES, "DeepLab (RCM+MAM, val)"].iloc[:2]) == [75.0, 50.0]
    assert list(rows.loc[NAMES, "BPM (ViT-PCM, train)"]) == [70.0, 30.0, 20.0]
    assert rows.loc["mIoU", "RCM+MAM (train)"] == pytest.approx(round(100 * (0.6 + 0.2 + 0.1) / 3, 1))
    assert pd.isna(rows.loc["dog", "ViT-PCM (val)"])  # undefined stays undefined
    # this run's columns keep their own values
    own = json.loads((tree["results"] / "eval" / "model-val.json").read_text())
    assert rows.loc["cat", "PC2M (val)"] == round(100 * own["iou"][1], 1)

    markdown = (tree["out"] / "summary.md").read_text(encoding="utf-8")
    assert markdown.startswith("# PC2M results")
    assert (f"- Compared with (`report.compare_with`, their columns beside this run's): `{vitpcm}` (ViT-PCM, "
            f"`train.method: vitpcm`); `{rcm}` (RCM+MAM, `train.method: rcm_mam`).") in markdown
    header = markdown[markdown.index("| class_id"):].splitlines()[0]
    assert "| ViT-PCM+CRF (val) |" in header and "| DeepLab (RCM+MAM, val) |" in header
    # the per-class figure draws every column, compared ones included, under the table's names
    legend = per_class_iou_figure(summary, NAMES).axes[0].get_legend()
    assert [text.get_text() for text in legend.get_texts()] == list(summary.columns)[2:]


def test_the_same_method_twice_is_told_apart_by_folder(tree, tmp_path):
    first = other_run(tmp_path / "a" / "pc2m-small", "pc2m", 0.1)
    second = other_run(tmp_path / "b" / "pc2m-small", "pc2m", 0.2)  # same folder name: the path
    vitpcm = other_run(tmp_path / "vitpcm-run", "vitpcm", 0.3)
    summary = table(tree, first, second, vitpcm)
    val = [column for column in summary.columns if column.startswith("PC2M (")]
    # three PC2M runs: this one is "results", the two others share a name, so their paths show
    assert val == ["PC2M (results, val)", f"PC2M ({first}, val)", f"PC2M ({second}, val)"]
    assert "ViT-PCM (val)" in summary.columns  # a method of its own needs no folder
    assert "DeepLab (ViT-PCM, val)" in summary.columns
    assert summary.columns.is_unique


@pytest.mark.parametrize(("change", "message"), [
    ({"mode": "unsupervised"}, r"'.*other': evaluation model-train is in unsupervised mode, this run in weak"),
    ({"iou": [0.5, 0.5]}, r"'.*other': evaluation model-train has 2 classes, this run's dataset 3"),
    ({"images": 7}, r"'.*other': evaluation model-train scored 7 images, this run 2 on train"),
])
def test_a_run_on_another_task_is_refused_naming_its_folder(tree, tmp_path, change, message):
    folder = other_run(tmp_path / "other", "vitpcm", 0.1)
    path = folder / "eval" / "model-train.json"
    write_json(path, {**json.loads(path.read_text()), **change})
    with pytest.raises(BadInputError, match=message):
        table(tree, folder)
    assert not (tree["out"] / "summary.csv").exists()


def test_a_folder_without_a_finished_run_is_refused(tree, tmp_path):
    empty = tmp_path / "not-run"
    empty.mkdir()
    with pytest.raises(BadInputError, match=r"'.*not-run' has no model/done.json and no evaluations.*run that"):
        table(tree, empty)
    folder = other_run(tmp_path / "no-evals", "vitpcm", 0.1)
    shutil.rmtree(folder / "eval")
    with pytest.raises(BadInputError, match=r"'.*no-evals' has no evaluations \(eval/\*.json\)"):
        table(tree, folder)


def test_this_runs_own_folder_or_a_folder_twice_is_a_config_error(tree, tmp_path):
    with pytest.raises(ConfigError, match="this run's own results folder"):
        table(tree, tree["results"])
    folder = other_run(tmp_path / "other", "vitpcm", 0.1)
    with pytest.raises(ConfigError, match="named twice"):
        table(tree, folder, tmp_path / "." / "other")


def test_without_compared_runs_the_report_is_unchanged(tree):
    summary = table(tree)
    assert "Compared with" not in (tree["out"] / "summary.md").read_text(encoding="utf-8")
    assert list(summary.columns)[2:] == ["BPM (PC2M, train)", "BPM+CRF (PC2M, train)", "PC2M (val)",
                                         "PC2M+CRF (val)"]


@pytest.mark.slow
def test_the_workflow_reruns_only_the_report_with_the_compared_run(tmp_path_factory):
    """The session's finished tiny PC2M run (shared, not rerun) copied as this run, its evaluations
    and done.json copied as a ViT-PCM run's: Snakemake reruns the report alone, which tables both."""
    reference = reference_run(tmp_path_factory)
    work = tmp_path_factory.mktemp("compare")
    shutil.copytree(reference, work / "results")  # mtimes kept: nothing upstream is out of date
    other = work / "runs" / "vitpcm"
    shutil.copytree(reference / "eval", other / "eval")
    done = json.loads((reference / "model" / "done.json").read_text())
    write_json(other / "model" / "done.json", {**done, "method": "vitpcm"})
    # relative to the working folder, as `results` is
    config = write_config(work / "tiny.yaml", tiny_config(work / "results", report={"compare_with": ["runs/vitpcm"]}))

    run = snakemake("--configfile", str(config), cwd=work)
    assert run.returncode == 0, run.stdout[-6000:]
    assert job_counts(run.stdout) == {"report": 1, "all": 1}
    summary = pd.read_csv(work / "results" / "reports" / "summary.csv")
    for own, compared in (("BPM (PC2M, train)", "BPM (ViT-PCM, train)"), ("PC2M (val)", "ViT-PCM (val)"),
                          ("PC2M+CRF (val)", "ViT-PCM+CRF (val)"), ("DeepLab (PC2M, val)", "DeepLab (ViT-PCM, val)")):
        columns = list(summary.columns)
        assert columns.index(compared) == columns.index(own) + 1
        assert summary[compared].equals(summary[own])  # the same evaluations under both names
    markdown = (work / "results" / "reports" / "summary.md").read_text(encoding="utf-8")
    assert "`runs/vitpcm` (ViT-PCM, `train.method: vitpcm`)" in markdown
    assert "| PC2M (val) | ViT-PCM (val) |" in markdown

    # a folder that holds no finished run stops the plan with what to do, before any job
    missing = snakemake("-n", "--configfile", str(config), "--config", "report={compare_with: [runs/csrm]}", cwd=work)
    assert missing.returncode != 0
    assert "compared results folder 'runs/csrm' has no model/done.json" in missing.stdout
    assert "run that run's config first" in missing.stdout


def test_a_comus_run_is_compared_by_its_rounds(tree, tmp_path):
    """A COMUS run has no model/done.json: its method is in comus/summary.json, its stages are rounds."""
    comus = tmp_path / "comus-run"
    write_json(comus / "comus" / "summary.json", {"method": "comus", "num_classes": len(NAMES)})
    write_json(comus / "eval" / "comus_round1-val.json", evaluation([0.7, 0.2, None], 3))
    write_json(comus / "eval" / "comus_round2-val.json", evaluation([0.75, 0.25, None], 3))
    summary = table(tree, comus)
    assert {"COMUS round 1 (val)", "COMUS round 2 (val)"} <= set(summary.columns)
    row = summary.set_index("class").loc["mIoU"]
    assert row["COMUS round 2 (val)"] == pytest.approx(50.0)
