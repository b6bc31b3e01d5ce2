"""The ViT backbone: building a timm model, loading local weights safely, and its features.

The unsupervised stages follow Deep Spectral Methods (Melas-Kyriazi et al., CVPR 2022): the
features of a patch are the *keys* of the last attention block (heads concatenated, CLS and
register tokens dropped). The final CLS token and the final patch tokens (both after the last
norm) are available too.

Weights come from exactly one explicit place (``backbone.weights``): ``random``, ``timm``
(timm's own download) or a local file. Local files are always read with
``torch.load(weights_only=True)`` or safetensors, so a checkpoint cannot run code, and they must
match the architecture exactly (strict loading): a wrong file is an error, never a partial load.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from pipeline.errors import ConfigError, WeightsError

log = logging.getLogger(__name__)

# Prefixes that training wrappers put before the backbone's own parameter names: DDP (`module.`)
# and the DINO MultiCropWrapper (`backbone.`, beside its projection `head.`).
_WRAPPER_PREFIXES = ("module.", "backbone.")

# DINOv2 training checkpoints keep both networks in one dict, as `teacher.*` and `student.*`.
_NETWORK_PREFIXES = ("teacher.", "student.")

# Projection heads of DINO / DINOv2 training: not part of the backbone.
_HEAD_PREFIXES = ("head.", "dino_head.", "ibot_head.")

# DINOv2 trains with chunked blocks (`blocks.<chunk>.<index>.`); timm numbers them `blocks.<index>.`.
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")

# Keys under which trainers nest the state dict (timm train script, DeiT, DINOv2 ...).
_NESTING_KEYS = ("state_dict", "model")

# Official full DINO checkpoints pickle the training `args` as an argparse.Namespace. It is a
# plain attribute bag (no code runs when it is rebuilt), so it is the one class allowed beyond
# torch's weights-only set; anything else (functions, custom classes) is refused.
_SAFE_GLOBALS = [argparse.Namespace]

_NOT_A_VIT = "not a timm VisionTransformer (the feature stage needs a DINO / DINOv2 ViT)"

# How many offending keys a mismatch message lists per kind.
_SHOWN_KEYS = 4


def build_backbone(
    name: str,
    weights: str,
    checkpoint_key: str = "teacher",
    model_kwargs: dict | None = None,
) -> nn.Module:
    """A timm ViT named ``name`` with ``weights`` (``random``, ``timm`` or a local file), in eval mode."""
    model_kwargs = dict(model_kwargs or {})
    _check_model_name(name)
    if weights == "random":
        model = _create_model(name, pretrained=False, model_kwargs=model_kwargs)
    elif weights == "timm":
        # A build without storage first validates the name and the keyword arguments, so that a
        # failure of the pretrained build is about the download.
        _create_model_without_weights(name, model_kwargs)
        model = _create_pretrained_from_timm(name, model_kwargs)
    else:
        state_dict = read_weights_file(Path(weights), checkpoint_key)
        model = _create_model_to_load(name, model_kwargs)
        load_state_dict_strict(model, state_dict, Path(weights), name)
    model.eval()
    return model


def _create_model_without_weights(name: str, model_kwargs: dict) -> nn.Module:
    """The model's structure on the meta device: no memory, no random initialisation."""
    with torch.device("meta"):
        return _create_model(name, pretrained=False, model_kwargs=model_kwargs)


def _create_model_to_load(name: str, model_kwargs: dict) -> nn.Module:
    """A model whose every tensor a strict load will overwrite: allocated, not randomly initialised
    (the initialisation of a ViT-B/16 is about a second of every job's start-up on a CPU). A model
    with buffers outside its state dict, which no load fills, is initialised as usual."""
    model = _create_model_without_weights(name, model_kwargs)
    persistent = set(model.state_dict())
    if any(key not in persistent for key, _ in model.named_buffers()):
        return _create_model(name, pretrained=False, model_kwargs=model_kwargs)
    return model.to_empty(device="cpu")


def _check_model_name(name: str) -> None:
    if timm.is_model(name):
        return
    candidates = timm.list_models(pretrained=True) + timm.list_models()
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    hint = f"; close names: {', '.join(close)}" if close else ""
    raise ConfigError(f"backbone.name: {name!r} is not a timm model{hint}")


def _create_model(name: str, pretrained: bool, model_kwargs: dict) -> nn.Module:
    try:
        model = timm.create_model(
            name, pretrained=pretrained, num_classes=0, dynamic_img_size=True, **model_kwargs
        )
    except TypeError as exc:
        if "unexpected keyword argument 'dynamic_img_size'" in str(exc):
            raise ConfigError(f"backbone.name: {name!r} is {_NOT_A_VIT}") from None
        raise ConfigError(f"backbone.model_kwargs: not accepted by {name!r} ({exc})") from None
    except RuntimeError as exc:
        if "pretrained tag" in str(exc):
            raise ConfigError(f"backbone.name: {exc}") from None
        raise
    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"backbone.name: {name!r} ({type(model).__name__}) is {_NOT_A_VIT}")
    return model


def _create_pretrained_from_timm(name: str, model_kwargs: dict) -> nn.Module:
    try:
        return _create_model(name, pretrained=True, model_kwargs=model_kwargs)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - any download/hub failure means the same to the user
        reason = (str(exc).strip().splitlines() or [""])[0].rstrip(".")
        raise WeightsError(
            f"backbone.weights: timm could not fetch the pretrained weights of {name!r} "
            f"(offline or no access to the Hugging Face hub?): {type(exc).__name__}: {reason}. "
            "Download the checkpoint and set backbone.weights to its path."
        ) from None


# ---------------------------------------------------------------------------------------------
# Reading weight files


def read_weights_file(path: Path, checkpoint_key: str = "teacher") -> dict[str, torch.Tensor]:
    """The backbone state dict stored in ``path``, wrappers unwrapped and prefixes stripped."""
    if not path.is_file():
        raise WeightsError(
            f"backbone.weights: {path}: no such file (expected `random`, `timm` or the path of "
            "a weights file)"
        )
    if path.stat().st_size == 0:
        raise WeightsError(f"backbone.weights: {path}: empty file (0 bytes)")
    if path.suffix == ".safetensors":
        raw = _load_safetensors(path)
    else:
        raw = _load_torch(path)
    state_dict = _select_state_dict(raw, checkpoint_key, path)
    state_dict = _select_network(state_dict, checkpoint_key, path)
    return _unchunk_blocks(_strip_wrapper_prefixes(state_dict))


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(
            f"backbone.weights: {path}: truncated or corrupt safetensors file ({exc})"
        ) from None


def _load_torch(path: Path) -> object:
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            raise WeightsError(
                f"backbone.weights: refusing to load {path} (not a plain tensor checkpoint: "
                f"{_unpickler_reason(str(exc))})"
            ) from None
        raise WeightsError(f"backbone.weights: {path}: corrupt checkpoint ({exc})") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"backbone.weights: {path}: truncated or corrupt checkpoint ({first})") from None


def _unpickler_reason(message: str) -> str:
    """The offending global from torch's long weights-only message (whose advice to set
    weights_only=False is exactly what this project refuses to do)."""
    match = re.search(r"WeightsUnpickler error: ([^.]*)", message)
    return match.group(1).strip() if match else "it holds pickled objects"


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _select_state_dict(obj: object, checkpoint_key: str, path: Path) -> dict[str, torch.Tensor]:
    """Find the tensor dict: plain, under ``checkpoint_key`` (DINO teacher/student) or nested."""
    while not _is_state_dict(obj):
        if not isinstance(obj, dict):
            raise WeightsError(f"backbone.weights: {path}: holds a {type(obj).__name__}, not a state dict")
        if isinstance(obj.get(checkpoint_key), dict):
            obj = obj[checkpoint_key]
            continue
        nested = [k for k in _NESTING_KEYS if isinstance(obj.get(k), dict)]
        if nested:
            obj = obj[nested[0]]
            continue
        dict_keys = sorted(str(k) for k, v in obj.items() if isinstance(v, dict))
        raise WeightsError(
            f"backbone.weights: {path}: no state dict found under backbone.checkpoint_key "
            f"{checkpoint_key!r} nor {' / '.join(_NESTING_KEYS)}; dict entries in the file: "
            f"{dict_keys or 'none'}"
        )
    return obj


def _select_network(
    state_dict: dict[str, torch.Tensor], checkpoint_key: str, path: Path
) -> dict[str, torch.Tensor]:
    """Keep ``checkpoint_key``'s tensors of a dict holding `teacher.*` and `student.*` keys."""
    if not any(key.startswith(_NETWORK_PREFIXES) for key in state_dict):
        return state_dict
    prefix = f"{checkpoint_key}."
    selected = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not selected:
        raise WeightsError(
            f"backbone.weights: {path}: no `{prefix}*` tensors for backbone.checkpoint_key "
            f"{checkpoint_key!r} (the file has teacher.* / student.* tensors)"
        )
    return selected


def _unchunk_blocks(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_CHUNKED_BLOCK.sub(r"blocks.\1.", key): value for key, value in state_dict.items()}


def _strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    stripped = {}
    for key, value in state_dict.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        stripped[key] = value
    return stripped


# ---------------------------------------------------------------------------------------------
# Strict loading


def load_state_dict_strict(
    model: VisionTransformer, state_dict: dict[str, torch.Tensor], path: Path, name: str
) -> None:
    """Load ``state_dict`` into ``model``; any missing, extra or misshapen key is a WeightsError."""
    expected = model.state_dict()
    # A projection head of DINO training is not part of the backbone; drop it unless the model
    # itself has a head to fill.
    if not any(k.startswith(_HEAD_PREFIXES) for k in expected):
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(_HEAD_PREFIXES)}
    # timm would silently resample the kernel of another patch size: refuse that first.
    _raise_on_mismatch(_patch_embed_mismatch(state_dict, expected), path, name)
    # timm's own converter: DINOv2 key names (mask_token, w12/w3), position embeddings resampled
    # when the grid differs (e.g. other img_size in model_kwargs).
    try:
        state_dict = checkpoint_filter_fn(dict(state_dict), model)
    except (RuntimeError, ValueError, KeyError, IndexError) as exc:
        raise WeightsError(
            f"backbone.weights: {path} does not fit {name!r}: conversion failed ({exc})"
        ) from None
    _raise_on_mismatch(describe_mismatch(state_dict, expected), path, name)
    model.load_state_dict(state_dict, strict=True)
    log.info("loaded %d tensors from %s into %s", len(state_dict), path, name)


def _patch_embed_mismatch(
    state_dict: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
) -> list[str]:
    key = "patch_embed.proj.weight"
    if key in state_dict and key in expected and state_dict[key].shape[-2:] != expected[key].shape[-2:]:
        found, wanted = tuple(state_dict[key].shape), tuple(expected[key].shape)
        return [f"shape mismatch: {key} file {found} vs model {wanted}"]
    return []


def describe_mismatch(
    state_dict: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
) -> list[str]:
    """Short lines naming the first missing, unexpected and misshapen keys (empty if it fits)."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshapen = [
        k for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    lines = []
    if missing:
        shown = ", ".join(f"{k} {tuple(expected[k].shape)}" for k in missing[:_SHOWN_KEYS])
        lines.append(f"{len(missing)} missing: {shown}")
    if unexpected:
        shown = ", ".join(f"{k} {tuple(state_dict[k].shape)}" for k in unexpected[:_SHOWN_KEYS])
        lines.append(f"{len(unexpected)} unexpected: {shown}")
    if misshapen:
        shown = ", ".join(
            f"{k} file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
            for k in misshapen[:_SHOWN_KEYS]
        )
        lines.append(f"{len(misshapen)} shape mismatch: {shown}")
    return lines


def _raise_on_mismatch(lines: list[str], path: Path, name: str) -> None:
    if lines:
        raise WeightsError(
            f"backbone.weights: {path} does not fit {name!r} (weights for another "
            f"architecture?): {'; '.join(lines)}"
        )


# ---------------------------------------------------------------------------------------------
# Model facts


def patch_size(model: VisionTransformer) -> int:
    height, width = model.patch_embed.patch_size
    if height != width:
        raise ConfigError(f"backbone.name: non-square patches {height}x{width} are not supported")
    return int(height)


def num_prefix_tokens(model: VisionTransformer) -> int:
    """CLS plus register tokens, which precede the patch tokens in every block."""
    return int(model.num_prefix_tokens)


def embed_dim(model: VisionTransformer) -> int:
    return int(model.embed_dim)


def normalisation(model: VisionTransformer) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per RGB channel for images scaled to [0, 1], from timm's pretrained config."""
    cfg = model.pretrained_cfg
    return tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])


# ---------------------------------------------------------------------------------------------
# Forward


@dataclass
class ViTFeatures:
    """Per batch: keys/tokens are B x N x D (N = gh * gw, row-major), cls is B x D."""

    grid: tuple[int, int]
    keys: torch.Tensor | None = None
    cls: torch.Tensor | None = None
    tokens: torch.Tensor | None = None


def extract_features(
    model: VisionTransformer,
    images: torch.Tensor,
    keys: bool = True,
    cls: bool = False,
    tokens: bool = False,
) -> ViTFeatures:
    """Last-block attention keys and/or final CLS / patch tokens of ``images`` (B x 3 x H x W).

    H and W must be multiples of the patch size.
    """
    size = patch_size(model)
    height, width = images.shape[-2:]
    if height % size or width % size:
        raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {size}")
    grid = (height // size, width // size)
    prefix = num_prefix_tokens(model)
    captured: list[torch.Tensor] = []
    # The hook sees qkv's output whatever attention kernel (fused or not) runs afterwards.
    attn = model.blocks[-1].attn
    handle = attn.qkv.register_forward_hook(lambda _m, _i, out: captured.append(out)) if keys else None
    try:
        with torch.inference_mode():
            final = model.forward_features(images)
    finally:
        if handle is not None:
            handle.remove()
    out = ViTFeatures(grid=grid)
    if keys:
        out.keys = _keys_from_qkv(captured[0], attn)[:, prefix:]
    if cls:
        out.cls = final[:, 0]
    if tokens:
        out.tokens = final[:, prefix:]
    return out


def key_dim(model: VisionTransformer) -> int:
    """Width of :func:`extract_features`' keys: the last block's heads concatenated."""
    return model.blocks[-1].attn.qkv.out_features // 3


def _keys_from_qkv(qkv: torch.Tensor, attn: nn.Module) -> torch.Tensor:
    """B x T x D keys (heads concatenated) from the B x T x 3D qkv projection, k-norm applied."""
    batch, tokens, triple = qkv.shape
    dim = triple // 3
    k = qkv[..., dim : 2 * dim]
    if not isinstance(attn.k_norm, nn.Identity):
        k = attn.k_norm(k.reshape(batch, tokens, attn.num_heads, -1)).reshape(batch, tokens, dim)
    return k
