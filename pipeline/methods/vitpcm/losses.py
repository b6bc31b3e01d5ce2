"""ViT-PCM's losses (paper 001 eqs. 1, 8, 9)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.methods.pc2m.losses import masked_cross_entropy
from pipeline.methods.pc2m.model import PatchPredictions, image_class_probabilities, multilabel_bce
from pipeline.methods.vitpcm.settings import ViTPCMSettings
from pipeline.training.augment import Alignment, resample
from pipeline.training.distributed import Reducer

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


