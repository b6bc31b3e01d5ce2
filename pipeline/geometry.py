"""Mapping between an image and the patch grid the backbone saw.

The feature and prediction stages resize an image (longer side ≤ max_size, scale ≤ 1), then crop
or pad it bottom/right to a multiple of the patch size. Per image they store ``geometry`` =
[scale, resized_h, resized_w, final_h, final_w]. Every consumer of patch-grid maps (CRF,
evaluation, pseudo-label report) brings them back to the image with the functions here, so the
mapping lives in one place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def unpack(geometry: torch.Tensor) -> tuple[float, tuple[int, int], tuple[int, int]]:
    scale, rh, rw, fh, fw = geometry.tolist()
    return float(scale), (int(round(rh)), int(round(rw))), (int(round(fh)), int(round(fw)))


def grid_to_image(
    maps: torch.Tensor, geometry: torch.Tensor, image_hw: tuple[int, int], mode: str = "bilinear"
) -> torch.Tensor:
    """C×gh×gw (float probabilities, or label ids with ``mode="nearest"``) -> C×H×W on the image.

    The grid is upsampled to the backbone's input (final_h×final_w); the part beyond the resized
    image (padding) is dropped, and a part the crop removed (at most one patch, bottom/right) is
    filled by replicating the last row/column; then the resized image is scaled back to H×W.
    """
    _, (rh, rw), (fh, fw) = unpack(geometry)
    squeeze = maps.dim() == 2
    x = (maps[None] if squeeze else maps)[None].float()
    align = {"align_corners": False} if mode != "nearest" else {}
    x = F.interpolate(x, size=(fh, fw), mode=mode, **align)[..., : min(rh, fh), : min(rw, fw)]
    if rh > fh or rw > fw:
        x = F.pad(x, (0, max(0, rw - fw), 0, max(0, rh - fh)), mode="replicate")
    if (rh, rw) != tuple(image_hw):
        x = F.interpolate(x, size=tuple(image_hw), mode=mode, **align)
    x = x[0]
    return x[0] if squeeze else x
