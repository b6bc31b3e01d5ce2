"""PC2M (paper 000): optimal transport, area balancing, view alignment, training runtime
(learning, kill-and-resume equality, divergence, absent classes) and prediction; tiny CPU models."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import ot as pot
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline import shards
from pipeline.datasets import build_index, read_manifest
from pipeline.datasets.demo import generate_demo
from pipeline.errors import PipelineError
from pipeline.imageio import load_mask, load_rgb
from pipeline.methods.pc2m import ot
from pipeline.methods.pc2m.losses import LossSettings, pc2m_loss
from pipeline.methods.pc2m.model import PatchPredictions
from pipeline.methods.pc2m.views import ViewSettings, make_views
from pipeline.training.augment import local_to_global, patch_centres, patches_in_source, render, resample

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 5  # demo: background + 4 shapes

BACKBONE = {
    "name": "vit_small_patch16_224.dino",
    "weights": "random",
    "checkpoint_key": "teacher",
    "model_kwargs": {"depth": 2, "embed_dim": 48, "num_heads": 3, "patch_size": 8},
}


def train_settings(**overrides) -> dict:
    settings = dict(
        method="pc2m", epochs=3, warmup_epochs=1, unfreeze_blocks=5, batch_size=4, lr=1e-3,
        lr_after_warmup_factor=0.1, global_size=48, local_size=24, local_view_size="equal", global_scale=[0.8, 1.0],
        local_scale=[0.3, 0.6], max_rotation=10.0, flip=True, jitter=True, gamma=0.02,
        epsilon_start=0.1, epsilon_end=0.9, epsilon_rate=0.05, epsilon_schedule="reach_at_40",
        sinkhorn_iterations=3, use_ot=True, use_match=True, match_weight=0.5, alpha_init="dataset_frequencies",
        class_area_update="offline", keep_checkpoints=1, num_workers=0, device="cpu", views_on="auto",
    )
    settings.update(overrides)
    return settings


def predict_settings(**overrides) -> dict:
    settings = dict(max_size=64, upscale=True, fit="pad", batch_size=8, num_workers=0, device="cpu",
                    restrict_to_labels=False, flip=False, decode="auto")
    settings.update(overrides)
    return settings


def make_demo(root: Path, n_train: int, n_val: int, width: int, height: int) -> Path:
    generate_demo(root / "demo", 0, n_train, n_val, width, height)
    build_index({"dataset": {"kind": "demo", "images_per_shard": 64, "verify_images": True},
                 "demo_root": str(root / "demo")}, root / "index", 1)
    return root / "index"


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory) -> Path:
    return make_demo(tmp_path_factory.mktemp("pc2m_small"), 16, 4, 64, 48)


def mean_iou(manifest: Path, masks: Path, split: str) -> tuple[float, float]:
    """(mIoU of the predicted masks, mIoU of predicting background everywhere) on ``split``."""
    rows = read_manifest(manifest)
    rows = rows[rows["split"] == split]
    conf = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    for row in rows.itertuples():
        gt = load_mask(row.mask_path).astype(np.int64)
        pred = load_mask(masks / f"{row.image_id}.png").astype(np.int64)
        keep = gt != 255
        conf += np.bincount(gt[keep] * NUM_CLASSES + pred[keep], minlength=NUM_CLASSES**2).reshape(NUM_CLASSES, -1)
    iou = np.diag(conf) / np.maximum(conf.sum(0) + conf.sum(1) - np.diag(conf), 1)
    background_only = conf[0].sum() / conf.sum() / NUM_CLASSES
    return float(iou.mean()), float(background_only)


# ---------------------------------------------------------------------------------------------
# Optimal transport and area balancing (Sec. 3.2, App. B)


def random_log_probs(n: int, c: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(n, c, generator=generator, dtype=torch.float64) * 2, dim=1)


def test_sinkhorn_meets_both_marginals():
    log_probs = random_log_probs(200, 6, 0)
    alpha = torch.tensor([0.4, 0.2, 0.15, 0.1, 0.1, 0.05], dtype=torch.float64)
    plan = ot.sinkhorn(log_probs, alpha, epsilon=0.5, iterations=200).double()
    # N * Q: rows are soft labels summing to 1 (delta = 1/N), columns sum to N * alpha.
    torch.testing.assert_close(plan.sum(dim=1), torch.ones(200, dtype=torch.float64), atol=1e-3, rtol=0)
    torch.testing.assert_close(plan.sum(dim=0) / 200, alpha, atol=1e-3, rtol=0)


@pytest.mark.filterwarnings("ignore:Sinkhorn did not converge")
def test_sinkhorn_matches_pot_with_cost_minus_log_p():
    """POT solves min <Q, M> - reg H(Q) with kernel exp(-M/reg): M = -log P, reg = eps gives the
    kernel P^(1/eps) of Sec. 3.2; POT iterates v = b / K'u, u = a / Kv like ours, so even the
    3-iteration plans agree."""
    for seed, epsilon, iterations in ((1, 0.5, 3), (2, 0.9, 3), (3, 0.3, 100)):
        log_probs = random_log_probs(64, 5, seed)
        alpha = torch.softmax(torch.randn(5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), 0)
        ours = ot.sinkhorn(log_probs, alpha, epsilon, iterations).double() / 64
        a = np.full(64, 1 / 64)
        theirs = pot.sinkhorn(a, alpha.numpy(), -log_probs.numpy(), reg=epsilon, method="sinkhorn",
                              numItermax=iterations, stopThr=0.0)
        np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-4, atol=1e-9)


def test_sinkhorn_is_finite_at_small_epsilon_and_empties_absent_classes():
    log_probs = random_log_probs(50, 4, 4) * 20  # near one-hot predictions, eps 0.1: kernel P^10
    alpha = torch.tensor([0.5, 0.0, 0.3, 0.2], dtype=torch.float64)
    plan = ot.sinkhorn(log_probs, alpha, epsilon=0.1, iterations=3)
    assert torch.isfinite(plan).all()
    assert float(plan[:, 1].abs().max()) == 0.0
    torch.testing.assert_close(plan.sum(dim=1).double(), torch.ones(50, dtype=torch.float64), atol=1e-4, rtol=0)


def test_batch_marginal_eq5_and_absent_class():
    nu_d = ot.class_frequencies([[1], [1, 2], [2], []], 4)  # class 3 never labelled
    assert ot.absent_classes(nu_d) == [3]
    torch.testing.assert_close(nu_d, torch.tensor([4, 2, 2, 0], dtype=torch.float64) / 8)
    alpha_tilde = torch.tensor([0.5, 0.2, 0.2, 0.1], dtype=torch.float64)
    nu_b = ot.multi_hot_frequencies(torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 0]]))
    alpha = ot.batch_class_marginal(alpha_tilde, nu_b, nu_d)
    expected = alpha_tilde * torch.tensor([2 / 5 / 0.5, 2 / 5 / 0.25, 1 / 5 / 0.25, 0.0], dtype=torch.float64)
    torch.testing.assert_close(alpha, expected / expected.sum())
    assert torch.isfinite(alpha).all() and float(alpha[3]) == 0.0


def test_ema_and_epsilon_schedules_give_the_papers_values():
    alpha = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    area = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    updated = ot.ema_update(alpha, area, gamma=0.02)  # eq. 7
    torch.testing.assert_close(updated, 0.98 * alpha + 0.02 * area)
    for _ in range(2000):  # a fixed point at the predicted areas (eq. 9)
        updated = ot.ema_update(updated, area, gamma=0.02)
    torch.testing.assert_close(updated, area)
    # App. B: eps starts at 0.1, grows at rate 0.05 per epoch, never exceeds 0.9.
    assert ot.epsilon_at(0, 0.1, 0.9, 0.05) == pytest.approx(0.1)
    assert ot.epsilon_at(20, 0.1, 0.9, 0.05) == pytest.approx(0.1 * math.e)
    assert ot.epsilon_at(40, 0.1, 0.9, 0.05) == pytest.approx(0.1 * math.e**2)
    assert ot.epsilon_at(43, 0.1, 0.9, 0.05) < 0.9
    assert ot.epsilon_at(44, 0.1, 0.9, 0.05) == ot.epsilon_at(60, 0.1, 0.9, 0.05) == 0.9
    probs = torch.softmax(torch.randn(2, 3, 4, 4), dim=1)  # eq. 6 gives distributions
    torch.testing.assert_close(ot.image_class_areas(probs).sum(dim=1), torch.ones(2))


# ---------------------------------------------------------------------------------------------
# Views and the local-global alignment


def test_alignment_puts_the_same_source_points_under_matched_patches():
    """Source pixels encode their own (x, y); a bilinear image of a linear ramp is exact, so the
    global view read at the aligned positions must show the local patch centres' source points."""
    size = 96
    ramp = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    source = torch.stack([ramp[None, :].expand(size, size), ramp[:, None].expand(size, size),
                          torch.full((size, size), 0.5)])
    settings = ViewSettings(64, 32, (0.7, 1.0), (0.3, 0.6), 20.0, True, False)
    compared = 0  # views of 64 / 32 px are 8 x 8 / 4 x 4 patches of 8 px
    for seed in range(10):
        pair = make_views(source, settings, torch.Generator().manual_seed(seed))
        alignment = local_to_global(pair.theta_global[None], pair.theta_local[None], (4, 4))
        local_grid = patch_centres((4, 4), 1, torch.device("cpu"))
        local_at_centres = torch.nn.functional.grid_sample(pair.local_view[None], local_grid, align_corners=False)
        global_at_centres = resample(pair.global_view[None], alignment)
        valid = alignment.valid[0]
        # Keep a margin of a pixel from the view borders, where bilinear reads the zero padding.
        inner = valid & (alignment.grid[0].abs() < 1 - 2 / 64).all(dim=-1)
        assert inner.sum() > 0
        diff = (local_at_centres - global_at_centres)[0, :2][:, inner].abs().max()
        assert diff < 2e-2, f"seed {seed}: aligned positions differ by {diff}"
        compared += int(inner.sum())
        # Unaligned (same grid position in both views) must not match: the test has teeth.
        naive = torch.nn.functional.interpolate(pair.global_view[None], size=(4, 4), mode="area")
        assert (local_at_centres - naive)[0, :2][:, inner].abs().max() > 0.05
    assert compared > 60


def test_local_patches_outside_the_global_view_are_masked():
    theta_global = torch.tensor([[[0.5, 0.0, -0.5], [0.0, 0.5, -0.5]]])  # top-left quarter
    theta_local = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])  # the whole source
    alignment = local_to_global(theta_global, theta_local, (4, 4))
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[:2, :2] = True
    assert torch.equal(alignment.valid[0], expected)


def ramp_source(size: int) -> torch.Tensor:
    """A source whose pixels encode their own (x, y) in [0, 1], and whose three channels sum to 1
    (so a patch's mean colour is a class distribution)."""
    ramp = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    x, y = ramp[None, :].expand(size, size), ramp[:, None].expand(size, size)
    return torch.stack([x / 2, y / 2, 1 - (x + y) / 2])


def test_patches_in_source_marks_the_padded_corners():
    """A rotated, shifted view's patches whose centres fall outside the source, where ``render``
    pads with zeros: the same patches as a nearest-neighbour rendering of a mask of ones read at
    the patch centres (torch's own sampler, an independent route)."""
    angle = math.radians(25)
    theta = torch.tensor([[[0.9 * math.cos(angle), -0.9 * math.sin(angle), 0.1],
                           [0.9 * math.sin(angle), 0.9 * math.cos(angle), -0.05]]])
    grid = (6, 6)
    ours = patches_in_source(theta, grid)[0]
    sampled = torch.nn.functional.grid_sample(
        torch.ones(1, 1, 5, 5), torch.nn.functional.affine_grid(theta, [1, 1, *grid], align_corners=False),
        mode="nearest", padding_mode="zeros", align_corners=False)[0, 0] > 0
    assert torch.equal(ours, sampled)
    assert 0 < int((~ours).sum()) < 12 and bool(ours[2:4, 2:4].all())  # the corners go, the middle stays
    # In the rendered view a left-out patch is mostly zero padding (the image, convex, lies in a
    # half-plane away from the patch centre: under half the patch), a kept one shows the image.
    coverage = torch.nn.functional.avg_pool2d(render(torch.ones(3, 400, 400), theta[0], 48)[None, :1], 8)[0, 0]
    assert float(coverage[~ours].max()) < 0.5 and float(coverage[ours].min()) > 0


@pytest.mark.parametrize("local_view_size,local_px", [("equal", 64), ("local_size", 32)])
def test_step_aligns_the_local_grid_it_predicts(local_view_size, local_px, monkeypatch):
    """PC2MRun.step on views of a ramp image (train.local_view_size both ways) through a model
    whose patch prediction is the patch's mean colour: the global predictions read where the
    alignment says must equal the local predictions of the same patches. A local grid of the
    wrong size or position fails here (shapes or values). In ``online`` mode the step's areas
    are the means over the patches inside the image."""
    import pipeline.methods.pc2m.method as method_module
    from pipeline.methods.pc2m.losses import LossTerms
    from pipeline.methods.pc2m.settings import TrainSettings
    from pipeline.training.distributed import LOCAL

    class MeanColour(torch.nn.Module):
        def forward(self, images):
            return PatchPredictions(torch.nn.functional.avg_pool2d(images, 8).clamp_min(1e-6).log())

    settings = TrainSettings.from_params(train_settings(global_size=64, local_size=32, local_view_size=local_view_size,
                                                        class_area_update="online", jitter=False, max_rotation=20.0,
                                                        global_scale=[0.9, 1.0]))
    views = settings.views()
    assert (views.global_size, views.local_size) == (64, local_px)
    pairs = [make_views(ramp_source(96), views, torch.Generator().manual_seed(seed)) for seed in range(6)]
    batch = {"global": torch.stack([p.global_view for p in pairs]), "local": torch.stack([p.local_view for p in pairs]),
             "theta_global": torch.stack([p.theta_global for p in pairs]),
             "theta_local": torch.stack([p.theta_local for p in pairs]),
             "target": torch.ones(6, 3)}
    run = method_module.PC2MRun.__new__(method_module.PC2MRun)
    run.model, run.settings, run.device, run.reducer = MeanColour(), settings, torch.device("cpu"), LOCAL
    run.views_on_device = False
    run.alpha_tilde_device = run.nu_dataset_device = torch.full((3,), 1 / 3)
    run.epoch_epsilon, run.area_sum, run.images_seen = 0.5, torch.zeros(3, dtype=torch.float64), 0.0
    seen = {}

    def capture(global_pred, local_pred, alignment, *args, **kwargs):
        seen.update(global_pred=global_pred, local_pred=local_pred, alignment=alignment, **kwargs)
        zero = torch.zeros(())
        return LossTerms(zero, zero, zero)

    monkeypatch.setattr(method_module, "pc2m_loss", capture)
    run.step(batch, 0, 0)
    local_probs, alignment = seen["local_pred"].probs, seen["alignment"]
    assert local_probs.shape[-2:] == alignment.valid.shape[-2:] == (local_px // 8,) * 2
    global_at_local = resample(seen["global_pred"].probs, alignment)
    # Patches (and their bilinear neighbours) well inside the image and the global view: a patch
    # straddling the image's border averages padding into its colour.
    centres = patch_centres(alignment.valid.shape[-2:], 6, torch.device("cpu"))
    in_source = torch.einsum("bij,bhwj->bhwi", batch["theta_local"],
                             torch.cat([centres, torch.ones_like(centres[..., :1])], dim=-1))
    inner = alignment.valid & (alignment.grid.abs() < 0.75).all(dim=-1) & (in_source.abs() < 0.6).all(dim=-1)
    assert int(inner.sum()) > 20
    assert float((global_at_local - local_probs)[:, :2].permute(1, 0, 2, 3)[:, inner].abs().max()) < 2e-2
    # Online areas: the mean colour over the global patches whose centres are inside the image.
    inside = seen["global_valid"]
    assert not bool(inside.all())  # rotated views: some corners are padding
    expected = sum((batch["global"][b].unfold(1, 8, 8).unfold(2, 8, 8).mean(dim=(-1, -2))[:, inside[b]]
                    .mean(dim=1)) for b in range(6))
    torch.testing.assert_close(run.area_sum.float(), expected, atol=1e-4, rtol=0)
    assert run.images_seen == 6


@pytest.mark.parametrize("use_ot,use_match", [(True, True), (False, True), (True, False)])
def test_loss_variants_are_finite_and_reach_the_classifier(use_ot, use_match):
    torch.manual_seed(0)
    logits_g = torch.randn(2, 4, 6, 6, requires_grad=True)
    logits_l = torch.randn(2, 4, 3, 3, requires_grad=True)
    theta = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]], [[0.5, 0, 0.2], [0, 0.5, -0.1]]])
    alignment = local_to_global(theta[:1].expand(2, 2, 3), theta, (3, 3))
    targets = torch.tensor([[1.0, 1, 0, 0], [1, 0, 1, 1]])
    alpha = torch.tensor([0.4, 0.3, 0.2, 0.1])
    terms = pc2m_loss(PatchPredictions(torch.log_softmax(logits_g, 1)),
                      PatchPredictions(torch.log_softmax(logits_l, 1)), alignment, targets, alpha, 0.1,
                      LossSettings(use_ot, use_match, 3))
    assert torch.isfinite(terms.total)
    terms.total.backward()
    assert logits_g.grad.abs().sum() > 0 and logits_l.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Training runtime


def _runner(index: Path, out: Path, settings: dict, mode: str = "weak", labels: Path | None = None) -> str:
    params = {"backbone": BACKBONE, "train": settings, "mode": mode, "seed": 0}
    return textwrap.dedent(f"""
        from pipeline.training.trainer import train
        train({str(index / 'manifest.csv')!r}, {str(index / 'classes.json')!r},
              {str(labels) if labels else None!r}, {str(out)!r}, {params!r}, 1)
    """)


def _run(code: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> None:
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]


def test_killed_run_resumes_to_the_same_weights(small_demo, tmp_path):
    # Views large enough that an epoch lasts long enough to be killed in (seconds, on an idle machine).
    settings = train_settings(epochs=3, global_size=160, local_size=80)
    _finish(_run(_runner(small_demo, tmp_path / "straight", settings)))

    interrupted = tmp_path / "interrupted"
    process = _run(_runner(small_demo, interrupted, settings))
    # last.pt, the checkpoint a resume reads, is linked just after epoch-0001.pt: wait for it, not
    # for the epoch file (a kill between the two found no last.pt).
    first = interrupted / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 240
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert first.exists() and process.poll() is None, "training ended before it could be killed"
    process.send_signal(signal.SIGKILL)  # epoch 1 is saved: the process is in epoch 2
    process.wait()
    assert not (interrupted / "model.pt").exists()
    killed_after = torch.load(interrupted / "checkpoints" / "last.pt", weights_only=True)["epochs_done"]
    assert killed_after == 1, "the kill did not land in epoch 2"
    _finish(_run(_runner(small_demo, interrupted, settings)))

    straight = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)["model"]
    resumed = torch.load(interrupted / "model.pt", weights_only=True)["model"]
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    for log_name in ("history.csv", "alpha.csv"):
        a = pd.read_csv(tmp_path / "straight" / log_name).drop(columns=["seconds"], errors="ignore")
        b = pd.read_csv(interrupted / log_name).drop(columns=["seconds"], errors="ignore")
        pd.testing.assert_frame_equal(a, b)
    assert (interrupted / "done.json").exists()


def test_non_finite_loss_stops_naming_epoch_and_batch(small_demo, tmp_path, monkeypatch):
    import pipeline.methods.pc2m.method as train_module
    from pipeline.training.trainer import train

    calls = {"n": 0}
    real_loss = train_module.pc2m_loss

    def diverging(*args, **kwargs):
        terms = real_loss(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 4 + 3:  # 4 batches per epoch: epoch 1, batch 2
            terms.total = terms.total * float("nan")
        return terms

    monkeypatch.setattr(train_module, "pc2m_loss", diverging)
    with pytest.raises(PipelineError, match="epoch 1 batch 2"):
        train(small_demo / "manifest.csv", small_demo / "classes.json", None, tmp_path,
                           {"backbone": BACKBONE, "train": train_settings(epochs=3), "mode": "weak", "seed": 0}, 1)
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert state["epochs_done"] == 1
    assert not (tmp_path / "model.pt").exists() and not (tmp_path / "done.json").exists()


def test_class_absent_from_labels_is_reported(small_demo, tmp_path, caplog):
    from pipeline.training.trainer import train

    manifest = read_manifest(small_demo / "manifest.csv")
    keep = manifest[~manifest["labels"].str.contains("4")]
    keep.to_csv(tmp_path / "manifest.csv", index=False)
    with caplog.at_level("WARNING"):
        train(tmp_path / "manifest.csv", small_demo / "classes.json", None, tmp_path / "out",
              {"backbone": BACKBONE, "train": train_settings(epochs=1), "mode": "weak", "seed": 0}, 1)
    assert "[4] never appear" in caplog.text
    done = pd.read_json(tmp_path / "out" / "done.json", typ="series")
    assert list(done["absent_classes"]) == [4]
    alpha = pd.read_csv(tmp_path / "out" / "alpha.csv")
    assert np.isfinite(alpha.drop(columns="epoch").to_numpy()).all()


def test_unsupervised_mode_never_reads_ground_truth(small_demo, tmp_path, monkeypatch, full_disk_at_the_third_mask):
    """Masks deleted, manifest labels blanked: training and prediction still run on the pseudo-labels.
    A mask that fails to write (the PNGs are written by threads) stops the prediction in its main
    thread and leaves neither the masks folder nor the probabilities."""
    from pipeline.predict import predict_shard
    from pipeline.training.trainer import train

    manifest = read_manifest(small_demo / "manifest.csv")
    pseudo = manifest[manifest["split"] == "train"][["image_id", "labels", "has_labels"]].copy()
    pseudo["labels"] = [str((i % 3) + 1) for i in range(len(pseudo))]  # clusters 1..3
    pseudo.to_csv(tmp_path / "image_labels.csv", index=False)
    (tmp_path / "summary.json").write_text('{"num_clusters": 3}')
    blind = manifest.assign(mask_path=[str(tmp_path / "gone" / f"{i}.png") for i in manifest["image_id"]],
                            labels="", has_labels=False)
    blind.to_csv(tmp_path / "manifest.csv", index=False)
    params = {"backbone": BACKBONE, "train": train_settings(epochs=1), "mode": "unsupervised", "seed": 0,
              "predict": predict_settings(restrict_to_labels=True)}
    train(tmp_path / "manifest.csv", small_demo / "classes.json", tmp_path / "image_labels.csv", tmp_path / "out",
          params, 1)
    predict_shard(tmp_path / "manifest.csv", 0, tmp_path / "out" / "model.pt", tmp_path / "probs.safetensors",
                  tmp_path / "masks", params, 1, labels_path=tmp_path / "image_labels.csv")
    meta = shards.read_meta(tmp_path / "probs.safetensors")
    assert meta["num_classes"] == 4
    assert set(meta["restricted_images"]) == set(pseudo["image_id"])  # train only, never val
    history = pd.read_csv(tmp_path / "out" / "history.csv")
    assert history["js_alpha_gt"].isna().all()

    import pipeline.predict as predict

    full_disk_at_the_third_mask(predict)
    with pytest.raises(OSError, match="No space left"):
        predict_shard(tmp_path / "manifest.csv", 0, tmp_path / "out" / "model.pt", tmp_path / "failed.safetensors",
                      tmp_path / "failed_masks", params, 2, labels_path=tmp_path / "image_labels.csv")
    assert not (tmp_path / "failed.safetensors").exists() and not (tmp_path / "failed_masks").exists()
    assert [p.name for p in tmp_path.iterdir() if "failed" in p.name] == []


def test_predict_decodes_jpegs_as_the_feature_stage_does(small_demo, tmp_path):
    """predict.decode: the demo as JPEGs, an untrained network, predicted at an upscaled size
    (paper 001's presets upscale to 960 px). ``workers`` and ``device`` (libjpeg both, on the CPU)
    give the same probabilities exactly, through a real worker process; Pillow's resize differs
    from torch's by at most a grey level, so its probabilities are close but not the same."""
    from pipeline.backbone import build_backbone
    from pipeline.methods.pc2m.model import Architecture, build_network, model_payload
    from pipeline.predict import predict_shard

    manifest = read_manifest(small_demo / "manifest.csv")
    for row in manifest.itertuples():
        jpeg = tmp_path / "jpegs" / f"{row.image_id}.jpg"
        jpeg.parent.mkdir(exist_ok=True)
        Image.fromarray(load_rgb(row.image_path)).save(jpeg, quality=90)
        manifest.loc[row.Index, "image_path"] = str(jpeg)
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    torch.manual_seed(0)
    arch = Architecture("pc2m", NUM_CLASSES, 0, BACKBONE["name"])
    net = build_network(build_backbone(BACKBONE["name"], "random", "teacher", BACKBONE["model_kwargs"]), arch)
    torch.save(model_payload(net, arch), tmp_path / "model.pt")
    probs = {}
    for decode in ("workers", "device", "pil"):
        params = {"backbone": BACKBONE, "mode": "weak",
                  "predict": predict_settings(max_size=80, decode=decode, num_workers=1, batch_size=3)}
        predict_shard(tmp_path / "manifest.csv", 0, tmp_path / "model.pt", tmp_path / f"{decode}.safetensors",
                      tmp_path / f"masks-{decode}", params, 1)
        probs[decode] = shards.read_images(tmp_path / f"{decode}.safetensors")
    assert probs["workers"].keys() == probs["pil"].keys() and len(probs["pil"]) == len(manifest)
    differences = []
    for image_id, tensors in probs["pil"].items():
        assert torch.equal(probs["workers"][image_id]["probs"], probs["device"][image_id]["probs"])
        differences.append((probs["workers"][image_id]["probs"].float() - tensors["probs"].float()).abs().max())
    assert 0 < max(differences) < 0.05


def test_a_bad_predict_decode_is_a_config_error():
    from pipeline.predict import PredictSettings

    with pytest.raises(PipelineError, match=r"predict\.decode: 'nvjpeg' is not one of auto, pil, device, workers"):
        PredictSettings.from_params(predict_settings(decode="nvjpeg"))


def test_weak_training_learns_the_demo(tmp_path):
    """A random-init tiny ViT (patch 8) learns the demo's colour-coded shapes within a few CPU
    epochs: the loss falls and val mIoU beats predicting background everywhere by a margin
    (measured 0.23 against 0.14; a trainer whose gradients or targets were broken stays at or
    below the baseline)."""
    from pipeline.predict import predict_shard
    from pipeline.training.trainer import train

    index = make_demo(tmp_path, 32, 16, 96, 72)
    settings = train_settings(epochs=12, batch_size=8, lr=3e-3, lr_after_warmup_factor=1.0,
                              global_size=64, local_size=32)
    params = {"backbone": BACKBONE, "train": settings, "mode": "weak", "seed": 0,
              "predict": predict_settings(max_size=64)}
    train(index / "manifest.csv", index / "classes.json", None, tmp_path / "out", params, 2)
    predict_shard(index / "manifest.csv", 0, tmp_path / "out" / "model.pt", tmp_path / "probs.safetensors",
                  tmp_path / "masks", params, 2)
    history = pd.read_csv(tmp_path / "out" / "history.csv")
    assert history["loss"].iloc[-3:].mean() < history["loss"].iloc[0] - 0.5
    miou, background_only = mean_iou(index / "manifest.csv", tmp_path / "masks", "val")
    assert miou > background_only + 0.05, (miou, background_only)
    # Prediction files: float16 probability grids, masks at image size.
    images = shards.read_images(tmp_path / "probs.safetensors")
    first = read_manifest(index / "manifest.csv").iloc[0]
    probs = images[first["image_id"]]["probs"]
    assert probs.dtype == torch.float16 and probs.shape[0] == NUM_CLASSES
    torch.testing.assert_close(probs.float().sum(0), torch.ones(probs.shape[1:]), atol=2e-2, rtol=0)
    assert load_mask(tmp_path / "masks" / f"{first['image_id']}.png").shape == load_rgb(first["image_path"]).shape[:2]


def test_two_process_gloo_run_equals_one_process(small_demo, tmp_path):
    """torchrun with 2 CPU processes on the same global batch ends with the single-process
    weights up to float rounding (Sinkhorn sums, nu_b, loss normaliser and q reduced globally)."""
    settings = train_settings(epochs=2)
    params = {"backbone": BACKBONE, "train": settings, "mode": "weak", "seed": 0}
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        from pipeline.training.trainer import train
        train({str(small_demo / 'manifest.csv')!r}, {str(small_demo / 'classes.json')!r}, None, sys.argv[1],
              {params!r}, 1)
    """))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for processes, out in ((1, tmp_path / "one"), (2, tmp_path / "two")):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   str(script), str(out)]
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    one = torch.load(tmp_path / "one" / "model.pt", weights_only=True)["model"]
    two = torch.load(tmp_path / "two" / "model.pt", weights_only=True)["model"]
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-4, rtol=1e-4)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "one" / "alpha.csv"),
                                  pd.read_csv(tmp_path / "two" / "alpha.csv"), atol=1e-5)
