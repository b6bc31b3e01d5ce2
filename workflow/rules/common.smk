# Config validation, paths and input functions shared by every rule.
import functools
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

from pipeline.config import (
    check_config,
    check_gpu_request,
    command_line_types,
    load_schema,
    results_folder,
    validate_config,
)
from pipeline.compare import compared_folders, run_files
from pipeline.errors import BadInputError, ConfigError
from pipeline.patch_sizes import check_patch_sizes
from pipeline.stage_settings import (
    dataset_roots,
    files_fingerprint,
    hold_results_lock,
    read_text_or_none,
    settings_text,
    split_section,
    write_if_changed,
)

try:
    _SCHEMA = load_schema(workflow.source_path("../schemas/config.schema.yaml"))
    # nested --config values arrive as strings (`--config affinity='{enabled: true}'`)
    config.update(command_line_types(config, _SCHEMA))
    validate_config(config, _SCHEMA)
    check_patch_sizes(config)
    check_config(config)
    # report.compare_with: other runs' results folders (not this run's own, none twice)
    COMPARED = compared_folders(config["report"]["compare_with"], results_folder(config["results"]))
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


def planning_only():
    """Whether this Snakemake invocation only plans or reads (dry run, lint, report, unlock, DAG
    listings): then nothing is locked and no settings file changes. Snakemake does not say it
    while this file is read, so its own command-line parser reads the command line."""
    if Path(sys.argv[0]).name not in ("snakemake", "__main__.py"):
        return False  # called through the API: a real run
    from snakemake.cli import get_argument_parser

    try:
        args, _ = get_argument_parser().parse_known_args(sys.argv[1:])
    except SystemExit:
        return False
    flags = (
        "dryrun",
        "lint",
        "report",
        "unlock",
        "list_rules",
        "list_target_rules",
        "summary",
        "detailed_summary",
        "dag",
        "rulegraph",
        "filegraph",
        "d3dag",
        "print_compilation",
    )
    return any(getattr(args, flag, None) for flag in flags)


PLANNING_ONLY = planning_only()


# One run per results folder, whatever the working directory: the main Snakemake process holds a
# lock on it while it runs (not while it only plans; SLURM jobs re-read this file in another mode).
if workflow.is_main_process and not PLANNING_ONLY:
    try:
        hold_results_lock(RESULTS, os.getcwd())
    except ConfigError as exc:
        raise WorkflowError(str(exc)) from None


# What reruns a stage (pipeline/stage_settings.py): its result settings in
# <results>/settings/<rule>.json, an input of the rule, rewritten only when they change; its
# speed-only keys in <rule>.runtime.json, read by the stage but no input. Only the main process
# writes them (remote jobs read what it wrote).
def section(name):
    """The result keys of a config section (speed-only keys left out)."""
    return split_section(name, config[name])[0]


def without(mapping, keys):
    return {key: value for key, value in mapping.items() if key not in keys}


def runtime_keys(*names):
    return {name: split_section(name, config[name])[1] for name in names}


def settings_file(rule, result, runtime=None):
    """The rule's settings file (an input), written with its runtime file when they changed. A
    dry run (or any planning-only call) leaves them alone: a changed file goes to
    settings/dry-run/, a path of its own, which the plan shows as a rerun exactly as the real run
    will do."""
    path = results(f"settings/{rule}.json")
    if not workflow.is_main_process:
        return path
    if PLANNING_ONLY:
        if settings_text(result) != read_text_or_none(path):
            path = results(f"settings/dry-run/{rule}.json")
            write_if_changed(path, result)
        return path
    write_if_changed(path, result)
    write_if_changed(runtime_file(rule), runtime or {})
    return path


def runtime_file(rule):
    """The rule's speed-only settings (a plain path in params: never a rerun trigger)."""
    return results(f"settings/{rule}.runtime.json")


# Stages that write masks: name -> folder (one sub-folder per shard, or per split for DeepLab),
# and the splits each is evaluated on where they have ground truth (paper 000 Tables 3-4, 11).
MASK_STAGES = {"model": "model/masks", "crf": "crf/masks", "deeplab": "deeplab/masks"}
EVALUATED = {"model": ("train", "val"), "crf": ("train", "val"), "deeplab": ("val",)}
# --- AffinityNet random walk (workflow/rules/affinity.smk) ---------------------------------------
# When enabled, its masks are one more stage, between the predictions and the CRF, and the CRF
# (hence DeepLab) refines the walked probabilities instead of the predicted ones.
AFFINITY_ENABLED = config["affinity"]["enabled"]
if AFFINITY_ENABLED:
    MASK_STAGES = {"model": MASK_STAGES["model"], "affinity": "affinity/masks", **MASK_STAGES}
    EVALUATED = {"model": EVALUATED["model"], "affinity": ("train", "val"), **EVALUATED}
CRF_PROBS = "affinity/probs" if AFFINITY_ENABLED else "model/probs"
# --- end AffinityNet -------------------------------------------------------------------------------
# --- CSRM's CAM baseline (paper 004 Sec. 3.2.6; workflow/rules/model.smk) --------------------------
# CSRM starts from a CAM classifier: the cam_baseline stage's (train.csrm.init: baseline), or a file.
# The baseline's own CAM masks are a stage of the report too (paper 004 Table 2, first row).
CSRM_INIT = config["train"]["csrm"]["init"] if config["train"]["method"] == "csrm" else "none"
CAM_BASELINE = "cam_baseline/model.pt"
if CSRM_INIT == "baseline":
    MASK_STAGES = {"cam_baseline": "cam_baseline/masks", **MASK_STAGES}
    EVALUATED = {"cam_baseline": ("train", "val"), **EVALUATED}
# Trained networks predicted by predict_model (results/{trained}/model.pt)
TRAINED = ("model", "cam_baseline") if CSRM_INIT == "baseline" else ("model",)
# --- end CAM baseline ------------------------------------------------------------------------------
# --- COMUS (paper 002; workflow/rules/comus.smk) ---------------------------------------------------
# When enabled, COMUS replaces the patch classifier and its CRF / DeepLab stages: the masks are those
# of its self-training rounds (DeepLabs predicting every split), each a stage evaluated on train
# and val, the last one the run's final masks.
COMUS = config["comus"]
COMUS_ENABLED = COMUS["enabled"]
COMUS_ROUNDS = list(range(1, COMUS["rounds"] + 1))
if COMUS_ENABLED:
    MASK_STAGES = {f"comus_round{r}": f"comus/round{r}/masks" for r in COMUS_ROUNDS}
    EVALUATED = {stage: ("train", "val") for stage in MASK_STAGES}
# Stages whose masks are one folder per split (DeepLabs) rather than one per shard.
PER_SPLIT_STAGES = {"deeplab", *(f"comus_round{r}" for r in COMUS_ROUNDS)}
# --- end COMUS -------------------------------------------------------------------------------------
TRAIN_SPLIT = "train"


wildcard_constraints:
    shard=r"\d{5}",
    split=r"[A-Za-z0-9_]+",
    stage="|".join(MASK_STAGES),
    trained="|".join(TRAINED),


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


def index_facts(wildcards, input):
    """Paths the index reads that the workflow makes (demo folder, COCO mask cache): job facts."""
    facts = {}
    if "demo" in input.keys():
        facts["demo_root"] = input.demo
    if "coco_train" in input.keys():
        facts["coco_masks"] = {"train": input.coco_train, "val": input.coco_val}
    return as_json(facts)


def index_settings():
    """The index's result settings, with a fingerprint of every file the dataset is read from,
    so that an added, removed, replaced or edited image, mask or list reruns it (computed by the
    main process only: a walk of the dataset's folders)."""
    settings = {
        # the section of the dataset's kind only: another kind's paths change nothing
        "dataset": {
            key: value
            for key, value in DATASET.items()
            if key not in ("demo", "folder", "voc", "coco") or key == DATASET["kind"]
        },
        "on_bad_input": config["on_bad_input"],
        "seed": config["seed"],
        # training reads this split: a dataset without it stops at the index, before any feature
        "required_split": TRAIN_SPLIT,
        # weak mode trains on the dataset's labels: a dataset without any stops at the index
        "require_labels": config["mode"] == "weak",
    }
    if workflow.is_main_process:
        settings["files"] = files_fingerprint(dataset_roots(DATASET))
    return settings


def manifest_path():
    return checkpoints.dataset_index.get().output.manifest


@functools.lru_cache(maxsize=4)
def _split_facts(path, mtime_ns):
    import pandas as pd

    frame = pd.read_csv(
        path, usecols=["split", "mask_path", "shard"], dtype={"mask_path": str}, keep_default_na=False, na_filter=False
    )
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


def shard_list(wildcards):
    """The rows of one shard (dataset/shards/shard-NNNNN.csv, written by the index only when they
    change): a per-shard job reads it instead of the whole manifest, so images added elsewhere do
    not rerun it. Asking the checkpoint first ties the list to the index job that writes it."""
    return str(Path(manifest_path()).parent / "shards" / f"shard-{wildcards.shard}.csv")


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
    """Splits a stage writes masks for: every split (sharded stages, COMUS rounds: round r + 1
    trains on round r's train masks), or DeepLab's."""
    return deeplab_splits() if stage == "deeplab" else list(dataset_facts()[0])


def sharded(stage):
    """Every shard file of a sharded stage (features, spectral, segment_features)."""
    return expand(results(f"{stage}/shard-{{shard}}.safetensors"), shard=shard_ids())


def sharded_dirs(stage_dir):
    """Every per-shard output folder of a sharded stage that writes masks."""
    return expand(results(f"{stage_dir}/shard-{{shard}}"), shard=shard_ids())


def mask_dirs(stage, split):
    """The folders holding a stage's masks for ``split``."""
    if stage in PER_SPLIT_STAGES:
        return [results(f"{MASK_STAGES[stage]}/{split}")]
    return sharded_dirs(MASK_STAGES[stage])


def all_mask_dirs(stage):
    """Every mask folder of a stage, whatever the split."""
    if stage in PER_SPLIT_STAGES:
        return [d for split in stage_splits(stage) for d in mask_dirs(stage, split)]
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


def compared_inputs():
    """The files the report reads from each run of report.compare_with: its model/done.json and
    eval/*.json. This workflow does not make another run's files, so a folder without them
    stops the plan here with a message saying what to run, not as a missing input of no rule."""
    files = []
    for folder in COMPARED:
        try:
            done, evals = run_files(folder)
        except BadInputError as exc:
            raise WorkflowError(f"config key report.compare_with: {exc}") from None
        files += [str(done), *map(str, evals)]
    return files


def cam_scale_inputs():
    """The CAM table per inference scale: RCM+MAM in weak mode with GT masks on train."""
    wanted = config["train"]["method"] == "rcm_mam" and config["mode"] == "weak"
    return [results("reports/cam_scales.csv")] if wanted and TRAIN_SPLIT in splits_with_gt() else []


def model_classes(input):
    """Classes a trained segmentation model predicts: the dataset's (weak) or clusters + 1."""
    if config["mode"] == "unsupervised":
        return predicted_classes(input)
    return json.loads(Path(input.classes).read_text())["num_classes"]


def weights_input():
    """The backbone's weights file, when it is one: changing it reruns what depends on it."""
    weights = config["backbone"]["weights"]
    return [] if weights in ("random", "timm") else [weights]


# train's sub-sections that belong to one method each; CSRM also reads its CAM classifier's.
METHOD_SECTIONS = {"vitpcm": ("vitpcm",), "rcm_mam": ("rcm_mam",), "cam": ("cam",), "csrm": ("csrm", "cam")}


def train_section():
    """The train section of the train_model job: without the other methods' sub-sections (tuning
    one method never retrains another); CSRM's init `baseline` becomes the path of the
    cam_baseline stage's model."""
    train = section("train")
    own = METHOD_SECTIONS.get(train["method"], ())
    others = {name for names in METHOD_SECTIONS.values() for name in names} - set(own)
    train = without(train, others)
    if CSRM_INIT == "baseline":
        train = {**train, "csrm": {**train["csrm"], "init": results(CAM_BASELINE)}}
    return train


def cam_baseline_section():
    """The train section of the cam_baseline job: the CAM method with train.cam's length and batch."""
    train = section("train")
    cam = train["cam"]
    return {"method": "cam", "epochs": cam["epochs"], "batch_size": cam["batch_size"], "cam": cam}


def train_inputs(wildcards):
    inputs = training_data_inputs(wildcards)
    if CSRM_INIT != "none":
        inputs["init"] = results(CAM_BASELINE) if CSRM_INIT == "baseline" else CSRM_INIT
    return inputs


def training_data_inputs(wildcards):
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
    inputs = {"manifest": shard_list(wildcards), "model": results(f"{wildcards.trained}/model.pt")}
    if config["mode"] == "unsupervised":
        inputs["labels"] = results("pseudo_labels/image_labels.csv")
    return inputs


def pseudo_summary_input():
    """The clustering's summary (its number of clusters) in unsupervised mode: COMUS's or PC2M's."""
    if config["mode"] != "unsupervised":
        return []
    return [results("comus/summary.json" if COMUS_ENABLED else "pseudo_labels/summary.json")]


def predicted_classes(input):
    """Ids a stage can predict in unsupervised mode: background + one per cluster (for matching)."""
    if config["mode"] != "unsupervised":
        return None
    return json.loads(Path(input.pseudo_summary[0]).read_text())["num_clusters"] + 1


def final_targets(wildcards):
    """What `snakemake` builds by default: the last stage of the mode's DAG built so far."""
    return [results("reports/summary.md")]


# DeepLab (deeplab.smk): keys that only steer prediction (training ignores them) and the one that only says which splits
# are predicted (no prediction changes with it).
DEEPLAB_TEST_KEYS = ("predict_splits", "pad_to", "test_scales", "test_flip")


def deeplab_train_section():
    """The `deeplab` keys training reads: the chosen recipe's block only, so that editing another
    recipe does not retrain."""
    cfg = without(section("deeplab"), DEEPLAB_TEST_KEYS)
    recipe = cfg["recipe"]
    return {**cfg, "recipes": {recipe: cfg["recipes"][recipe]} if recipe in cfg["recipes"] else {}}


# --- COMUS (workflow/rules/comus.smk) ---------------------------------------------------------


def comus_round_section(round_number):
    """Round ``round_number``'s DeepLab training keys: deeplab's, its length comus.epochs[r-1]."""
    epochs = COMUS["epochs"][round_number - 1]
    return {**deeplab_train_section(), "iterations": None, "epochs": epochs}


def comus_round_masks(wildcards):
    """What round r trains on: the pseudo-masks (round 1), round r-1's train-split predictions."""
    previous = int(wildcards.round) - 1
    if previous == 0:
        return {"masks": results("comus/pseudo_masks"), "images": results("comus/training_images.csv")}
    return {"masks": results(f"comus/round{previous}/masks/train")}
