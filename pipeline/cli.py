"""Command line of the pipeline: ``python -m pipeline <stage> ...``.

Each sub-command is one stage and is what the Snakemake rule of that stage calls. Stage
parameters are the relevant slice of the validated ``config.yaml`` as JSON objects, given inline
or as files (``--params``, repeatable, merged): the workflow passes the stage's settings file
(an input of the rule, so a changed value reruns it) and its speed-only runtime file.
Errors that a user can fix (bad input, bad weights, bad config) end in one line naming the file
or key, not a traceback.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
from pathlib import Path
from typing import NoReturn

from pipeline.errors import PipelineError
from pipeline.stage_settings import merge_params

log = logging.getLogger("pipeline")


def _params(values: str | list[str]) -> dict:
    """The stage's parameters: each ``--params`` is a JSON object or a JSON file holding one (the
    workflow passes its settings and runtime files, pipeline/stage_settings.py); later ones win."""
    parts = []
    for text in [values] if isinstance(values, str) else values:
        source = "--params"
        if not text.lstrip().startswith("{"):
            source = f"--params file {text}"
            try:
                text = Path(text).read_text(encoding="utf-8")
            except OSError as exc:
                raise PipelineError(f"{source}: cannot read it ({exc.strerror})") from None
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PipelineError(f"{source} is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise PipelineError(f"{source} must be a JSON object")
        parts.append(value)
    return Params(merge_params(parts))


class Params(dict):
    """``--params`` as parsed; a key the stage reads but the JSON lacks is an error naming the
    key (``--params lack key train.epochs``), not a KeyError traceback. Nested sections too."""

    # Built like a dict (dataclasses.asdict and copy rebuild it from pairs); ``where``: its dotted key.
    def __init__(self, *args, where: str = "", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.where = where
        for key, item in list(self.items()):
            if isinstance(item, dict):
                self[key] = Params(item, where=f"{where}{key}.")

    def __missing__(self, key: str):
        raise PipelineError(f"--params lack key {self.where}{key}")


def _cmd_demo_data(args: argparse.Namespace) -> None:
    from pipeline.datasets.demo import generate_demo

    params = _params(args.params)
    generate_demo(Path(args.out), seed=int(params["seed"]), **params["demo"])


def _cmd_coco_masks(args: argparse.Namespace) -> None:
    from pipeline.datasets.coco import convert_coco_annotations

    convert_coco_annotations(Path(args.annotations), Path(args.out), threads=args.threads)


def _cmd_index(args: argparse.Namespace) -> None:
    from pipeline.datasets import build_index

    build_index(_params(args.params), Path(args.out_dir), threads=args.threads)


def _cmd_extract_features(args: argparse.Namespace) -> None:
    from pipeline.features import extract_shard

    extract_shard(
        manifest_path=Path(args.manifest),
        shard=args.shard,
        out_path=Path(args.out),
        params=_params(args.params),
        threads=args.threads,
    )


def _cmd_spectral_segments(args: argparse.Namespace) -> None:
    from pipeline.segments import run_spectral_shard

    run_spectral_shard(Path(args.features), Path(args.manifest), Path(args.out), _params(args.params), args.threads)


def _cmd_segment_features(args: argparse.Namespace) -> None:
    from pipeline.segments import run_segment_features_shard

    run_segment_features_shard(
        Path(args.spectral), Path(args.features), Path(args.manifest), Path(args.out), _params(args.params),
        args.threads,
    )


def resolve_num_clusters(configured: int | None, classes_path: Path) -> int:
    """``pseudo_labels.num_clusters: null`` means one cluster per foreground class of the dataset."""
    if configured is not None:
        return int(configured)
    num_classes = json.loads(classes_path.read_text())["num_classes"]
    if not num_classes:
        raise PipelineError(
            "config key pseudo_labels.num_clusters: the dataset does not say how many classes it has;"
            " set pseudo_labels.num_clusters (or dataset.folder.num_classes)"
        )
    return int(num_classes) - 1


def _cmd_pseudo_labels(args: argparse.Namespace) -> None:
    from pipeline.pseudo_labels import run_pseudo_labels

    params = _params(args.params)
    cfg = dict(params["pseudo_labels"])
    cfg["num_clusters"] = resolve_num_clusters(cfg["num_clusters"], Path(args.classes))
    run_pseudo_labels(
        [Path(p) for p in args.segment_features],
        [Path(p) for p in args.spectral],
        Path(args.manifest),
        Path(args.out_dir),
        cfg,
        seed=int(params["seed"]),
        threads=args.threads,
    )


def _cmd_comus_proposals(args: argparse.Namespace) -> None:
    from pipeline.comus import run_proposals

    run_proposals(Path(args.manifest), [Path(p) for p in args.spectral], Path(args.out_dir), _params(args.params),
                  args.threads)


def _cmd_comus_pseudo_masks(args: argparse.Namespace) -> None:
    from pipeline.comus import run_pseudo_masks

    params = _params(args.params)
    cfg = dict(params["pseudo_labels"])
    cfg["num_clusters"] = resolve_num_clusters(cfg["num_clusters"], Path(args.classes))
    run_pseudo_masks(Path(args.proposals), Path(args.out_masks), Path(args.out_dir), cfg, seed=int(params["seed"]),
                     threads=args.threads)


def _cmd_pseudo_label_report(args: argparse.Namespace) -> None:
    from pipeline.pseudo_label_report import report_pseudo_labels

    report_pseudo_labels(Path(args.pseudo_dir), Path(args.manifest), Path(args.classes), Path(args.csv), Path(args.md))


def _cmd_train(args: argparse.Namespace) -> None:
    from pipeline.training.trainer import train

    train(Path(args.manifest), Path(args.classes), Path(args.labels) if args.labels else None,
          Path(args.out_dir), _params(args.params), args.threads)


def _cmd_predict(args: argparse.Namespace) -> None:
    from pipeline.predict import predict_shard

    predict_shard(Path(args.manifest), args.shard, Path(args.model), Path(args.out_probs), Path(args.out_masks),
                  _params(args.params), args.threads, labels_path=Path(args.labels) if args.labels else None)


def _cmd_cam_scales(args: argparse.Namespace) -> None:
    from pipeline.methods.rcm_mam.scale_table import cam_scale_table

    cam_scale_table(Path(args.manifest), Path(args.model), _params(args.params), args.split, Path(args.out_csv),
                    args.threads)


def _cmd_crf(args: argparse.Namespace) -> None:
    from pipeline.crf import crf_shard

    crf_shard(Path(args.probs), Path(args.manifest), Path(args.out_masks), _params(args.params), args.threads)


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from pipeline.evaluate import evaluate_masks

    params = _params(args.params)
    evaluate_masks([Path(d) for d in args.masks], Path(args.manifest), Path(args.classes), args.split,
                   params["mode"], Path(args.out_json), Path(args.out_csv),
                   num_predicted_classes=params.get("num_predicted_classes"),
                   matching=params["evaluate"]["matching"], discovered_iou=params["evaluate"]["discovered_iou"])


def _cmd_train_deeplab(args: argparse.Namespace) -> None:
    from pipeline.deeplab.train import train_deeplab

    only = None
    if args.images:
        import pandas as pd

        only = set(pd.read_csv(args.images, dtype={"image_id": str}, keep_default_na=False)["image_id"])
    train_deeplab(Path(args.manifest), [Path(d) for d in args.masks], Path(args.out_dir), _params(args.params),
                  args.threads, only)


def _cmd_predict_deeplab(args: argparse.Namespace) -> None:
    from pipeline.deeplab.predict import predict_deeplab

    predict_deeplab(Path(args.manifest), args.split, Path(args.model), Path(args.out_masks), _params(args.params),
                    args.threads)


def _cmd_report(args: argparse.Namespace) -> None:
    from pipeline.report import build_report

    params = _params(args.params)
    build_report(
        [Path(p) for p in args.eval], Path(args.manifest), Path(args.classes),
        Path(args.history) if args.history else None, Path(args.done),
        {stage: {split: [Path(d) for d in dirs] for split, dirs in by_split.items()}
         for stage, by_split in params.get("stage_mask_dirs", [])},
        Path(args.out_dir), params, pseudo_labels_csv=Path(args.pseudo_labels) if args.pseudo_labels else None,
        cam_scales_csv=Path(args.cam_scales) if args.cam_scales else None,
        deeplab_done=Path(args.deeplab_done) if args.deeplab_done else None,
    )


def _cmd_apply(args: argparse.Namespace) -> None:
    from pipeline.apply import apply_params, run_apply
    from pipeline.config import load_config

    # Rules pass their slice of the config (--params); users the run's config files (--config).
    params = _params(args.params) if args.params else apply_params(load_config(args.config))
    run_apply(args.step, Path(args.out), params, args.threads,
              images=Path(args.images) if args.images else None,
              model=Path(args.model) if args.model else None,
              deeplab_model=Path(args.deeplab_model) if args.deeplab_model else None, shard=args.shard)


def _cmd_train_affinity(args: argparse.Namespace) -> None:
    from pipeline.affinity.train import train_affinity

    train_affinity(Path(args.manifest), [Path(p) for p in args.probs], Path(args.out_dir), _params(args.params),
                   args.threads)


def _cmd_refine_affinity(args: argparse.Namespace) -> None:
    from pipeline.affinity.predict import refine_shard

    refine_shard(Path(args.probs), Path(args.manifest), Path(args.model), Path(args.out_probs),
                 Path(args.out_masks), _params(args.params), args.threads)




def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="stage", required=True)

    p = sub.add_parser("demo-data", help="generate the synthetic demo dataset")
    p.add_argument("--out", required=True, help="folder to create")
    p.add_argument("--params", required=True, action="append", help='JSON: {"seed": int, "demo": {...}}')
    p.set_defaults(func=_cmd_demo_data)

    p = sub.add_parser("coco-masks", help="convert a COCO instances JSON to semantic label PNGs")
    p.add_argument("--annotations", required=True, help="instances_<split>2014.json")
    p.add_argument("--out", required=True, help="folder of <image stem>.png masks to create")
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=_cmd_coco_masks)

    p = sub.add_parser("index", help="index a dataset into manifest.csv, classes.json, skipped.csv")
    p.add_argument("--params", required=True, action="append", help='JSON: {"dataset": {...}, "on_bad_input": ...}')
    p.add_argument("--out-dir", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=_cmd_index)

    p = sub.add_parser("extract-features", help="ViT features of one shard of the manifest")
    p.add_argument("--manifest", required=True)
    p.add_argument("--shard", type=int, required=True)
    p.add_argument("--out", required=True, help="shard file (.safetensors) to write")
    p.add_argument("--params", required=True, action="append", help='JSON: {"backbone": {...}, "features": {...}}')
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=_cmd_extract_features)

    p = sub.add_parser("spectral-segments", help="Laplacian eigenvectors and segments of one feature shard")
    p.add_argument("--features", required=True, help="feature shard (.safetensors)")
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--params", required=True, action="append", help='JSON: {"spectral": {...}, "seed": int}')
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=_cmd_spectral_segments)

    p = sub.add_parser("segment-features", help="CLS feature of each segment's crop, one shard")
    p.add_argument("--spectral", required=True, help="spectral shard (.safetensors)")
    p.add_argument("--features", required=True, help="feature shard (for the resize geometry)")
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--params", required=True, action="append",
                   help='JSON: {"backbone", "features", "segment_features", "seed"}')
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=_cmd_segment_features)

    p = sub.add_parser("pseudo-labels", help="cluster all crop features into pseudo multi-labels")
    p.add_argument("--segment-features", nargs="+", required=True)
    p.add_argument("--spectral", nargs="+", required=True)
    p.add_argument("--manifest", required=True)
    p.add_argument("--classes", required=True, help="classes.json of the dataset index")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--params", required=True, action="append", help='JSON: {"pseudo_labels": {...}, "seed": int}')
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=_cmd_pseudo_labels)

    p = sub.add_parser("pseudo-label-report", help="F1 and mIoU of the pseudo-labels against GT")
    p.add_argument("--pseudo-dir", required=True)
    p.add_argument("--manifest", required=True)
    p.add_argument("--classes", required=True)
    p.add_argument("--csv", required=True)
    p.add_argument("--md", required=True)
    p.set_defaults(func=_cmd_pseudo_label_report)

    p = sub.add_parser("train", help="train PC2M (weak: dataset labels; unsupervised: pseudo-labels)")
    p.add_argument("--manifest", required=True)
    p.add_argument("--classes", required=True)
    p.add_argument("--labels", help="pseudo-label image_labels.csv (unsupervised mode)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--params", required=True, action="append", help='JSON: {"backbone", "train", "mode", "seed"}')
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("predict", help="class-probability maps and masks of one shard (any method's model.pt)")
    p.add_argument("--manifest", required=True)
    p.add_argument("--shard", type=int, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--labels", help="pseudo-label image_labels.csv (unsupervised mode)")
    p.add_argument("--out-probs", required=True)
    p.add_argument("--out-masks", required=True)
    p.add_argument("--params", required=True, action="append", help='JSON: {"backbone", "predict", "mode"}')
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("cam-scales", help="RCM+MAM: CAM mIoU, precision, recall per inference scale (weak mode)")
    p.add_argument("--manifest", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--out-csv", required=True)
    p.add_argument("--params", required=True, action="append", help='JSON: {"backbone", "predict"}')
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=_cmd_cam_scales)

    p = sub.add_parser("crf", help="dense-CRF refinement of one shard of probability maps")
    p.add_argument("--probs", required=True)
    p.add_argument("--manifest", required=True)
    p.add_argument("--out-masks", required=True)
    p.add_argument("--params", required=True, action="append", help="JSON: the crf config section")
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=_cmd_crf)

    p = sub.add_parser("evaluate", help="mIoU & co. of a stage's masks against GT (streaming)")
    p.add_argument("--masks", nargs="+", required=True, help="folders of <image_id>.png masks")
    p.add_argument("--manifest", required=True)
    p.add_argument("--classes", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--out-json", required=True)
    p.add_argument("--out-csv", required=True)
    p.add_argument("--params", required=True, action="append",
                   help='JSON: {"mode", "evaluate", "num_predicted_classes"}')
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("comus-proposals", help="COMUS object proposals and their crops' CLS features")
    p.add_argument("--manifest", required=True)
    p.add_argument("--spectral", nargs="*", default=[], help="spectral shards (proposals without a saliency folder)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--params", required=True, action="append",
                   help='JSON: {"comus", "backbone", "features", "seed"}')
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=_cmd_comus_proposals)

    p = sub.add_parser("comus-pseudo-masks", help="cluster COMUS proposals, filter, write pseudo-masks")
    p.add_argument("--proposals", required=True, help="the comus-proposals folder")
    p.add_argument("--classes", required=True)
    p.add_argument("--out-masks", required=True)
    p.add_argument("--out-dir", required=True, help="clusters.csv, training_images.csv, summary.json")
    p.add_argument("--params", required=True, action="append", help='JSON: {"pseudo_labels", "seed"}')
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=_cmd_comus_pseudo_masks)

    p = sub.add_parser("train-deeplab", help="train DeepLabV3+ on the train split's pseudo-masks")
    p.add_argument("--manifest", required=True)
    p.add_argument("--masks", nargs="+", required=True, help="folders of <image_id>.png pseudo-masks")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--images", help="CSV whose image_id column is the training set (default: the whole train split)")
    p.add_argument("--params", required=True, action="append", help='JSON: {"deeplab", "num_classes", "seed"}')
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=_cmd_train_deeplab)

    p = sub.add_parser("predict-deeplab", help="DeepLab masks of one split")
    p.add_argument("--manifest", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--out-masks", required=True)
    p.add_argument("--params", required=True, action="append", help='JSON: {"deeplab"}')
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=_cmd_predict_deeplab)

    p = sub.add_parser("apply", help="segment a new folder of images with a finished run's model(s)")
    p.add_argument("--model", help="the run's PC2M model (<results>/model/model.pt)")
    p.add_argument("--deeplab-model", help="the run's DeepLab model (<results>/deeplab/model.pt), optional")
    p.add_argument("--images", help="folder of new images (searched recursively; other files ignored)")
    p.add_argument("--out", required=True, help="output folder (masks, probabilities, overlays, report)")
    p.add_argument("--config", nargs="+", default=["config.yaml"],
                   help="the run's config files, merged in order as Snakemake does (default: config.yaml)")
    p.add_argument("--params", action="append",
                   help="JSON or JSON files instead of --config (what the workflow's rules pass)")
    p.add_argument("--step", default="all",
                   help="all (default), or one step: index the folder, predict (one --shard or all), report")
    p.add_argument("--shard", type=int, help="with --step predict: this shard of the index only")
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=_cmd_apply)

    p = sub.add_parser("report", help="tables and plots of every evaluated stage")
    p.add_argument("--eval", nargs="*", default=[],
                   help="eval/<stage>-<split>.json files (none for a dataset without ground truth)")
    p.add_argument("--manifest", required=True)
    p.add_argument("--classes", required=True)
    p.add_argument("--history", help="model/history.csv (COMUS trains no patch classifier: none)")
    p.add_argument("--deeplab-done", help="deeplab/done.json: the report says which DeepLab recipe ran")
    p.add_argument("--cam-scales", help="reports/cam_scales.csv (RCM+MAM, weak mode): a table per inference scale")
    p.add_argument("--done", required=True, help="model/done.json (the method and its classes; alpha.csv beside "
                   "history.csv is plotted when the method wrote one)")
    p.add_argument("--pseudo-labels", help="reports/pseudo_labels.csv (unsupervised mode)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--params", required=True, action="append",
                   help='JSON: {"mode", "qualitative_images", "gallery_images", '
                   '"stage_mask_dirs": [[stage, {split: [folder, ...]}], ...]}')
    p.set_defaults(func=_cmd_report)

    # AffinityNet random walk (pipeline/affinity)
    p = sub.add_parser("train-affinity", help="train AffinityNet on the train split's confident regions")
    p.add_argument("--manifest", required=True)
    p.add_argument("--probs", nargs="+", required=True, help="probability shards (.safetensors) of the train images")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--params", required=True, action="append", help='JSON: {"affinity": {...}, "seed": int}')
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=_cmd_train_affinity)

    p = sub.add_parser("refine-affinity", help="random-walk refinement of one shard of probability maps")
    p.add_argument("--probs", required=True, help="probability shard (.safetensors)")
    p.add_argument("--manifest", required=True)
    p.add_argument("--model", required=True, help="affinity/model.pt")
    p.add_argument("--out-probs", required=True)
    p.add_argument("--out-masks", required=True)
    p.add_argument("--params", required=True, action="append", help='JSON: {"affinity": {...}}')
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=_cmd_refine_affinity)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        args.func(args)
    except PipelineError as exc:
        # A user-fixable problem: one line that names the file or key, no traceback.
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


def end_job(status: int) -> NoReturn:
    """End a job's process with ``status``. Its objects are not worth collecting any more:
    freezing the heap spares the interpreter's final collection over everything torch and timm
    made at import, about 1 s of every job on 2 CPU cores (bench/RESULTS.md, startup). Atexit
    handlers still run (logs are flushed as before) and objects are still released as modules
    are torn down; only reference cycles are left to the operating system. The stages close
    their files themselves."""
    gc.freeze()
    raise SystemExit(status)
