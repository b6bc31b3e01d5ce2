"""Patch-grid maps come back onto the image where the backbone saw them."""

from __future__ import annotations

import torch

from pipeline.features import image_geometry
from pipeline.geometry import grid_to_image


def as_tensor(g):
    return g.as_tensor()


def test_crop_geometry_maps_patches_to_their_pixels():
    # 100x70 image, no resize, patch 16, crop -> final 96x64, grid 6x4
    g = image_geometry(100, 70, max_size=512, patch=16, fit="crop")
    labels = torch.arange(24).reshape(6, 4)
    out = grid_to_image(labels, as_tensor(g), (100, 70), mode="nearest").long()
    assert out.shape == (100, 70)
    assert out[0, 0] == 0 and out[15, 15] == 0 and out[16, 16] == 5
    assert out[95, 63] == 23
    # the cropped-away border (rows 96..99, cols 64..69) replicates the last patch
    assert (out[96:, :16] == 20).all() and (out[:16, 64:] == 3).all()


def test_pad_and_resize_geometry():
    # 1000x500 image resized by 0.5 to 500x250, padded to 512x256, grid 32x16
    g = image_geometry(1000, 500, max_size=500, patch=16, fit="pad")
    assert g.grid == (32, 16)
    labels = torch.zeros(32, 16, dtype=torch.long)
    labels[:, 8:] = 1  # right half of the grid = resized cols 128.. = original cols 256..
    out = grid_to_image(labels, as_tensor(g), (1000, 500), mode="nearest").long()
    assert out.shape == (1000, 500)
    assert (out[:, :250] == 0).all() and (out[:, 262:] == 1).all()


def test_probabilities_stay_normalised():
    g = image_geometry(50, 40, max_size=512, patch=8, fit="crop")
    probs = torch.softmax(torch.randn(3, *g.grid), dim=0)
    out = grid_to_image(probs, as_tensor(g), (50, 40))
    assert out.shape == (3, 50, 40)
    assert torch.allclose(out.sum(0), torch.ones(50, 40), atol=1e-5)
