"""ViT-PCM (paper 001), the baseline of PC2M by the same authors: ``train.method: vitpcm``.

One network (``model.PatchClassifier`` with the ``model.HVBiLSTM`` conditioning) and two branches:

- main branch: the image at ``global_size`` (384), flipped left-right / up-down and transposed
  (each p = 0.5) and colour-jittered; its max-pooled patch predictions give L_MCE (eq. 1, 3);
- equivariance (ET) branch: another augmentation of the image, a crop of ``crop_size`` px (128,
  starting on patch multiples, with probability ``crop_probability``) or the whole image, scaled
  to a tile of ``global_size / 2`` (192) px and flipped / transposed; four tiles of the batch are
  merged 2 x 2 into one mosaic (the merge m), and the mosaic's predictions split back per tile.

L_ET (eq. 8) is the cross-entropy between each tile's predictions and the soft target: the main
image's predictions in inference mode (no dropout, stop-gradient), mapped into the tile's frame
(inverse of the main branch's flips, then the tile's crop, scale and flips: ``views.resample``
at the tile's patch centres), restricted to the image's labels, each class scaled to peak 1 and
renormalised per patch (the official code's ``merge_class_labels``). Total: eq. 9 plus the L2
penalty on the classifier kernel that the official code adds to its loss.

Values: the official code's (github.com/deepplants/ViT-PCM, configs/voc12.yaml, model.py), which
differ from paper 001 Sec. 6.1's text in three places: 1 warm-up epoch (text: 2), last 5 blocks
unfrozen (text: 4), classifier init N(0, 0.05) and L2 0.01 (text: standard Gaussian, 0.1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.errors import ConfigError
from pipeline.pc2m.data import AugmentedViewDataset, derived_seed, source_image
from pipeline.pc2m.losses import masked_cross_entropy
from pipeline.pc2m.model import (
    PatchClassifier,
    PatchPredictions,
    image_class_probabilities,
    mixed_precision,
    multi_hot,
    multilabel_bce,
)
from pipeline.pc2m.ot import Reducer
from pipeline.pc2m.views import Alignment, colour_jitter, local_to_global, render, resample


@dataclass(frozen=True)
class ViTPCMSettings:
    """``train.vitpcm``: ViT-PCM's own values (the rest of ``train`` is shared with PC2M)."""

    lstm_hidden: int = 192  # HV-BiLSTM units per direction (MODEL.HIDDEN_SIZE)
    dropout: float = 0.2  # HV-BiLSTM and classifier inputs (SOLVER.DROPOUT)
    l2: float = 0.01  # Keras L2 on the classifier kernel: l2 * sum W^2 in the loss
    crop_size: int = 128  # ET crop side in px of the global_size image (IMAGE.SIZE.CROP)
    crop_probability: float = 0.3  # ET crop, else the whole image (AUGMENTATIONS.PROB_CROP)
    et_weight: float = 1.0  # eq. 9: L = L_MCE + L_ET
    use_hv_bilstm: bool = True  # Table 1 ablations: false = the plain linear patch classifier
    use_et: bool = True  # Table 1 ablations: false = L_MCE only (no ET branch)

    def check(self, global_size: int) -> None:
        if self.lstm_hidden < 1:
            raise ConfigError(f"train.vitpcm.lstm_hidden: {self.lstm_hidden} must be >= 1")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"train.vitpcm.dropout: {self.dropout} must be in [0, 1)")
        if not 0 < self.crop_size <= global_size:
            raise ConfigError(f"train.vitpcm.crop_size: {self.crop_size} must be in 1..{global_size} (global_size)")
        if not 0 <= self.crop_probability <= 1:
            raise ConfigError(f"train.vitpcm.crop_probability: {self.crop_probability} must be in [0, 1]")
        if self.l2 < 0 or self.et_weight < 0:
            raise ConfigError("train.vitpcm.l2 and train.vitpcm.et_weight must be >= 0")


# ---------------------------------------------------------------------------------------------
# The two branches' views


@dataclass(frozen=True)
class MosaicViews:
    """Main view of ``size`` px (= the source), ET tiles of ``size / 2`` px."""

    size: int
    patch: int
    crop_size: int
    crop_probability: float
    flip: bool
    jitter: bool

    @property
    def tile_size(self) -> int:
        return self.size // 2

    def check(self) -> None:
        if self.size % (2 * self.patch):
            raise ConfigError(f"train.global_size {self.size}: ViT-PCM needs a multiple of twice the patch size "
                              f"({2 * self.patch}) so that the 2 x 2 mosaic of tiles has the main view's patch grid")


def fair_coin(generator: torch.Generator) -> bool:
    return float(torch.rand((), generator=generator)) < 0.5


def dihedral(generator: torch.Generator, flip: bool) -> torch.Tensor:
    """2 x 2 map view -> source of the official augmentation: flip left-right, flip up-down, then
    transpose, each with p = 0.5 (the view is transpose(flip_ud(flip_lr(x))), so the coordinate
    map is LR @ UD @ T)."""
    lr, ud, transpose = (fair_coin(generator) for _ in range(3)) if flip else (False, False, False)
    lr_map = torch.diag(torch.tensor([-1.0 if lr else 1.0, 1.0]))
    ud_map = torch.diag(torch.tensor([1.0, -1.0 if ud else 1.0]))
    t_map = torch.tensor([[0.0, 1.0], [1.0, 0.0]]) if transpose else torch.eye(2)
    return lr_map @ ud_map @ t_map


def main_affine(generator: torch.Generator, flip: bool) -> torch.Tensor:
    """theta (2 x 3) of the main branch: flips and transpose of the whole image."""
    return torch.cat([dihedral(generator, flip), torch.zeros(2, 1)], dim=1)


def crop_window(generator: torch.Generator, size: int, crop: int, patch: int) -> tuple[int, int]:
    """Top-left (y, x) of the ET crop: each drawn from 0, patch, 2 patch, ..., size and clamped to
    size - crop, as the official ``bbox_for_crop`` (the last start is thus more likely)."""
    starts = range(0, size + 1, patch)
    y, x = (min(starts[int(torch.randint(len(starts), (), generator=generator))], size - crop) for _ in range(2))
    return y, x


def et_affine(generator: torch.Generator, views: MosaicViews) -> torch.Tensor:
    """theta (2 x 3) of the ET tile: crop (or the whole image), scaled to the tile, then flips and
    transpose; the scale is implicit in rendering the window at ``tile_size`` px."""
    if float(torch.rand((), generator=generator)) < views.crop_probability:
        y, x = crop_window(generator, views.size, views.crop_size, views.patch)
        side = views.crop_size / views.size
        centre = torch.tensor([[(x + views.crop_size / 2) / views.size * 2 - 1],
                               [(y + views.crop_size / 2) / views.size * 2 - 1]])
    else:
        side, centre = 1.0, torch.zeros(2, 1)
    return torch.cat([side * dihedral(generator, views.flip), centre], dim=1)


class MosaicViewDataset(AugmentedViewDataset):
    """Item i: the normalised main view and ET tile, their thetas, the multi-hot target, i.

    Every random choice comes from a generator seeded by (seed, epoch, i). Each branch jitters
    the colours of the source independently before its geometric transform (official order).
    """

    def _branch_source(self, source: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return colour_jitter(source, generator) if self.views.jitter else source

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = self.images[index]
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch, index))
        source = source_image(image.image_path, self.views.size)
        theta_main = main_affine(generator, self.views.flip)
        main = render(self._branch_source(source, generator), theta_main, self.views.size)
        theta_tile = et_affine(generator, self.views)
        tile = render(self._branch_source(source, generator), theta_tile, self.views.tile_size)
        return {
            "image": (main - self.mean) / self.std,
            "tile": (tile - self.mean) / self.std,
            "theta_main": theta_main,
            "theta_tile": theta_tile,
            "target": multi_hot(list(image.labels), self.num_classes),
            "index": torch.tensor(index),
        }


# ---------------------------------------------------------------------------------------------
# The merge m and its inverse


def tile_mosaic(tiles: torch.Tensor) -> torch.Tensor:
    """m: B tiles (B x ch x t x t) -> ceil(B / 4) mosaics (x ch x 2t x 2t), tiles 4j..4j+3 of the
    batch in row-major order in mosaic j. A batch that is not a multiple of 4 completes its last
    mosaic with its first tiles again (the official code drops those images instead)."""
    count = 4 * math.ceil(tiles.shape[0] / 4)
    order = torch.arange(count, device=tiles.device) % tiles.shape[0]
    quads = tiles[order].reshape(count // 4, 2, 2, *tiles.shape[1:])  # j, row, column, ch, t, t
    return quads.permute(0, 3, 1, 4, 2, 5).reshape(count // 4, tiles.shape[1], 2 * tiles.shape[2], 2 * tiles.shape[3])


def untile_mosaic(maps: torch.Tensor, count: int) -> torch.Tensor:
    """m^-1: mosaic maps (M x C x 2g x 2g) -> the first ``count`` tiles' maps (x C x g x g)."""
    m, c, h, w = maps.shape
    quads = maps.reshape(m, c, 2, h // 2, 2, w // 2).permute(0, 2, 4, 1, 3, 5)
    return quads.reshape(4 * m, c, h // 2, w // 2)[:count]


# ---------------------------------------------------------------------------------------------
# Losses (paper 001 eqs. 1, 8, 9)


def condition_on_labels(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The official ``merge_class_labels`` on B x C x h x w probabilities: classes outside the
    image's labels zeroed, each class map scaled to peak 1 (so every labelled class is someone's
    likely class), then renormalised per patch; an all-zero map or patch stays zero."""
    kept = probs * targets[:, :, None, None].to(probs)
    peak = kept.amax(dim=(2, 3), keepdim=True)
    scaled = torch.where(peak > 0, kept / peak.clamp_min(torch.finfo(kept.dtype).tiny), 0.0)
    total = scaled.sum(dim=1, keepdim=True)
    return torch.where(total > 0, scaled / total.clamp_min(torch.finfo(kept.dtype).tiny), 0.0)


@torch.no_grad()
def et_target(main_probs: torch.Tensor, alignment: Alignment, targets: torch.Tensor) -> torch.Tensor:
    """nu of eq. 8: the main branch's predictions (B x C x gh x gw) in each tile's frame
    (``alignment``: the tile's patch centres in the main view), conditioned on the labels."""
    return condition_on_labels(resample(main_probs.float(), alignment), targets)


@dataclass
class ETBranch:
    """The ET branch of a batch: each tile's predictions (mu), their soft targets (nu, from
    ``et_target``) and the tile patches seen by the main view."""

    tile_pred: PatchPredictions
    target: torch.Tensor
    valid: torch.Tensor


def et_loss(branch: ETBranch, reduce: Reducer) -> torch.Tensor:
    """Eq. 8: L_ET = -(1/s) sum_i nu_i log mu_i, averaged over the tile patches of the global batch."""
    return masked_cross_entropy(branch.target, branch.tile_pred.log_probs, branch.valid, reduce)


@dataclass
class ViTPCMTerms:
    total: torch.Tensor
    mce: torch.Tensor
    et: torch.Tensor
    l2: torch.Tensor


def vitpcm_loss(main_pred: PatchPredictions, branch: ETBranch | None, targets: torch.Tensor,
                classifier_weight: torch.Tensor, settings: ViTPCMSettings, reduce: Reducer) -> ViTPCMTerms:
    """Eq. 9 plus the classifier's L2 penalty: L_MCE + et_weight * L_ET + l2 * ||W||^2.

    L_MCE (eq. 1) averages the BCE over the classes of the max-pooled probabilities (eq. 3): the
    PC2M loss divided by |C|. The penalty is the official code's Keras kernel regulariser, which
    its loss adds; its gradient equals torch Adam's coupled ``weight_decay = 2 * l2`` on W alone.
    """
    mce = multilabel_bce(image_class_probabilities(main_pred), targets) / targets.shape[1]
    et = et_loss(branch, reduce) if branch is not None else torch.zeros((), device=mce.device)
    l2 = settings.l2 * classifier_weight.float().pow(2).sum()
    return ViTPCMTerms(total=mce + settings.et_weight * et + l2, mce=mce, et=et, l2=l2)


# ---------------------------------------------------------------------------------------------
# One training step


@torch.no_grad()
def inference_predictions(model: PatchClassifier, images: torch.Tensor) -> PatchPredictions:
    """The stop-gradient pass of the official code (``training=False``: no dropout)."""
    model.eval()
    try:
        return model(images)
    finally:
        model.train()


def vitpcm_step(model: PatchClassifier, batch: dict[str, torch.Tensor], settings: ViTPCMSettings,
                tile_grid: tuple[int, int], device: torch.device,
                reduce: Reducer) -> tuple[ViTPCMTerms, torch.Tensor]:
    """Loss terms of one batch and the main branch's probabilities (detached, for diagnostics)."""
    images = batch["image"].to(device, non_blocking=True)
    targets = batch["target"].to(device)
    with mixed_precision(device):
        main_pred = model(images)
    branch = None
    if settings.use_et:
        tiles = batch["tile"].to(device, non_blocking=True)
        alignment = local_to_global(batch["theta_main"].to(device), batch["theta_tile"].to(device), tile_grid)
        with mixed_precision(device):
            target = et_target(inference_predictions(model, images).probs, alignment, targets)
            mosaic_pred = model(tile_mosaic(tiles))
        tile_pred = PatchPredictions(untile_mosaic(mosaic_pred.log_probs, tiles.shape[0]))
        branch = ETBranch(tile_pred, target, alignment.valid)
    terms = vitpcm_loss(main_pred, branch, targets, model.classifier.weight, settings, reduce)
    return terms, main_pred.probs.detach()
