# Config validation, paths and input functions shared by every rule.
import json
import shlex
from pathlib import Path

from snakemake.exceptions import WorkflowError

from pipeline.config import load_schema, validate_config
from pipeline.errors import ConfigError

try:
    validate_config(config, load_schema(workflow.source_path("../schemas/config.schema.yaml")))
except ConfigError as exc:
    raise WorkflowError(f"invalid configuration: {exc}") from None


RESULTS = config["results"].rstrip("/")
DATASET = config["dataset"]


# Stages whose masks are evaluated: name -> folder (one sub-folder per shard, or per split for
# DeepLab), and the splits each is evaluated on (paper 000 Tables 3-4, 11).
MASK_STAGES = {"pc2m": "pc2m/masks", "crf": "crf/masks", "deeplab": "deeplab/masks"}
EVALUATED = {"pc2m": ("train", "val"), "crf": ("train", "val"), "deeplab": ("val",)}


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
    params = {"dataset": DATASET, "on_bad_input": config["on_bad_input"], "seed": config["seed"]}
    if "demo" in input.keys():
        params["demo_root"] = input.demo
    if "coco_train" in input.keys():
        params["coco_masks"] = {"train": input.coco_train, "val": input.coco_val}
    return as_json(params)


def manifest_path():
    return checkpoints.dataset_index.get().output.manifest


def shard_ids():
    """Shard ids present in the manifest (known once the dataset_index checkpoint has run)."""
    import pandas as pd

    shards = pd.read_csv(manifest_path(), usecols=["shard"])["shard"].unique()
    return [f"{int(s):05d}" for s in sorted(shards)]


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


def eval_targets():
    return [results(f"eval/{stage}-{split}.json") for stage, splits in EVALUATED.items() for split in splits]


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
