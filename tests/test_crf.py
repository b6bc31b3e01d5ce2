from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline import crf, shards
from pipeline.datasets import MANIFEST_COLUMNS
from pipeline.errors import BadInputError, ConfigError
from pipeline.imageio import load_mask


def edge_image(height: int, width: int, edge: int, seed: int = 0) -> np.ndarray:
    """Red left of column ``edge``, blue from it on, with a little pixel noise."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), np.int16)
    image[:, :edge] = (200, 40, 40)
    image[:, edge:] = (40, 60, 200)
    return np.clip(image + rng.integers(-2, 3, image.shape), 0, 255).astype(np.uint8)


def soft_boundary(height: int, width: int, centre: float, softness: float = 3.0) -> np.ndarray:
    """2 × H × W probabilities: class 1 rises smoothly around column ``centre``."""
    p1 = 1.0 / (1.0 + np.exp(-(np.arange(width) - centre) / softness))
    return np.stack([1.0 - p1, p1])[:, None, :].repeat(height, axis=1).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Parameters


def test_presets_match_prior_art():
    assert crf.resolve_params({"preset": "deeplab-v2"}) == crf.CrfParams(1, 3, 67, 3, 4, 10, "softmax", 0.7)
    assert crf.resolve_params({"preset": "psa"}) == crf.CrfParams(3, 3, 50, 5, 10, 10, "labels", 0.7)
    assert crf.resolve_params({"preset": "deep-spectral"}) == crf.CrfParams(3, 3, 80, 13, 10, 5, "labels", 0.99)


def test_overrides_replace_preset_fields_and_null_keeps_them():
    params = crf.resolve_params({"preset": "psa", "iterations": 3, "bilateral_srgb": 7, "gt_prob": None})
    assert (params.iterations, params.bilateral_srgb, params.gt_prob, params.bilateral_sxy) == (3, 7, 0.7, 50)


@pytest.mark.parametrize("params, message", [
    ({"preset": "nope"}, "preset"),
    ({"preset": "psa", "iterationz": 3}, "iterationz"),
    ({"unary": "logits"}, "unary"),
    ({"gt_prob": 1.0}, "gt_prob"),
])
def test_bad_params_are_config_errors(params, message):
    with pytest.raises(ConfigError, match=message):
        crf.resolve_params(params)


def test_unary_clamps_zero_probabilities_and_labels_unary_matches_pydensecrf():
    from pydensecrf.utils import unary_from_labels

    probs = np.zeros((3, 2, 2), np.float32)
    probs[0], probs[2, 0, 0] = 1.0, 1.0  # class 1 restricted to 0 everywhere
    probs[0, 0, 0] = 0.0
    softmax = crf.unary_energy(probs, crf.resolve_params({"preset": "deeplab-v2"}))
    assert softmax.shape == (3, 4) and softmax.dtype == np.float32 and softmax.flags.c_contiguous
    assert np.isfinite(softmax).all() and softmax.max() == pytest.approx(-np.log(1e-5))
    labels = crf.unary_energy(probs, crf.resolve_params({"preset": "psa"}))
    reference = unary_from_labels(probs.argmax(0), 3, gt_prob=0.7, zero_unsure=False)
    np.testing.assert_allclose(labels, reference, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Refinement


@pytest.mark.parametrize("centre", [26.0, 38.0])  # soft boundary 6 px left / right of the edge
def test_deeplab_crf_moves_a_blurred_boundary_onto_the_image_edge(centre):
    height, width, edge = 40, 64, 32
    probs = soft_boundary(height, width, centre)
    before = probs.argmax(axis=0)
    assert abs(int(np.argmax(before[0] == 1)) - edge) >= 5
    labels = crf.crf_refine(edge_image(height, width, edge), probs, {"preset": "deeplab-v2"})
    assert labels.dtype == np.uint8 and labels.shape == (height, width)
    assert (labels[:, :edge] == 0).all() and (labels[:, edge:] == 1).all()


# ---------------------------------------------------------------------------------------------
# The stage


IMAGE_H, IMAGE_W, PATCH = 48, 64, 16


def make_probs_shard(root, ids, num_classes=3, seed=0):
    """Images with two colour regions, grid probabilities favouring the right class per patch,
    a manifest and a probs shard."""
    rng = np.random.default_rng(seed)
    gh, gw = IMAGE_H // PATCH, IMAGE_W // PATCH
    tensors, rows = {}, []
    for image_id in ids:
        edge = int(rng.integers(20, 44))
        image_path = root / "images" / f"{image_id}.png"
        image_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(edge_image(IMAGE_H, IMAGE_W, edge, seed=int(rng.integers(1000)))).save(image_path)
        grid = rng.dirichlet(np.ones(num_classes), size=(gh, gw)).transpose(2, 0, 1)
        grid[1, :, : edge // PATCH] += 1.0
        grid[2, :, (edge + PATCH - 1) // PATCH :] += 1.0
        grid[0] = 0.0  # a restricted class: zero everywhere
        grid /= grid.sum(axis=0, keepdims=True)
        tensors[f"{image_id}/probs"] = torch.from_numpy(grid).to(torch.float16)
        tensors[f"{image_id}/geometry"] = torch.tensor([1.0, IMAGE_H, IMAGE_W, IMAGE_H, IMAGE_W])
        rows.append({"image_id": image_id, "image_path": str(image_path), "mask_path": "",
                     "labels": "", "has_labels": False, "split": "val", "width": IMAGE_W,
                     "height": IMAGE_H, "shard": 0})
    pd.DataFrame(rows, columns=MANIFEST_COLUMNS).to_csv(root / "manifest.csv", index=False)
    shards.write_shard(root / "probs.safetensors", tensors, {})
    return root / "probs.safetensors", root / "manifest.csv"


def test_crf_shard_writes_every_image_then_the_marker_and_workers_agree(tmp_path):
    ids = ["a", "b", "sub/c", "d", "e"]
    probs, manifest = make_probs_shard(tmp_path, ids)
    params = {"preset": "deeplab-v2", "iterations": 5}
    crf.crf_shard(probs, manifest, tmp_path / "one", params, threads=1)
    crf.crf_shard(probs, manifest, tmp_path / "two", params, threads=2)
    for folder in ("one", "two"):
        done = tmp_path / folder / crf.DONE_MARKER
        assert json.loads(done.read_text())["images"] == len(ids)
        pngs = [tmp_path / folder / f"{i}.png" for i in ids]
        assert all(p.is_file() for p in pngs)
        assert done.stat().st_mtime_ns >= max(p.stat().st_mtime_ns for p in pngs)
        assert sorted(p.name for p in (tmp_path / folder).rglob("*") if p.is_file()) == sorted(
            [".done", "a.png", "b.png", "c.png", "d.png", "e.png"])
    for image_id in ids:
        one = load_mask(tmp_path / "one" / f"{image_id}.png")
        assert one.shape == (IMAGE_H, IMAGE_W) and set(np.unique(one)) <= {1, 2}
        np.testing.assert_array_equal(one, load_mask(tmp_path / "two" / f"{image_id}.png"))


def test_crf_shard_rejects_an_image_missing_from_the_manifest(tmp_path):
    probs, _ = make_probs_shard(tmp_path, ["a", "b"])
    _, manifest = make_probs_shard(tmp_path / "other", ["a"])
    with pytest.raises(BadInputError, match="'b'.*not in"):
        crf.crf_shard(probs, manifest, tmp_path / "out", {"preset": "psa"})
    assert not (tmp_path / "out" / crf.DONE_MARKER).exists()


def test_crf_shard_image_size_mismatch_names_the_image_and_leaves_no_marker(tmp_path):
    probs, manifest = make_probs_shard(tmp_path, ["a", "b"])
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(tmp_path / "images" / "b.png")
    with pytest.raises(BadInputError, match="'b'.*12x10.*64x48"):
        crf.crf_shard(probs, manifest, tmp_path / "out", {"preset": "psa"}, threads=2)
    assert not (tmp_path / "out" / crf.DONE_MARKER).exists()
