"""Spectral segments on the demo dataset cover the GT objects; crop boxes are made on the patch grid
(Deep Spectral Methods' erosion/dilation) and map back to the image;
the sharded spectral stage is deterministic and handles degenerate input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

from pipeline import shards
from pipeline.datasets.demo import generate_demo
from pipeline.errors import BadInputError
from pipeline.features import image_geometry
from pipeline.imageio import load_mask, load_rgb
from pipeline.segments import group_by_grid, patch_box, run_spectral_shard, segment_box
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


def grid_mask(shape: tuple[int, int], *blocks: tuple[slice, slice]) -> np.ndarray:
    mask = np.zeros(shape, bool)
    for block in blocks:
        mask[block] = True
    return mask


def test_a_bridge_to_the_border_is_cut_before_the_box():
    # 5x5-patch object, joined to the left border by a one-patch-wide bridge along row 6
    mask = grid_mask((12, 16), np.s_[4:9, 8:13], np.s_[6, 0:8])
    # by hand, cross erosions: 1st -> rows 5-7 x cols 9-11 plus the bridge's stub (6, 8);
    # 2nd -> (6, 9), (6, 10); 3 dilations -> rows 3-9, cols 6-13
    assert patch_box(mask, erode=2, dilate=3) == (3, 6, 10, 14)
    assert segment_box(mask, 8, (96, 128), (96, 128), erode=2, dilate=3) == (24, 48, 80, 112)
    assert patch_box(mask, erode=0, dilate=0) == (4, 0, 9, 13)  # the bridge's box, without erosion


def test_context_margin_is_dilate_patches_clipped_to_the_image():
    inner = grid_mask((12, 16), np.s_[5:7, 6:9])
    assert segment_box(inner, 16, (192, 256), (192, 256), erode=0, dilate=3) == (2 * 16, 3 * 16, 10 * 16, 12 * 16)
    corner = grid_mask((12, 16), np.s_[0:2, 14:16])
    assert segment_box(corner, 16, (192, 256), (192, 256), erode=0, dilate=3) == (0, 11 * 16, 5 * 16, 256)


def test_erosion_keeps_the_last_non_empty_iteration():
    rect = grid_mask((8, 10), np.s_[2:5, 3:7])  # 3x4: the 1st erosion leaves row 3, cols 4-5; the 2nd, nothing
    assert patch_box(rect, erode=0, dilate=0) == (2, 3, 5, 7)
    assert patch_box(rect, erode=1, dilate=0) == (3, 4, 4, 6)
    assert patch_box(rect, erode=2, dilate=0) == (3, 4, 4, 6)
    assert patch_box(rect, erode=5, dilate=0) == (3, 4, 4, 6)
    # the image edge erodes nothing: a 2-patch band along the border survives one erosion
    edge = grid_mask((8, 10), np.s_[0:2, :])
    assert patch_box(edge, erode=1, dilate=0) == (0, 0, 1, 10)
    assert patch_box(np.zeros((4, 4), bool), 2, 3) is None


def scipy_patch_box(mask: np.ndarray, erode: int, dilate: int) -> tuple[int, int, int, int]:
    """Deep Spectral Methods' recipe written with scipy.ndimage: cross footprint, the outside
    counted as set, an erosion that empties the mask skipped."""
    cross = ndimage.generate_binary_structure(2, 1)
    for _ in range(erode):
        eroded = ndimage.binary_erosion(mask, cross, border_value=1)
        mask = eroded if eroded.any() else mask
    if dilate:
        mask = ndimage.binary_dilation(mask, cross, iterations=dilate)
    ys, xs = np.nonzero(mask)
    return ys.min(), xs.min(), ys.max() + 1, xs.max() + 1


def test_patch_box_agrees_with_scipy_on_random_segments():
    rng = np.random.default_rng(0)
    for _ in range(50):
        labels = rng.integers(0, 3, (4, 5)).repeat(3, 0).repeat(3, 1)[: rng.integers(6, 13), : rng.integers(6, 16)]
        mask = labels == 1
        if mask.any():
            for erode, dilate in [(2, 3), (1, 0), (3, 5)]:
                assert patch_box(mask, erode, dilate) == scipy_patch_box(mask, erode, dilate)


@pytest.mark.parametrize("fit", ["pad", "crop"])
def test_boxes_map_to_a_non_square_image_at_a_non_integer_scale(fit):
    geometry = image_geometry(300, 500, max_size=224, patch=16, fit=fit)
    assert geometry.scale == pytest.approx(0.448) and geometry.resized == (134, 224)
    grid = geometry.grid  # pad: 9 x 14 (the last row half padding); crop: 8 x 14 (6 resized rows cut)
    inner = grid_mask(grid, np.s_[2:5, 3:6])
    # resized rows 32-80, cols 48-96 -> x 300/134 and 500/224, rounded outwards
    assert segment_box(inner, 16, geometry.resized, (300, 500), 0, 0) == (71, 107, 180, 215)
    # the last row and column own the rest of the resized image: padding is not image, and the
    # rows a crop cut belong to the last patch row
    last = grid_mask(grid, np.s_[grid[0] - 1 :, grid[1] - 1 :])
    y0 = (grid[0] - 1) * 16 * 300 // 134
    assert segment_box(last, 16, geometry.resized, (300, 500), 0, 0) == (y0, 13 * 16 * 500 // 224, 300, 500)


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
