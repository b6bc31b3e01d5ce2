"""The config schema accepts the shipped configs and names the key of every mistake."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import check_config, load_schema, validate_config
from pipeline.errors import ConfigError


@pytest.fixture(scope="module")
def schema(repo):
    return load_schema(repo / "workflow/schemas/config.schema.yaml")


def _merge(base: dict, override: dict) -> dict:
    """Recursive merge, as Snakemake merges --configfile over the default config."""
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def test_default_config_is_valid(default_config, schema):
    validate_config(default_config, schema)


@pytest.mark.parametrize("preset", sorted(p.stem for p in (Path(__file__).parents[1] / "presets").glob("*.yaml")))
def test_presets_are_valid(repo, default_config, schema, preset):
    with open(repo / "presets" / f"{preset}.yaml", encoding="utf-8") as fh:
        override = yaml.safe_load(fh)
    merged = _merge(default_config, override)
    validate_config(merged, schema)
    assert merged["dataset"]["kind"] in preset
    assert merged["mode"] == ("weak" if "weak" in preset else "unsupervised")
    check_config(merged)


def test_the_rcm_mam_preset_has_the_papers_values(repo, default_config):
    override = yaml.safe_load((repo / "presets" / "voc-weak-rcm.yaml").read_text(encoding="utf-8"))
    merged = _merge(default_config, override)
    train, rcm = merged["train"], merged["train"]["rcm_mam"]
    # paper 003 Sec. 4.2 and App. B-C
    assert (train["method"], train["epochs"], train["batch_size"]) == ("rcm_mam", 20, 16)
    assert (rcm["backbone"], rcm["crop_size"], rcm["resize_range"], rcm["lr"], rcm["lr_power"]) == (
        "resnet38", 192, [0.5, 1.3], 0.01, 0.9)
    assert (rcm["threshold"], rcm["temperature"], rcm["ema_momentum"], rcm["feature_dim"]) == (0.2, 0.5, 0.997, 256)
    assert rcm["scales"] == [0.5, 1.0, 2.0] and rcm["mam_start_epoch"] == 6
    assert merged["predict"]["rcm_mam"]["scales"] == [0.5, 1.0, 1.5, 2.0] and merged["predict"]["flip"]
    assert merged["affinity"]["enabled"]  # Sec. 4.3: the random walk before DeepLab


def test_unknown_top_level_key_is_named(default_config, schema):
    default_config["sed"] = 1
    with pytest.raises(ConfigError, match=r"unknown config key sed\b"):
        validate_config(default_config, schema)


def test_unknown_nested_key_is_named_with_its_path(default_config, schema):
    default_config["features"]["max_sise"] = 448
    with pytest.raises(ConfigError, match=r"features\.max_sise"):
        validate_config(default_config, schema)


@pytest.mark.parametrize(
    ("path", "value", "named"),
    [
        (("dataset", "images_per_shard"), "many", "dataset.images_per_shard"),
        (("seed",), 1.5, "seed"),
        (("features", "keep"), ["keys", "attn"], "features.keep.1"),
        (("features", "fit"), "stretch", "features.fit"),
        (("on_bad_input",), "ignore", "on_bad_input"),
        (("features", "device"), "gpu0", "features.device"),
    ],
)
def test_wrong_type_or_value_is_named(default_config, schema, path, value, named):
    node = default_config
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ConfigError) as info:
        validate_config(default_config, schema)
    assert f"config key {named}:" in str(info.value)


def test_nested_command_line_values_get_the_schemas_types(repo, default_config):
    # what Snakemake makes of `--config affinity='{enabled: true, epochs: 3, lr: 1e-2}'` (YAML BaseLoader)
    from pipeline.config import command_line_types

    schema = load_schema(repo / "workflow" / "schemas" / "config.schema.yaml")
    default_config["affinity"].update(enabled="true", epochs="3", lr="1e-2", device="cpu")
    default_config["folder_typo"] = "1"
    typed = command_line_types(default_config, schema)
    assert typed["affinity"]["enabled"] is True and typed["affinity"]["epochs"] == 3
    assert typed["affinity"]["lr"] == pytest.approx(0.01) and typed["affinity"]["device"] == "cpu"
    assert typed["folder_typo"] == "1"  # unknown keys stay as they are (validation names them)
    default_config["affinity"]["epochs"] = "three"
    with pytest.raises(ConfigError, match="affinity.epochs"):
        validate_config(command_line_types(default_config, schema), schema)


@pytest.mark.parametrize("ablation", ["vit-s16", "no-ot", "no-match"])
def test_table_1_ablation_overlays_are_valid_on_the_weak_preset(repo, default_config, schema, ablation):
    layers = [repo / "presets" / "voc-weak.yaml", repo / "presets" / "ablations" / "vit-s16.yaml",
              repo / "presets" / "ablations" / f"{ablation}.yaml"]
    merged = default_config
    for layer in layers:
        merged = _merge(merged, yaml.safe_load(layer.read_text(encoding="utf-8")))
    validate_config(merged, schema)
    check_config(merged)
    assert merged["backbone"]["name"].startswith("vit_small_patch16_384")
    assert (merged["train"]["use_ot"], merged["train"]["use_match"]) == (ablation != "no-ot", ablation != "no-match")


def test_the_vitpcm_preset_follows_its_official_code(repo, default_config):
    merged = _merge(default_config, yaml.safe_load((repo / "presets" / "voc-weak-vitpcm.yaml").read_text()))
    assert merged["train"]["method"] == "vitpcm" and merged["backbone"]["name"].endswith("orig_in21k_ft_in1k")
    assert (merged["train"]["epochs"], merged["train"]["batch_size"], merged["predict"]["max_size"]) == (80, 64, 960)
