"""Label-free means label-free (issue 14): no unsupervised preset or default starts any network
(the PC2M backbone, the DeepLab backbone / initialisation) from weights trained with human labels.
Self-supervised DINO weights only: DINO ViTs, the DINO ResNet-50.

config.yaml and every presets/*.yaml are merged the way the workflow merges them
(:func:`pipeline.config.load_config`: config.yaml, then the preset) and each run that is
``mode: unsupervised`` is checked by :func:`label_problems`. The check itself is tested on crafted
bad configs and on the weak presets, which do use supervised ImageNet weights.
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path

import pytest

from pipeline.config import load_config

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted((REPO / "presets").glob("*.yaml"))

# Name parts that mark weights trained with human labels: timm pretrained tags (ImageNet-1k /
# -12k / -21k / -22k classification, its fine-tunes, torchvision's and the "ResNet strikes back"
# a1/a1h/a2/a3 recipes), torchvision weight enums, Caffe / MXNet ImageNet conversions, and
# segmentation datasets with pixel labels (DeepLab's COCO-initialised ResNets).
SUPERVISED_TOKENS = frozenset({
    "in1k", "in12k", "in21k", "in22k", "in21ft1k", "in22ft1k", "ft", "a1", "a1h", "a2", "a3", "tv", "tv2",
    "imagenet", "imagenet1k", "imagenet21k", "imagenet22k", "ilsvrc", "cls1000", "caffe", "supervised",
    "augreg", "bit", "coco", "voc", "ade20k", "cityscapes",
})
# torchvision's downloaded files: <arch>-<8 hex digits>.pth (e.g. resnet101-63fe2227.pth).
TORCHVISION_FILE = re.compile(r"^[a-z0-9_]+-[0-9a-f]{8}\.pth$")
# Config keys that name a network's weights (or the network whose timm tag implies them).
WEIGHT_KEY_PARTS = ("backbone", "weights", "init", "pretrained")


def _strings(node, path: tuple[str, ...] = ()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(value, (*path, str(key)))
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value, path)
    elif isinstance(node, str):
        yield ".".join(path), node


def _tokens(value: str) -> set[str]:
    return set(re.split(r"[^a-z0-9]+", value.lower())) - {""}


def _named_dino(value: str | None) -> bool:
    return value is not None and "dino" in _tokens(Path(value).name)


def label_problems(config: dict) -> list[str]:
    """``key: value (why)`` for each weight an unsupervised run must not use; [] when label-free."""
    problems = []
    for key, value in _strings(config):
        if not any(part in key for part in WEIGHT_KEY_PARTS):
            continue
        tags = _tokens(value) & SUPERVISED_TOKENS
        if tags:
            problems.append(f"{key}: {value} (supervised tag {', '.join(sorted(tags))})")
        elif TORCHVISION_FILE.match(Path(value).name):
            problems.append(f"{key}: {value} (a torchvision ImageNet file)")
    backbone = config["backbone"]
    if backbone["weights"] == "timm" and "dino" not in _tokens(backbone["name"].partition(".")[2]):
        problems.append(f"backbone.name: {backbone['name']} (timm's pretrained weights without a DINO tag)")
    elif backbone["weights"] not in ("random", "timm") and not _named_dino(backbone["weights"]):
        problems.append(f"backbone.weights: {backbone['weights']} (not a DINO file)")
    deeplab = config["deeplab"]
    if deeplab["init"] == "file" and not _named_dino(deeplab["init_file"]):
        problems.append(f"deeplab.init_file: {deeplab['init_file']} (not a DINO file)")
    return problems


@functools.cache
def _load(preset: Path | None) -> dict:
    return load_config([REPO / "config.yaml", *([preset] if preset else [])])


def merged(preset: Path | None) -> dict:
    """config.yaml with ``preset`` merged over it (a copy: tests may edit it)."""
    return copy.deepcopy(_load(preset))


UNSUPERVISED = [p for p in PRESETS if merged(p)["mode"] == "unsupervised"]
WEAK = [p for p in PRESETS if merged(p)["mode"] == "weak"]


def test_there_are_presets_of_both_modes():
    assert UNSUPERVISED and WEAK


def test_default_config_is_unsupervised_and_label_free():
    config = merged(None)
    assert config["mode"] == "unsupervised"
    assert label_problems(config) == []


@pytest.mark.parametrize("preset", UNSUPERVISED, ids=lambda p: p.name)
def test_unsupervised_presets_use_dino_weights_only(preset):
    config = merged(preset)
    assert label_problems(config) == []
    # A preset reproduces a paper: DINO starts, not the demo's random ones.
    assert _named_dino(config["backbone"]["weights"]) or "dino" in _tokens(config["backbone"]["name"])
    assert config["deeplab"]["init"] == "dino_resnet50" and _named_dino(config["deeplab"]["init_file"])


@pytest.mark.parametrize("preset", WEAK, ids=lambda p: p.name)
def test_the_check_sees_the_supervised_weights_of_the_weak_presets(preset):
    config = merged(preset)
    config["mode"] = "unsupervised"
    assert label_problems(config)


@pytest.mark.parametrize("change,flagged", [
    ({"deeplab": {"init": "file", "init_file": "weights/resnet101.a1h_in1k.safetensors"}}, "deeplab.init_file"),
    ({"deeplab": {"init": "file", "init_file": "weights/resnet50-0676ba61.pth"}}, "torchvision"),
    ({"deeplab": {"init": "file", "init_file": "weights/my_resnet50.pth"}}, "not a DINO file"),
    ({"deeplab": {"backbone": "resnet50.tv2_in1k"}}, "deeplab.backbone"),
    ({"backbone": {"name": "vit_base_patch16_384.augreg_in21k_ft_in1k"}}, "in21k"),
    ({"backbone": {"name": "vit_small_patch16_224", "weights": "timm"}}, "without a DINO tag"),
    ({"backbone": {"weights": "weights/vit_small_patch16_224.pth"}}, "not a DINO file"),
])
def test_the_check_flags_a_crafted_supervised_config(change, flagged):
    config = merged(UNSUPERVISED[0])
    assert label_problems(config) == []
    for section, values in change.items():
        config[section].update(values)
    problems = label_problems(config)
    assert any(flagged in problem for problem in problems), problems
