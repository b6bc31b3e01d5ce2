"""MainNet F and SupportNet G of RCM+MAM (paper 003, Sec. 3.1 and Appendix C).

Both are ``CAMNet``: backbone -> 1x1 conv to the D = 256 feature map X -> 1x1 conv to the
N foreground CAMs A; the image scores are GAP of A (a sigmoid / soft-margin loss follows). G is
an EMA copy of F (``pipeline.training.ema``, alpha = 0.997), never trained by gradients.

Multi-scale forward (Sec. 3.1): the image is resized (bilinear) by each scale (0.5, 1, 2), and
each scale's X and ReLU'd CAM are interpolated back to the input size; then every foreground CAM
is divided by its maximum (``max_normalise``, "A^k <- A^k / max(A^k)" as in AffinityNet / SEAM).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Keeps an all-zero CAM at zero instead of 0/0 (the codebases' 1e-5).
MAX_NORM_EPS = 1e-5


class CAMNet(nn.Module):
    """Backbone -> X (1x1 conv to ``feature_dim``) -> CAMs (1x1 conv to ``num_classes``).

    The backbone's BatchNorm layers are frozen (eval mode, no gradient) and so are the modules
    it names in ``frozen_modules``, as in the PSA / SEAM training of ResNet-38: with 16 crops of
    192 px the batch statistics would be too noisy to train on.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, feature_dim: int = 256) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.project = nn.Conv2d(backbone.out_channels, feature_dim, 1, bias=False)
        self.classifier = nn.Conv2d(feature_dim, num_classes, 1, bias=False)
        nn.init.kaiming_normal_(self.project.weight)
        nn.init.xavier_uniform_(self.classifier.weight)
        for name in getattr(backbone, "frozen_modules", ()):
            getattr(backbone, name).requires_grad_(False)
        for module in self._batchnorms():
            module.requires_grad_(False)

    def _batchnorms(self) -> list[nn.Module]:
        return [m for m in self.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def train(self, mode: bool = True) -> CAMNet:
        super().train(mode)
        for module in self._batchnorms():
            module.eval()
        return self

    def new_layers(self) -> list[nn.Module]:
        """The layers trained from scratch (10x learning rate in ``optim.param_groups``)."""
        return [self.project, self.classifier]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(X: B x D x h x w, raw CAMs: B x N x h x w) at the backbone's output stride."""
        features = self.project(self.backbone(images))
        return features, self.classifier(features)


@dataclass
class ScaleOutput:
    """One scale's outputs, resized to the input size H x W (all float32).

    features: B x D x H x W; cams: B x N x H x W, ReLU'd and max-normalised; logits: B x N
    (GAP of the raw CAMs at the network's own resolution).
    """

    features: torch.Tensor
    cams: torch.Tensor
    logits: torch.Tensor


def max_normalise(cams: torch.Tensor) -> torch.Tensor:
    """Each map of ``cams`` (... x H x W, non-negative) divided by its maximum."""
    peak = cams.flatten(-2).amax(dim=-1)[..., None, None]
    return cams / (peak + MAX_NORM_EPS)


def resize(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def scaled_images(images: torch.Tensor, scale: float) -> torch.Tensor:
    """``images`` resized by ``scale`` (bilinear; sides rounded, at least 1 pixel)."""
    if scale == 1.0:
        return images
    height, width = images.shape[-2:]
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


def forward_scale(net: CAMNet, images: torch.Tensor, scale: float) -> ScaleOutput:
    """``net`` on ``images`` resized by ``scale``; outputs at the size of ``images``."""
    size = tuple(images.shape[-2:])
    features, cams = net(scaled_images(images, scale))
    features, cams = features.float(), cams.float()
    logits = cams.mean(dim=(-2, -1))
    return ScaleOutput(resize(features, size), normalised_cams(cams, size), logits)


def normalised_cams(cams: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Raw CAMs ReLU'd, resized to ``size`` and max-normalised (float32)."""
    return max_normalise(resize(F.relu(cams.float()), size))


def scale_cams(net: nn.Module, images: torch.Tensor, scale: float) -> torch.Tensor:
    """Only the CAMs of ``forward_scale`` (inference: the features are never resized)."""
    _, cams = net(scaled_images(images, scale))
    return normalised_cams(cams, tuple(images.shape[-2:]))


def forward_scales(net: CAMNet, images: torch.Tensor, scales: tuple[float, ...]) -> list[ScaleOutput]:
    return [forward_scale(net, images, scale) for scale in scales]


def fuse_scales(cams: list[torch.Tensor]) -> torch.Tensor:
    """The msinf-CAM: per-scale CAMs (each B x N x H x W, max-normalised) summed, then
    max-normalised again (the PSA / SEAM multi-scale rule; paper 003 does not give its own)."""
    return max_normalise(torch.stack(cams).sum(dim=0))
