"""Augmentations every training method shares: random affine views rendered from a source image
(``theta`` maps the view's normalised coordinates, -1..1 with ``align_corners=False``, to the
source's), ViT-PCM's colour jitter, and the map between two views' grids (``local_to_global``)
that lets a loss compare predictions made on the same image regions whatever the flips, scales
and rotations: view B -> source -> view A is ``inv(theta_a) o theta_b``.

Every random choice is drawn from a ``torch.Generator`` the dataset seeds per (seed, epoch, image).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Colour jitter of ViT-PCM (PRIOR-ART.md): brightness 0.2, contrast [0.5, 2], saturation
# [0.5, 1.5], hue 0.1, greyscale p = 0.1. Paper 000 only says "jittering".
BRIGHTNESS = 0.2
CONTRAST = (0.5, 2.0)
SATURATION = (0.5, 1.5)
HUE = 0.1
GREYSCALE_P = 0.1


def uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def random_affine(
    generator: torch.Generator, scale: tuple[float, float], max_rotation_deg: float, flip: bool
) -> torch.Tensor:
    """theta (2 x 3): view coordinates -> source coordinates; a square window of side ``s``
    (fraction of the source), rotated by up to ``max_rotation_deg``, mirrored with p = 0.5,
    placed so that its unrotated square lies inside the source."""
    s = uniform(generator, *scale)
    angle = math.radians(uniform(generator, -max_rotation_deg, max_rotation_deg))
    mirror = -1.0 if flip and float(torch.rand((), generator=generator)) < 0.5 else 1.0
    tx = uniform(generator, -(1.0 - s), 1.0 - s)
    ty = uniform(generator, -(1.0 - s), 1.0 - s)
    cos, sin = math.cos(angle), math.sin(angle)
    linear = torch.tensor([[cos, -sin], [sin, cos]]) @ torch.diag(torch.tensor([mirror * s, s]))
    return torch.cat([linear, torch.tensor([[tx], [ty]])], dim=1).float()


def render(source: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
    """The view (3 x size x size) of a 3 x H x W source under ``theta`` (bilinear, zeros out)."""
    grid = F.affine_grid(theta[None], [1, source.shape[0], size, size], align_corners=False)
    return F.grid_sample(source[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]


def colour_jitter(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random brightness, contrast, saturation, hue and greyscale on a 3 x H x W image in [0, 1]."""
    from torchvision.transforms.v2 import functional as TF

    image = TF.adjust_brightness(image, uniform(generator, 1 - BRIGHTNESS, 1 + BRIGHTNESS))
    image = TF.adjust_contrast(image, uniform(generator, *CONTRAST))
    image = TF.adjust_saturation(image, uniform(generator, *SATURATION))
    image = TF.adjust_hue(image, uniform(generator, -HUE, HUE))
    if float(torch.rand((), generator=generator)) < GREYSCALE_P:
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    return image.clamp(0.0, 1.0)


def _homogeneous(theta: torch.Tensor) -> torch.Tensor:
    """B x 2 x 3 -> B x 3 x 3."""
    bottom = torch.tensor([0.0, 0.0, 1.0], dtype=theta.dtype, device=theta.device).expand(theta.shape[0], 1, 3)
    return torch.cat([theta, bottom], dim=1)


def patch_centres(grid: tuple[int, int], batch: int, device: torch.device) -> torch.Tensor:
    """Normalised (x, y) of each patch centre of a gh x gw grid: B x gh x gw x 2."""
    gh, gw = grid
    ys = (torch.arange(gh, device=device, dtype=torch.float32) + 0.5) / gh * 2 - 1
    xs = (torch.arange(gw, device=device, dtype=torch.float32) + 0.5) / gw * 2 - 1
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx, yy], dim=-1).expand(batch, gh, gw, 2)


@dataclass
class Alignment:
    """Where each local patch centre lies in the global view (grid for ``F.grid_sample``) and
    whether it is seen there (inside the global view and inside the source image)."""

    grid: torch.Tensor  # B x lh x lw x 2, normalised coordinates of the global view
    valid: torch.Tensor  # B x lh x lw bool


def _homogeneous_centres(grid: tuple[int, int], batch: int, device: torch.device) -> torch.Tensor:
    """Patch centres as homogeneous (x, y, 1): B x gh x gw x 3."""
    centres = patch_centres(grid, batch, device)
    return torch.cat([centres, torch.ones_like(centres[..., :1])], dim=-1)


def patches_in_source(theta: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """B x gh x gw bool: whether the centre of each patch of a view rendered with ``theta``
    (B x 2 x 3) lies inside the source image.

    ``render`` fills the view outside the source with zeros (a rotated or shifted view's
    corners); a patch whose centre is there is mostly that padding, not the image, so the
    losses and the class-area estimate leave it out. The same rule as ``local_to_global``'s
    "inside the source".
    """
    centres = _homogeneous_centres(grid, theta.shape[0], theta.device)
    in_source = torch.einsum("bij,bhwj->bhwi", theta.float(), centres)
    return (in_source.abs() <= 1).all(dim=-1)


def local_to_global(theta_global: torch.Tensor, theta_local: torch.Tensor, local_grid: tuple[int, int]) -> Alignment:
    """Compose inv(theta_g) o theta_l at the local patch centres (B x 2 x 3 thetas)."""
    local_h = _homogeneous_centres(local_grid, theta_local.shape[0], theta_local.device)
    to_global = torch.linalg.inv(_homogeneous(theta_global.float())) @ _homogeneous(theta_local.float())
    in_global = torch.einsum("bij,bhwj->bhwi", to_global, local_h)[..., :2]
    valid = (in_global.abs() <= 1).all(dim=-1) & patches_in_source(theta_local, local_grid)
    return Alignment(grid=in_global, valid=valid)


def resample(maps: torch.Tensor, alignment: Alignment) -> torch.Tensor:
    """Global-view maps (B x C x gh x gw) read at the local patch centres: B x C x lh x lw.

    Bilinear weights sum to one with border padding, so distributions stay distributions.
    """
    return F.grid_sample(maps, alignment.grid.to(maps.dtype), mode="bilinear", padding_mode="border",
                         align_corners=False)
