"""Image sizes that the backbone's patch size constrains: rounded to a multiple, or refused.

A ViT cuts what it sees into patches, so every view or crop it sees whole must be a multiple of
the patch size (timm otherwise fails deep inside a training job with "Input height (128) should
be divisible by patch size (14)"). The listed backbones have patches of 16 (DINO S/16, B/16),
8 (S/8, B/8) and 14 (DINOv2), and one config must work with all of them, so per key
(config.yaml says the same beside each key):

- rounded to the nearest multiple of the patch (ties up), the stage log naming key, value,
  rounded value and patch: ``segment_features.crop_size``, ``train.global_size`` (to twice the
  patch for ``train.method: vitpcm``, whose 2 x 2 mosaic of global_size / 2 tiles must have the
  main view's patch grid), ``train.local_size``, ``train.vitpcm.crop_size`` (the ET crop starts on
  patch multiples and is clamped to end inside the view, so it must be whole patches too);
- refused, before any job runs, when no multiple can work: a size smaller than one patch, an
  ET crop larger than the global view (as configured or once both are rounded);
- taken as they are: ``features.max_size`` and ``predict.max_size`` bound the longer side and
  ``fit`` then crops or pads each side to the patch (refused only below one patch), and the
  DeepLab ViT pads its input to the patch, so ``deeplab.crop_size`` / ``pad_to`` need nothing.

The workflow checks a config before any job runs (:func:`check_patch_sizes`), reading the patch
size from the timm name (``patch14``) or ``backbone.model_kwargs.patch_size`` without building the
model; the stages round with the built model's own patch size through the same functions.
"""

from __future__ import annotations

import logging
import re

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

_PATCH_IN_NAME = re.compile(r"patch(\d+)")


def patch_size_of(name: str, model_kwargs: dict | None = None) -> int | None:
    """The patch side of timm model ``name`` built with ``model_kwargs``; None when the name
    does not say (the stages then still round with the built model's patch size)."""
    override = (model_kwargs or {}).get("patch_size")
    if override is not None:
        sides = set(override) if isinstance(override, (list, tuple)) else {override}
        if len(sides) != 1:
            raise ConfigError(f"backbone.model_kwargs.patch_size: {override} is not square; only square patches work")
        return int(sides.pop())
    match = _PATCH_IN_NAME.search(name)
    return int(match.group(1)) if match else None


def require_one_patch(key: str, value: int, patch: int) -> None:
    if value < patch:
        raise ConfigError(f"{key}: {value} is smaller than one patch of the backbone (patch size {patch})")


def fit_to_patch(key: str, value: int, patch: int, patches: int = 1) -> int:
    """``value`` rounded to the nearest multiple of ``patches`` x ``patch`` (ties up), logged when
    it changes; ConfigError when it is smaller than one patch."""
    require_one_patch(key, value, patch)
    step = patch * patches
    fitted = max(1, (value + step // 2) // step) * step
    if fitted != value:
        unit = f"{patches} x patch size {patch}" if patches > 1 else f"patch size {patch}"
        log.info("%s: %d is not a multiple of %d (%s); using %d", key, value, step, unit, fitted)
    return fitted


def fit_view_sizes(method: str, global_size: int, local_size: int, crop_size: int,
                   patch: int) -> tuple[int, int, int]:
    """PC2M / ViT-PCM training sizes (global view, local view, ET crop) fitted to ``patch``; the
    ET crop only matters, and is only checked, for ``method`` vitpcm."""
    vitpcm = method == "vitpcm"
    fitted_global = fit_to_patch("train.global_size", global_size, patch, 2 if vitpcm else 1)
    fitted_local = fit_to_patch("train.local_size", local_size, patch)
    if not vitpcm:
        return fitted_global, fitted_local, crop_size
    fitted_crop = fit_to_patch("train.vitpcm.crop_size", crop_size, patch)
    # As configured too: ViTPCMSettings.check refuses that when the training job starts.
    if crop_size > global_size or fitted_crop > fitted_global:
        raise ConfigError(
            f"train.vitpcm.crop_size: {crop_size} (rounded to {fitted_crop} for patch size {patch}) is larger "
            f"than train.global_size {global_size} (rounded to {fitted_global})"
        )
    return fitted_global, fitted_local, fitted_crop


def check_patch_sizes(config: dict) -> dict[str, int]:
    """The patch-constrained sizes the stages will use with ``config`` (dotted key -> value), or
    ConfigError naming the key, its value and the patch size. Empty when the backbone's name
    does not tell its patch size."""
    backbone = config["backbone"]
    patch = patch_size_of(backbone["name"], backbone.get("model_kwargs"))
    if patch is None:
        return {}
    for key in ("features", "predict"):
        require_one_patch(f"{key}.max_size", config[key]["max_size"], patch)
    train = config["train"]
    global_size, local_size, crop_size = fit_view_sizes(
        train["method"], train["global_size"], train["local_size"], train["vitpcm"]["crop_size"], patch)
    sizes = {"train.global_size": global_size, "train.local_size": local_size}
    if train["method"] == "vitpcm":
        sizes["train.vitpcm.crop_size"] = crop_size
    if config["mode"] == "unsupervised":
        crop = config["segment_features"]["crop_size"]
        sizes["segment_features.crop_size"] = fit_to_patch("segment_features.crop_size", crop, patch)
    return sizes
