"""Configuration validation against the workflow's JSON schema, with messages that name the key.

``snakemake.utils.validate`` reports a failure as a jsonschema dump; users editing YAML want the
dotted key and what is wrong with it, so the workflow calls :func:`validate_config` instead.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from pipeline.datasets.common import is_within
from pipeline.errors import ConfigError
from pipeline.stage_settings import merge_params


def require_fields(cls, section: Mapping[str, Any], name: str) -> None:
    """ConfigError naming every key of config section ``name`` that the settings dataclass ``cls``
    needs (fields without a default) and the stage's ``--params`` lack."""
    needed = [f.name for f in dataclasses.fields(cls)
              if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [key for key in needed if key not in section]
    if missing:
        raise ConfigError(f"--params lack key(s) {', '.join(f'{name}.{key}' for key in missing)}")


def load_schema(path: str | Path) -> dict:
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def _dotted(path) -> str:
    return ".".join(str(part) for part in path) or "<top level>"


def _describe(error: jsonschema.ValidationError) -> str:
    where = _dotted(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed))
        keys = ", ".join(f"{where}.{k}" if error.absolute_path else k for k in unknown)
        return f"unknown config key {keys} (allowed here: {', '.join(allowed)})"
    if error.validator == "required":
        return f"config key {where}: {error.message}"
    return f"config key {where}: {error.message}"


def command_line_types(value: Any, schema: dict) -> Any:
    """``value`` with string leaves typed as the schema says. Snakemake reads a nested ``--config``
    value (``--config affinity='{enabled: true, epochs: 1}'``) with YAML's BaseLoader, which
    makes every leaf a string; a leaf whose schema type is boolean, integer, number or null and
    whose text reads as one becomes that value (anything else stays, and validation names it)."""
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        return {key: command_line_types(item, properties.get(key, {})) for key, item in value.items()}
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [command_line_types(item, schema["items"]) for item in value]
    if not isinstance(value, str):
        return value
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else types
    text = value.strip()
    if "boolean" in types and text.lower() in ("true", "false"):
        return text.lower() == "true"
    if "null" in types and text in ("null", "~"):
        return None
    for name, kind in (("integer", int), ("number", float)):
        if name in types:
            try:
                return kind(text)
            except ValueError:
                pass
    return value


def validate_config(config: dict[str, Any], schema: dict) -> None:
    """Raise :class:`ConfigError` for the first problem (deepest path first), naming the key."""
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (-len(e.absolute_path), str(e.absolute_path)))
    if errors:
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise ConfigError(_describe(errors[0]) + more)


SCHEMA = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


def load_config(paths: list[str | Path]) -> dict:
    """The configuration of YAML files merged in order (config.yaml first, then presets), validated.

    For commands run without Snakemake (``python -m pipeline apply``) that need a run's settings."""
    config: dict[str, Any] = {}
    for path in paths:
        try:
            with open(path, encoding="utf-8") as fh:
                loaded = yaml.safe_load(fh) or {}
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the config file ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: not a mapping of config keys")
        config = merge_params([config, loaded])
    validate_config(config, load_schema(SCHEMA))
    return config


# ---------------------------------------------------------------------------------------------
# Checks across keys that the schema cannot express. Each one stops a run at parse time that
# would otherwise fail (or quietly go wrong) after hours of features and training.


def results_folder(value: str) -> str:
    """``results`` as the workflow uses it: ``~`` expanded (YAML leaves it literal, and the rules
    would create a folder named ``~``), no trailing slash. A file-system root, the home folder or
    any folder above it is refused: the run writes (and replaces) sub-folders there."""
    path = os.path.expanduser(value)
    if path.startswith("~"):
        raise ConfigError(f"config key results: {value!r}: unknown user in {path.split('/')[0]!r}")
    real = os.path.realpath(path)
    home = os.path.realpath(os.path.expanduser("~"))
    if real == os.path.dirname(real) or is_within(home, real):
        raise ConfigError(f"config key results: {value!r} is {real}, a root or home folder (or above it); "
                          "name a folder for this run's artifacts, e.g. results/")
    return path.rstrip("/") or path



def check_config(config: dict[str, Any]) -> None:
    """Cross-key checks of a schema-valid config; ConfigError naming the keys."""
    results = os.path.realpath(results_folder(config["results"]))
    dataset = config["dataset"]
    folder = dataset.get("folder") or {}
    if dataset["kind"] == "folder" and folder.get("images"):
        images = os.path.realpath(os.path.expanduser(folder["images"]))
        # The next index would take the run's own masks and figures for images.
        if is_within(results, images):
            raise ConfigError(f"config key results ({results}) lies inside dataset.folder.images ({images}): "
                              "move results outside the images folder")
    if (config["mode"] == "unsupervised" and dataset["kind"] == "folder"
            and config["pseudo_labels"].get("num_clusters") is None
            and folder.get("num_classes") is None and folder.get("class_names") is None):
        raise ConfigError("unsupervised mode needs a number of clusters: set pseudo_labels.num_clusters "
                          "(or dataset.folder.num_classes / dataset.folder.class_names)")
    comus = config.get("comus") or {}
    if comus.get("enabled"):
        if config["mode"] != "unsupervised":
            raise ConfigError("comus.enabled: COMUS is an unsupervised method; set mode: unsupervised")
        if len(comus["epochs"]) != comus["rounds"]:
            raise ConfigError(f"comus.epochs: one length per round (comus.rounds is {comus['rounds']}), "
                              f"got {comus['epochs']}")


def check_gpu_request(compute: dict[str, Any], detected: int) -> None:
    """A local run asking for GPUs on a machine that has none would run every GPU stage on the
    CPU without a word (``auto`` adapts; an explicit count is a request). Not for remote
    executors: a SLURM submit host may have no GPU while its compute nodes do."""
    if detected:
        return
    for key in ("gpus_per_job", "train_gpus"):
        value = compute.get(key, "auto")
        if value != "auto" and int(value) > 0:
            raise ConfigError(f"config key compute.{key} is {value} but this machine has no GPU (nvidia-smi finds "
                              "none, or CUDA_VISIBLE_DEVICES hides them): set it to auto or 0 to run on the CPU, "
                              "or pass --resources gpu=N if the GPUs are there")
