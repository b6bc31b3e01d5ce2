"""Configuration validation against the workflow's JSON schema, with messages that name the key.

``snakemake.utils.validate`` reports a failure as a jsonschema dump; users editing YAML want the
dotted key and what is wrong with it, so the workflow calls :func:`validate_config` instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import yaml

from pipeline.errors import ConfigError


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


def validate_config(config: dict[str, Any], schema: dict) -> None:
    """Raise :class:`ConfigError` for the first problem (deepest path first), naming the key."""
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (-len(e.absolute_path), str(e.absolute_path)))
    if errors:
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise ConfigError(_describe(errors[0]) + more)


SCHEMA = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


def merged(base: dict, override: dict) -> dict:
    """``override`` laid over ``base`` section by section, as Snakemake merges ``--configfile``s."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


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
        config = merged(config, loaded)
    validate_config(config, load_schema(SCHEMA))
    return config
