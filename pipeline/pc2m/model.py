"""The PC2M network: a timm ViT and one patch classifier shared by both branches (paper 000
Sec. 3.1, Fig. 2), as in ViT-PCM (paper 001) without its HV-BiLSTM."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.backbone import embed_dim, num_prefix_tokens, patch_size

log = logging.getLogger(__name__)

# log(0) guard for the BCE on max-pooled probabilities.
_PROB_FLOOR = 1e-6


@dataclass
class PatchPredictions:
    """Per-patch class distributions of a batch, on the patch grid: B x C x gh x gw."""

    log_probs: torch.Tensor

    @property
    def probs(self) -> torch.Tensor:
        return self.log_probs.exp()


class PatchClassifier(nn.Module):
    """ViT encoder f and the dense layer W in R^{e x |C|} (no bias: F_i W^c is a similarity)."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(embed_dim(backbone), num_classes, bias=False)
        # ViT-PCM's head initialiser (N(0, 0.05), PRIOR-ART.md); paper 000 does not say.
        nn.init.normal_(self.classifier.weight, std=0.05)
        self.num_classes = num_classes

    def forward(self, images: torch.Tensor) -> PatchPredictions:
        """Eq. 1: P = softmax(F W) per patch; F = final patch tokens (after the last norm)."""
        size = patch_size(self.backbone)
        grid = (images.shape[-2] // size, images.shape[-1] // size)
        tokens = self.backbone.forward_features(images)[:, num_prefix_tokens(self.backbone) :]
        logits = self.classifier(tokens).float()
        log_probs = F.log_softmax(logits, dim=-1)
        return PatchPredictions(log_probs.transpose(1, 2).reshape(images.shape[0], -1, *grid))


def image_class_probabilities(predictions: PatchPredictions) -> torch.Tensor:
    """Global max pooling over the patches: B x C image-level class probabilities (paper 001)."""
    return predictions.probs.amax(dim=(2, 3))


def multilabel_bce(image_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """L_MCE: binary cross-entropy summed over classes, mean over images (Algorithm 1, MCE).

    ``targets`` is multi-hot B x C with background (class 0) always 1, as in ViT-PCM.
    """
    y = image_probs.clamp(_PROB_FLOOR, 1.0 - _PROB_FLOOR)
    t = targets.to(y)
    return -(t * y.log() + (1.0 - t) * (1.0 - y).log()).sum(dim=1).mean()


def multi_hot(labels: list[int], num_classes: int) -> torch.Tensor:
    """Multi-hot target of an image's foreground labels, background included."""
    target = torch.zeros(num_classes, dtype=torch.float32)
    target[0] = 1.0
    target[list(labels)] = 1.0
    return target


def set_trainable(model: PatchClassifier, unfrozen_blocks: int) -> list[nn.Parameter]:
    """Freeze the backbone except its last ``unfrozen_blocks`` blocks (and the final norm when
    any block trains); the classifier always trains. Returns the trainable parameters.

    Paper 000 Sec. 4.2: warm-up with the initialised weights frozen (0 blocks), then the last
    five layers unfrozen; ViT-PCM's code unfreezes the final norm with them.
    """
    backbone = model.backbone
    for parameter in backbone.parameters():
        parameter.requires_grad_(False)
    if unfrozen_blocks > 0:
        for block in list(backbone.blocks)[-unfrozen_blocks:]:
            block.requires_grad_(True)
        backbone.norm.requires_grad_(True)
    model.classifier.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]
