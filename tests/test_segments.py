"""Spectral segments on the demo dataset cover the GT objects; crop boxes map back to the image;
the sharded spectral stage is deterministic and handles degenerate input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import shards
from pipeline.datasets.demo import generate_demo
from pipeline.errors import BadInputError
from pipeline.imageio import load_mask, load_rgb
from pipeline.segments import group_by_grid, run_spectral_shard, segment_box, segment_masks_on_resized
from pipeline.spectral import colour_patch_features, key_affinity, segment_patches, smallest_eigenpairs

PATCH = 8
SPECTRAL = {
    "splits": ["train"],
    "num_eigenvectors": 20,
    "num_segments": 6,
    "max_segments": 8,
    "background": "border",
    "colour_weight": 0.0,
    "colour_neighbors": 20,
    "colour_xy_weight": 2.0,
    "batch_size": 4,
    "device": "cpu",
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    generate_demo(root, seed=0, n_train=12, n_val=0, width=192, height=144)
    return root


def mean_best_match_iou(demo: Path, corrupt_eigenvectors: bool) -> float:
    ious = []
    for image_path in sorted((demo / "images" / "train").glob("*.png")):
        rgb = load_rgb(image_path)
        gt = load_mask(demo / "masks" / "train" / image_path.name)
        keys, grid = colour_patch_features(rgb, PATCH)
        values, vectors = smallest_eigenpairs(key_affinity(keys[None]), 20)
        if corrupt_eigenvectors:  # what a broken solver would hand on
            vectors = torch.randn_like(vectors, generator=torch.Generator().manual_seed(0))
        seg = segment_patches(values[0], vectors[0], grid, 6, 8, "border", seed=0).numpy()
        seg = seg.repeat(PATCH, 0).repeat(PATCH, 1)
        gt = gt[: seg.shape[0], : seg.shape[1]]
        for cls in set(np.unique(gt)) - {0, 255}:
            obj = gt == cls
            ious.append(max([((seg == s) & obj).sum() / ((seg == s) | obj).sum() for s in np.unique(seg) if s] or [0]))
    return float(np.mean(ious))


def test_segments_cover_the_demo_objects(demo):
    good = mean_best_match_iou(demo, corrupt_eigenvectors=False)
    broken = mean_best_match_iou(demo, corrupt_eigenvectors=True)
    # measured: 0.49 with the real eigenvectors, 0.08 with random ones
    assert good > 0.4
    assert broken < 0.2


def test_segment_box_maps_back_to_the_original_image():
    mask = np.zeros((50, 80), bool)  # resized image (scale 0.5 of a 100x160 original)
    mask[10:20, 30:40] = True
    assert segment_box(mask, 0.5, (100, 160), erode=0, dilate=0) == (20, 60, 40, 80)
    # erosion that empties a tiny mask falls back to the mask itself
    tiny = np.zeros((50, 80), bool)
    tiny[5, 5] = True
    assert segment_box(tiny, 1.0, (50, 80), erode=2, dilate=0) == (5, 5, 6, 6)
    assert segment_box(np.zeros((4, 4), bool), 1.0, (4, 4), 0, 0) is None


def test_segment_masks_drop_padding_and_background():
    segments = torch.tensor([[0, 1], [2, 2]])
    masks = segment_masks_on_resized(segments, patch=4, resized_hw=(6, 7))
    assert set(masks) == {1, 2}
    assert masks[1].shape == (6, 7) and masks[1][:4, 4:].all() and masks[1].sum() == 12
    assert masks[2][4:6].all() and masks[2].sum() == 14


def test_group_by_grid_never_mixes_grids():
    grids = {"a": (2, 3), "b": (3, 2), "c": (2, 3), "d": (2, 3)}
    batches = group_by_grid(grids, batch_size=2)
    assert sorted(map(sorted, batches)) == [["a", "c"], ["b"], ["d"]]


def write_feature_shard(path: Path, keys: dict[str, torch.Tensor], grid: tuple[int, int]) -> None:
    geometry = torch.tensor([1.0, grid[0] * PATCH, grid[1] * PATCH, grid[0] * PATCH, grid[1] * PATCH])
    tensors = {i: {"keys": k.half(), "grid": torch.tensor(grid, dtype=torch.int32), "geometry": geometry}
               for i, k in keys.items()}
    shards.write_shard(path, shards.per_image_tensors(tensors), {"image_ids": sorted(keys)})


def write_manifest(path: Path, ids: list[str], split: str = "train") -> None:
    rows = [dict(image_id=i, image_path="", mask_path="", labels="", has_labels=False, split=split, width=1, height=1,
                 shard=0) for i in ids]
    pd.DataFrame(rows).to_csv(path, index=False)


def test_spectral_stage_is_deterministic_and_keeps_degenerate_images(tmp_path):
    gen = torch.Generator().manual_seed(0)
    keys = {f"img{i}": torch.randn(24, 16, generator=gen) for i in range(3)}
    keys["flat"] = torch.ones(24, 16)  # one colour: no spectral structure
    write_feature_shard(tmp_path / "features.safetensors", keys, (4, 6))
    write_manifest(tmp_path / "manifest.csv", sorted(keys))
    params = {"spectral": SPECTRAL, "seed": 0}
    for name in ("a", "b"):
        run_spectral_shard(tmp_path / "features.safetensors", tmp_path / "manifest.csv",
                           tmp_path / f"{name}.safetensors", params, 1)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    out = shards.read_images(tmp_path / "a.safetensors")
    assert set(out) == set(keys)
    assert out["img0"]["eigenvectors"].shape == (24, 20)
    assert (out["flat"]["segments"] == 1).all()  # documented fallback: one foreground segment


def test_spectral_stage_refuses_nan_keys_naming_the_image(tmp_path):
    keys = {"good": torch.randn(24, 16), "bad": torch.randn(24, 16)}
    keys["bad"][3, 2] = float("nan")
    write_feature_shard(tmp_path / "features.safetensors", keys, (4, 6))
    write_manifest(tmp_path / "manifest.csv", sorted(keys))
    with pytest.raises(BadInputError, match="'bad'.*NaN"):
        run_spectral_shard(tmp_path / "features.safetensors", tmp_path / "manifest.csv", tmp_path / "o.safetensors",
                           {"spectral": SPECTRAL, "seed": 0}, 1)
    assert not (tmp_path / "o.safetensors").exists()


def test_spectral_stage_skips_other_splits(tmp_path):
    keys = {"v1": torch.randn(24, 16)}
    write_feature_shard(tmp_path / "features.safetensors", keys, (4, 6))
    write_manifest(tmp_path / "manifest.csv", ["v1"], split="val")
    run_spectral_shard(tmp_path / "features.safetensors", tmp_path / "manifest.csv", tmp_path / "o.safetensors",
                       {"spectral": SPECTRAL, "seed": 0}, 1)
    assert shards.read_images(tmp_path / "o.safetensors") == {}
