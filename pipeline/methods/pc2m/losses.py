"""The PC2M objective (paper 000 Sec. 3.1, Algorithm 1):

    L = L_MCE + w * (CE(Q^g, P^l) + CE(Q^l, P^g))

with w = 1/2 in Algorithm 1 and w = 1 in eq. 2 (``train.match_weight``, default 1/2),
Q^t the optimal-transport plan of branch t (``ot.sinkhorn``) and the global branch's maps
resampled at the local patches (``augment.resample``) so both terms compare the same regions; local
patches not seen by the global view are left out. The entropy terms H(Q) of eq. 2 carry no
gradient (stop-gradient) and are left out, as in Algorithm 1.

Patches outside the image (a rotated view's zero-padded corners, ``augment.patches_in_source``)
take no part: not in the MCE's max pooling, not among the N patches of the transport plans, not
read when the global maps are resampled (bilinear weights renormalised over the patches inside),
not in the CE terms.

Ablations of Table 1: ``use_ot = False`` matches the raw (detached) predictions of the other
branch instead of transport plans; ``use_match = False`` trains each branch against its own plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.methods.pc2m.model import PatchPredictions, image_class_probabilities, multilabel_bce
from pipeline.methods.pc2m.ot import sinkhorn
from pipeline.training.augment import Alignment, resample
from pipeline.training.distributed import LOCAL, Reducer

# log(0) guard for the resampled global probabilities.
_PROB_FLOOR = 1e-8
# Least bilinear weight of the global patches inside the image for a local patch to be read.
_MIN_WEIGHT = 1e-6


# Algorithm 1's weight of the match terms (eq. 2 reads 1); the config's train.match_weight.
ALGORITHM_1_MATCH_WEIGHT = 0.5


@dataclass(frozen=True)
class LossSettings:
    use_ot: bool
    use_match: bool
    sinkhorn_iterations: int
    match_weight: float = ALGORITHM_1_MATCH_WEIGHT


@dataclass
class LossTerms:
    total: torch.Tensor
    mce: torch.Tensor
    match: torch.Tensor


def _flat(maps: torch.Tensor) -> torch.Tensor:
    """B x C x h x w -> (B*h*w) x C, patches as rows (the N x |C| matrices of Sec. 3.1)."""
    return maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])


def _unflat(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    b, c, h, w = like.shape
    return rows.reshape(b, h, w, c).permute(0, 3, 1, 2)


def transport_plan(
    predictions: PatchPredictions, valid: torch.Tensor, alpha: torch.Tensor, epsilon: float, iterations: int,
    reduce: Reducer,
) -> torch.Tensor:
    """Q of one branch as B x C x h x w soft labels (each patch sums to 1), transporting only the
    ``valid`` patches (B x h x w); the others' rows are 0 and never read."""
    log_probs = predictions.log_probs.detach()
    return _unflat(sinkhorn(_flat(log_probs), alpha, epsilon, iterations, reduce, valid.reshape(-1)), log_probs)


def resample_inside(maps: torch.Tensor, valid: torch.Tensor, alignment: Alignment) -> tuple[torch.Tensor, torch.Tensor]:
    """Global maps (B x C x gh x gw) read at the local patch centres from the ``valid`` global
    patches only: bilinear weights renormalised over them. Also returns where any such patch
    was read (B x lh x lw bool)."""
    inside = valid[:, None].to(maps.dtype)
    weight = resample(inside, alignment)
    read = weight[:, 0] > _MIN_WEIGHT
    return resample(maps * inside, alignment) / weight.clamp_min(_MIN_WEIGHT), read


def masked_cross_entropy(
    target: torch.Tensor, log_probs: torch.Tensor, valid: torch.Tensor, reduce: Reducer
) -> torch.Tensor:
    """CE(t, y) = -sum_c t log y, averaged over the valid patches of the GLOBAL batch.

    Scaled by the number of processes, because DDP averages the gradients of the processes: the
    sum of the local terms over the global count is then the single-process mean.
    """
    per_patch = -(target * log_probs).sum(dim=1)
    weight = valid.to(per_patch.dtype)
    count = reduce.sum(weight.sum().detach()).clamp_min(1.0)
    processes = reduce.sum(torch.ones((), device=per_patch.device))
    return (per_patch * weight).sum() * processes / count


def pc2m_loss(
    global_pred: PatchPredictions,
    local_pred: PatchPredictions,
    alignment: Alignment,
    targets: torch.Tensor,
    alpha: torch.Tensor,
    epsilon: float,
    settings: LossSettings,
    reduce: Reducer = LOCAL,
    global_valid: torch.Tensor | None = None,
    local_valid: torch.Tensor | None = None,
) -> LossTerms:
    """L_PC2M of Algorithm 1 for one batch (``targets``: B x C multi-hot, background on).

    ``global_valid`` / ``local_valid`` (B x h x w bool): each branch's patches inside the image
    (``augment.patches_in_source``); every patch by default.
    """
    global_valid = _everywhere(global_pred) if global_valid is None else global_valid
    local_valid = _everywhere(local_pred) if local_valid is None else local_valid
    mce = multilabel_bce(image_class_probabilities(global_pred, global_valid), targets)
    if settings.use_ot:
        q_global = transport_plan(global_pred, global_valid, alpha, epsilon, settings.sinkhorn_iterations, reduce)
        q_local = transport_plan(local_pred, local_valid, alpha, epsilon, settings.sinkhorn_iterations, reduce)
    else:
        q_global, q_local = global_pred.probs.detach(), local_pred.probs.detach()
    if settings.use_match:
        q_global_at_local, read = resample_inside(q_global, global_valid, alignment)
        p_global_at_local = resample_inside(global_pred.probs, global_valid, alignment)[0]
        valid = alignment.valid & local_valid & read
        match = settings.match_weight * (
            masked_cross_entropy(q_global_at_local, local_pred.log_probs, valid, reduce)
            + masked_cross_entropy(q_local, p_global_at_local.clamp_min(_PROB_FLOOR).log(), valid, reduce)
        )
    else:
        match = settings.match_weight * (
            masked_cross_entropy(q_global, global_pred.log_probs, global_valid, reduce)
            + masked_cross_entropy(q_local, local_pred.log_probs, local_valid, reduce)
        )
    return LossTerms(total=mce + match, mce=mce, match=match)


def _everywhere(predictions: PatchPredictions) -> torch.Tensor:
    return torch.ones_like(predictions.log_probs[:, 0], dtype=torch.bool)
