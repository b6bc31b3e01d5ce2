# Paths and input functions of the apply rules (workflow/rules/apply.smk).
from pipeline.apply import apply_params
from pipeline.apply import shard_ids as apply_shard_ids

APPLY = config["apply"]
APPLY_DIR = results(f"apply/{APPLY['name']}")


def apply_index_settings():
    """The new folder's index settings, with its files' fingerprint: new or edited images rerun it."""
    settings = apply_params(config, ["index"])
    if workflow.is_main_process and APPLY["images"]:
        settings["files"] = files_fingerprint([APPLY["images"]])
    return settings


def applied(path):
    return f"{APPLY_DIR}/{path}"


def apply_images(wildcards):
    if not APPLY["images"]:
        raise WorkflowError("config key apply.images must name the folder of new images for the apply target")
    return APPLY["images"]


def applied_models():
    """PC2M always; DeepLab per apply.deeplab (auto: only a model the run has already trained)."""
    wanted = APPLY["deeplab"]
    if wanted == "auto":
        wanted = Path(results("deeplab/model.pt")).is_file()
    return ["model", "deeplab"] if wanted else ["model"]


def run_model_inputs(model):
    """The run's trained model, and what says how many classes it predicts (model_classes)."""
    inputs = {"model": results(f"{model}/model.pt"), "classes": results("dataset/classes.json")}
    if config["mode"] == "unsupervised":
        inputs["pseudo_summary"] = [results("pseudo_labels/summary.json")]
    return inputs


def applied_shards(path):
    """``path`` (with {shard}) for every shard of the new folder's index."""
    manifest = checkpoints.apply_index.get().output.manifest
    return [applied(path.format(shard=f"{shard:05d}")) for shard in apply_shard_ids(manifest)]


def applied_outputs(wildcards):
    """Per model applied: the run's model file and the overlays of every shard (after apply_index)."""
    inputs = {}
    for model in applied_models():
        inputs[f"{model}_model"] = results(f"{model}/model.pt")
        inputs[f"{model}_overlays"] = applied_shards(f"{model}/overlays/shard-{{shard}}")
    return inputs
