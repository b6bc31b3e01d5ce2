"""CSRM's equations (paper 004 Sec. 3), one function each, on plain tensors.

Shapes: B images, C foreground classes (the CAM has no background), K = C + 1 segmentation classes
(background 0 first), H x W pixels. Every loss is a mean over the pixels its mask keeps; an empty
mask gives 0 (with a gradient path, so a batch without reliable pixels trains nothing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Keeps an all-zero CAM at zero instead of 0/0 (the CAM codebases' 1e-5).
PSI_EPS = 1e-5


def psi_normalise(cams: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Eq. 2: psi(A_c) = ReLU(up(A_c)) / max_hw ReLU(up(A_c)); B x C x h x w -> B x C x H x W in [0, 1]."""
    up = F.relu(F.interpolate(cams, size=size, mode="bilinear", align_corners=False))
    return up / (up.flatten(-2).amax(dim=-1)[..., None, None] + PSI_EPS)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. 5: the multi-label soft-margin loss of the GAP logits p (B x C) and the labels y (B x C)."""
    return F.multilabel_soft_margin_loss(logits, labels)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``mask`` (same shape); 0 when the mask is empty."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def segmentation_loss(log_probs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 7: -(1/|M^p|) sum_hw M^p_hw sum_c I_hwc log s_hwc; ``log_probs`` B x K x H x W (student),
    ``targets`` B x H x W class ids (the dCRF labels: one-hot I), ``mask`` B x H x W."""
    picked = log_probs.gather(1, targets.clamp_min(0)[:, None]).squeeze(1)
    return masked_mean(-picked, mask)


def s2c_mask(teacher_probs: torch.Tensor, sigma: float) -> torch.Tensor:
    """Eq. 8: M^s = 1[max_c s^t_c > sigma_s2c]; ``teacher_probs`` B x K x H x W -> B x H x W."""
    return teacher_probs.amax(dim=1) > sigma


def s2c_loss(background_logits: torch.Tensor, cams: torch.Tensor, teacher_probs: torch.Tensor,
             sigma: float) -> torch.Tensor:
    """Eqs. 8-9: Q = softmax([S^s_bg (stop-gradient) | up(A^s)]) over K channels, and the masked
    cross-entropy of Q at the teacher's class c* = argmax_c s^t. ``background_logits`` B x H x W
    (the student's background segmentation logit), ``cams`` B x C x H x W (the student's raw CAMs
    upsampled to H x W), ``teacher_probs`` B x K x H x W."""
    logits = torch.cat([background_logits.detach()[:, None], cams], dim=1)
    target = teacher_probs.argmax(dim=1)
    picked = F.log_softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)
    return masked_mean(-picked, s2c_mask(teacher_probs, sigma))


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Eq. 10: H_hw = -sum_c s_hwc log s_hwc; B x K x H x W -> B x H x W (0 log 0 = 0)."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(dim=1)


def lower_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of ``values`` with lower interpolation: an actual value, so q = 1 is the
    maximum (kthvalue: no size limit, unlike torch.quantile)."""
    flat = values.flatten()
    rank = int(round(q * (flat.numel() - 1), 6))  # 0-based index, rounded down (6 places: float noise)
    return flat.kthvalue(rank + 1).values


def reliable_mask(entropies: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 11: M = 1[H <= gamma_t], gamma_t the (1 - alpha)-quantile of the batch's pixel entropies:
    the fraction alpha of highest-entropy pixels is dropped (U2PL's reading of paper 004's alpha,
    going 0.2 -> 0, which then keeps every pixel; docs/FIDELITY.md)."""
    return entropies <= lower_quantile(entropies, 1.0 - alpha)


def consistency_loss(student_log_probs: torch.Tensor, teacher_probs: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eqs. 10-12: the student's masked cross-entropy on the strong (ClassMix) view at the mixed
    teacher's class c*, over the pixels whose teacher entropy passes ``reliable_mask``."""
    target = teacher_probs.argmax(dim=1)
    picked = student_log_probs.gather(1, target[:, None]).squeeze(1)
    return masked_mean(-picked, reliable_mask(entropy(teacher_probs), alpha))


def info_nce(queries: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
             temperature: float) -> torch.Tensor:
    """Eq. 13 for a set of queries: -mean log[e^{<r, r+>/tau} / (e^{<r, r+>/tau} + sum_j e^{<r, r-_j>/tau})]
    with cosine similarities; ``queries`` Q x D, ``positives`` Q x D, ``negatives`` Q x N x D."""
    queries = F.normalize(queries, dim=-1)
    positive = (queries * F.normalize(positives, dim=-1)).sum(dim=-1, keepdim=True)
    negative = torch.einsum("qd,qnd->qn", queries, F.normalize(negatives, dim=-1))
    logits = torch.cat([positive, negative], dim=1) / temperature
    return -F.log_softmax(logits, dim=1)[:, 0].mean()


def linear_ramp(start: float, end: float, progress: float) -> float:
    """``start`` at progress 0, ``end`` at progress 1, linear between (sigma_s2c 0.1 -> 1, alpha 0.2 -> 0)."""
    progress = min(max(progress, 0.0), 1.0)
    return start + (end - start) * progress
