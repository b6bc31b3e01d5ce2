"""AffinityNet random-walk refinement (pipeline/affinity): pair labels, loss, transition matrix and
walk against hand computations, the network's shapes. The demo DAG with the stage switched on runs
in tests/test_methods_dag.py (RCM+MAM unsupervised, as paper 003 walks its CAMs)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.affinity.labels import (
    IGNORE,
    affinity_labels,
    background_scaled,
    confident_labels,
    neighbour_offsets,
    pool_labels,
)
from pipeline.affinity.loss import EPS, affinity_loss
from pipeline.affinity.model import EMBED_CHANNELS, AffinityNet, pair_affinities
from pipeline.affinity.random_walk import affinity_matrix, random_walk, refine_scores, transition_matrix

# ---------------------------------------------------------------------------------------------
# Labels


def test_offsets_hold_every_neighbour_within_the_radius_once():
    offsets = neighbour_offsets(5)
    # independent count: lattice points 0 < d^2 < 25, each unordered pair once
    disk = {(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5) if 0 < dy * dy + dx * dx < 25}
    assert len(offsets) == len(disk) // 2 == 34
    assert set(offsets) | {(-dy, -dx) for dy, dx in offsets} == disk
    assert neighbour_offsets(2) == [(0, 1), (1, -1), (1, 0), (1, 1)]


def test_affinity_labels_by_hand():
    # offsets of radius 2: k0 (0,1), k1 (1,-1), k2 (1,0), k3 (1,1); cells (y, x) of a 2 x 2 map
    bg, fg, neg = affinity_labels(np.array([[0, 1], [0, 1]], np.uint8), radius=2)
    expected_bg, expected_fg, expected_neg = (np.zeros((4, 2, 2), np.float32) for _ in range(3))
    expected_neg[0, 0, 0] = expected_neg[0, 1, 0] = 1  # (0,0)-(0,1), (1,0)-(1,1): 0 vs 1
    expected_neg[1, 0, 1] = 1  # (0,1)-(1,0): 1 vs 0
    expected_bg[2, 0, 0] = 1  # (0,0)-(1,0): both background
    expected_fg[2, 0, 1] = 1  # (0,1)-(1,1): both class 1
    expected_neg[3, 0, 0] = 1  # (0,0)-(1,1): 0 vs 1
    np.testing.assert_array_equal(bg, expected_bg)
    np.testing.assert_array_equal(fg, expected_fg)
    np.testing.assert_array_equal(neg, expected_neg)


def test_ignored_cells_make_no_pair():
    bg, fg, neg = affinity_labels(np.array([[0, 2], [IGNORE, 2]], np.uint8), radius=2)
    assert bg.sum() == 0  # the only other background neighbour is ignored
    assert fg.sum() == 1 and fg[2, 0, 1] == 1  # (0,1)-(1,1): class 2 twice
    assert neg.sum() == 2 and neg[0, 0, 0] == 1 and neg[3, 0, 0] == 1  # (0,0) with (0,1) and (1,1)


def test_confident_labels_follow_the_two_background_strengths():
    # pixels: unsure / sure background / sure class 2 / sure class 1 (classes: bg, 1, 2)
    probs = np.array([[0.9, 0.99, 0.5, 0.2], [0.1, 0.01, 0.1, 0.8], [0.0, 0.0, 0.4, 0.0]], np.float32)[:, None, :]
    # pixel 0: 0.9^4 = 0.656 > 0.1 (not sure foreground), 0.9^32 = 0.034 < 0.1 (not sure background)
    # pixel 1: 0.99^32 = 0.725 > 0.01; pixel 2: 0.5^4 = 0.0625 < 0.4; pixel 3: 0.2^4 < 0.8
    np.testing.assert_array_equal(confident_labels(probs, 4, 32), [[IGNORE, 0, 2, 1]])
    np.testing.assert_allclose(background_scaled(probs, 2)[0], probs[0] ** 2)
    np.testing.assert_array_equal(background_scaled(probs, 2)[1:], probs[1:])


def test_pool_labels_takes_each_cells_most_frequent_value():
    labels = np.array([[1, 1, 0, 0],
                       [1, 2, IGNORE, IGNORE],
                       [3, 3, 2, 2],
                       [4, 4, 0, 0]], np.uint8)
    # ties (3,3,4,4) go to the smaller value; 255 counts like any value
    np.testing.assert_array_equal(pool_labels(labels, 2), [[1, 0], [3, 0]])
    with pytest.raises(ValueError):
        pool_labels(labels[:3], 2)


# ---------------------------------------------------------------------------------------------
# Loss


def test_loss_by_hand():
    affinity = torch.tensor([0.5, 0.25, 0.8, 0.6])
    bg, fg, neg = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 1.0, 0, 0]), torch.tensor([0, 0, 1.0, 1.0])
    loss, parts = affinity_loss(affinity, bg, fg, neg)
    bg_loss = -math.log(0.5 + EPS) / (1 + EPS)
    fg_loss = -math.log(0.25 + EPS) / (1 + EPS)
    neg_loss = -(math.log(1 + EPS - 0.8) + math.log(1 + EPS - 0.6)) / (2 + EPS)
    assert loss.item() == pytest.approx(bg_loss / 4 + fg_loss / 4 + neg_loss / 2, rel=1e-6)
    assert parts == pytest.approx({"bg_loss": bg_loss, "fg_loss": fg_loss, "neg_loss": neg_loss}, rel=1e-6)
    # an empty group contributes nothing (not NaN)
    empty, _ = affinity_loss(affinity, torch.zeros(4), fg, torch.zeros(4))
    assert empty.item() == pytest.approx(fg_loss / 4, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Random walk


def test_affinity_matrix_places_each_pair_symmetrically():
    # 2 x 2 grid, cells 0 1 / 2 3; radius 2 offsets (0,1) (1,-1) (1,0) (1,1)
    pair = torch.zeros(4, 2, 2)
    pair[0, 0, 0], pair[0, 1, 0] = 0.1, 0.2  # 0-1, 2-3
    pair[1, 0, 1] = 0.3  # 1-2
    pair[2, 0, 0], pair[2, 0, 1] = 0.4, 0.5  # 0-2, 1-3
    pair[3, 0, 0] = 0.6  # 0-3
    pair[0, 0, 1] = pair[1, 0, 0] = pair[3, 0, 1] = 9.0  # pairs leaving the map: never used
    expected = torch.tensor([[1.0, 0.1, 0.4, 0.6],
                             [0.1, 1.0, 0.3, 0.5],
                             [0.4, 0.3, 1.0, 0.2],
                             [0.6, 0.5, 0.2, 1.0]])
    torch.testing.assert_close(affinity_matrix(pair, radius=2), expected)


def test_transition_matrix_is_row_stochastic_and_powers_by_squaring():
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(6, 6, generator=generator, dtype=torch.float64)
    a = (a + a.T) / 2
    t = transition_matrix(a, beta=8)
    torch.testing.assert_close(t.sum(dim=1), torch.ones(6, dtype=torch.float64))
    ref = a.numpy() ** 8
    ref = ref / ref.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(t.numpy(), ref, rtol=1e-12)
    scores = torch.rand(3, 6, generator=generator, dtype=torch.float64)
    walked = random_walk(scores, t, log_t=3)
    np.testing.assert_allclose(walked.numpy(), (np.linalg.matrix_power(ref, 8) @ scores.numpy().T).T, rtol=1e-10)


def test_walk_stays_in_its_block_and_converges_to_the_block_mean():
    # a 1 x 8 grid, radius 5: every cell sees the next four. Affinity 1 inside the blocks
    # {0..3} and {4..7}, 0 across them: two disconnected, fully connected blocks.
    offsets = neighbour_offsets(5)
    pair = torch.zeros(len(offsets), 1, 8, dtype=torch.float64)
    for k, (dy, dx) in enumerate(offsets):
        for x in range(8):
            if dy == 0 and 0 <= x + dx < 8 and (x < 4) == (x + dx < 4):
                pair[k, 0, x] = 1.0
    scores = torch.tensor([[1.0, 0, 0, 3, 0, 0, 0, 8], [0, 2, 2, 0, 5, 1, 1, 1]], dtype=torch.float64)
    walked = refine_scores(scores.view(2, 1, 8), pair, radius=5, beta=8, log_t=8)[:, 0]
    left, right = scores[:, :4].mean(dim=1, keepdim=True), scores[:, 4:].mean(dim=1, keepdim=True)
    torch.testing.assert_close(walked, torch.cat([left.expand(2, 4), right.expand(2, 4)], dim=1))


def test_walk_converges_to_the_degree_weighted_mean_on_a_chain():
    # a connected 1 x 5 chain (radius 2: neighbours only): T = D^-1 A has the stationary
    # distribution pi ~ degrees (1 + neighbours), so T^t v -> (pi . v) everywhere
    pair = torch.zeros(4, 1, 5, dtype=torch.float64)
    pair[0, 0, :4] = 1.0
    scores = torch.tensor([[0.0, 0, 0, 0, 10]], dtype=torch.float64)
    walked = refine_scores(scores.view(1, 1, 5), pair, radius=2, beta=1, log_t=12)[0, 0]
    degrees = np.array([2, 3, 3, 3, 2], float)
    torch.testing.assert_close(walked, torch.full((5,), float(degrees @ scores[0].numpy() / degrees.sum()),
                                                  dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# Network


def test_network_embeds_at_stride_8_and_affinities_are_exp_minus_mean_l1():
    torch.manual_seed(0)
    model = AffinityNet("resnet18").eval()
    with torch.no_grad():
        embedding = model(torch.randn(2, 3, 64, 48))
    assert embedding.shape == (2, EMBED_CHANNELS, 8, 6)
    affinity = pair_affinities(embedding, radius=5)
    assert affinity.shape == (2, 34, 8, 6)
    assert bool(((affinity > 0) & (affinity <= 1)).all())
    # by hand: cells f(0,0) = (0, 0), f(0,1) = (1, 3): offset (0, 1) gives exp(-(1 + 3) / 2)
    tiny = torch.tensor([[[[0.0, 1.0]], [[0.0, 3.0]]]])
    assert pair_affinities(tiny, radius=2)[0, 0, 0, 0].item() == pytest.approx(math.exp(-2.0))
    # the backbone's BatchNorm is frozen: statistics do not move in training mode
    model.train()
    bn = next(m for m in model.body.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(bn.running_mean, before)
    assert not any(p.requires_grad for p in bn.parameters())


def test_walk_geometry_bounds_the_longer_side_and_pads_to_the_stride():
    from pipeline.affinity.predict import walk_geometry
    from pipeline.geometry import grid_to_image

    # 100 x 70 at most 64: scale 0.64 -> 64 x 44.8 -> 64 x 45, padded to 64 x 48
    geometry = walk_geometry(100, 70, 64)
    np.testing.assert_allclose(geometry.numpy(), [0.64, 64, 45, 64, 48])
    np.testing.assert_allclose(walk_geometry(40, 30, 512).numpy(), [1.0, 40, 30, 40, 32])
    # the stride-8 grid comes back to the image's size
    assert grid_to_image(torch.rand(3, 8, 6), geometry, (100, 70)).shape == (3, 100, 70)


def test_random_crop_pads_labels_with_ignore():
    from pipeline.affinity.train import random_crop

    rgb, labels = np.ones((4, 6, 3), np.float32), np.zeros((4, 6), np.uint8)
    crop_rgb, crop_labels = random_crop(rgb, labels, 8, np.random.default_rng(0))
    assert crop_rgb.shape == (8, 8, 3) and crop_labels.shape == (8, 8)
    # 4 x 6 real pixels (flipped or not), the rest ignored and zero (the mean colour)
    assert (crop_labels == 0).sum() == 24 and (crop_labels == IGNORE).sum() == 40
    assert crop_rgb.sum() == 24 * 3


def test_training_samples_have_fixed_shapes_and_carry_a_bad_image_as_an_error(tmp_path):
    from PIL import Image

    from pipeline.affinity.train import AffinitySamples, TrainImage, TrainSettings

    Image.fromarray(np.full((40, 30, 3), 128, np.uint8)).save(tmp_path / "a.png")
    # probabilities on a 5 x 4 grid of 8 px patches: class 1 sure on the left half, background right
    probs = torch.zeros(2, 5, 4)
    probs[1, :, :2], probs[0, :, 2:] = 1.0, 1.0
    geometry = torch.tensor([1.0, 40, 30, 40, 32])
    images = [TrainImage("a", str(tmp_path / "a.png"), 40, 30, probs.half(), geometry),
              TrainImage("b", str(tmp_path / "missing.png"), 40, 30, probs.half(), geometry)]
    settings = TrainSettings(backbone="resnet18", backbone_weights="random", radius=5, alpha_fg=4, alpha_bg=32,
                             epochs=1, batch_size=2, crop_size=48, lr=0.07, head_lr_multiplier=10, momentum=0,
                             weight_decay=5e-4, poly_power=0.9, num_workers=0, device="cpu")
    samples = AffinitySamples(images, settings, seed=0, length=4, mean=(0.5,) * 3, std=(0.25,) * 3)
    items = [samples[k] for k in range(4)]
    good = [item for item in items if not item[-1]]
    bad = [item for item in items if item[-1]]
    assert good and bad and "missing.png" in bad[0][-1]
    for image, bg, fg, neg, _ in items:
        assert image.shape == (3, 48, 48) and bg.shape == fg.shape == neg.shape == (34, 6, 6)
    _, bg, fg, neg, _ = good[0]
    # both classes are confident somewhere: pairs of each kind, each pair in at most one group
    assert bg.sum() > 0 and fg.sum() > 0 and neg.sum() > 0
    assert float((bg + fg + neg).max()) == 1.0
