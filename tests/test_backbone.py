"""The backbone: every weight format loads exactly, wrong files fail by name, keys are right.

Everything runs on random weights (no network): tiny models made on the fly stand in for the
real checkpoints, which share their key names and layouts.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pipeline import backbone as bb
from pipeline.backbone import build_backbone, extract_features, patch_size
from pipeline.errors import ConfigError, WeightsError

TINY = {"depth": 2, "embed_dim": 48, "num_heads": 3}
DINO_S16 = "vit_small_patch16_224.dino"


def tiny(name: str = DINO_S16, seed: int = 1, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_backbone(name, "random", model_kwargs={**TINY, **overrides})


def outputs(model: torch.nn.Module, seed: int = 0) -> bb.ViTFeatures:
    size = patch_size(model)
    images = torch.randn(2, 3, 2 * size, 3 * size, generator=torch.Generator().manual_seed(seed))
    return extract_features(model, images, keys=True, cls=True, tokens=True)


def assert_same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    out_a, out_b = outputs(a), outputs(b)
    for name in ("keys", "cls", "tokens"):
        assert torch.equal(getattr(out_a, name), getattr(out_b, name)), name


def state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def load(path: Path, name: str = DINO_S16, checkpoint_key: str = "teacher", **overrides) -> torch.nn.Module:
    return build_backbone(name, str(path), checkpoint_key, model_kwargs={**TINY, **overrides})


class NotATensor:
    """A custom class: unpickling it would import and instantiate code."""


def dino_head(prefix: str) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}head.mlp.0.weight": torch.randn(16, 48),
        f"{prefix}head.mlp.0.bias": torch.randn(16),
        f"{prefix}head.last_layer.weight_g": torch.ones(32, 1),
        f"{prefix}head.last_layer.weight_v": torch.randn(32, 16),
    }


def full_dino_checkpoint(teacher: torch.nn.Module, student: torch.nn.Module) -> dict:
    """Layout of DINO's `checkpoint.pth`: DDP + MultiCropWrapper prefixes, heads, training state."""
    return {
        "teacher": {**{f"backbone.{k}": v for k, v in state_dict(teacher).items()}, **dino_head("")},
        "student": {
            **{f"module.backbone.{k}": v for k, v in state_dict(student).items()},
            **dino_head("module."),
        },
        "optimizer": {"state": {}, "param_groups": [{"lr": 5e-4, "params": [0, 1]}]},
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_small", patch_size=16, lr=5e-4),
        "dino_loss": {"center": torch.zeros(1, 32)},
    }


# ---------------------------------------------------------------------------------------------
# Architectures


@pytest.mark.parametrize(
    "name, patch, dim",
    [
        ("vit_small_patch16_224.dino", 16, 384),
        ("vit_small_patch8_224.dino", 8, 384),
        ("vit_base_patch16_224.dino", 16, 768),
        ("vit_base_patch8_224.dino", 8, 768),
        ("vit_small_patch14_dinov2", 14, 384),
        ("vit_base_patch14_dinov2", 14, 768),
    ],
)
def test_real_architectures_take_any_multiple_of_the_patch(name, patch, dim):
    model = build_backbone(name, "random")
    assert not model.training
    assert patch_size(model) == patch and bb.embed_dim(model) == dim
    # Not the default 224/518 input: dynamic image size must adapt the position embeddings.
    out = extract_features(model, torch.zeros(1, 3, 2 * patch, 3 * patch), keys=True, cls=True)
    assert out.grid == (2, 3)
    assert out.keys.shape == (1, 6, dim) and out.cls.shape == (1, dim)
    assert out.tokens is None


def test_model_kwargs_make_a_tiny_model():
    model = tiny()
    assert len(model.blocks) == 2 and bb.embed_dim(model) == 48
    assert bb.num_prefix_tokens(model) == 1
    mean, std = bb.normalisation(model)
    assert mean == pytest.approx((0.485, 0.456, 0.406)) and std == pytest.approx((0.229, 0.224, 0.225))


def test_unknown_name_suggests_close_names():
    with pytest.raises(ConfigError, match=r"backbone\.name.*vit_small_patch16_224\.dino"):
        build_backbone("vit_smal_patch16_224.dino", "random")


def test_non_vit_and_bad_kwargs_are_config_errors():
    with pytest.raises(ConfigError, match=r"backbone\.name.*resnet18.*VisionTransformer"):
        build_backbone("resnet18", "random")
    with pytest.raises(ConfigError, match=r"backbone\.model_kwargs"):
        build_backbone(DINO_S16, "random", model_kwargs={"no_such_argument": 1})


# ---------------------------------------------------------------------------------------------
# Weight formats


@pytest.mark.parametrize(
    "layout",
    ["dino_pretrain_pth", "timm_safetensors", "wrapped_state_dict", "wrapped_model", "fp16"],
)
def test_weight_formats_load_exactly(tmp_path, layout):
    source = tiny(seed=1)
    weights = state_dict(source)
    if layout == "timm_safetensors":
        path = tmp_path / "model.safetensors"
        save_file(weights, path)
    else:
        path = tmp_path / "model.pth"
        content = {
            "dino_pretrain_pth": weights,
            "wrapped_state_dict": {"state_dict": weights, "epoch": 3},
            "wrapped_model": {"model": weights, "args": argparse.Namespace(lr=0.1)},
            "fp16": {k: v.half() for k, v in weights.items()},
        }[layout]
        torch.save(content, path)
    loaded = load(path)
    if layout == "fp16":
        expected = tiny(seed=1)
        expected.load_state_dict({k: v.half().float() for k, v in weights.items()})
        assert_same_model(loaded, expected)
    else:
        assert_same_model(loaded, source)
    assert not loaded.training


def test_a_loaded_model_is_all_file_and_skips_the_random_initialisation(tmp_path, monkeypatch):
    """Built to be loaded, the model is not randomly initialised (it is allocated, then filled):
    every tensor of its state is the file's; a model with a buffer no file holds is initialised
    as before, so that buffer keeps its value."""
    source = tiny(seed=1)
    path = tmp_path / "model.pth"
    torch.save(state_dict(source), path)
    torch.manual_seed(0)
    loaded = load(path)
    after_load = torch.rand(4)
    torch.manual_seed(0)
    assert torch.equal(after_load, torch.rand(4))  # no random initialisation drew from the generator
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    real_create = bb._create_model

    def with_a_buffer(*args, **kwargs):
        model = real_create(*args, **kwargs)
        model.register_buffer("scale", torch.full((3,), 7.0, device=model.cls_token.device), persistent=False)
        return model

    monkeypatch.setattr(bb, "_create_model", with_a_buffer)
    assert torch.equal(load(path).scale, torch.full((3,), 7.0))


def test_full_dino_checkpoint_teacher_and_student(tmp_path):
    teacher, student = tiny(seed=1), tiny(seed=2)
    path = tmp_path / "checkpoint.pth"
    torch.save(full_dino_checkpoint(teacher, student), path)
    assert_same_model(load(path, checkpoint_key="teacher"), teacher)
    assert_same_model(load(path, checkpoint_key="student"), student)
    with pytest.raises(WeightsError, match=r"checkpoint\.pth.*checkpoint_key 'ema'.*student"):
        load(path, checkpoint_key="ema")


def test_official_dinov2_checkpoint_layout(tmp_path):
    name = "vit_small_patch14_dinov2"
    source = tiny(name, seed=3)
    # DINOv2's released files carry the (unused) mask token beside timm-compatible names.
    weights = {**state_dict(source), "mask_token": torch.zeros(1, 48)}
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(weights, path)
    assert_same_model(load(path, name), source)


def dinov2_training_keys(model: torch.nn.Module, network: str) -> dict[str, torch.Tensor]:
    """`<network>.backbone.*` with chunked blocks (one block per chunk), plus the two heads."""
    weights = {}
    for key, value in state_dict(model).items():
        if key.startswith("blocks."):
            index = key.split(".")[1]
            key = f"blocks.{index}.{key[len('blocks.'):]}"
        weights[f"{network}.backbone.{key}"] = value
    weights[f"{network}.dino_head.mlp.0.weight"] = torch.randn(16, 48)
    weights[f"{network}.ibot_head.mlp.0.weight"] = torch.randn(16, 48)
    return weights


def test_dinov2_training_checkpoint_layout(tmp_path):
    name = "vit_small_patch14_dinov2"
    teacher, student = tiny(name, seed=5), tiny(name, seed=6)
    path = tmp_path / "model_final.pth"
    model = {**dinov2_training_keys(teacher, "teacher"), **dinov2_training_keys(student, "student")}
    torch.save({"model": model, "optimizer": {"state": {}}, "iteration": 5}, path)
    assert_same_model(load(path, name), teacher)
    assert_same_model(load(path, name, checkpoint_key="student"), student)


@pytest.mark.parametrize(
    "other, pattern",
    [
        ({"embed_dim": 64, "num_heads": 4}, r"shape mismatch: .*\(1, 1, 64\)"),  # ViT-B into ViT-S
        ({"depth": 3}, r"unexpected: blocks\.2\."),
        ({"patch_size": 8}, r"patch_embed\.proj\.weight file \(48, 3, 8, 8\)"),  # S/8 into S/16
    ],
)
def test_weights_of_another_architecture_fail_by_name(tmp_path, other, pattern):
    path = tmp_path / "other_arch.pth"
    torch.save(state_dict(tiny(**other)), path)
    with pytest.raises(WeightsError, match=rf"other_arch\.pth does not fit '{DINO_S16}'.*{pattern}"):
        load(path)


def test_missing_keys_fail(tmp_path):
    weights = state_dict(tiny())
    del weights["norm.weight"]
    path = tmp_path / "partial.pth"
    torch.save(weights, path)
    with pytest.raises(WeightsError, match=r"partial\.pth.*1 missing: norm\.weight \(48,\)"):
        load(path)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_or_empty_files_fail_by_name(tmp_path, suffix):
    full = tmp_path / f"full{suffix}"
    weights = state_dict(tiny())
    save_file(weights, full) if suffix == ".safetensors" else torch.save(weights, full)
    truncated = tmp_path / f"truncated{suffix}"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(WeightsError, match=rf"truncated{suffix}.*truncated or corrupt"):
        load(truncated)
    empty = tmp_path / f"empty{suffix}"
    empty.touch()
    with pytest.raises(WeightsError, match=rf"empty{suffix}: empty file"):
        load(empty)
    with pytest.raises(WeightsError, match=r"missing\.pth: no such file"):
        load(tmp_path / "missing.pth")


@pytest.mark.parametrize("payload", [os.system, NotATensor()], ids=["function", "class_instance"])
def test_checkpoints_with_pickled_objects_are_refused(tmp_path, payload):
    path = tmp_path / "evil.pth"
    torch.save({"model": state_dict(tiny()), "extra": payload}, path)
    with pytest.raises(WeightsError, match=r"refusing to load .*evil\.pth \(not a plain tensor checkpoint"):
        load(path)


def test_only_weights_timm_asks_timm_for_pretrained_weights(tmp_path, monkeypatch):
    import timm

    real_create = timm.create_model
    calls: list[bool] = []

    def create_model(name, pretrained=False, **kwargs):
        calls.append(pretrained)
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real_create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", create_model)
    tiny()
    path = tmp_path / "w.pth"
    torch.save(state_dict(tiny()), path)
    load(path)
    assert calls and not any(calls)
    with pytest.raises(WeightsError, match=r"backbone\.weights: timm could not fetch .*offline"):
        build_backbone(DINO_S16, "timm", model_kwargs=TINY)
    assert calls[-1] is True


# ---------------------------------------------------------------------------------------------
# What the forward returns


@pytest.mark.parametrize("name", [DINO_S16, "vit_small_patch14_reg4_dinov2"])
@pytest.mark.parametrize("fused", [True, False])
def test_keys_equal_a_manual_recomputation(name, fused):
    model = tiny(name, seed=4)
    for block in model.blocks:
        block.attn.fused_attn = fused
    size, dim, prefix = patch_size(model), bb.embed_dim(model), bb.num_prefix_tokens(model)
    images = torch.randn(2, 3, 3 * size, 2 * size, generator=torch.Generator().manual_seed(5))
    out = extract_features(model, images, keys=True, cls=True, tokens=True)

    with torch.inference_mode():
        # Input of the last block (patch tokens), then its norm1 and the key third of qkv.
        (patches, _), = model.forward_intermediates(
            images, indices=[len(model.blocks) - 2], norm=False, output_fmt="NLC",
            return_prefix_tokens=True, intermediates_only=True,
        )
        last = model.blocks[-1]
        weight, bias = last.attn.qkv.weight[dim : 2 * dim], last.attn.qkv.bias[dim : 2 * dim]
        keys = F.linear(last.norm1(patches), weight, bias)
        (final_patches, final_prefix), = model.forward_intermediates(
            images, indices=[len(model.blocks) - 1], norm=True, output_fmt="NLC",
            return_prefix_tokens=True, intermediates_only=True,
        )

    assert out.grid == (3, 2) and prefix == (1 if name == DINO_S16 else 5)
    assert out.keys.shape == (2, 6, dim)
    torch.testing.assert_close(out.keys, keys, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.tokens, final_patches, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.cls, final_prefix[:, 0], atol=1e-5, rtol=1e-5)


def test_only_requested_outputs_are_returned():
    out = extract_features(tiny(), torch.zeros(1, 3, 16, 32), keys=False, cls=True)
    assert out.keys is None and out.tokens is None and out.cls.shape == (1, 48)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        extract_features(tiny(), torch.zeros(1, 3, 20, 32))
