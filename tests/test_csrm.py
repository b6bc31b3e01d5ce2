"""CSRM (paper 004) and its CAM baseline (Puzzle-CAM): every equation against a value computed by
hand or another way, the CAM-model loader on files made on the fly, and a short real training."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import WeightsError
from pipeline.methods.cam.puzzle import merge_tiles, puzzle_alpha, puzzle_losses, tile_images
from pipeline.methods.csrm.classmix import classmix_masks, mix
from pipeline.methods.csrm.contrast import (
    ContrastSettings,
    NegativeBank,
    class_ranks,
    contrast_loss,
    entropy_groups,
    negative_mask,
)
from pipeline.methods.csrm.losses import (
    classification_loss,
    consistency_loss,
    entropy,
    info_nce,
    linear_ramp,
    psi_normalise,
    reliable_mask,
    s2c_loss,
    s2c_mask,
    segmentation_loss,
)
from pipeline.methods.csrm.model import CAMClassifier, CSRMNet, build_features, load_cam_weights
from pipeline.methods.csrm.pseudo import IGNORE, image_pseudo_labels
from pipeline.methods.csrm.step import CSRMLossSettings, ema_momentum, loss_weights, training_step
from pipeline.training.ema import teacher_copy

TRUNK = "resnet10t"  # a small timm ResNet: the tests' stand-in for ResNeSt-101


# --- eq. 2, 5 ------------------------------------------------------------------------------------


def test_psi_is_relu_over_the_maximum_of_each_map():
    cams = torch.tensor([[[[-1.0, 2.0], [4.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]]])  # 1 x 2 x 2 x 2
    psi = psi_normalise(cams, (2, 2))
    assert torch.allclose(psi[0, 0], torch.tensor([[0.0, 0.5], [1.0, 0.25]]), atol=1e-4)
    assert torch.equal(psi[0, 1], torch.zeros(2, 2))  # an all-zero CAM stays 0, not 0/0


def test_classification_loss_is_eq_5():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    labels = torch.tensor([[1.0, 0.0, 1.0]])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    by_hand = -sum(y * math.log(sig(p)) + (1 - y) * math.log(math.exp(-p) / (1 + math.exp(-p)))
                   for p, y in zip([2.0, -1.0, 0.5], [1, 0, 1], strict=True)) / 3
    assert classification_loss(logits, labels).item() == pytest.approx(by_hand, rel=1e-5)


# --- eqs. 6-7: band, pseudo-labels, masked CE -----------------------------------------------------


def test_band_labels_keep_foreground_above_delta_fg_background_below_delta_bg_and_ignore_between():
    # One pixel per case; class 1's psi-normalised CAM value decides, class 2 is absent (0).
    cams = np.array([[[0.02, 0.05, 0.2, 0.35, 0.36, 0.9]], [[0.0] * 6]], dtype=np.float32)  # 2 x 1 x 6
    image = np.zeros((1, 6, 3), dtype=np.uint8)
    labels = image_pseudo_labels(image, cams, delta_bg=0.05, delta_fg=0.35, crf=None)
    # (0.05, 0.35] is the uncertainty band (eq. 6): 0.05 is background, 0.35 ignored, 0.36 class 1
    assert labels.tolist() == [[0, 0, IGNORE, IGNORE, 1, 1]]


def test_band_labels_with_the_crf_keep_a_confident_object_and_its_background():
    from pipeline.crf import resolve_params

    cams = np.zeros((1, 16, 16), dtype=np.float32)
    cams[0, 4:12, 4:12] = 1.0
    cams[0, 3, 4:12] = 0.2  # a band row above the object
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    image[4:12, 4:12] = 200
    labels = image_pseudo_labels(image, cams, 0.05, 0.35, resolve_params({"preset": "psa"}))
    assert (labels[5:11, 5:11] == 1).all() and (labels[0, :] == 0).all()
    assert set(np.unique(labels)) <= {0, 1, IGNORE}


def test_segmentation_loss_is_the_masked_cross_entropy_of_eq_7():
    log_probs = torch.log(torch.tensor([[[[0.7, 0.2]], [[0.3, 0.8]]]]))  # 1 x 2 classes x 1 x 2
    targets = torch.tensor([[[0, IGNORE]]])
    loss = segmentation_loss(log_probs, targets, targets != IGNORE)
    assert loss.item() == pytest.approx(-math.log(0.7), rel=1e-6)  # the ignored pixel does not count
    assert segmentation_loss(log_probs, torch.full((1, 1, 2), IGNORE), torch.zeros(1, 1, 2, dtype=torch.bool)) == 0


# --- eqs. 8-9: s2c ---------------------------------------------------------------------------------


def test_s2c_mask_and_softmax_over_background_logit_and_cams():
    teacher = torch.tensor([[[[0.6, 0.3]], [[0.3, 0.35]], [[0.1, 0.35]]]])  # 1 x K=3 x 1 x 2
    assert s2c_mask(teacher, 0.5).tolist() == [[[True, False]]]
    background = torch.tensor([[[1.0, 0.0]]], requires_grad=True)
    cams = torch.tensor([[[[2.0, 0.0]], [[0.5, 0.0]]]], requires_grad=True)  # 1 x C=2 x 1 x 2
    loss = s2c_loss(background, cams, teacher, sigma=0.5)
    # pixel 0: Q = softmax([1, 2, 0.5]); teacher's class c* = 0 (background)
    q = np.exp([1.0, 2.0, 0.5]) / np.exp([1.0, 2.0, 0.5]).sum()
    assert loss.item() == pytest.approx(-math.log(q[0]), rel=1e-5)
    loss.backward()
    assert background.grad is None  # S_bg is a constant of eq. 9
    assert cams.grad[0, :, 0, 1].abs().sum() == 0  # the masked pixel gives no gradient


# --- eqs. 10-12: entropy-quantile mask, consistency --------------------------------------------------


def test_entropy_and_the_quantile_mask_drop_the_alpha_highest():
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0]]).T.reshape(1, 2, 1, 2)
    assert entropy(probs)[0, 0].tolist() == pytest.approx([math.log(2), 0.0])
    entropies = torch.arange(8.0).reshape(1, 2, 4)
    assert reliable_mask(entropies, 0.25).sum() == 6  # the two highest of eight dropped
    assert reliable_mask(entropies, 0.0).all()  # alpha at its end value keeps every pixel
    assert not reliable_mask(entropies, 0.25)[0, 1, 3] and not reliable_mask(entropies, 0.25)[0, 1, 2]


def test_consistency_loss_uses_the_teacher_argmax_on_reliable_pixels():
    teacher = torch.tensor([[[[0.9, 0.5]], [[0.1, 0.5]]]])  # pixel 1 has the highest entropy
    student = torch.log(torch.tensor([[[[0.6, 0.3]], [[0.4, 0.7]]]]))
    loss = consistency_loss(student, teacher, alpha=0.5)
    assert loss.item() == pytest.approx(-math.log(0.6), rel=1e-6)


# --- ClassMix ----------------------------------------------------------------------------------------


def test_classmix_mixes_image_and_target_with_the_same_masks():
    labels = torch.tensor([[[0, 1], [2, 2]], [[3, 3], [0, 4]]])  # 2 images of 2 x 2
    generator = torch.Generator().manual_seed(0)
    masks, partners = classmix_masks(labels, probability=1.0, generator=generator)
    assert partners.tolist() == [1, 0]
    # half of the partner's foreground classes (at least one), all their pixels
    for i, j in ((0, 1), (1, 0)):
        pasted = labels[j][masks[i]].unique()
        assert len(pasted) == max(len(labels[j][labels[j] > 0].unique()) // 2, 1) and (pasted > 0).all()
        assert torch.equal(masks[i], torch.isin(labels[j], pasted))
    images = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 2, 2)
    mixed_images, mixed_labels = mix(images, masks, partners), mix(labels, masks, partners)
    for i, j in ((0, 1), (1, 0)):
        for y in range(2):
            for x in range(2):
                source = j if masks[i, y, x] else i
                assert torch.equal(mixed_images[i, :, y, x], images[source, :, y, x])
                assert mixed_labels[i, y, x] == labels[source, y, x]
    never, _ = classmix_masks(labels, probability=0.0, generator=generator)
    assert not never.any()


# --- eq. 13: InfoNCE, bank, negatives -----------------------------------------------------------------


def test_info_nce_known_answer():
    query = torch.tensor([[2.0, 0.0]])
    positive = torch.tensor([[1.0, 0.0]])  # cosine 1
    negatives = torch.tensor([[[0.0, 3.0], [-1.0, 0.0]]])  # cosines 0 and -1
    expected = -math.log(math.exp(2.0) / (math.exp(2.0) + math.exp(0.0) + math.exp(-2.0)))
    assert info_nce(query, positive, negatives, temperature=0.5).item() == pytest.approx(expected, rel=1e-6)


def test_fifo_bank_keeps_the_last_n_in_order():
    bank = NegativeBank(num_classes=2, size=4, dim=1)
    bank.push(1, torch.tensor([[1.0], [2.0], [3.0]]))
    assert bank.contents(1).flatten().tolist() == [1, 2, 3] and bank.count(0) == 0
    bank.push(1, torch.tensor([[4.0], [5.0]]))
    assert bank.contents(1).flatten().tolist() == [2, 3, 4, 5]
    bank.push(1, torch.arange(10.0, 16.0)[:, None])  # more than fit: only the newest four
    assert bank.contents(1).flatten().tolist() == [12, 13, 14, 15]
    restored = NegativeBank(2, 4, 1)
    restored.load_state_dict(bank.state_dict())
    assert restored.contents(1).flatten().tolist() == [12, 13, 14, 15]
    drawn = bank.sample(1, (3, 5), torch.Generator().manual_seed(0))
    assert drawn.shape == (3, 5, 1) and set(drawn.flatten().tolist()) <= {12.0, 13.0, 14.0, 15.0}


def test_negatives_are_hard_unreliable_pixels_by_rank_and_label():
    # 4 pixels, K = 8 classes; class 2 is the candidate negative class.
    probs = torch.full((1, 8, 1, 4), 0.001)
    probs[0, 0, 0, :] = 0.9  # background first everywhere
    probs[0, 2, 0, 0] = 0.005  # rank 2, not in the image: (a)
    probs[0, 2, 0, 1] = 0.002  # rank 2 but class 2 in the image labels: not (a); rank 2 < 4: not (b)
    probs[0, 3:6, 0, 2] = torch.tensor([0.02, 0.03, 0.04])
    probs[0, 2, 0, 2] = 0.009  # rank 5: (b)
    probs[0, 2, 0, 3] = 0.5  # probability above 1%: never a negative
    ranks = class_ranks(probs)
    assert ranks[0, 2, 0].tolist() == [2, 2, 5, 2]
    settings = ContrastSettings(rank_low=3, rank_high=6)
    high = torch.ones(1, 1, 4, dtype=torch.bool)
    absent = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0]])
    present = torch.tensor([[1, 0, 1, 0, 0, 0, 0, 0]])
    assert negative_mask(probs, ranks, absent, high, 2, settings)[0, 0].tolist() == [True, True, True, False]
    assert negative_mask(probs, ranks, present, high, 2, settings)[0, 0].tolist() == [False, False, True, False]
    assert not negative_mask(probs, ranks, absent, ~high, 2, settings).any()  # low entropy: never


def test_entropy_groups_are_the_alpha_quantiles():
    entropies = torch.arange(10.0).reshape(1, 1, 10)
    low, high = entropy_groups(entropies, 0.2)
    assert low.flatten().tolist() == [True] * 2 + [False] * 8  # <= the 0.2-quantile (lower)
    assert high.flatten().tolist() == [False] * 7 + [True] * 3  # >= the 0.8-quantile (7.2 -> 7)


def test_contrast_loss_pulls_queries_to_their_prototype():
    # Two classes; the teacher is sure everywhere but class 1 is second-ranked (hard) in column 1.
    generator = torch.Generator().manual_seed(0)
    probs = torch.tensor([[0.999, 0.999, 0.6], [0.001, 0.001, 0.4]]).reshape(1, 2, 1, 3)
    cam_labels = torch.tensor([[[0, 0, IGNORE]]])
    teacher = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]).reshape(1, 2, 1, 3)
    bank = NegativeBank(2, 4, 2)
    bank.push(0, torch.tensor([[0.0, 1.0]]))
    student = teacher.clone().requires_grad_(True)
    settings = ContrastSettings(queries=3, negatives=2)
    loss = contrast_loss(student, teacher, probs, cam_labels, torch.tensor([[1, 0]]), 0.5, bank, settings, generator)
    # class 0: queries = prototype = (1, 0), negatives = (0, 1): -log(e^2 / (e^2 + 2 e^0)); class 1 has no
    # query: the sum is divided by the 2 classes (eq. 13's 1 / |C|).
    expected = -math.log(math.exp(2) / (math.exp(2) + 2)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)


# --- schedules, EMA ------------------------------------------------------------------------------


def test_ramps_and_warm_up():
    settings = CSRMLossSettings()
    assert linear_ramp(0.1, 1.0, 0.5) == pytest.approx(0.55) and linear_ramp(0.2, 0.0, 2.0) == 0.0
    warm = loss_weights(settings, epoch=0, progress=0.0)
    assert (warm.s2c, warm.u, warm.m) == (0.0, 0.0, 0.0) and warm.sigma == pytest.approx(0.1)
    later = loss_weights(settings, epoch=1, progress=0.5)
    assert (later.s2c, later.u, later.m) == (1.0, 1.0, 1.0)
    assert later.sigma == pytest.approx(0.55) and later.alpha == pytest.approx(0.1)
    only_s = loss_weights(CSRMLossSettings(use_s2c=False, use_u=False, use_m=False), epoch=3, progress=0.5)
    assert (only_s.s2c, only_s.u, only_s.m) == (0.0, 0.0, 0.0)  # Table 1, row 1


def test_ema_momentum_copies_during_warm_up_then_ramps_to_its_cap():
    assert ema_momentum(3, warmup_steps=5, momentum=0.99) == 0.0
    assert ema_momentum(5, 5, 0.99) == 0.0 and ema_momentum(6, 5, 0.99) == pytest.approx(0.5)
    assert ema_momentum(1000, 5, 0.99) == pytest.approx(0.99)


# --- the networks, the CAM loader, puzzle --------------------------------------------------------


@pytest.fixture(scope="module")
def cam_model():
    torch.manual_seed(0)
    return CAMClassifier(build_features(TRUNK, "random", "test"), 3, freeze_batchnorm=False).eval()


def test_csrm_network_shapes(cam_model):
    net = CSRMNet(build_features(TRUNK, "random", "test"), 4).eval()
    out = net(torch.rand(2, 3, 64, 48))
    assert out.cams.shape == (2, 3, 4, 3) and out.logits.shape == (2, 3)
    assert out.segmentation.shape == (2, 4, 64, 48) and out.representation.shape == (2, 256, 16, 12)


def puzzle_cam_state_dict(model: CAMClassifier) -> dict:
    """How Puzzle-CAM saves its classifier: ``model.*`` trunk keys, ``stage*`` aliases, ``classifier``."""
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("features.body."):
            name = key.removeprefix("features.body.")
            state[f"model.{name}"] = value.clone()
            if name.startswith("layer1."):
                state[f"stage2.0.{name.removeprefix('layer1.')}"] = value.clone()
        elif not key.endswith("num_batches_tracked"):
            state[key] = value.clone()
    return state


@pytest.mark.parametrize("layout", ["puzzle-cam", "p-noc", "ours"])
def test_cam_model_loader_fills_trunk_and_classifier(tmp_path, cam_model, layout):
    if layout == "puzzle-cam":
        payload = puzzle_cam_state_dict(cam_model)
    elif layout == "p-noc":
        payload = {k.replace("features.body.", "backbone."): v for k, v in cam_model.state_dict().items()}
    else:
        payload = {"format": "cam-model/1", "arch": {"method": "cam"}, "model": cam_model.state_dict()}
    path = tmp_path / "cam.pth"
    torch.save(payload, path)
    net = CSRMNet(build_features(TRUNK, "random", "test"), 4)
    load_cam_weights(net, path)
    for key, value in cam_model.state_dict().items():
        assert torch.equal(net.state_dict()[key], value), key
    images = torch.rand(1, 3, 64, 64)
    assert torch.allclose(net.eval()(images).cams, cam_model(images)[1], atol=1e-5)


def test_cam_model_loader_refuses_another_network(tmp_path, cam_model):
    path = tmp_path / "other.pth"
    torch.save({"model.conv1.weight": torch.zeros(3, 3, 1, 1), "classifier.weight": torch.zeros(3, 512, 1, 1)}, path)
    with pytest.raises(WeightsError, match="does not fit"):
        load_cam_weights(CSRMNet(build_features(TRUNK, "random", "test"), 4), path)
    rcm = tmp_path / "rcm.pt"
    torch.save({"format": "x", "arch": {"method": "rcm_mam"}, "model": {}}, rcm)
    with pytest.raises(WeightsError, match="not a CAM classifier"):
        load_cam_weights(CSRMNet(build_features(TRUNK, "random", "test"), 4), rcm)


def test_puzzle_tiles_merge_back_and_alpha_ramps():
    images = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    tiles = tile_images(images)
    # tile-major: all images' top-left tiles first, then top-right, ...
    assert tiles.shape == (8, 3, 2, 3) and torch.equal(tiles[1], images[1, :, :2, :3])
    assert torch.equal(tiles[2], images[0, :, :2, 3:]) and torch.equal(tiles[7], images[1, :, 2:, 3:])
    assert torch.equal(merge_tiles(tiles), images)
    assert puzzle_alpha(4.0, 0, 100, 0.5) == 0 and puzzle_alpha(4.0, 25, 100, 0.5) == 2.0
    assert puzzle_alpha(4.0, 80, 100, 0.5) == 4.0


def test_puzzle_losses_equal_a_hand_assembly(cam_model):
    images, labels = torch.rand(2, 3, 64, 64), torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    total, parts = puzzle_losses(cam_model, images, labels, alpha=2.0)
    cams = cam_model(images)[1]
    tiles = [cam_model(images[:, :, y : y + 32, x : x + 32])[0] for y in (0, 32) for x in (0, 32)]
    merged = cam_model.classifier(torch.cat([torch.cat(tiles[:2], -1), torch.cat(tiles[2:], -1)], -2))
    re = ((cams - merged).abs() * labels[:, :, None, None]).mean()
    by_hand = (F.multilabel_soft_margin_loss(cams.mean((-2, -1)), labels)
               + F.multilabel_soft_margin_loss(merged.mean((-2, -1)), labels) + 2.0 * re)
    assert total.item() == pytest.approx(by_hand.item(), rel=1e-5) and parts["re"] == pytest.approx(re.item(), rel=1e-5)
    plain, plain_parts = puzzle_losses(cam_model, images, labels, alpha=0.0)
    assert plain.item() == pytest.approx(parts["cls"].item(), rel=1e-6) and plain_parts["re"] == 0


def test_training_step_trains_every_branch_and_leaves_the_teacher_alone():
    torch.manual_seed(0)
    student = CSRMNet(build_features(TRUNK, "random", "test"), 3)
    with torch.no_grad():
        student.classifier.weight.abs_()  # CAMs >= 0 on the ReLU'd features: foreground pseudo-labels exist
    teacher = teacher_copy(student)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    images = torch.rand(4, 3, 32, 32)
    rgb = (images.permute(0, 2, 3, 1) * 255).to(torch.uint8)
    labels = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    bank = NegativeBank(3, 8, 256)
    for c in range(3):  # negatives from earlier batches (this one has none: 3 classes, no hard ranks)
        bank.push(c, torch.randn(8, 256))
    settings = CSRMLossSettings(delta_fg=0.3, in_loop_crf=False, contrast=ContrastSettings(queries=4, negatives=8))
    total, parts = training_step(student.train(), teacher, images, rgb, labels, 1, 0.5, bank, settings, None,
                                 torch.Generator().manual_seed(0))
    assert set(parts) == {"c", "s", "s2c", "u", "m"} and torch.isfinite(total) and parts["m"] > 0
    total.backward()
    for name in ("classifier", "segmentation", "representation"):
        grads = [p.grad for n, p in student.named_parameters() if n.startswith(name) and p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    warm_total, warm_parts = training_step(student, teacher, images, rgb, labels, 0, 0.0, bank, settings, None,
                                           torch.Generator().manual_seed(0))
    assert warm_parts["u"] == 0 and warm_parts["m"] == 0 and warm_parts["s2c"] == 0  # warm-up: eq. 14 without them
    assert warm_total.item() == pytest.approx((warm_parts["c"] + warm_parts["s"]).item(), rel=1e-6)


# --- through the shared trainer and predictor ------------------------------------------------------


def cam_settings(**overrides) -> dict:
    cam = dict(backbone=TRUNK, weights="random", epochs=1, batch_size=4, lr=0.1, lr_power=0.9, momentum=0.0,
               weight_decay=1e-4, crop_size=32, long_side_range=[32, 64], flip=True, jitter=False, puzzle_alpha=4.0,
               puzzle_ramp=0.5, freeze_batchnorm=False)
    return cam | overrides


def csrm_train_settings(init: str, **overrides) -> dict:
    from test_pc2m import train_settings

    csrm = dict(init=init, image_size=32, flip=True, lr=0.007, weight_decay=1e-4, momentum=0.9, nesterov=True,
                ema_momentum=0.99, warmup_epochs=1, delta_bg=0.05, delta_fg=0.35, in_loop_crf=True, crf_preset="psa",
                sigma_start=0.1, sigma_end=1.0, lambda_s2c_start=1.0, lambda_s2c_end=1.0, lambda_u=1.0, lambda_m=1.0,
                alpha_start=0.2, alpha_end=0.0, classmix_probability=0.5, queries=4, negatives=8, temperature=0.5,
                query_threshold=0.3, negative_threshold=0.01, rank_low=3, rank_high=6, use_s2c=True, use_u=True,
                use_m=True)
    return train_settings(**({"method": "csrm", "epochs": 3, "batch_size": 4, "cam": cam_settings(), "csrm": csrm}
                             | overrides))


def test_cam_baseline_then_csrm_train_resume_exactly_and_predict(tmp_path):
    import shutil

    import pandas as pd

    from pipeline import shards
    from pipeline.predict import predict_shard
    from pipeline.training.trainer import train
    from test_pc2m import BACKBONE, NUM_CLASSES, make_demo, predict_settings

    demo = make_demo(tmp_path / "demo", 8, 2, 48, 40)

    def run(out, train_params, threads=2):
        train(demo / "manifest.csv", demo / "classes.json", None, out,
              {"backbone": BACKBONE, "train": train_params, "mode": "weak", "seed": 0}, threads)

    from test_pc2m import train_settings

    run(tmp_path / "cam", train_settings(method="cam", epochs=1, batch_size=4, cam=cam_settings()))
    cam_history = pd.read_csv(tmp_path / "cam" / "history.csv")
    assert {"cls", "p_cls", "re", "puzzle_alpha"} <= set(cam_history.columns) and cam_history["re"].gt(0).all()
    init = str(tmp_path / "cam" / "model.pt")
    settings = csrm_train_settings(init, keep_checkpoints=3)
    run(tmp_path / "straight", settings)
    history = pd.read_csv(tmp_path / "straight" / "history.csv")
    assert list(history["lambda_u"]) == [0.0, 1.0, 1.0]  # the warm-up epoch, then eq. 14 in full
    assert history["u"].iloc[0] == 0 and history["u"].iloc[1:].gt(0).all()
    assert history["lr"].is_monotonic_decreasing and history["s"].gt(0).all()
    straight = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    assert straight["arch"]["method"] == "csrm"
    # A run killed after epoch 2 resumes to the same teacher, the same history (the CRF in worker processes).
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copyfile(tmp_path / "straight" / "checkpoints" / "epoch-0002.pt",
                    tmp_path / "resumed" / "checkpoints" / "last.pt")
    run(tmp_path / "resumed", settings)
    resumed = torch.load(tmp_path / "resumed" / "model.pt", weights_only=True)
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    pd.testing.assert_frame_equal(history.drop(columns="seconds"),
                                  pd.read_csv(tmp_path / "resumed" / "history.csv").drop(columns="seconds"))

    predict = predict_settings(max_size=48, flip=True) | {"csrm": {"scales": [0.5, 1.0]},
                                                          "cam": {"scales": [1.0], "background": 0.35}}
    params = {"backbone": BACKBONE, "predict": predict, "mode": "weak"}
    for model in ("straight", "cam"):
        out = tmp_path / f"predict-{model}"
        predict_shard(demo / "manifest.csv", 0, tmp_path / model / "model.pt", out / "probs.safetensors",
                      out / "masks", params, 2)
        meta = shards.read_meta(out / "probs.safetensors")
        assert meta["num_classes"] == NUM_CLASSES and meta["patch_size"] == 8
        for image in shards.read_images(out / "probs.safetensors").values():
            probs = image["probs"].float()
            torch.testing.assert_close(probs.sum(0), torch.ones_like(probs[0]), atol=2e-3, rtol=0)
        assert len(list((out / "masks").glob("*.png"))) == len(meta["image_ids"]) == 10


def test_segmentation_predictor_averages_scales_and_flips():
    from pipeline.methods.csrm.method import SegmentationPredictor

    torch.manual_seed(0)
    net = CSRMNet(build_features(TRUNK, "random", "test"), 3).eval()
    predictor = SegmentationPredictor(net, (0.5, 1.0))
    images = torch.rand(1, 3, 32, 48)
    with torch.no_grad():
        views = []
        for scale in (0.5, 1.0):
            scaled = F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
            for flip in (False, True):
                probs = F.softmax(net(scaled.flip(-1) if flip else scaled).segmentation, dim=1)
                probs = F.interpolate(probs, size=(32, 48), mode="bilinear", align_corners=False)
                views.append(probs.flip(-1) if flip else probs)
        by_hand = F.avg_pool2d(torch.stack(views).mean(0), 8)
    torch.testing.assert_close(predictor.predict(images, flip=True), by_hand, atol=1e-5, rtol=1e-4)


def test_csrm_trains_on_clustering_pseudo_labels_without_ground_truth(tmp_path):
    """Unsupervised mode: masks gone, manifest labels blanked; CSRM (from ImageNet-free random
    weights, init none) trains on the clusters and predicts clusters + 1 classes."""
    from pipeline import shards
    from pipeline.datasets import read_manifest
    from pipeline.predict import predict_shard
    from pipeline.training.trainer import train
    from test_pc2m import BACKBONE, make_demo, predict_settings

    demo = make_demo(tmp_path / "demo", 8, 2, 48, 40)
    manifest = read_manifest(demo / "manifest.csv")
    pseudo = manifest[manifest["split"] == "train"][["image_id", "labels", "has_labels"]].copy()
    pseudo["labels"] = [str((i % 2) + 1) for i in range(len(pseudo))]  # clusters 1..2
    pseudo.to_csv(tmp_path / "image_labels.csv", index=False)
    (tmp_path / "summary.json").write_text('{"num_clusters": 2}')
    blind = manifest.assign(mask_path=[str(tmp_path / "gone" / f"{i}.png") for i in manifest["image_id"]],
                            labels="", has_labels=False)
    blind.to_csv(tmp_path / "manifest.csv", index=False)
    predict = predict_settings(max_size=48, restrict_to_labels=True) | {"csrm": {"scales": [1.0]}}
    params = {"backbone": BACKBONE, "train": csrm_train_settings("none", epochs=2), "mode": "unsupervised",
              "seed": 0, "predict": predict}
    train(tmp_path / "manifest.csv", demo / "classes.json", tmp_path / "image_labels.csv", tmp_path / "out", params, 1)
    done = json.loads((tmp_path / "out" / "done.json").read_text())
    assert done["num_classes"] == 3 and done["mode"] == "unsupervised" and done["init"] == "none"
    predict_shard(tmp_path / "manifest.csv", 0, tmp_path / "out" / "model.pt", tmp_path / "probs.safetensors",
                  tmp_path / "masks", params, 1, labels_path=tmp_path / "image_labels.csv")
    meta = shards.read_meta(tmp_path / "probs.safetensors")
    assert meta["num_classes"] == 3 and set(meta["restricted_images"]) == set(pseudo["image_id"])
