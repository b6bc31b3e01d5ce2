"""Sizes the backbone's patch constrains: rounded to the nearest multiple (logged) or refused with
one line naming the key, the value and the patch size, for every listed backbone and preset."""

from __future__ import annotations

import logging

import pytest
import yaml

from pipeline.backbone import build_backbone, patch_size
from pipeline.errors import ConfigError
from pipeline.patch_sizes import check_patch_sizes, fit_to_patch, fit_view_sizes, patch_size_of
from pipeline.stage_settings import merge_params
from workflow_runs import with_values

BACKBONES = {
    "vit_small_patch16_224.dino": 16,
    "vit_small_patch8_224.dino": 8,
    "vit_base_patch16_224.dino": 16,
    "vit_base_patch8_224.dino": 8,
    "vit_small_patch14_dinov2": 14,
    "vit_base_patch14_dinov2": 14,
}
PRESETS = ["voc-weak", "voc-unsupervised", "coco-weak", "coco-unsupervised"]
TINY = {"depth": 1, "embed_dim": 24, "num_heads": 2}


@pytest.mark.parametrize("name", BACKBONES)
def test_patch_size_from_the_name_is_the_built_models(name):
    assert patch_size_of(name) == BACKBONES[name]
    assert patch_size(build_backbone(name, "random", model_kwargs=TINY)) == BACKBONES[name]


def test_model_kwargs_patch_size_overrides_the_name():
    assert patch_size_of("vit_small_patch16_224.dino", {"patch_size": 14}) == 14
    assert patch_size_of("vit_small_patch16_224.dino", {"patch_size": [8, 8]}) == 8
    assert patch_size_of("some_model_without_patch_in_its_name") is None
    with pytest.raises(ConfigError, match=r"^backbone.model_kwargs.patch_size: \[8, 16\] is not square"):
        patch_size_of("vit_small_patch16_224.dino", {"patch_size": [8, 16]})


@pytest.mark.parametrize(("value", "patch", "expected"), [
    (128, 14, 126), (64, 14, 70), (384, 14, 378), (192, 14, 196), (48, 14, 42), (224, 14, 224),
    (50, 16, 48), (56, 16, 64), (21, 14, 28), (14, 14, 14), (128, 16, 128), (130, 8, 128),
])
def test_rounds_to_the_nearest_multiple_ties_up(value, patch, expected):
    assert fit_to_patch("train.global_size", value, patch) == expected


def test_the_log_names_key_value_rounded_value_and_patch(caplog):
    with caplog.at_level(logging.INFO, logger="pipeline.patch_sizes"):
        fit_to_patch("train.global_size", 128, 14)
        fit_to_patch("train.local_size", 70, 14)
    assert [r.getMessage() for r in caplog.records] == [
        "train.global_size: 128 is not a multiple of 14 (patch size 14); using 126"
    ]


@pytest.mark.parametrize("value", [1, 13])
def test_smaller_than_one_patch_is_refused(value):
    with pytest.raises(ConfigError) as info:
        fit_to_patch("train.local_size", value, 14)
    assert str(info.value) == f"train.local_size: {value} is smaller than one patch of the backbone (patch size 14)"


def test_vitpcm_global_view_is_rounded_to_twice_the_patch_and_its_crop_to_the_patch():
    assert fit_view_sizes("vitpcm", 128, 64, 48, 14) == (140, 70, 42)
    assert fit_view_sizes("vitpcm", 384, 192, 128, 14) == (392, 196, 126)
    # PC2M has no ET crop: the value is left alone, however odd.
    assert fit_view_sizes("pc2m", 128, 64, 5, 14) == (126, 70, 5)


def test_vitpcm_crop_larger_than_the_rounded_view_is_refused():
    # 41 -> 28 (2 x 14), its crop 41 -> 42.
    with pytest.raises(ConfigError) as info:
        fit_view_sizes("vitpcm", 41, 28, 41, 14)
    assert str(info.value) == ("train.vitpcm.crop_size: 41 (rounded to 42 for patch size 14) is larger than "
                               "train.global_size 41 (rounded to 28)")
    # Larger as configured, though not once rounded: still refused, as the training job would.
    with pytest.raises(ConfigError, match=r"^train.vitpcm.crop_size: 130 \(rounded to 126 for patch size 14\)"):
        fit_view_sizes("vitpcm", 128, 64, 130, 14)


@pytest.mark.parametrize("preset", [None, *PRESETS])
@pytest.mark.parametrize("method", ["pc2m", "vitpcm"])
@pytest.mark.parametrize("name", BACKBONES)
def test_every_backbone_works_with_the_defaults_and_every_preset(repo, default_config, preset, method, name):
    config = default_config
    if preset is not None:
        config = merge_params([config, yaml.safe_load((repo / "presets" / f"{preset}.yaml").read_text())])
    config = with_values(config, backbone__name=name, train__method=method, mode="unsupervised")
    patch = BACKBONES[name]
    sizes = check_patch_sizes(config)
    expected_keys = {"train.global_size", "train.local_size", "segment_features.crop_size"}
    assert set(sizes) == expected_keys | ({"train.vitpcm.crop_size"} if method == "vitpcm" else set())
    for key, value in sizes.items():
        section, *rest = key.split(".")
        configured = config[section]
        for part in rest:
            configured = configured[part]
        step = 2 * patch if (key, method) == ("train.global_size", "vitpcm") else patch
        assert value % step == 0 and abs(value - configured) <= step // 2, (key, configured, value)


def test_weak_mode_does_not_check_the_unused_segment_crops(default_config):
    sizes = check_patch_sizes(with_values(default_config, mode="weak"))
    assert "segment_features.crop_size" not in sizes


def test_a_name_without_patch_size_is_left_to_the_stages(default_config):
    assert check_patch_sizes(with_values(default_config, backbone__name="my_local_vit")) == {}


# Every key a backbone's patch can make impossible. A 32 px patch (model_kwargs.patch_size) lets
# values the schema accepts fall below one patch.
@pytest.mark.parametrize(("key", "value"), [
    ("features__max_size", 16),
    ("predict__max_size", 31),
    ("segment_features__crop_size", 20),
    ("train__global_size", 30),
    ("train__local_size", 8),
    ("train__vitpcm__crop_size", 16),
])
def test_each_impossible_key_is_named_with_its_value_and_the_patch(default_config, key, value):
    values = {"backbone__model_kwargs": {"patch_size": 32}, "train__method": "vitpcm", key: value}
    config = with_values(default_config, **values)
    with pytest.raises(ConfigError) as info:
        check_patch_sizes(config)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{key.replace('__', '.')}: {value} ") and "patch size 32" in message
