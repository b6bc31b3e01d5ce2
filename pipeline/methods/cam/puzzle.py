"""Puzzle-CAM's losses (Jo & Yu, ICIP 2021; the recipe of its public code, OFRIN/PuzzleCAM):
L = L_cls(GAP(A)) + L_p-cls(GAP(A_re)) + alpha L_re, with A the CAMs of the image, A_re the CAMs of
the trunk features of its 2 x 2 tiles merged back into one map, and L_re the L1 distance of the two
(the raw, pre-ReLU maps) on the image's classes, averaged over every element. alpha rises
linearly from 0 to its maximum (4) over the first half of training. alpha = 0 is the plain CAM
classifier (multi-label soft-margin on GAP): no tiles are run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.methods.csrm.losses import classification_loss
from pipeline.methods.csrm.model import CAMClassifier

TILES = 2  # 2 x 2 pieces (Puzzle-CAM's num_pieces = 4)


def tile_images(images: torch.Tensor) -> torch.Tensor:
    """B x 3 x H x W -> (4 B) x 3 x H/2 x W/2, tile-major (top-left, top-right, bottom-left, bottom-right)."""
    rows = images.chunk(TILES, dim=-2)
    return torch.cat([tile for row in rows for tile in row.chunk(TILES, dim=-1)])


def merge_tiles(tiles: torch.Tensor) -> torch.Tensor:
    """The inverse of ``tile_images`` on feature maps: (4 B) x F x h x w -> B x F x 2h x 2w."""
    parts = tiles.chunk(TILES * TILES)
    rows = [torch.cat(parts[r * TILES : (r + 1) * TILES], dim=-1) for r in range(TILES)]
    return torch.cat(rows, dim=-2)


def puzzle_alpha(max_alpha: float, step: int, max_steps: int, ramp: float) -> float:
    """alpha at ``step``: linear from 0 to ``max_alpha`` over the first ``ramp`` of the steps."""
    if ramp <= 0:
        return max_alpha
    return min(max_alpha * step / (ramp * max_steps), max_alpha)


def puzzle_losses(model: CAMClassifier, images: torch.Tensor, labels: torch.Tensor,
                  alpha: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The total and its detached parts ``cls``, ``p_cls``, ``re``; ``labels`` B x C multi-hot foreground."""
    _, cams = model(images)
    cls = classification_loss(cams.float().mean(dim=(-2, -1)), labels)
    if alpha <= 0:
        zero = cls.detach() * 0.0
        return cls, {"cls": cls.detach(), "p_cls": zero, "re": zero}
    tiled, _ = model(tile_images(images))
    merged = model.classifier(merge_tiles(tiled)).float()
    if merged.shape[-2:] != cams.shape[-2:]:  # sides not a multiple of 2 x the output stride
        merged = F.interpolate(merged, size=cams.shape[-2:], mode="bilinear", align_corners=False)
    p_cls = classification_loss(merged.mean(dim=(-2, -1)), labels)
    re = ((cams.float() - merged).abs() * labels[:, :, None, None]).mean()
    total = cls + p_cls + alpha * re
    return total, {"cls": cls.detach(), "p_cls": p_cls.detach(), "re": re.detach()}
