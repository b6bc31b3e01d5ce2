"""CAM inference of RCM+MAM: multi-scale + flip msinf-CAMs -> class scores -> masks (paper 003 Table 5).

The inference scales are 0.5, 1.0, 1.5, 2.0 (Table 5, "msinf-CAMs"), each also horizontally
flipped (the AffinityNet / SEAM inference the paper compares with). Each view's CAM is ReLU'd,
resized to the image and max-normalised, and the views are fused like the SupportNet's CAMs in
training (``model.fuse_scales``). The background has no CAM channel (eq. 2): its score is a
constant threshold, as in the AffinityNet / SEAM evaluation.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.methods.rcm_mam.model import fuse_scales, scale_cams

INFER_SCALES = (0.5, 1.0, 1.5, 2.0)


@torch.no_grad()
def msinf_cams(net: nn.Module, images: torch.Tensor, scales: tuple[float, ...] = INFER_SCALES,
               flip: bool = True) -> torch.Tensor:
    """Fused CAMs B x N x H x W in [0, 1] of ``images`` (B x 3 x H x W); ``net`` in eval mode, any
    network whose forward returns (features, raw CAMs)."""
    views = []
    for scale in scales:
        views.append(scale_cams(net, images, scale))
        if flip:
            views.append(scale_cams(net, images.flip(-1), scale).flip(-1))
    return fuse_scales(views)


def class_scores(cams: torch.Tensor, labels: torch.Tensor | None, background: float) -> torch.Tensor:
    """B x (N+1) x H x W scores: channel 0 the constant ``background``, then the CAMs, zeroed for
    classes absent from ``labels`` (B x N multi-hot) when labels are given."""
    if labels is not None:
        cams = cams * labels.to(cams.dtype)[:, :, None, None]
    floor = torch.full_like(cams[:, :1], background)
    return torch.cat([floor, cams], dim=1)


def masks_from_scores(scores: torch.Tensor) -> torch.Tensor:
    """B x H x W label maps (0 = background, k = foreground class k): the best-scoring channel."""
    return scores.argmax(dim=1)
