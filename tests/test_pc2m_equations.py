"""PC2M's equations (paper 000 Sec. 3, Algorithm 1, App. A-B) against independent computations:
the loss by hand on a 2-image, 2 x 2-patch example, the MCE against torch's BCE, the Sinkhorn plan
against a plain numpy Sinkhorn-Knopp at two epsilons, the training phases and learning rates, the
token-to-grid order on a non-square input, and the epsilon / alpha-tilde schedules at the paper's
stated values. Nothing here calls the module's helpers to build its expected values."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import yaml

from pipeline.errors import ConfigError
from pipeline.methods.pc2m import ot
from pipeline.methods.pc2m.losses import LossSettings, pc2m_loss
from pipeline.methods.pc2m.method import PC2MRun
from pipeline.methods.pc2m.model import PatchClassifier, PatchPredictions, image_class_probabilities, multilabel_bce
from pipeline.methods.pc2m.settings import TrainSettings
from pipeline.training.augment import Alignment

REPO = Path(__file__).resolve().parents[1]


def config_train() -> dict:
    """config.yaml's train section, PC2M's keys only."""
    train = yaml.safe_load((REPO / "config.yaml").read_text())["train"]
    return {key: value for key, value in train.items() if key != "rcm_mam"}


def numpy_sinkhorn(probs: np.ndarray, alpha: np.ndarray, epsilon: float, iterations: int) -> np.ndarray:
    """Sinkhorn-Knopp in the probability domain (paper ref. [15]): K = P^(1/eps), columns scaled
    to alpha, then rows to 1/N; returned times N so that each row is a soft label."""
    n = probs.shape[0]
    kernel = probs ** (1.0 / epsilon)
    u = np.ones(n)
    for _ in range(iterations):
        v = alpha / (kernel.T @ u)
        u = (1.0 / n) / (kernel @ v)
    return n * u[:, None] * kernel * v[None, :]


# ---------------------------------------------------------------------------------------------
# L_PC2M by hand (Algorithm 1): MCE + CE(Q^g, P^l) / 2 + CE(Q^l, P^g) / 2


# Where each local patch (b, i, j) lies in the global view, as (weight, global row, global column)
# bilinear corners; None = not seen by the global view. Image 0: the local view is the global view
# flipped upside down; image 1: one patch half-way between two global patches, one outside.
CORNERS = {
    (0, 0, 0): [(1.0, 1, 0)], (0, 0, 1): [(1.0, 1, 1)], (0, 1, 0): [(1.0, 0, 0)], (0, 1, 1): [(1.0, 0, 1)],
    (1, 0, 0): [(0.5, 0, 0), (0.5, 0, 1)], (1, 0, 1): [(1.0, 1, 1)], (1, 1, 0): [(1.0, 0, 0)], (1, 1, 1): None,
}
# Normalised grid_sample coordinates (x, y) of the centres of a 2 x 2 patch grid (align_corners=False).
CENTRE = {0: -0.5, 1: 0.5}


def hand_alignment() -> Alignment:
    grid = torch.zeros(2, 2, 2, 2)
    valid = torch.zeros(2, 2, 2, dtype=torch.bool)
    for (b, i, j), corners in CORNERS.items():
        if corners is None:
            grid[b, i, j] = torch.tensor([0.9, 0.9])
            continue
        valid[b, i, j] = True
        grid[b, i, j, 0] = sum(w * CENTRE[gj] for w, _, gj in corners)
        grid[b, i, j, 1] = sum(w * CENTRE[gi] for w, gi, _ in corners)
    return Alignment(grid=grid, valid=valid)


def hand_example():
    generator = torch.Generator().manual_seed(7)
    logits_g = torch.randn(2, 3, 2, 2, generator=generator, dtype=torch.float64) * 1.5
    logits_l = torch.randn(2, 3, 2, 2, generator=generator, dtype=torch.float64) * 1.5
    targets = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]], dtype=torch.float64)
    alpha = np.array([0.5, 0.3, 0.2])
    return logits_g, logits_l, targets, alpha


def hand_loss(logits_g, logits_l, targets, alpha, epsilon, weight=0.5, pairing="paper", resampled=True,
              outside_g=frozenset(), outside_l=frozenset()):
    """Algorithm 1 written out patch by patch (torch only for the gradient; plans are constants).
    ``outside_g`` / ``outside_l``: (b, i, j) patches outside the image (zero padding), which take
    no part: not pooled, not transported, not read, not matched."""
    log_pg = logits_g - torch.logsumexp(logits_g, dim=1, keepdim=True)
    log_pl = logits_l - torch.logsumexp(logits_l, dim=1, keepdim=True)
    pg, pl = log_pg.exp(), log_pl.exp()
    # Plans over the N patches of the batch inside the image, rows in (b, i, j) order.
    rows = [(b, i, j) for b in range(2) for i in range(2) for j in range(2)]
    rows_g = [r for r in rows if r not in outside_g]
    rows_l = [r for r in rows if r not in outside_l]
    flat_g = np.array([[pg[b, c, i, j].item() for c in range(3)] for b, i, j in rows_g])
    flat_l = np.array([[pl[b, c, i, j].item() for c in range(3)] for b, i, j in rows_l])
    qg = dict(zip(rows_g, torch.from_numpy(numpy_sinkhorn(flat_g, alpha, epsilon, 3))))
    ql = dict(zip(rows_l, torch.from_numpy(numpy_sinkhorn(flat_l, alpha, epsilon, 3))))

    def corners_inside(b, i, j):
        corners = CORNERS[(b, i, j)] if resampled else [(1.0, i, j)]
        inside = [(w, gi, gj) for w, gi, gj in corners or [] if (b, gi, gj) not in outside_g]
        total = sum(w for w, _, _ in inside)
        return [(w / total, gi, gj) for w, gi, gj in inside]

    def at_local(values, b, i, j):
        return sum(w * values(b, gi, gj) for w, gi, gj in corners_inside(b, i, j))

    ce_g_to_l, ce_l_to_g, count = 0.0, 0.0, 0
    for b, i, j in rows:
        if CORNERS[(b, i, j)] is None or (b, i, j) in outside_l or not corners_inside(b, i, j):
            continue
        count += 1
        qg_here = at_local(lambda b_, i_, j_: qg[(b_, i_, j_)], b, i, j)
        log_pg_here = torch.log(at_local(lambda b_, i_, j_: pg[b_, :, i_, j_], b, i, j))
        if pairing == "paper":
            ce_g_to_l = ce_g_to_l - (qg_here * log_pl[b, :, i, j]).sum()
            ce_l_to_g = ce_l_to_g - (ql[(b, i, j)] * log_pg_here).sum()
        else:  # each plan against its own branch: the pairing the paper does not use
            ce_g_to_l = ce_g_to_l - (qg_here * log_pg_here).sum()
            ce_l_to_g = ce_l_to_g - (ql[(b, i, j)] * log_pl[b, :, i, j]).sum()
    pooled = torch.stack([torch.stack([pg[b, :, i, j] for bb, i, j in rows_g if bb == b]).amax(dim=0)
                          for b in range(2)])
    mce = -(targets * pooled.log() + (1 - targets) * (1 - pooled).log()).sum(dim=1).mean()
    return mce + weight * (ce_g_to_l / count + ce_l_to_g / count)


@pytest.mark.parametrize("epsilon,weight", [(0.1, 0.5), (0.5, 0.5), (0.5, 1.0)])
def test_pc2m_loss_equals_the_hand_computation(epsilon, weight):
    """``train.match_weight`` 0.5 (Algorithm 1, the default) and 1 (eq. 2)."""
    logits_g, logits_l, targets, alpha = hand_example()
    expected_g = logits_g.clone().requires_grad_(True)
    expected_l = logits_l.clone().requires_grad_(True)
    expected = hand_loss(expected_g, expected_l, targets, alpha, epsilon, weight)
    expected.backward()

    ours_g = logits_g.clone().requires_grad_(True)
    ours_l = logits_l.clone().requires_grad_(True)
    terms = pc2m_loss(PatchPredictions(torch.log_softmax(ours_g, 1)), PatchPredictions(torch.log_softmax(ours_l, 1)),
                      hand_alignment(), targets, torch.from_numpy(alpha), epsilon,
                      LossSettings(True, True, 3, weight))
    terms.total.backward()
    # The plans are computed in float32 (ot.sinkhorn), hence the tolerance.
    assert float(terms.total.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    # Gradients equal those of the hand formula with the plans held constant (stop-gradient).
    torch.testing.assert_close(ours_g.grad, expected_g.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours_l.grad, expected_l.grad, rtol=1e-4, atol=1e-6)
    # The test has teeth: a swapped pairing, a missing resampling or the other weight move the value.
    for wrong in (dict(pairing="self"), dict(resampled=False), dict(weight=1.5 - weight)):
        other = hand_loss(logits_g, logits_l, targets, alpha, epsilon, **{"weight": weight, **wrong})
        assert abs(float(other.detach()) - float(expected.detach())) > 1e-2, wrong


# Patches outside the image: global patch (1, 0, 1) (so local patch (1, 0, 0) reads global
# (1, 0, 0) alone) and local patch (0, 0, 1), as a rotated view's zero-padded corners.
OUTSIDE_G, OUTSIDE_L = frozenset({(1, 0, 1)}), frozenset({(0, 0, 1)})


def inside_mask(outside) -> torch.Tensor:
    valid = torch.ones(2, 2, 2, dtype=torch.bool)
    for b, i, j in outside:
        valid[b, i, j] = False
    return valid


def test_padded_patches_take_no_part_in_mce_transport_and_match():
    """L_PC2M with patches outside the image equals Algorithm 1 written out on the patches inside
    (MCE pooled, plans over, reads renormalised over, CE averaged over them), whatever the padded
    patches predict; they get no gradient. The padded global patch is made to predict class 1,
    absent from image 1, so pooling it would move the MCE."""
    logits_g, logits_l, targets, alpha = hand_example()
    logits_g[1, 1, 0, 1] = 8.0
    expected_g = logits_g.clone().requires_grad_(True)
    expected_l = logits_l.clone().requires_grad_(True)
    expected = hand_loss(expected_g, expected_l, targets, alpha, 0.5, outside_g=OUTSIDE_G, outside_l=OUTSIDE_L)
    expected.backward()

    def ours(global_logits, local_logits):
        return pc2m_loss(PatchPredictions(torch.log_softmax(global_logits, 1)),
                         PatchPredictions(torch.log_softmax(local_logits, 1)),
                         hand_alignment(), targets, torch.from_numpy(alpha), 0.5, LossSettings(True, True, 3, 0.5),
                         global_valid=inside_mask(OUTSIDE_G), local_valid=inside_mask(OUTSIDE_L))

    ours_g = logits_g.clone().requires_grad_(True)
    ours_l = logits_l.clone().requires_grad_(True)
    terms = ours(ours_g, ours_l)
    terms.total.backward()
    assert float(terms.total.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    torch.testing.assert_close(ours_g.grad, expected_g.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours_l.grad, expected_l.grad, rtol=1e-4, atol=1e-6)
    assert float(ours_g.grad[1, :, 0, 1].abs().max()) == 0.0 and float(ours_l.grad[0, :, 0, 1].abs().max()) == 0.0
    # Other predictions on the padding: the same loss.
    other_g, other_l = logits_g.clone(), logits_l.clone()
    other_g[1, :, 0, 1] = torch.tensor([-3.0, 5.0, 2.0], dtype=torch.float64)
    other_l[0, :, 0, 1] = torch.tensor([9.0, -4.0, 0.0], dtype=torch.float64)
    assert float(ours(other_g, other_l).total) == pytest.approx(float(terms.total.detach()), rel=1e-6)
    # The test has teeth: counting the padding (anywhere) moves the value.
    for wrong in (dict(), dict(outside_l=OUTSIDE_L), dict(outside_g=OUTSIDE_G)):
        other = hand_loss(logits_g, logits_l, targets, alpha, 0.5, **wrong)
        assert abs(float(other.detach()) - float(expected.detach())) > 1e-2, wrong
    # The MCE alone: by hand, the padded patch's 8.0 on class 1 is not pooled.
    pg = torch.softmax(logits_g, dim=1)
    pooled_1 = torch.stack([pg[1, :, 0, 0], pg[1, :, 1, 0], pg[1, :, 1, 1]]).amax(dim=0)
    assert float(pg[1, 1, 0, 1]) > float(pooled_1[1]) + 0.03  # pooling the padding would change it
    torch.testing.assert_close(image_class_probabilities(PatchPredictions(torch.log_softmax(logits_g, 1)),
                                                         inside_mask(OUTSIDE_G))[1], pooled_1)


def test_sinkhorn_transports_only_the_patches_inside():
    """Rows left out: the plan of the others is the plain Sinkhorn of those rows alone (N = their
    count), and the left-out rows get no mass."""
    generator = torch.Generator().manual_seed(11)
    log_probs = torch.log_softmax(torch.randn(12, 4, generator=generator, dtype=torch.float64) * 2, dim=1)
    alpha = np.array([0.4, 0.3, 0.2, 0.1])
    valid = torch.tensor([True] * 5 + [False] * 2 + [True] * 4 + [False])
    plan = ot.sinkhorn(log_probs, torch.from_numpy(alpha), 0.5, 3, valid=valid).double()
    expected = numpy_sinkhorn(log_probs[valid].exp().numpy(), alpha, 0.5, 3)
    np.testing.assert_allclose(plan[valid].numpy(), expected, rtol=1e-4, atol=1e-7)
    assert float(plan[~valid].abs().max()) == 0.0


def test_class_areas_leave_out_padded_patches():
    """Eq. 6 over the K' patches inside the image: image 0 has its corner patch outside (it says
    class 2 with certainty), image 1 none."""
    probs = torch.tensor([[[0.5, 0.2], [0.1, 0.0]], [[0.3, 0.6], [0.7, 0.0]], [[0.2, 0.2], [0.2, 1.0]]])
    probs = torch.stack([probs, probs.flip(-1)])  # 2 x 3 x 2 x 2
    valid = torch.ones(2, 2, 2, dtype=torch.bool)
    valid[0, 1, 1] = False
    areas = ot.image_class_areas(probs, valid)
    torch.testing.assert_close(areas[0], torch.tensor([0.8, 1.6, 0.6]) / 3)
    torch.testing.assert_close(areas[1], torch.tensor([0.8, 1.6, 1.6]) / 4)
    torch.testing.assert_close(ot.image_class_areas(probs)[0], torch.tensor([0.8, 1.6, 1.6]) / 4)


def test_mce_is_torch_bce_on_max_pooled_probabilities():
    """Algorithm 1's MCE: BCE of the max-pooled patch probabilities, summed over classes, mean
    over images (paper 001 eq. 1 would average over classes: |C| times smaller)."""
    generator = torch.Generator().manual_seed(3)
    log_probs = torch.log_softmax(torch.randn(3, 4, 3, 5, generator=generator), dim=1)
    targets = torch.tensor([[1.0, 0, 1, 0], [1, 1, 1, 0], [1, 0, 0, 1]])
    pooled = F.adaptive_max_pool2d(log_probs.exp(), 1).flatten(1)
    reference = F.binary_cross_entropy(pooled, targets, reduction="sum") / 3
    ours = multilabel_bce(image_class_probabilities(PatchPredictions(log_probs)), targets)
    assert float(ours) == pytest.approx(float(reference), rel=1e-6)
    assert float(F.binary_cross_entropy(pooled, targets)) == pytest.approx(float(reference) / 4, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Sinkhorn: epsilon shapes the plan (App. B)


def test_epsilon_changes_the_plan_as_an_independent_sinkhorn_says():
    generator = torch.Generator().manual_seed(5)
    log_probs = torch.log_softmax(torch.randn(40, 4, generator=generator, dtype=torch.float64) * 2, dim=1)
    alpha = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    plans = {}
    for epsilon in (0.1, 0.9, 50.0):
        plans[epsilon] = ot.sinkhorn(log_probs, alpha, epsilon, 3).double()
        expected = numpy_sinkhorn(log_probs.exp().numpy(), alpha.numpy(), epsilon, 3)
        np.testing.assert_allclose(plans[epsilon].numpy(), expected, rtol=1e-4, atol=1e-7)

    def entropy(plan):
        return float(-(plan * plan.clamp_min(1e-30).log()).sum(dim=1).mean())

    # Small eps sharpens the pseudo-labels (kernel P^10), large eps flattens them towards alpha.
    assert (plans[0.1] - plans[0.9]).abs().max() > 0.1
    assert entropy(plans[0.1]) < entropy(plans[0.9]) - 0.1
    torch.testing.assert_close(plans[50.0], alpha.expand(40, 4), atol=0.05, rtol=0)


# ---------------------------------------------------------------------------------------------
# Training phases (Sec. 4.2): what trains, at which learning rate


def test_phases_free_the_papers_parameters_at_the_papers_learning_rates():
    backbone = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=16, patch_size=8,
                                 embed_dim=12, depth=7, num_heads=2, num_classes=0)
    # PatchClassifierRun.optimizer, on a run holding only what it reads (model, settings, device).
    run = PC2MRun.__new__(PC2MRun)
    run.model = PatchClassifier(backbone, 3)
    run.settings = TrainSettings.from_params(config_train())
    run.device = torch.device("cpu")
    assert (run.settings.warmup_epochs, run.settings.unfreeze_blocks) == (1, 5)  # Sec. 4.2

    def names(parameters):
        by_id = {id(p): n for n, p in run.model.named_parameters()}
        return {by_id[id(p)] for p in parameters}

    warmup, warmup_optimizer = run.optimizer(0)
    assert names(warmup) == {"classifier.weight"}
    assert warmup_optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)  # Sec. 4.2: 1e-3
    assert names(warmup_optimizer.param_groups[0]["params"]) == {"classifier.weight"}

    tuned, tuned_optimizer = run.optimizer(1)
    expected = {"classifier.weight", "backbone.norm.weight", "backbone.norm.bias"}
    expected |= {n for n, _ in run.model.named_parameters() if n.split(".")[1:3] in
                 [["blocks", str(k)] for k in range(2, 7)]}
    assert names(tuned) == expected == names(tuned_optimizer.param_groups[0]["params"])
    assert not any(n.startswith(("backbone.blocks.0.", "backbone.blocks.1.", "backbone.patch_embed",
                                 "backbone.pos_embed", "backbone.cls_token")) for n in names(tuned))
    assert tuned_optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)  # 1e-3 scaled by 1e-1
    assert all(p.requires_grad == (n in expected) for n, p in run.model.named_parameters())


# ---------------------------------------------------------------------------------------------
# Token-to-grid order (eq. 1): patch (row, column) of the image is cell (row, column) of the map


def test_tokens_land_on_their_patch_on_a_non_square_input():
    """A 2 x 3-patch image whose patch (r, c) lights channel 3r + c; a one-layer-free ViT whose
    patch embedding copies the mean channel value and whose classifier is the identity must
    predict class 3r + c at cell (r, c). A column-major or transposed reshape fails."""
    patch, rows, cols = 8, 2, 3
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=(rows * patch, cols * patch),
                            patch_size=patch, in_chans=6, embed_dim=6, depth=0, num_heads=1, num_classes=0)
    with torch.no_grad():
        vit.patch_embed.proj.weight.zero_()
        vit.patch_embed.proj.bias.zero_()
        for k in range(6):
            vit.patch_embed.proj.weight[k, k] = 1.0 / patch**2
        vit.pos_embed.zero_()
    model = PatchClassifier(vit, 6).eval()
    with torch.no_grad():
        model.classifier.weight.copy_(torch.eye(6) * 10)
    image = torch.zeros(1, 6, rows * patch, cols * patch)
    for r in range(rows):
        for c in range(cols):
            image[0, 3 * r + c, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = 1.0
    with torch.no_grad():
        predicted = model(image).log_probs.argmax(dim=1)[0]
    assert predicted.shape == (rows, cols)
    assert predicted.tolist() == [[0, 1, 2], [3, 4, 5]]


# ---------------------------------------------------------------------------------------------
# Schedules at the paper's stated values (Sec. 4.3, App. B, Algorithm 1)


def test_config_holds_the_papers_schedule_values():
    train = config_train()
    assert (train["epsilon_start"], train["epsilon_end"], train["epsilon_rate"]) == (0.1, 0.9, 0.05)  # App. B
    assert train["sinkhorn_iterations"] == 3  # App. B
    assert train["gamma"] == 0.02  # Sec. 4.3
    # The readings chosen (config.yaml comments, docs/FIDELITY.md).
    assert train["epsilon_schedule"] == "reach_at_40"
    assert train["match_weight"] == 0.5  # Algorithm 1
    assert train["alpha_init"] == "dataset_frequencies"  # Sec. 3.2 text
    assert train["local_view_size"] == "equal"  # Sec. 3.1: K patches per branch
    assert train["class_area_update"] == "offline"  # Sec. 3.2, Algorithm 1
    assert TrainSettings.from_params(train).views().local_size == train["global_size"]
    assert TrainSettings.from_params({**train, "local_view_size": "local_size"}).views().local_size == 64


@pytest.mark.parametrize("key,value", [("epsilon_schedule", "linear"), ("alpha_init", "zeros"),
                                       ("class_area_update", "both"), ("local_view_size", "half")])
def test_unknown_readings_are_refused(key, value):
    with pytest.raises(ConfigError, match=f"train.{key}"):
        TrainSettings.from_params({**config_train(), key: value})


def test_reach_at_40_epsilon_reading_meets_the_papers_numbers():
    """App. B: starts at 0.1, grows exponentially for 40 epochs to 0.9, at "0.05 rate"."""
    eps = [ot.epsilon_at(m, 0.1, 0.9, 0.05, "reach_at_40") for m in range(50)]
    assert eps[0] == pytest.approx(0.1)
    assert eps[40] == pytest.approx(0.9) and eps[39] < 0.9 and eps[45] == 0.9
    growth = [math.log(b / a) for a, b in zip(eps[:40], eps[1:41])]
    assert growth == pytest.approx([math.log(9) / 40] * 40)
    assert round(growth[0], 2) == pytest.approx(0.05, abs=0.006)  # 0.055: "0.05" to one figure
    # The setting follows train.epochs only for `scaled`.
    settings = TrainSettings.from_params({**config_train(), "epochs": 10})
    assert settings.epsilon(9) == pytest.approx(0.1 * 9 ** (9 / 40))


@pytest.mark.parametrize("epochs", [10, 45])
def test_scaled_epsilon_reading_meets_the_end_at_the_last_epoch(epochs):
    settings = TrainSettings.from_params({**config_train(), "epochs": epochs, "epsilon_schedule": "scaled"})
    eps = [settings.epsilon(m) for m in range(epochs)]
    assert eps[0] == pytest.approx(0.1) and eps[-1] == pytest.approx(0.9)
    assert eps[-2] < 0.9
    assert eps[epochs // 2] == pytest.approx(0.1 * 9 ** ((epochs // 2) / (epochs - 1)))


def test_alpha_tilde_initialisations():
    """nu_D (Sec. 3.2: background in every image) or 1/|C| (Algorithm 1: ones(C)/C)."""
    nu_d = ot.class_frequencies([[1], [1, 2], [2, 2]], 4)
    torch.testing.assert_close(ot.initial_class_areas("dataset_frequencies", nu_d),
                               torch.tensor([3.0, 2.0, 2.0, 0.0], dtype=torch.float64) / 7)
    torch.testing.assert_close(ot.initial_class_areas("uniform", nu_d), torch.full((4,), 0.25, dtype=torch.float64))


def test_exponential_epsilon_reading_by_hand():
    """App. B: 0.1, growing by e^0.05 per epoch, capped at 0.9: 0.1 e^(0.05 m)."""
    for epoch in range(60):
        expected = min(0.9, 0.1 * math.exp(0.05 * epoch))
        assert ot.epsilon_at(epoch, 0.1, 0.9, 0.05) == pytest.approx(expected)
    assert ot.epsilon_at(9, 0.1, 0.9, 0.05) == pytest.approx(0.1568, abs=1e-4)  # COCO's last of 10 epochs


def test_alpha_tilde_ema_by_hand():
    """Eq. 7 with gamma 0.02 and Algorithm 1's q / q.sum(): two epochs from nu_D, by hand."""
    alpha = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    q = torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64)  # summed, not normalised, as Algorithm 1
    first = ot.ema_update(alpha, q, 0.02)
    expected_first = [0.98 * 0.6 + 0.02 * 0.5, 0.98 * 0.3 + 0.02 * 0.25, 0.98 * 0.1 + 0.02 * 0.25]
    torch.testing.assert_close(first, torch.tensor(expected_first, dtype=torch.float64))
    second = ot.ema_update(first, q, 0.02)
    expected_second = [0.98 * e + 0.02 * t for e, t in zip(expected_first, (0.5, 0.25, 0.25))]
    torch.testing.assert_close(second, torch.tensor(expected_second, dtype=torch.float64))


def test_alpha_init_reaches_the_run(tmp_path):
    """train.alpha_init sets the first row of alpha.csv (alpha-tilde_0) of a real one-epoch run."""
    import pandas as pd

    from pipeline.training.trainer import train
    from test_pc2m import BACKBONE, NUM_CLASSES, make_demo, train_settings

    index = make_demo(tmp_path, 8, 2, 64, 48)
    params = {"backbone": BACKBONE, "train": train_settings(epochs=1, alpha_init="uniform"), "mode": "weak",
              "seed": 0}
    train(index / "manifest.csv", index / "classes.json", None, tmp_path / "out", params, 1)
    alpha = pd.read_csv(tmp_path / "out" / "alpha.csv").drop(columns="epoch").to_numpy()
    np.testing.assert_allclose(alpha[0], np.full(NUM_CLASSES, 1 / NUM_CLASSES), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# The offline pass of eqs. 6-7 (Sec. 3.2, Algorithm 1's second loop)


def independent_areas(model: torch.nn.Module, paths: list[str], size: int, mean, std) -> np.ndarray:
    """Per image, one at a time: PIL's bicubic square resize, normalised, eval-mode softmax, mean
    over the patches."""
    from PIL import Image

    areas = []
    model.eval()
    with torch.no_grad():
        for path in paths:
            rgb = np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BICUBIC))
            x = (torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255 - torch.tensor(mean)[:, None, None]) \
                / torch.tensor(std)[:, None, None]
            areas.append(torch.softmax(model(x[None]).log_probs, dim=1)[0].mean(dim=(1, 2)).double().numpy())
    return np.stack(areas)


def test_offline_pass_is_the_mean_of_per_image_areas(tmp_path):
    """dataset_class_area_sums over 5 images of several sizes, in batches of 2 (the last partial),
    equals the sum of the per-image areas computed one by one; each process's share adds up to the
    whole; the pass runs in eval mode (the head's dropout 0.5 would move it) and leaves the model
    training."""
    from PIL import Image

    from pipeline.methods.pc2m.method import dataset_class_area_sums
    from pipeline.methods.pc2m.views import PlainImageDataset
    from pipeline.training.data import LabelledImage, source_image

    generator = np.random.default_rng(0)
    paths = []
    for k, (w, h) in enumerate([(40, 30), (32, 32), (50, 20), (24, 36), (33, 33)]):
        paths.append(str(tmp_path / f"{k}.png"))
        Image.fromarray(generator.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    images = [LabelledImage(str(k), path, (1,)) for k, path in enumerate(paths)]
    torch.manual_seed(0)
    backbone = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                 embed_dim=12, depth=1, num_heads=2, num_classes=0)
    model = PatchClassifier(backbone, 4, dropout=0.5).train()
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    dataset = PlainImageDataset(images, 32, mean, std)
    # The workers hand over uint8 pixels, normalised where the model runs: exactly the numbers of
    # normalising them in the worker (the dataset's items before).
    for k, path in enumerate(paths):
        in_worker = (source_image(path, 32) - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
        assert dataset[k].dtype == torch.uint8 and torch.equal(dataset.normalise(dataset[k]), in_worker)
    cpu = torch.device("cpu")
    total = dataset_class_area_sums(model, dataset, list(range(5)), 2, 0, cpu)
    assert model.training
    expected = independent_areas(model, paths, 32, mean, std)
    np.testing.assert_allclose(total.numpy(), expected.sum(axis=0), rtol=1e-5)
    shares = [dataset_class_area_sums(model, dataset, list(range(rank, 5, 2)), 1, 0, cpu) for rank in (0, 1)]
    np.testing.assert_allclose((shares[0] + shares[1]).numpy(), total.numpy(), rtol=1e-6)
    # Train mode (dropout on) would give other areas: the eval mode matters.
    model.train()
    with torch.no_grad():
        dropped = torch.softmax(model(dataset.normalise(torch.stack([dataset[k] for k in range(5)]))).log_probs,
                                dim=1)
    assert np.abs(dropped.mean(dim=(2, 3)).sum(dim=0).double().numpy() - expected.sum(axis=0)).max() > 1e-3


def test_offline_area_update_reaches_the_run(tmp_path):
    """A one-epoch run: alpha-tilde_1 in alpha.csv is eq. 7 applied to the mean per-image areas of
    the trained model (model.pt) on the unaugmented training images, computed here independently;
    the online reading, from the augmented views, gives another alpha-tilde_1."""
    import pandas as pd

    from pipeline.backbone import build_backbone, normalisation
    from pipeline.datasets import read_manifest
    from pipeline.methods.pc2m.model import Architecture, build_network
    from pipeline.training.trainer import train
    from test_pc2m import BACKBONE, make_demo, train_settings

    index = make_demo(tmp_path, 8, 2, 64, 48)
    alphas = {}
    for update in ("offline", "online"):
        params = {"backbone": BACKBONE, "train": train_settings(epochs=1, class_area_update=update), "mode": "weak",
                  "seed": 0}
        train(index / "manifest.csv", index / "classes.json", None, tmp_path / update, params, 1)
        alphas[update] = pd.read_csv(tmp_path / update / "alpha.csv").drop(columns="epoch").to_numpy()
    payload = torch.load(tmp_path / "offline" / "model.pt", weights_only=True)
    backbone = build_backbone(BACKBONE["name"], "random", "teacher", BACKBONE["model_kwargs"])
    model = build_network(backbone, Architecture(**payload["arch"]))
    model.load_state_dict(payload["model"])
    manifest = read_manifest(index / "manifest.csv")
    paths = list(manifest[manifest["split"] == "train"]["image_path"])
    q = independent_areas(model, paths, 48, *normalisation(backbone)).mean(axis=0)
    alpha_0 = alphas["offline"][0]
    np.testing.assert_allclose(alphas["offline"][1], 0.98 * alpha_0 + 0.02 * q / q.sum(), rtol=2e-5)
    np.testing.assert_allclose(alphas["online"][0], alpha_0)
    assert np.abs(alphas["online"][1] - alphas["offline"][1]).max() > 1e-5
