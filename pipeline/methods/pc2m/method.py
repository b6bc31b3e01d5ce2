"""PC2M as a plug-in of the shared trainer (paper 000 Sec. 4.2, Algorithm 1), and the patch-
classifier run ViT-PCM (``pipeline.methods.vitpcm``) builds on.

alpha-tilde (eq. 7) is updated at the end of every epoch from q (eq. 6) averaged over the
dataset. ``train.class_area_update``: ``offline`` (default) is Algorithm 1's second pass, "updated
offline to the dataset's current predictions" (Sec. 3.2): the model in eval mode predicts every
training image once, unaugmented, at the global size, without gradients; ``online`` averages the
global-view predictions seen while training (augmented, rotated; no extra pass). Either way the
patches outside the image (zero-padded corners) are left out of the areas, as of the losses.
ViT-PCM has no transport: its alpha-tilde is only the diagnostic EMA of the areas predicted on
its training views (``alpha.csv``, ``js_alpha_*``; always online), its ``epsilon`` column is
empty.

Data parallel: the Sinkhorn sums, nu_b, the match-loss normaliser and the area estimate are
reduced over processes (``Reducer``); the offline pass predicts each process's share of the
images (every world-th from its rank).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from pipeline.atomic import write_csv
from pipeline.backbone import build_backbone, normalisation, patch_size
from pipeline.datasets import read_manifest
from pipeline.devices import mixed_precision
from pipeline.imageio import load_mask
from pipeline.methods.pc2m.losses import pc2m_loss
from pipeline.methods.pc2m.model import PatchClassifier, build_network, model_payload, set_trainable
from pipeline.methods.pc2m.ot import (
    absent_classes,
    batch_class_marginal,
    class_frequencies,
    ema_update,
    image_class_areas,
    initial_class_areas,
    js_divergence,
    multi_hot_frequencies,
)
from pipeline.methods.pc2m.predict import load_predictor  # noqa: F401 - the method's predictor
from pipeline.methods.pc2m.settings import TrainSettings
from pipeline.methods.pc2m.views import PlainImageDataset, TwoViewDataset, render_view_batch
from pipeline.training.augment import local_to_global, patches_in_source
from pipeline.training.compile import compile_blocks, compile_wanted
from pipeline.training.data import TRAIN_SPLIT, views_on_device
from pipeline.training.method import MethodRun, TrainContext

log = logging.getLogger(__name__)


def check_settings(train: dict) -> None:
    TrainSettings.from_params(train)


def prepare(context: TrainContext) -> MethodRun:
    return PC2MRun(context)


def ground_truth_areas(manifest_path: Path, image_ids: set[str], num_classes: int) -> torch.Tensor | None:
    """alpha* of App. A.1: the mean over train images of each class's area fraction (weak mode
    only: GT classes are the model's classes; in unsupervised mode cluster ids are not, and a
    Hungarian matching belongs to the evaluation stage)."""
    manifest = read_manifest(manifest_path)
    rows = manifest[(manifest["split"] == TRAIN_SPLIT) & manifest["image_id"].isin(image_ids)]
    if (rows["mask_path"] == "").any() or rows.empty:
        return None
    total = torch.zeros(num_classes, dtype=torch.float64)
    for path in rows["mask_path"]:
        mask = load_mask(path)
        counts = np.bincount(mask[mask != 255].ravel(), minlength=num_classes)[:num_classes]
        total += torch.from_numpy(counts / max(counts.sum(), 1))
    return total / len(rows)


@torch.no_grad()
def dataset_class_area_sums(model: PatchClassifier, dataset: PlainImageDataset, indices: list[int],
                            batch_size: int, num_workers: int, device: torch.device) -> torch.Tensor:
    """sum_X q(X) (eq. 6) over images ``indices`` of ``dataset``, predicted in eval mode (the
    offline pass of Algorithm 1); the model's train / eval mode is restored."""
    was_training = model.training
    model.eval()
    batches = [indices[start : start + batch_size] for start in range(0, len(indices), batch_size)]
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, pin_memory=device.type == "cuda")
    total = torch.zeros(model.num_classes, dtype=torch.float64, device=device)
    for pixels in loader:
        images = dataset.normalise(pixels.to(device, non_blocking=True))
        with mixed_precision(device):
            probs = model(images).probs
        total += image_class_areas(probs).double().sum(dim=0)
    model.train(was_training)
    return total


class PatchClassifierRun(MethodRun):
    """What PC2M and ViT-PCM share: the patch-classifier network on the configured backbone, the
    warm-up / fine-tune phases with Adam, and alpha-tilde with its diagnostics (alpha.csv, the JS
    divergence to the ground-truth areas in weak mode)."""

    def __init__(self, context: TrainContext) -> None:
        params = context.params
        settings = TrainSettings.from_params(params["train"])
        self.context = context
        self.device = context.device
        self.reducer = context.processes.reducer
        images, num_classes = context.images, context.num_classes
        self.nu_dataset = class_frequencies([i.labels for i in images], num_classes).float()
        self.absent = absent_classes(self.nu_dataset)
        if self.absent:
            log.warning("classes %s never appear in the training labels (nu_D = 0): their area alpha is 0 "
                        "and no patch is transported to them", self.absent)
        self.gt_areas = (ground_truth_areas(context.manifest_path, {i.image_id for i in images}, num_classes)
                         if context.mode == "weak" else None)
        backbone = build_backbone(params["backbone"]["name"], params["backbone"]["weights"],
                                  params["backbone"].get("checkpoint_key", "teacher"),
                                  params["backbone"].get("model_kwargs") or {})
        self.arch = settings.architecture(num_classes, params["backbone"]["name"])
        self.model = build_network(backbone, self.arch, settings.head_dropout(), settings.lstm_precision())
        compiled = compile_blocks(backbone) if compile_wanted(settings.compile, self.device) else 0
        log.info("backbone blocks %s (train.compile: %s)",
                 f"compiled: {compiled} (torch.compile, at their first call)" if compiled else "eager",
                 settings.compile)
        self.mean, self.std = normalisation(backbone)
        self.patch = patch_size(backbone)
        self.settings = settings.fitted_to_patch(self.patch)
        self.views_on_device = views_on_device(self.settings.views_on, self.device)
        log.info("training views rendered %s (train.views_on: %s)",
                 f"on {self.device}" if self.views_on_device else "in the DataLoader workers", self.settings.views_on)
        self.dataset = self.build_dataset()
        # alpha-tilde_0: nu_D (Sec. 3.2) or uniform (Algorithm 1), train.alpha_init.
        self.alpha_tilde = initial_class_areas(self.settings.alpha_init, self.nu_dataset)
        self.alphas: list[list[float]] = [self.alpha_tilde.tolist()]
        self.area_sum = torch.zeros(num_classes, dtype=torch.float64)
        self.images_seen = 0.0

    def build_dataset(self) -> TwoViewDataset:
        return TwoViewDataset(self.context.images, self.context.num_classes, self.settings.views(), self.mean,
                              self.std, self.context.seed, render_in_worker=not self.views_on_device)

    def phase(self, epoch: int) -> int:
        return self.settings.phase(epoch)

    def optimizer(self, epoch: int) -> tuple[list[nn.Parameter], torch.optim.Optimizer]:
        phase = self.settings.phase(epoch)
        parameters = set_trainable(self.model, phase)
        # Fused Adam (one kernel for all tensors) on CUDA; the CPU keeps the reference
        # implementation, so CPU runs give the same numbers as before.
        optimizer = torch.optim.Adam(parameters, lr=self.settings.learning_rate(epoch),
                                     fused=self.device.type == "cuda" or None)
        log.info("epoch %d: %d backbone blocks unfrozen, %d trainable tensors, lr %g",
                 epoch, phase, len(parameters), self.settings.learning_rate(epoch))
        return parameters, optimizer

    def epoch_columns(self, epoch: int) -> dict:
        self.area_sum = torch.zeros(self.context.num_classes, dtype=torch.float64, device=self.device)
        self.images_seen = 0.0
        return {"unfrozen_blocks": self.settings.phase(epoch), "lr": self.settings.learning_rate(epoch),
                "epsilon": self.epsilon(epoch)}

    def epsilon(self, epoch: int) -> float:
        """The Sinkhorn epsilon of ``epoch`` (App. B); NaN for a method without transport."""
        return self.settings.epsilon(epoch)

    def record_areas(self, probs: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Accumulate q (eq. 6) of the full-image branch's detached probabilities over its
        ``valid`` patches (those inside the image; all by default)."""
        self.area_sum += image_class_areas(probs, valid).double().sum(dim=0)
        self.images_seen += probs.shape[0]

    def mean_areas(self) -> torch.Tensor:
        """(1/T) sum_X q(X) of eq. 7: here the mean over the training views of the epoch."""
        seen = self.reducer.sum(torch.tensor(self.images_seen, device=self.device))
        return self.reducer.sum(self.area_sum) / seen

    def end_epoch(self, epoch: int) -> dict:
        """alpha-tilde update (eq. 7) from the mean predicted areas, and its diagnostics."""
        area_mean = self.mean_areas().float().cpu()
        new_alpha = ema_update(self.alpha_tilde, area_mean, self.settings.gamma)
        columns = {"js_alpha_change": js_divergence(new_alpha, self.alpha_tilde),
                   "js_alpha_gt": js_divergence(new_alpha, self.gt_areas) if self.gt_areas is not None
                   else float("nan")}
        self.alpha_tilde = new_alpha
        self.alphas.append(self.alpha_tilde.tolist())
        log.info("epoch %d: JS(alpha, gt) %.4f", epoch, columns["js_alpha_gt"])
        return columns

    def state_dict(self) -> dict:
        return {"alpha_tilde": self.alpha_tilde, "alphas": self.alphas}

    def load_state_dict(self, state: dict) -> None:
        self.alpha_tilde, self.alphas = state["alpha_tilde"], state["alphas"]

    def write_logs(self, out_dir: Path) -> None:
        frame = pd.DataFrame(self.alphas, columns=[f"class_{c}" for c in range(len(self.alphas[0]))])
        frame.insert(0, "epoch", range(len(self.alphas)))
        write_csv(out_dir / "alpha.csv", frame, float_format="%.6g")

    def model_payload(self) -> dict:
        return model_payload(self.model, self.arch)

    def summary(self) -> dict:
        return {"architecture": asdict(self.arch), "absent_classes": self.absent,
                "alpha_tilde": self.alpha_tilde.tolist()}


class PC2MRun(PatchClassifierRun):
    """One batch of Algorithm 1: both views forward, alpha (eq. 5), the PC2M loss."""

    def epoch_columns(self, epoch: int) -> dict:
        columns = super().epoch_columns(epoch)
        self.epoch_epsilon = columns["epsilon"]
        self.alpha_tilde_device = self.alpha_tilde.to(self.device)
        self.nu_dataset_device = self.nu_dataset.to(self.device)
        return columns

    def step(self, batch: dict[str, torch.Tensor], epoch: int, index: int) -> dict[str, torch.Tensor]:
        device = self.device
        if self.views_on_device:
            global_views, local_views = render_view_batch(batch, self.dataset.views, self.dataset.mean,
                                                          self.dataset.std, device)
        else:
            global_views = batch["global"].to(device, non_blocking=True)
            local_views = batch["local"].to(device, non_blocking=True)
        targets = batch["target"].to(device, non_blocking=True)
        theta_global = batch["theta_global"].to(device, non_blocking=True)
        theta_local = batch["theta_local"].to(device, non_blocking=True)
        with mixed_precision(device):
            global_pred, local_pred = self.model(global_views), self.model(local_views)
        alpha = batch_class_marginal(self.alpha_tilde_device, multi_hot_frequencies(targets, self.reducer),
                                     self.nu_dataset_device)
        # The patch grids of the views as predicted (local: global_size or local_size, per
        # train.local_view_size), so the alignment has the local branch's shape by construction.
        global_grid, local_grid = global_pred.log_probs.shape[-2:], local_pred.log_probs.shape[-2:]
        global_valid = patches_in_source(theta_global, global_grid)
        terms = pc2m_loss(global_pred, local_pred, local_to_global(theta_global, theta_local, local_grid), targets,
                          alpha, self.epoch_epsilon, self.settings.losses(), self.reducer,
                          global_valid=global_valid, local_valid=patches_in_source(theta_local, local_grid))
        if self.settings.class_area_update == "online":
            self.record_areas(global_pred.probs.detach(), global_valid)
        return {"loss": terms.total, "mce": terms.mce, "match": terms.match}

    def mean_areas(self) -> torch.Tensor:
        """(1/T) sum_X q(X) of eq. 7; ``offline``: from a pass over the training images."""
        if self.settings.class_area_update == "online":
            return super().mean_areas()
        processes = self.context.processes
        dataset = PlainImageDataset(self.context.images, self.settings.global_size, self.mean, self.std)
        share = list(range(processes.rank, len(dataset), processes.world))
        sums = dataset_class_area_sums(self.model, dataset, share, max(1, self.settings.batch_size // processes.world),
                                       self.settings.num_workers, self.device)
        return self.reducer.sum(sums) / len(dataset)
