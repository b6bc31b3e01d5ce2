"""Final report: one results table over every evaluated stage, what the run found, and figures.

Reads the evaluation summaries (``eval/{stage}-{split}.json``; none at all for a dataset without
ground truth), the PC2M training logs (``model/history.csv``, ``model/alpha.csv``), the dataset
manifest and classes, each stage's mask folders and, in the unsupervised mode, the pseudo-label
report; writes into ``out_dir``:

- ``summary.csv`` / ``summary.md``: per-class IoU, mIoU, pixel accuracy and mIoU_shape in % (one
  decimal), one column per evaluated stage and split, laid out like paper 000 Tables 3, 4 and 11.
  Columns use the paper's names (pc2m on train = "BPM", on val = "PC2M"; crf adds "+CRF"), and
  each names its method (``column_name``: "BPM (PC2M, train)", "DeepLab (ViT-PCM, val)"); the
  columns are whatever evaluation files are given, so a stage that was not run is simply absent.
  With ``compare_with`` (config ``report.compare_with``), the evaluations of other finished runs
  on the same dataset join the table, each beside this run's column of the same stage and split.
- ``per_class_iou.png``: the table's per-class IoU as grouped bars (without ground truth: a
  figure saying so, so that the outputs are the same in every case).
- ``alpha.png``: alpha-tilde per class over the epochs, and the Jensen-Shannon divergences of
  paper 000 Fig. 6/10 with the Sinkhorn epsilon (App. B).
- ``training.png``: the loss terms per epoch.
- ``qualitative.png``: image | GT | each stage's mask for the first few val images (train when
  there is no val split; paper 000 Fig. 12-16), VOC palette. A stage without a mask for one of
  those images is an error naming the stage: every image of a split a stage predicts must have
  one, so a gap means the results are inconsistent.
- ``clusters.csv``: what the run found, with or without ground truth: per predicted id (cluster
  in the unsupervised mode, class in the weak mode) of the final stage's masks (DeepLab, else
  CRF, else PC2M), the images holding it and its share of all pixels.
- ``gallery.png``: per predicted id, the images where it covers most of the image, with that id
  overlaid.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline.atomic import atomic_path, write_text
from pipeline.compare import compared_folders, run_files
from pipeline.datasets import read_classes, read_manifest
from pipeline.datasets.common import IGNORE_INDEX
from pipeline.errors import BadInputError, ConfigError
from pipeline.evaluate import find_prediction
from pipeline.imageio import load_mask, load_rgb, overlay, voc_palette
from pipeline.tables import markdown_table

log = logging.getLogger(__name__)

DEFAULT_QUALITATIVE_IMAGES = 4
DEFAULT_GALLERY_IMAGES = 4
# Rows of the gallery (predicted ids with the largest pixel share): beyond this a PNG is unreadable.
MAX_GALLERY_IDS = 40
# history.csv columns that are not loss terms (the rest are: loss, mce, match, et, ...).
NON_LOSS_COLUMNS = {"epoch", "unfrozen_blocks", "lr", "epsilon", "seconds"}
CLUSTER_COLUMNS = ["id", "name", "images", "image_share", "pixel_share"]
# Column order of the paper's tables: train (Table 3) before val (Table 4), pipeline order within.
# cam_baseline: CSRM's CAM classifier (paper 004 Table 2); affinity: the optional random walk
STAGE_ORDER = ("cam_baseline", "model", "affinity", "crf", "deeplab")
SPLIT_ORDER = ("train", "val")
# Summary rows after the per-class rows: label -> key of the evaluation JSON.
# precision / recall: means over the classes (paper 003 Tables 2 and 5 judge CAMs by them).
METRIC_ROWS = {"mIoU": "miou", "pixel accuracy": "pixel_accuracy", "precision": "precision", "recall": "recall",
               "mIoU_shape": "miou_shape"}
# Paper 000's Table 11 shows the 21 VOC classes by name; beyond that a legend is unreadable.
MAX_LEGEND_CLASSES = 21


# train.method -> the name its paper gives it (cam: the plain CAM baseline of paper 003 Table 2).
METHOD_NAMES = {"pc2m": "PC2M", "vitpcm": "ViT-PCM", "rcm_mam": "RCM+MAM", "csrm": "CSRM", "cam": "CAM baseline",
                "comus": "COMUS"}
# Methods whose train-split masks the papers call Baseline Pseudo-Masks (ViT-PCM's nomenclature).
BPM_METHODS = ("pc2m", "vitpcm")


@dataclass(frozen=True)
class StageEval:
    """One evaluation summary: a stage's masks scored on one split."""

    stage: str
    split: str
    result: dict
    method: str = "pc2m"
    run: str = ""  # the run's folder, when another run of the report has the same method

    @property
    def column(self) -> str:
        return column_name(self.stage, self.split, self.method, self.run)


def method_name(method: str) -> str:
    return METHOD_NAMES.get(method, method)


def paper_name(stage: str, split: str, method: str = "pc2m") -> str:
    """The papers' name for a stage's masks: on train, for the patch classifiers, the Baseline
    Pseudo-Masks (BPM, paper 000 Table 3, the ViT-PCM nomenclature); otherwise the method's
    predictions (PC2M, Table 4; RCM+MAM, ...)."""
    base = "BPM" if split == "train" and method in BPM_METHODS else method_name(method)
    names = {"model": base, "affinity": f"{base}+RW", "crf": f"{base}+CRF", "deeplab": "DeepLab",
             "cam_baseline": "CAM baseline"}
    if stage in names:
        return names[stage]
    round_number = comus_round(stage)
    return stage if round_number is None else f"COMUS round {round_number}"


def comus_round(stage: str) -> int | None:
    """The self-training round of a COMUS stage ``comus_round<N>`` (paper 002's iterations), else None."""
    prefix = "comus_round"
    return int(stage[len(prefix):]) if stage.startswith(prefix) and stage[len(prefix):].isdigit() else None


def column_name(stage: str, split: str, method: str = "pc2m", run: str = "") -> str:
    """A column's name: the masks' paper name, then in brackets the method where that name does
    not say it (BPM: whose pseudo-masks; DeepLab: whose masks trained it), the run's folder where
    two runs of the report share a method, and the split: "PC2M+CRF (val)", "BPM (ViT-PCM,
    train)", "DeepLab (PC2M, run-b, val)"."""
    name = paper_name(stage, split, method)
    qualifiers = [] if name.startswith(method_name(method)) else [method_name(method)]
    return f"{name} ({', '.join([*qualifiers, *([run] if run else []), split])})"


# ---------------------------------------------------------------------------------------------
# Reading the artifacts


def read_evals(eval_jsons: Sequence[Path], method: str = "pc2m", run: str = "") -> list[StageEval]:
    """The evaluation summaries in the paper's column order (unknown stages and splits last)."""
    evals = []
    for path in map(Path, eval_jsons):
        stage, sep, split = path.stem.rpartition("-")
        if not sep or not stage:
            raise BadInputError(f"{path}: expected an evaluation file named {{stage}}-{{split}}.json")
        evals.append(StageEval(stage, split, _read_json(path), method, run))
    return column_order(evals)


def column_order(evals: Sequence[StageEval]) -> list[StageEval]:
    """Train before val, pipeline order within a split; a stable sort, so that the runs of a
    comparison stand side by side per stage and split, in the order given."""

    def rank(item: StageEval) -> tuple:
        return (_rank(item.split, SPLIT_ORDER), item.split, _rank(item.stage, STAGE_ORDER),
                comus_round(item.stage) or 0, item.stage)

    return sorted(evals, key=rank)


def _rank(value: str, order: Sequence[str]) -> int:
    return order.index(value) if value in order else len(order)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{path}: unreadable evaluation summary ({exc})") from None


@dataclass(frozen=True)
class Run:
    """One run whose evaluations the table holds: its results folder, method and evaluation files."""

    folder: Path
    method: str
    eval_jsons: list[Path]


def compared_run(folder: Path) -> Run:
    """A finished run of ``report.compare_with``, read from its results folder."""
    done, eval_jsons = run_files(folder)
    return Run(Path(folder), run_method(_read_json(done)), eval_jsons)


def run_method(done: Mapping) -> str:
    """``train.method`` of a run, from its ``model/done.json`` (PC2M's first ones carried none)."""
    return str(done.get("method", "pc2m"))


def run_suffixes(runs: Sequence[Run]) -> list[str]:
    """Per run, what its column names add to its method: nothing when no other run has its
    method (the method tells them apart), else its folder's name, or its path when another of
    those folders has the same name."""
    methods = Counter(run.method for run in runs)
    shared = [run for run in runs if methods[run.method] > 1]
    folder_names = Counter(run.folder.name for run in shared)
    return ["" if methods[run.method] == 1 else run.folder.name if folder_names[run.folder.name] == 1
            else str(run.folder) for run in runs]


def check_comparable(compared: Sequence[StageEval], folder: Path, mode: str, own: Sequence[StageEval],
                     num_classes: int) -> None:
    """A compared run's evaluations must score the same task as this run's: same mode, same
    classes, and per split the same images with GT (another count means another dataset or split
    list). BadInputError naming the folder otherwise."""
    scored = {item.split: item.result["images"] for item in own}
    for item in compared:
        result, what = item.result, f"compared run {str(folder)!r}: evaluation {item.stage}-{item.split}"
        if result["mode"] != mode:
            raise BadInputError(f"{what} is in {result['mode']} mode, this run in {mode}: compare runs of one mode")
        if len(result["iou"]) != num_classes:
            raise BadInputError(f"{what} has {len(result['iou'])} classes, this run's dataset {num_classes}: "
                                "compare runs on the same dataset")
        if scored.get(item.split, result["images"]) != result["images"]:
            raise BadInputError(f"{what} scored {result['images']} images, this run {scored[item.split]} on "
                                f"{item.split}: compare runs on the same dataset and split lists")


def common_mode(evals: Sequence[StageEval], mode: str | None = None) -> str:
    """The run's mode (weak | unsupervised): ``mode`` when given, and every summary must share it."""
    modes = {item.result["mode"] for item in evals} | ({mode} if mode else set())
    if len(modes) > 1:
        raise BadInputError(f"evaluation summaries mix modes {sorted(modes)}: re-run the evaluations")
    if not modes:
        raise ConfigError("report params lack 'mode', and there is no evaluation to take it from")
    return modes.pop()


def class_names(classes: dict, evals: Sequence[StageEval]) -> list[str]:
    """The dataset's class names (none for an unsupervised folder without classes)."""
    num_classes = int(classes.get("num_classes") or 0)
    names = classes.get("names") or [str(i) for i in range(num_classes)]
    for item in evals:
        if len(item.result["iou"]) != len(names):
            raise BadInputError(
                f"evaluation {item.stage}-{item.split} has {len(item.result['iou'])} classes, the dataset "
                f"{len(names)}: re-run the evaluation"
            )
    return list(names)


# ---------------------------------------------------------------------------------------------
# The table


def percent(value: float | None) -> float:
    """A score in [0, 1] (None: undefined) as % with one decimal, the precision of the paper."""
    return math.nan if value is None else round(100.0 * float(value), 1)


def summary_frame(evals: Sequence[StageEval], names: Sequence[str]) -> pd.DataFrame:
    """Rows: classes (by id), then the METRIC_ROWS; columns: class_id, class, one per evaluation."""
    frame = pd.DataFrame({
        "class_id": pd.array(list(range(len(names))) + [None] * len(METRIC_ROWS), dtype="Int64"),
        "class": list(names) + list(METRIC_ROWS),
    })
    for item in evals:
        scores = list(item.result["iou"]) + [item.result.get(key) for key in METRIC_ROWS.values()]
        frame[item.column] = [percent(value) for value in scores]
    return frame


def header_lines(classes: dict, manifest: pd.DataFrame, mode: str, evals: Sequence[StageEval],
                 method: str = "pc2m") -> list[str]:
    counts = []
    for split, rows in manifest.groupby("split", sort=False):
        counts.append(f"{split} {len(rows)} ({int((rows['mask_path'] != '').sum())} with GT masks)")
    classes_text = (f"{classes['num_classes']} classes (background included)" if classes.get("num_classes")
                    else "no class names (clusters only)")
    scored = [f"{item.column} on {item.result['images']}" for item in evals]
    switch = "`comus.enabled: true`" if method == "comus" else f"`train.method: {method}`"
    return [
        f"# {method_name(method)} results",
        "",
        f"- Method: {method_name(method)} ({switch}).",
        f"- Dataset: {classes.get('kind', 'unknown')}, {classes_text}.",
        f"- Mode: {mode} ({'image-level labels' if mode == 'weak' else 'pseudo-labels from clustering, no labels'}).",
        f"- Images per split: {', '.join(counts)}.",
        f"- Images scored (those with a GT mask): {', '.join(scored)}." if scored
        else "- No ground-truth masks: nothing is scored; below is what the run found.",
        "",
    ]


def unsupervised_notes(evals: Sequence[StageEval]) -> list[str]:
    """Why the unsupervised scores are comparable at all: predicted ids are clusters, matched to
    classes before scoring; plus the COMUS discovery counts (paper 002), which matter on COCO."""
    lines = [
        "Unsupervised: predicted ids are clusters, matched to classes on each column's dataset "
        "confusion before scoring (Hungarian one-to-one on IoU, or majority vote when there are "
        "more clusters than classes).",
        "",
    ]
    for item in evals:
        result = item.result
        total = result["num_classes"]
        threshold = 100 * result["discovered_iou"]
        # The mIoU over all classes leads: a mean over the discovered classes only is highest for a
        # degenerate model that finds one class (one cluster everywhere scores the background well).
        lines.append(
            f"- {item.column}: mIoU {_fmt(result['miou'])} over all {total} classes (matching {result['matching']}); "
            f"{result['discovered']}/{total} classes discovered (IoU ≥ {threshold:g}%; mIoU over those "
            f"{result['discovered']} only: {_fmt(result['miou_discovered'])}), {result['with_cluster']}/{total} "
            f"with a cluster (IoU > 0; mIoU over those only: {_fmt(result['miou_with_cluster'])})."
        )
    return lines + [""]


def _fmt(value: float | None) -> str:
    """A score in [0, 1] as '12.3' (%), '–' when undefined."""
    scaled = percent(value)
    return "–" if math.isnan(scaled) else f"{scaled:.1f}"


def pseudo_label_lines(pseudo_csv: Path) -> list[str]:
    """The pseudo-label scores (``reports/pseudo_labels.csv``, rows 'macro' / 'micro'); none when
    the train split had no ground truth (the report is then empty)."""
    rows = pd.read_csv(pseudo_csv).set_index("class_name")
    if "macro" not in rows.index:
        return []
    macro, micro = rows.loc["macro"], rows.loc["micro"]
    return [
        f"Pseudo-labels (train split, `{Path(pseudo_csv).name}`): multi-label F1 macro {_fmt(macro['f1'])}, "
        f"micro {_fmt(micro['f1'])} (paper 000 Appendix, VOC trainaug: 53 / 51); "
        f"pseudo-map mIoU {_fmt(macro['iou'])}.",
        "",
    ]


def summary_markdown(frame: pd.DataFrame | None, header: list[str], notes: list[str],
                     found: list[str]) -> str:
    """The report's text: header, the scores table (when anything was scored), what was found."""
    scores = [] if frame is None else [
        "Scores in % (one decimal); rows as in paper 000 Table 11, columns as in Tables 3 (train) "
        "and 4 (val), each naming its method: BPM = a patch classifier's (PC2M's, ViT-PCM's) "
        "pseudo-masks on train, +CRF = refined by the dense CRF (+RW: AffinityNet's random walk, "
        "which the CRF then starts from), DeepLab (M, ...) = DeepLab trained on method M's masks. "
        "'–': undefined (class absent from GT and prediction).",
        "",
        *notes,
        markdown_table(frame),
        "",
    ]
    return "\n".join(header + scores + found) + "\n"


def found_lines(clusters: pd.DataFrame, stage: str, mode: str) -> list[str]:
    """The clusters table (``clusters.csv``) under a heading naming the masks it counts."""
    what, whats = ("cluster", "clusters") if mode == "unsupervised" else ("class", "classes")
    table = clusters.assign(image_share=clusters["image_share"].map(_fmt),
                            pixel_share=clusters["pixel_share"].map(_fmt))
    return [
        f"## What was found: {whats} of the final masks ({stage})",
        "",
        f"Per predicted {what}: images holding it, and its share of the images and of all pixels (%). "
        "`gallery.png` shows the images each covers most; `training.png` the training curves.",
        "",
        markdown_table(table.rename(columns={"image_share": "images (%)", "pixel_share": "pixels (%)"})),
    ]


# ---------------------------------------------------------------------------------------------
# Figures


def save_figure(figure: Figure, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        # The temporary name ends in .partial, so the format cannot come from the extension.
        figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")


def per_class_iou_figure(frame: pd.DataFrame, names: Sequence[str]) -> Figure:
    """Grouped bars: one group per class, one bar per evaluated stage/split."""
    columns = list(frame.columns[2:])
    per_class = frame.iloc[: len(names)]
    x = np.arange(len(names))
    width = 0.8 / len(columns)
    # Wide enough for every bar of every class (81 on COCO), capped to keep the PNG viewable.
    width_inches = min(30.0, max(6.0, 0.5 + len(names) * (0.15 * len(columns) + 0.2)))
    figure = Figure(figsize=(width_inches, 4.5), layout="constrained")
    ax = figure.subplots()
    for index, column in enumerate(columns):
        ax.bar(x + (index - (len(columns) - 1) / 2) * width, per_class[column].to_numpy(float), width,
               label=column)
    ax.set_xticks(x, list(names), rotation=90 if len(names) > 12 else 30, ha="center" if len(names) > 12 else "right")
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_title("Per-class IoU (paper 000 Table 11)")
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    return figure


def message_figure(text: str) -> Figure:
    """A figure saying why there is nothing to plot: the outputs stay the same in every case."""
    figure = Figure(figsize=(6.0, 1.5), layout="constrained")
    ax = figure.subplots()
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    return figure


def no_scores_figure() -> Figure:
    """per_class_iou.png when nothing was scored."""
    return message_figure("No ground-truth masks: no per-class IoU.\nSee clusters.csv and gallery.png.")


def training_figure(history: pd.DataFrame) -> Figure:
    """The loss terms per epoch (history.csv), the total bold; a log axis when all are positive."""
    figure = Figure(figsize=(7.0, 4.0), layout="constrained")
    ax = figure.subplots()
    terms = [c for c in history.columns if c not in NON_LOSS_COLUMNS and not c.startswith("js_")]
    for column in terms:
        ax.plot(history["epoch"], history[column], marker=".", label=column,
                linewidth=2.5 if column == "loss" else 1.2)
    if terms and (history[terms].to_numpy(float) > 0).all():
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (epoch mean)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Training curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return figure


def read_alpha(alpha_csv: Path, num_classes: int | None = None) -> pd.DataFrame:
    """alpha.csv: row m = alpha-tilde used in epoch m (row 0 = nu_D, the last row the estimate after
    the final epoch), columns epoch, class_0..class_{C-1} (C = the model's classes: the dataset's in
    weak mode, background + clusters in unsupervised mode)."""
    frame = pd.read_csv(alpha_csv)
    count = num_classes if num_classes is not None else len(frame.columns) - 1
    expected = ["epoch"] + [f"class_{c}" for c in range(count)]
    if list(frame.columns) != expected:
        raise BadInputError(f"{alpha_csv}: columns {list(frame.columns)}, expected {expected}")
    return frame


def model_class_names(mode: str, names: Sequence[str], count: int) -> list[str]:
    """Legend names of the model's classes: the dataset's in weak mode; in unsupervised mode the
    model predicts background + clusters, which are not the dataset's classes."""
    if mode == "weak":
        return list(names)
    return ["background", *[f"cluster {i}" for i in range(1, count)]]


def alpha_figure(alpha: pd.DataFrame, history: pd.DataFrame, names: Sequence[str]) -> Figure:
    """Top: alpha-tilde_m per class. Bottom (paper 000 Fig. 6/10): D_JS(alpha_m, alpha_{m-1}) and
    D_JS(alpha_m, alpha*) on a log axis, epsilon on a twin axis. History row e is epoch e, whose
    update produced alpha_{e+1}, so its divergences are drawn at m = e + 1 and its epsilon at e."""
    figure = Figure(figsize=(8.0, 7.0), layout="constrained")
    top, bottom = figure.subplots(2, 1, sharex=True)
    epochs = alpha["epoch"].to_numpy()
    for c, name in enumerate(names):
        top.plot(epochs, alpha[f"class_{c}"].to_numpy(), marker=".", label=name)
    top.set_ylabel("α̃ (normalised class area)")
    top.set_title("Class-area estimate α̃ (row 0 = ν_D)")
    if len(names) <= MAX_LEGEND_CLASSES:
        top.legend(fontsize="x-small", ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    top.grid(alpha=0.3)

    divergences = {"js_alpha_change": ("D_JS(α̃_m, α̃_m-1)", "tab:blue"),
                   "js_alpha_gt": ("D_JS(α̃_m, α*) (GT areas)", "tab:red")}
    drawn, positive = [], False
    for column, (label, colour) in divergences.items():
        if column in history and history[column].notna().any():
            drawn += bottom.plot(history["epoch"] + 1, history[column], marker=".", color=colour, label=label)
            positive |= bool((history[column] > 0).any())
    if positive:  # divergences span decades (Fig. 10: ~1e-1 down to ~1e-5)
        bottom.set_yscale("log", nonpositive="mask")
    bottom.set_ylabel("Jensen-Shannon divergence")
    bottom.set_xlabel("epoch m")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.grid(alpha=0.3)
    twin = bottom.twinx()
    drawn += twin.plot(history["epoch"], history["epsilon"], linestyle="--", color="tab:gray", label="ε (Sinkhorn)")
    twin.set_ylabel("ε")
    bottom.legend(handles=drawn, fontsize="small", loc="upper right")
    return figure


def qualitative_images(manifest: pd.DataFrame, count: int) -> tuple[str, list[str]]:
    """The split shown (val, else train, else the first) and its first ``count`` image ids in
    sorted order, those with a GT mask first (a row without GT says less)."""
    present = set(manifest["split"])
    split = next((s for s in ("val", "train") if s in present), min(present))
    rows = manifest[manifest["split"] == split]
    with_gt = sorted(rows.loc[rows["mask_path"] != "", "image_id"])
    without_gt = sorted(rows.loc[rows["mask_path"] == "", "image_id"])
    return split, (with_gt + without_gt)[:count]


def stage_mask(stage: str, mask_dirs: Sequence[Path], image_id: str, manifest_path: Path) -> np.ndarray:
    try:
        return load_mask(find_prediction([Path(d) for d in mask_dirs], image_id, manifest_path))
    except BadInputError as exc:
        raise BadInputError(f"qualitative figure, stage {stage!r}: {exc}") from None


def qualitative_figure(manifest: pd.DataFrame, manifest_path: Path, split: str, image_ids: Sequence[str],
                       stage_mask_dirs: Mapping[str, Sequence[Path]], mode: str, method: str = "pc2m") -> Figure:
    """Rows: images; columns: image | GT | one mask per stage, coloured with the VOC palette
    (255 = ignore, ivory as in the paper's figures)."""
    palette = voc_palette()
    rows = manifest.set_index("image_id")
    stages = list(stage_mask_dirs)
    id_note = ", cluster ids" if mode == "unsupervised" else ""
    titles = ["image", "ground truth"] + [f"{column_name(s, split, method)}{id_note}" for s in stages]
    figure = Figure(figsize=(2.4 * len(titles), 2.2 * len(image_ids) + 0.6), layout="constrained")
    axes = figure.subplots(len(image_ids), len(titles), squeeze=False)
    for r, image_id in enumerate(image_ids):
        row = rows.loc[image_id]
        panels = [load_rgb(row["image_path"]),
                  palette[load_mask(row["mask_path"], row["image_path"])] if row["mask_path"] else None]
        panels += [palette[stage_mask(s, stage_mask_dirs[s], image_id, manifest_path)] for s in stages]
        for c, panel in enumerate(panels):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if panel is None:
                ax.text(0.5, 0.5, "no GT", ha="center", va="center", transform=ax.transAxes)
            else:
                ax.imshow(panel, interpolation="nearest")
            if r == 0:
                ax.set_title(titles[c], fontsize="small")
        axes[r, 0].set_ylabel(image_id, fontsize="small")
    if mode == "unsupervised":
        figure.suptitle("Unsupervised: predictions shown as raw cluster ids (VOC palette), so their colours "
                        "need not match those of the GT classes", fontsize="small")
    return figure


# ---------------------------------------------------------------------------------------------
# What was found (with or without ground truth)


@dataclass(frozen=True)
class Found:
    """Per image of the final stage's masks, the fraction of its pixels each predicted id covers."""

    stage: str
    image_ids: list[str]
    fractions: np.ndarray  # images x ids, float32
    pixels: np.ndarray  # pixels per id, int64


def final_stage(stage_mask_dirs: Mapping[str, Mapping[str, Sequence[Path]]]) -> str:
    """The last stage of the pipeline order that wrote masks: the masks the run delivers."""
    stages = [stage for stage in STAGE_ORDER if stage_mask_dirs.get(stage)] or list(stage_mask_dirs)
    if not stages:
        raise ConfigError("report params lack stage_mask_dirs: no masks to describe")
    return stages[-1]


def count_found(manifest: pd.DataFrame, manifest_path: Path, stage: str, split_dirs: Mapping[str, Sequence[Path]],
                num_ids: int) -> Found:
    """One streaming pass over the stage's masks of every split it predicted."""
    rows = manifest[manifest["split"].isin(list(split_dirs))]
    image_ids = list(rows["image_id"])
    fractions = np.zeros((len(image_ids), num_ids), dtype=np.float32)
    pixels = np.zeros(num_ids, dtype=np.int64)
    for index, (image_id, split) in enumerate(zip(image_ids, rows["split"])):
        mask = stage_mask(stage, split_dirs[split], image_id, manifest_path)
        counts = np.bincount(mask.ravel(), minlength=256)
        if counts[num_ids:255].any():
            stray = int(np.flatnonzero(counts[num_ids:255])[0]) + num_ids
            raise BadInputError(f"stage {stage!r}: mask of {image_id!r} holds id {stray}, the model predicts "
                                f"0..{num_ids - 1}")
        valid = counts[:num_ids]
        pixels += valid
        fractions[index] = valid / max(1, int(valid.sum()))
    return Found(stage, image_ids, fractions, pixels)


def clusters_frame(found: Found, names: Sequence[str]) -> pd.DataFrame:
    """clusters.csv: per id, images holding it, share of images and of pixels (fractions)."""
    images = (found.fractions > 0).sum(axis=0)
    total = max(1, int(found.pixels.sum()))
    return pd.DataFrame({
        "id": range(len(names)),
        "name": list(names),
        "images": images.astype(np.int64),
        "image_share": images / max(1, len(found.image_ids)),
        "pixel_share": found.pixels / total,
    }, columns=CLUSTER_COLUMNS)


def gallery_figure(found: Found, names: Sequence[str], manifest: pd.DataFrame, manifest_path: Path,
                   split_dirs: Mapping[str, Sequence[Path]], per_id: int) -> Figure:
    """Rows: predicted ids by pixel share (at most MAX_GALLERY_IDS); columns: the ``per_id``
    images where that id covers the largest fraction, the id's pixels overlaid in its colour."""
    shown = [int(k) for k in np.argsort(-found.pixels, kind="stable") if found.pixels[k] > 0][:MAX_GALLERY_IDS]
    rows = manifest.set_index("image_id")
    figure = Figure(figsize=(2.4 * per_id + 0.6, 2.0 * max(1, len(shown)) + 0.6), layout="constrained")
    axes = figure.subplots(max(1, len(shown)), per_id, squeeze=False)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    for r, k in enumerate(shown):
        order = np.argsort(-found.fractions[:, k], kind="stable")[:per_id]
        for c, index in enumerate(i for i in order if found.fractions[i, k] > 0):
            image_id = found.image_ids[index]
            row = rows.loc[image_id]
            mask = stage_mask(found.stage, split_dirs[row["split"]], image_id, manifest_path)
            only_k = np.where(mask == k, mask, IGNORE_INDEX).astype(np.uint8)
            axes[r, c].imshow(overlay(load_rgb(row["image_path"]), only_k, 0.6), interpolation="nearest")
            axes[r, c].set_title(f"{image_id} ({100 * found.fractions[index, k]:.0f}%)", fontsize="x-small")
        axes[r, 0].set_ylabel(names[k], fontsize="small")
    hidden = int((found.pixels > 0).sum()) - len(shown)
    figure.suptitle(f"Gallery of the {found.stage} masks: per predicted id, the images it covers most"
                    + (f" ({hidden} smaller ids not shown)" if hidden > 0 else ""), fontsize="small")
    return figure


# ---------------------------------------------------------------------------------------------
# The report


def build_report(
    eval_jsons: Sequence[Path],
    manifest_path: Path,
    classes_path: Path,
    history_csv: Path | None,
    done_json: Path,
    stage_mask_dirs: Mapping[str, Mapping[str, Sequence[Path]]],
    out_dir: Path,
    params: Mapping | None = None,
    pseudo_labels_csv: Path | None = None,
    cam_scales_csv: Path | None = None,
    deeplab_done: Path | None = None,
) -> pd.DataFrame:
    """Write summary.csv, summary.md, per_class_iou.png, alpha.png, training.png,
    qualitative.png, clusters.csv and gallery.png into ``out_dir``; return the summary table
    (no score columns when nothing was evaluated). ``stage_mask_dirs``: stage -> split -> its
    mask folders (one per shard), the stages in the figures' column order. ``params``: ``mode``,
    ``qualitative_images`` (default 4), ``gallery_images`` (default 4). ``pseudo_labels_csv``:
    the pseudo-label report (unsupervised mode), summarised under the table. ``cam_scales_csv``:
    the CAMs' scores per inference scale (RCM+MAM, paper 003 Table 5), tabled under it.
    ``deeplab_done``: the DeepLab stage's done.json, whose recipe and network the header names.
    ``params["compare_with"]``: results folders of other finished runs on the same dataset
    (pipeline/compare.py), whose evaluations join the table and the per-class figure; this run's
    folder is the one holding ``done_json``."""
    params = dict(params or {})
    count = _positive(params, "qualitative_images", DEFAULT_QUALITATIVE_IMAGES)
    per_id = _positive(params, "gallery_images", DEFAULT_GALLERY_IMAGES)
    out_dir = Path(out_dir)

    done = _read_json(done_json)
    method = run_method(done)
    own = Run(Path(done_json).parent.parent, method, list(map(Path, eval_jsons)))  # <results>/model/done.json
    compared = [compared_run(folder) for folder in compared_folders(params.get("compare_with") or [], own.folder)]
    suffixes = run_suffixes([own, *compared])
    own_evals = read_evals(own.eval_jsons, method, suffixes[0])
    mode = common_mode(own_evals, params.get("mode"))
    classes = read_classes(classes_path)
    names = class_names(classes, own_evals)
    evals = list(own_evals)
    for run, suffix in zip(compared, suffixes[1:]):
        run_evals = read_evals(run.eval_jsons, run.method, suffix)
        check_comparable(run_evals, run.folder, mode, own_evals, len(names))
        evals += run_evals
    evals = column_order(evals)
    manifest = read_manifest(manifest_path)
    history = pd.read_csv(history_csv) if history_csv is not None else None
    predicted_names = model_class_names(mode, names, int(done["num_classes"]))
    # alpha-tilde (paper 000 eq. 7): only the patch-classifier methods estimate class areas.
    alpha_csv = Path(history_csv or ".").parent / "alpha.csv"
    alpha = (read_alpha(alpha_csv, len(predicted_names))
             if history is not None and method in BPM_METHODS and alpha_csv.is_file() else None)

    stage = final_stage(stage_mask_dirs)
    found = count_found(manifest, Path(manifest_path), stage, stage_mask_dirs[stage], len(predicted_names))
    clusters = clusters_frame(found, predicted_names)
    with atomic_path(out_dir / "clusters.csv") as tmp:
        clusters.to_csv(tmp, index=False)

    frame = summary_frame(evals, names)
    notes = unsupervised_notes(evals) if mode == "unsupervised" and evals else []
    if pseudo_labels_csv is not None and Path(pseudo_labels_csv).is_file():
        notes += pseudo_label_lines(Path(pseudo_labels_csv))
    if cam_scales_csv is not None:
        notes += cam_scale_lines(Path(cam_scales_csv))
    with atomic_path(out_dir / "summary.csv") as tmp:
        frame.to_csv(tmp, index=False)
    header = header_lines(classes, manifest, mode, evals, method)
    # among the header's items, before its blank line
    header[-1:-1] = deeplab_lines(deeplab_done) + compared_lines(compared)
    write_text(out_dir / "summary.md", summary_markdown(frame if evals else None, header, notes,
                                                        found_lines(clusters, stage, mode)))

    save_figure(per_class_iou_figure(frame, names) if evals else no_scores_figure(), out_dir / "per_class_iou.png")
    save_figure(alpha_figure(alpha, history, predicted_names) if alpha is not None
                else message_figure(f"{method_name(method)} estimates no class areas (alpha-tilde is PC2M's)"),
                out_dir / "alpha.png")
    save_figure(training_figure(history) if history is not None
                else message_figure(f"{method_name(method)} trains no patch classifier (its rounds are DeepLabs)"),
                out_dir / "training.png")
    split, image_ids = qualitative_images(manifest, count)
    shown_stages = {s: by_split[split] for s, by_split in stage_mask_dirs.items() if split in by_split}
    save_figure(qualitative_figure(manifest, Path(manifest_path), split, image_ids, shown_stages, mode, method),
                out_dir / "qualitative.png")
    save_figure(gallery_figure(found, predicted_names, manifest, Path(manifest_path), stage_mask_dirs[stage], per_id),
                out_dir / "gallery.png")
    log.info("report of %d evaluations (%s) and %d %s masks written to %s", len(evals),
             ", ".join(f"{item.column}: mIoU {_fmt(item.result['miou'])}" for item in evals) or "no ground truth",
             len(found.image_ids), stage, out_dir)
    return frame


def compared_lines(compared: Sequence[Run]) -> list[str]:
    """The runs whose columns stand beside this run's (``report.compare_with``)."""
    if not compared:
        return []
    runs = "; ".join(f"`{run.folder}` ({method_name(run.method)}, `train.method: {run.method}`)" for run in compared)
    return [f"- Compared with (`report.compare_with`, their columns beside this run's): {runs}."]


def deeplab_lines(done_json: Path | None) -> list[str]:
    """Which DeepLab verification ran (``deeplab.recipe``: the papers' recipes differ)."""
    if done_json is None or not Path(done_json).is_file():
        return []
    done = _read_json(Path(done_json))
    if "recipe" not in done:
        return []
    return [f"- DeepLab verification: recipe `{done['recipe']}`, {done.get('network', 'network not recorded')}."]


def cam_scale_lines(path: Path) -> list[str]:
    """The CAMs per inference scale (paper 003 Tables 2 and 5) as a Markdown table, in %."""
    table = pd.read_csv(path)
    lines = ["CAMs per inference scale on the train images with GT (paper 003 Tables 2 and 5; each "
             "scale with its flip, msinf = all fused, as the masks above):", "",
             "| scale | images | mIoU | precision | recall |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r.scale} | {r.images} | {_fmt(r.miou)} | {_fmt(r.precision)} | {_fmt(r.recall)} |"
              for r in table.itertuples()]
    return [*lines, ""]


def _positive(params: Mapping, key: str, default: int) -> int:
    value = params.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"report.{key} must be a positive integer, not {value!r}")
    return value
