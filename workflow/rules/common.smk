# Config validation, paths and input functions shared by every rule.
import functools
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

from snakemake.exceptions import WorkflowError

from pipeline.config import check_config, check_gpu_request, load_schema, results_folder, validate_config
from pipeline.errors import ConfigError

try:
    validate_config(config, load_schema(workflow.source_path("../schemas/config.schema.yaml")))
    check_config(config)
except ConfigError as exc:
    raise WorkflowError(f"invalid configuration: {exc}") from None


# The rules run `python -m pipeline ...`. The package is imported from the workflow's own source
# folder, whatever the working directory (`--directory`) and also inside conda envs (which drop
# the user's PYTHONPATH): the prefix below is prepended to every shell command. It is not part of
# the rules' text, so moving the checkout does not rerun anything (envs/README.md).
_SOURCE = workflow.basedir.replace("{", "{{").replace("}", "}}")
shell.prefix(
    ("set -euo pipefail; " if (shell.get_executable() or "bash").endswith("bash") else "")
    + f"export PYTHONPATH={shlex.quote(_SOURCE)}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; "
)


# GPUs. Snakemake counts them as the resource `gpu`: every GPU rule asks for GPUS_PER_JOB (or
# TRAIN_GPUS) units, and a local run offers as many units as this machine has GPUs, so at most
# that many GPU jobs run at once; each job then claims a GPU no other job holds
# (pipeline/devices.py). `--resources gpu=N` on the command line wins. Remote executors (SLURM:
# `--jobs` sets nodes) get no global limit: the profile sets `gpu` per rule and SLURM allocates it.
def detected_gpus():
    """GPUs this process may use: `nvidia-smi -L`'s count, capped by CUDA_VISIBLE_DEVICES."""
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return 0
    count = sum(line.startswith("GPU ") for line in listing.stdout.splitlines()) if listing.returncode == 0 else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        entries = [v for v in visible.split(",") if v.strip()]
        count = 0 if entries[:1] in ([], ["-1"]) else min(count, len(entries))
    return count


def gpus_setting(key, default):
    value = config.get("compute", {}).get(key, "auto")
    return default if value == "auto" else int(value)


GPUS = detected_gpus()
GPUS_PER_JOB = gpus_setting("gpus_per_job", 1 if GPUS else 0)
TRAIN_GPUS = gpus_setting("train_gpus", GPUS_PER_JOB)
if workflow.nodes is None and not workflow.remote_exec and "gpu" not in workflow.global_resources:
    try:
        check_gpu_request(config.get("compute", {}), GPUS)
    except ConfigError as exc:
        raise WorkflowError(f"invalid configuration: {exc}") from None
    workflow.register_resource("gpu", GPUS)


RESULTS = results_folder(config["results"])
DATASET = config["dataset"]


# Stages that write masks: name -> folder (one sub-folder per shard, or per split for DeepLab),
# and the splits each is evaluated on where they have ground truth (paper 000 Tables 3-4, 11).
MASK_STAGES = {"pc2m": "pc2m/masks", "crf": "crf/masks", "deeplab": "deeplab/masks"}
EVALUATED = {"pc2m": ("train", "val"), "crf": ("train", "val"), "deeplab": ("val",)}
TRAIN_SPLIT = "train"


wildcard_constraints:
    shard=r"\d{5}",
    split=r"[A-Za-z0-9_]+",
    stage="|".join(MASK_STAGES),


def as_json(obj):
    """Stage parameters as one JSON string: passed quoted ({params.x:q}) to `python -m pipeline`."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def results(path):
    return f"{RESULTS}/{path}"


def index_inputs(wildcards):
    kind = DATASET["kind"]
    if kind == "demo":
        return {"demo": rules.demo_data.output[0]}
    if kind == "coco":
        cache = DATASET["coco"]["masks_cache"]
        return {"coco_train": f"{cache}/train", "coco_val": f"{cache}/val"}
    if kind == "voc":
        # Named as inputs so that a missing download is reported before any job runs.
        voc = DATASET["voc"]
        lists = {"voc_val_list": f"{voc['root']}/ImageSets/Segmentation/{voc['val_split']}.txt"}
        if voc["train_split"] == "trainaug":
            lists["voc_train_list"] = voc["trainaug_list"]
        else:
            lists["voc_train_list"] = f"{voc['root']}/ImageSets/Segmentation/{voc['train_split']}.txt"
        return lists
    images = DATASET.get("folder", {}).get("images")
    if not images:
        raise WorkflowError("config key dataset.folder.images must name a folder when dataset.kind is folder")
    return {"folder_images": images}


def index_params(wildcards, input):
    params = {
        "dataset": DATASET,
        "on_bad_input": config["on_bad_input"],
        "seed": config["seed"],
        # training reads this split: a dataset without it stops at the index, before any feature
        "required_split": TRAIN_SPLIT,
        # weak mode trains on the dataset's labels: a dataset without any stops at the index
        "require_labels": config["mode"] == "weak",
    }
    if "demo" in input.keys():
        params["demo_root"] = input.demo
    if "coco_train" in input.keys():
        params["coco_masks"] = {"train": input.coco_train, "val": input.coco_val}
    return as_json(params)


def manifest_path():
    return checkpoints.dataset_index.get().output.manifest


@functools.lru_cache(maxsize=4)
def _split_facts(path, mtime_ns):
    import pandas as pd

    frame = pd.read_csv(path, usecols=["split", "mask_path", "shard"], dtype={"mask_path": str},
                        keep_default_na=False, na_filter=False)
    with_gt = frame["mask_path"] != ""
    splits = {
        split: {"images": int(len(rows)), "with_gt": int(with_gt[rows.index].sum())}
        for split, rows in frame.groupby("split", sort=True)
    }
    shards = [f"{int(s):05d}" for s in sorted(frame["shard"].unique())]
    return splits, shards


def dataset_facts():
    """({split: {"images", "with_gt"}}, shard ids) of the indexed dataset. Known once the
    dataset_index checkpoint has run: an input function calling this makes Snakemake run the
    index first, which is how a target such as `features` works from an empty results folder."""
    path = manifest_path()
    return _split_facts(path, os.stat(path).st_mtime_ns)


def shard_ids():
    """Shard ids present in the manifest."""
    return dataset_facts()[1]


def splits_with_gt():
    return [split for split, facts in dataset_facts()[0].items() if facts["with_gt"]]


def deeplab_splits():
    """Splits DeepLab predicts: `deeplab.predict_splits` that the dataset has; when it has none of
    them (a one-split folder), every split, so that every image gets a final mask."""
    present = list(dataset_facts()[0])
    wanted = [split for split in config["deeplab"]["predict_splits"] if split in present]
    return wanted or present


def stage_splits(stage):
    """Splits a stage writes masks for: every split (sharded stages), or DeepLab's."""
    return deeplab_splits() if stage == "deeplab" else list(dataset_facts()[0])


def sharded(stage):
    """Every shard file of a sharded stage (features, spectral, segment_features)."""
    return expand(results(f"{stage}/shard-{{shard}}.safetensors"), shard=shard_ids())


def sharded_dirs(stage_dir):
    """Every per-shard output folder of a sharded stage that writes masks."""
    return expand(results(f"{stage_dir}/shard-{{shard}}"), shard=shard_ids())


def mask_dirs(stage, split):
    """The folders holding a stage's masks for ``split``."""
    if stage == "deeplab":
        return [results(f"{MASK_STAGES[stage]}/{split}")]
    return sharded_dirs(MASK_STAGES[stage])


def all_mask_dirs(stage):
    """Every mask folder of a stage, whatever the split."""
    if stage == "deeplab":
        return [d for split in deeplab_splits() for d in mask_dirs(stage, split)]
    return sharded_dirs(MASK_STAGES[stage])


def eval_targets():
    """One evaluation per (stage, split) the stage is evaluated on and that has ground truth and
    predictions; none at all for a dataset without masks (the report then describes the clusters)."""
    with_gt = splits_with_gt()
    return [
        results(f"eval/{stage}-{split}.json")
        for stage, splits in EVALUATED.items()
        for split in splits
        if split in with_gt and split in stage_splits(stage)
    ]


def model_classes(input):
    """Classes a trained segmentation model predicts: the dataset's (weak) or clusters + 1."""
    if config["mode"] == "unsupervised":
        return predicted_classes(input)
    return json.loads(Path(input.classes).read_text())["num_classes"]


def weights_input():
    """The backbone's weights file, when it is one: changing it reruns what depends on it."""
    weights = config["backbone"]["weights"]
    return [] if weights in ("random", "timm") else [weights]


def train_inputs(wildcards):
    inputs = {
        "manifest": results("dataset/manifest.csv"),
        "classes": results("dataset/classes.json"),
        "weights": weights_input(),
    }
    if config["mode"] == "unsupervised":
        inputs["labels"] = results("pseudo_labels/image_labels.csv")
        inputs["pseudo_summary"] = results("pseudo_labels/summary.json")
    return inputs


def predict_inputs(wildcards):
    inputs = {"manifest": results("dataset/manifest.csv"), "model": results("pc2m/model.pt")}
    if config["mode"] == "unsupervised":
        inputs["labels"] = results("pseudo_labels/image_labels.csv")
    return inputs


def predicted_classes(input):
    """Ids a stage can predict in unsupervised mode: background + one per cluster (for matching)."""
    if config["mode"] != "unsupervised":
        return None
    return json.loads(Path(input.pseudo_summary[0]).read_text())["num_clusters"] + 1


def final_targets(wildcards):
    """What `snakemake` builds by default: the last stage of the mode's DAG built so far."""
    return [results("reports/summary.md")]
