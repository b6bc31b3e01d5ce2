"""Apply a finished run's trained model(s) to a new folder of images, without retraining anything.

``python -m pipeline apply`` (and the Snakemake target ``apply``, whose jobs each run one step of
it) works in steps, all writing under one output folder (:class:`Layout`):

- ``index``: the folder's images, checked and sharded by the dataset stage's own indexer (folder
  adapter, ``build_index``) into ``dataset/manifest.csv``; files that are not images are ignored
  and listed in ``dataset/ignored.csv``.
- ``predict`` (per shard): PC2M probabilities and palette masks at image size (the run's own
  ``pipeline.predict``, never restricted to labels: new images have none), DeepLab masks
  (``pipeline.deeplab.predict``) when a DeepLab model is given, and an overlay per mask.
- ``report``: ``report.md``, ``gallery.png`` (image | overlays) and ``class_shares.csv``.

A model must be what the run would use: a model file of another backbone or class count, or of
the other kind (a DeepLab file as the PC2M model), stops with one line naming the file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.atomic import atomic_path, write_csv, write_text
from pipeline.errors import BadInputError, ConfigError, WeightsError

log = logging.getLogger(__name__)

STEPS = ("all", "index", "predict", "report")
MODELS = ("model", "deeplab")
IMAGES_KEY = "apply.images"

# Config values each step reads (what the rules pass as --params, so that changing an unrelated
# key reruns nothing); "all" takes their union.
_STEP_VALUES = {
    "index": ("images_per_shard", "verify_images", "on_bad_input"),
    "model": ("backbone", "predict", "mode", "overlay_alpha"),
    "deeplab": ("deeplab", "overlay_alpha"),
    "report": ("mode", "gallery_images"),
}


@dataclass(frozen=True)
class Layout:
    """Where every step reads and writes, under the output folder."""

    root: Path

    @property
    def dataset(self) -> Path:
        return self.root / "dataset"

    @property
    def manifest(self) -> Path:
        return self.dataset / "manifest.csv"

    @property
    def skipped(self) -> Path:
        return self.dataset / "skipped.csv"

    @property
    def ignored(self) -> Path:
        return self.dataset / "ignored.csv"

    def probs(self, shard: int) -> Path:
        return self.root / "model" / "probs" / f"shard-{shard:05d}.safetensors"

    def masks(self, model: str, shard: int) -> Path:
        return self.root / model / "masks" / f"shard-{shard:05d}"

    def overlays(self, model: str, shard: int) -> Path:
        return self.root / model / "overlays" / f"shard-{shard:05d}"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def gallery(self) -> Path:
        return self.root / "gallery.png"

    @property
    def shares(self) -> Path:
        return self.root / "class_shares.csv"


def apply_params(config: dict, parts: Sequence[str] = tuple(_STEP_VALUES)) -> dict:
    """The values of a validated config that the ``parts`` (index, pc2m, deeplab, report) read."""
    every = {
        "images_per_shard": config["dataset"]["images_per_shard"],
        "verify_images": config["dataset"]["verify_images"],
        "on_bad_input": config["on_bad_input"],
        "backbone": config["backbone"],
        "predict": config["predict"],
        "mode": config["mode"],
        "deeplab": config["deeplab"],
        "overlay_alpha": config["apply"]["overlay_alpha"],
        "gallery_images": config["apply"]["gallery_images"],
    }
    return {key: every[key] for part in parts for key in _STEP_VALUES[part]}


# ---------------------------------------------------------------------------------------------
# index


def index_images(images: Path, layout: Layout, params: dict, threads: int) -> None:
    """manifest.csv, classes.json, skipped.csv and ignored.csv of the new folder."""
    from pipeline.datasets import build_index
    from pipeline.datasets.folder import IMAGE_SUFFIXES, find_files

    root = Path(os.path.abspath(images))
    if not root.is_dir():
        raise BadInputError(f"{root}: folder of new images (config key {IMAGES_KEY}) not found")
    found, ignored = find_files(root)
    write_csv(layout.ignored, pd.DataFrame({"path": [str(path) for path, _ in ignored],
                                             "reason": [reason for _, reason in ignored]}, columns=["path", "reason"]))
    if ignored:
        log.warning("ignored %d files that are not images (listed in %s)", len(ignored), layout.ignored)
    if not found:
        suffixes = ", ".join(sorted(suffix.lstrip(".") for suffix in IMAGE_SUFFIXES))
        raise BadInputError(f"{root}: no images ({suffixes}) in this folder (config key {IMAGES_KEY});"
                            f" {len(ignored)} other files ignored")
    build_index({
        "dataset": {"kind": "folder", "images_per_shard": params["images_per_shard"],
                    "verify_images": params["verify_images"], "folder": {"images": str(root)}},
        "on_bad_input": params["on_bad_input"],
    }, layout.dataset, threads)


# ---------------------------------------------------------------------------------------------
# predict


def write_overlays(rows: pd.DataFrame, masks_dir: Path, out_dir: Path, alpha: float) -> None:
    """``out_dir/<image_id>.png``: every image of ``rows`` blended with its mask."""
    from PIL import Image
    from tqdm import tqdm

    from pipeline.atomic import atomic_dir
    from pipeline.imageio import load_mask, load_rgb, overlay, safe_child

    with atomic_dir(out_dir) as tmp_dir:
        for row in tqdm(rows.itertuples(), total=len(rows), desc=f"overlays {out_dir.name}", unit="img"):
            mask = load_mask(safe_child(masks_dir, row.image_id))
            blended = Image.fromarray(overlay(load_rgb(row.image_path), mask, alpha))
            with atomic_path(safe_child(tmp_dir, row.image_id)) as tmp:
                blended.save(tmp, format="PNG")


def predict_model(layout: Layout, shard: int, model_path: Path, params: dict, threads: int) -> int:
    """PC2M probabilities, masks and overlays of one shard; returns the model's class count."""
    from pipeline import shards
    from pipeline.features import shard_rows
    from pipeline.predict import predict_shard

    # New images carry no labels to restrict the classes to (that is for the run's train split).
    settings = {**params, "predict": {**params["predict"], "restrict_to_labels": False}}
    predict_shard(layout.manifest, shard, model_path, layout.probs(shard), layout.masks("model", shard), settings,
                  threads)
    write_overlays(shard_rows(layout.manifest, shard), layout.masks("model", shard), layout.overlays("model", shard),
                   params["overlay_alpha"])
    return int(shards.read_meta(layout.probs(shard))["num_classes"])


def check_deeplab(model_path: Path, arch: dict, params: dict) -> None:
    """A DeepLab model of the configured backbone predicting the expected classes, or WeightsError."""
    configured = params["deeplab"]["backbone"]
    if arch["backbone"] != configured:
        raise WeightsError(f"{model_path}: trained with backbone {arch['backbone']!r}, but config key"
                           f" deeplab.backbone is {configured!r}")
    expected = params.get("num_classes")
    if expected is not None and arch["num_classes"] != expected:
        raise WeightsError(f"{model_path}: predicts {arch['num_classes']} classes where {expected} are expected")


def predict_deeplab(layout: Layout, shard: int, model_path: Path, params: dict, threads: int) -> None:
    """DeepLab masks and overlays of one shard."""
    import torch

    from pipeline.deeplab.model import load_trained_deeplab
    from pipeline.deeplab.predict import PredictSettings, predict_rows
    from pipeline.features import shard_rows

    settings = PredictSettings.from_params(params)
    torch.set_num_threads(max(1, threads))
    rows = shard_rows(layout.manifest, shard)
    model = load_trained_deeplab(model_path)
    check_deeplab(model_path, model.arch, params)
    predict_rows(model, rows, layout.masks("deeplab", shard), settings, f"deeplab shard {shard}",
                 {"shard": shard, "model": str(model_path)}, threads)
    write_overlays(rows, layout.masks("deeplab", shard), layout.overlays("deeplab", shard), params["overlay_alpha"])


def shard_ids(manifest: Path) -> list[int]:
    from pipeline.datasets import read_manifest

    return sorted(int(s) for s in read_manifest(manifest)["shard"].unique())


def predict_shards(layout: Layout, shards: Sequence[int], models: dict[str, Path], params: dict,
                   threads: int) -> None:
    """Every model of ``models`` (pc2m, deeplab: path) on every shard of ``shards``."""
    for shard in shards:
        if "model" in models:
            # Standalone runs check DeepLab's classes against the PC2M model given with it.
            found = predict_model(layout, shard, models["model"], params, threads)
            params = {**params, "num_classes": params.get("num_classes") or found}
        if "deeplab" in models:
            predict_deeplab(layout, shard, models["deeplab"], params, threads)
        log.info("applied %s to shard %d", " and ".join(models), shard)


# ---------------------------------------------------------------------------------------------
# report


def class_names(count: int, mode: str, names: Sequence[str] | None) -> list[str]:
    """The run's class names in weak mode; cluster ids in unsupervised mode (or when unknown)."""
    if mode == "weak" and names is not None and len(names) == count:
        return list(names)
    return ["background", *[f"{'cluster' if mode == 'unsupervised' else 'class'} {i}" for i in range(1, count)]]


def known_classes(layout: Layout, models: dict[str, Path], params: dict, shard: int) -> int | None:
    """The models' class count: the run's, or the PC2M model's (recorded with its probabilities)."""
    from pipeline import shards

    if params.get("num_classes"):
        return int(params["num_classes"])
    return int(shards.read_meta(layout.probs(shard))["num_classes"]) if "model" in models else None


def pixel_counts(mask_paths: Sequence[Path]) -> np.ndarray:
    """Pixels per class id over every mask (length 256: any uint8 id)."""
    from tqdm import tqdm

    from pipeline.imageio import load_mask

    total = np.zeros(256, dtype=np.int64)
    for path in tqdm(mask_paths, desc="class shares", unit="mask"):
        total += np.bincount(load_mask(path).ravel(), minlength=256)
    return total


def class_shares(counts: dict[str, np.ndarray], names: Sequence[str]) -> pd.DataFrame:
    """Per class: the share of all pixels of the new images each model gives it, in %."""
    frame = pd.DataFrame({"class_id": range(len(names)), "class": list(names)})
    for model, count in counts.items():
        frame[model] = np.round(100.0 * count[: len(names)] / max(1, int(count.sum())), 2)
    return frame


def gallery_figure(rows: pd.DataFrame, overlay_dirs: dict[str, list[Path]], manifest_path: Path):
    """Rows: images; columns: the image, then each model's overlay."""
    from matplotlib.figure import Figure

    from pipeline.evaluate import find_prediction
    from pipeline.imageio import load_rgb

    columns = ["image", *overlay_dirs]
    figure = Figure(figsize=(3 * len(columns), 2.6 * len(rows)))
    axes = figure.subplots(len(rows), len(columns), squeeze=False)
    for r, row in enumerate(rows.itertuples()):
        pictures = [load_rgb(row.image_path)] + [
            load_rgb(find_prediction(dirs, row.image_id, manifest_path)) for dirs in overlay_dirs.values()]
        for c, picture in enumerate(pictures):
            axes[r][c].imshow(picture)
            axes[r][c].set_axis_off()
            axes[r][c].set_title(row.image_id if c == 0 else columns[c], fontsize=8)
    return figure


def report_markdown(manifest: pd.DataFrame, shares: pd.DataFrame, ignored: list[str], skipped: pd.DataFrame,
                    models: dict[str, Path], layout: Layout) -> str:
    from pipeline.tables import markdown_table

    lines = [
        "# Model applied to new images", "",
        f"- images: {len(manifest)} in {manifest['shard'].nunique()} shards (`{layout.manifest}`)",
        *[f"- {model}: `{path}`; masks in `{layout.root / model / 'masks'}`, overlays in"
          f" `{layout.root / model / 'overlays'}`" for model, path in models.items()],
        f"- files ignored (not images): {len(ignored)}", *[f"  - `{path}`" for path in ignored],
        f"- images skipped as bad input: {len(skipped)}",
        *[f"  - `{row.path}`: {row.reason}" for row in skipped.itertuples()],
        "", "## Share of the pixels per class (%)", "", markdown_table(shares),
        f"![gallery]({layout.gallery.name})", "",
    ]
    return "\n".join(lines)


def write_report(layout: Layout, models: dict[str, Path], params: dict) -> None:
    """report.md, gallery.png and class_shares.csv from the masks and overlays of every shard."""
    from pipeline.datasets import read_manifest
    from pipeline.evaluate import find_prediction
    from pipeline.report import save_figure

    manifest = read_manifest(layout.manifest)
    ids = manifest["shard"].unique()
    counts = {}
    for model in models:
        masks = [layout.masks(model, int(s)) for s in ids]
        counts[model] = pixel_counts([find_prediction(masks, i, layout.manifest) for i in manifest["image_id"]])
    count = (known_classes(layout, models, params, int(ids[0]))
             or 1 + max(int(np.flatnonzero(c).max(initial=0)) for c in counts.values()))
    shares = class_shares(counts, class_names(count, params["mode"], params.get("class_names")))
    write_csv(layout.shares, shares)
    shown = manifest.sort_values("image_id").head(max(1, int(params["gallery_images"])))
    overlays = {m: [layout.overlays(m, int(s)) for s in ids] for m in models}
    save_figure(gallery_figure(shown, overlays, layout.manifest), layout.gallery)
    ignored = pd.read_csv(layout.ignored, dtype=str, keep_default_na=False)["path"].tolist()
    skipped = pd.read_csv(layout.skipped, dtype=str, keep_default_na=False)
    # The index lists non-image files in skipped.csv too (no image id): they are in `ignored` already.
    skipped = skipped[skipped["image_id"] != ""]
    write_text(layout.report, report_markdown(manifest, shares, ignored, skipped, models, layout))
    log.info("report of %d images in %s", len(manifest), layout.report)


# ---------------------------------------------------------------------------------------------
# entry point


def run_apply(step: str, out_dir: Path, params: dict, threads: int = 1, images: Path | None = None,
              model: Path | None = None, deeplab_model: Path | None = None, shard: int | None = None) -> None:
    """One step (or ``all``) of applying ``model`` (PC2M) and ``deeplab_model`` to ``images``.

    ``params``: :func:`apply_params` of the run's config, plus optional ``num_classes`` (what the
    models must predict) and ``class_names`` (the run's, for the report)."""
    if step not in STEPS:
        raise ConfigError(f"apply step {step!r} is not one of {', '.join(STEPS)}")
    if shard is not None and step != "predict":
        raise ConfigError("--shard goes with --step predict (the other steps cover the whole folder)")
    layout = Layout(Path(out_dir))
    models = {name: Path(path) for name, path in (("model", model), ("deeplab", deeplab_model)) if path is not None}
    for name, path in models.items():
        if not path.is_file():
            raise WeightsError(f"{path}: {name} model file not found")
    if step in ("all", "predict", "report") and not models:
        raise ConfigError("apply needs --model (PC2M) and/or --deeplab-model")
    if step in ("all", "index"):
        if images is None:
            raise ConfigError(f"apply needs --images (config key {IMAGES_KEY}) to index a folder")
        index_images(images, layout, params, threads)
    if step in ("all", "predict"):
        predict_shards(layout, [shard] if shard is not None else shard_ids(layout.manifest), models, params, threads)
    if step in ("all", "report"):
        write_report(layout, models, params)

