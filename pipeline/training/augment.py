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
    return render_batch(source[None], theta[None], size)[0]


def render_batch(sources: torch.Tensor, thetas: torch.Tensor, size: int) -> torch.Tensor:
    """``render`` of B sources (B x 3 x H x W) under B thetas (B x 2 x 3) in one call: the same
    per-image numbers, where the views are rendered on the training device."""
    grid = F.affine_grid(thetas, [sources.shape[0], sources.shape[1], size, size], align_corners=False)
    return F.grid_sample(sources, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# The random draws of one colour jitter, in the order they are drawn: brightness, contrast,
# saturation and hue factors, then the greyscale flag (1.0 = greyscale).
JITTER_DRAWS = 5
# HSV -> RGB: for each hue sector 0..5, which of (v, p, q, t) each of R, G, B takes.
HUE_SECTOR_CHANNELS = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]])


def draw_jitter(generator: torch.Generator) -> torch.Tensor:
    """One colour jitter's factors (``JITTER_DRAWS``), drawn from ``generator``."""
    brightness = uniform(generator, 1 - BRIGHTNESS, 1 + BRIGHTNESS)
    contrast = uniform(generator, *CONTRAST)
    saturation = uniform(generator, *SATURATION)
    hue = uniform(generator, -HUE, HUE)
    greyscale = float(float(torch.rand((), generator=generator)) < GREYSCALE_P)
    return torch.tensor([brightness, contrast, saturation, hue, greyscale], dtype=torch.float64)


def draw_jitter_if(generator: torch.Generator, enabled: bool) -> torch.Tensor:
    """``draw_jitter`` when the jitter is on; otherwise nothing is drawn (the later draws stay as
    they were) and the factors are zeros, never applied."""
    return draw_jitter(generator) if enabled else torch.zeros(JITTER_DRAWS, dtype=torch.float64)


def apply_jitter(image: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """The colour jitter of ``factors`` (``draw_jitter``) on a 3 x H x W image in [0, 1]:
    torchvision's brightness, contrast, saturation, hue, then greyscale."""
    from torchvision.transforms.v2 import functional as TF

    brightness, contrast, saturation, hue, greyscale = factors.tolist()
    image = TF.adjust_brightness(image, brightness)
    image = TF.adjust_contrast(image, contrast)
    image = TF.adjust_saturation(image, saturation)
    image = TF.adjust_hue(image, hue)
    if greyscale:
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    return image.clamp(0.0, 1.0)


def colour_jitter(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random brightness, contrast, saturation, hue and greyscale on a 3 x H x W image in [0, 1]."""
    return apply_jitter(image, draw_jitter(generator))


def _luma(images: torch.Tensor) -> torch.Tensor:
    """B x 1 x H x W grey levels (ITU-R 601-2, torchvision's weights)."""
    r, g, b = images.unbind(dim=1)
    return (0.2989 * r + 0.587 * g + 0.114 * b)[:, None]


def _blend(images: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    return (ratio * images + (1.0 - ratio) * other).clamp(0.0, 1.0)


def _shift_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """RGB -> HSV, hue + shift (mod 1), -> RGB, per image (torchvision's formulas, batched)."""
    r, g, b = images.unbind(dim=1)
    value, _ = images.max(dim=1)
    chroma = value - images.min(dim=1).values
    grey = chroma == 0
    saturation = chroma / torch.where(grey, torch.ones_like(value), value)
    safe = torch.where(grey, torch.ones_like(chroma), chroma)
    rc, gc, bc = (value - r) / safe, (value - g) / safe, (value - b) / safe
    hue = torch.where(value == r, bc - gc, torch.where(value == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(grey, torch.zeros_like(hue), hue)
    hue = ((hue / 6.0 + 1.0).fmod(1.0) + shift[:, None, None]).remainder(1.0)
    sector = hue * 6.0
    base = torch.floor(sector)
    fraction = sector - base
    p = (value * (1.0 - saturation)).clamp(0.0, 1.0)
    q = (value * (1.0 - saturation * fraction)).clamp(0.0, 1.0)
    t = (value * (1.0 - saturation * (1.0 - fraction))).clamp(0.0, 1.0)
    sector = base.long().remainder(6)
    choice = HUE_SECTOR_CHANNELS.to(images.device, non_blocking=True)
    candidates = torch.stack([value, p, q, t], dim=1)
    return candidates.gather(1, choice[:, sector].permute(1, 0, 2, 3))


def jitter_batch(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """``apply_jitter`` of each of B images (B x 3 x H x W in [0, 1]) with its own factors
    (B x ``JITTER_DRAWS``) in one pass, for views rendered on the training device."""
    column = factors.to(images.device, images.dtype, non_blocking=True)[:, :, None, None, None].unbind(dim=1)
    brightness, contrast, saturation, hue, greyscale = column
    images = (images * brightness).clamp(0.0, 1.0)
    images = _blend(images, _luma(images).mean(dim=(1, 2, 3), keepdim=True), contrast)
    images = _blend(images, _luma(images), saturation)
    images = _shift_hue(images, hue.flatten())
    images = torch.where(greyscale > 0, _luma(images).expand_as(images), images)
    return images.clamp(0.0, 1.0)


def _homogeneous(theta: torch.Tensor) -> torch.Tensor:
    """B x 2 x 3 -> B x 3 x 3."""
    # Filled on the device: a small tensor copied from the host would be a blocking copy.
    bottom = torch.zeros(theta.shape[0], 1, 3, dtype=theta.dtype, device=theta.device)
    bottom[..., 2] = 1.0
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
    # inv_ex: linalg.inv's singularity check reads a device value on the host every step; a view's
    # matrix has a positive scale, so it is always invertible.
    inverse = torch.linalg.inv_ex(_homogeneous(theta_global.float())).inverse
    to_global = inverse @ _homogeneous(theta_local.float())
    in_global = torch.einsum("bij,bhwj->bhwi", to_global, local_h)[..., :2]
    valid = (in_global.abs() <= 1).all(dim=-1) & patches_in_source(theta_local, local_grid)
    return Alignment(grid=in_global, valid=valid)


def resample(maps: torch.Tensor, alignment: Alignment) -> torch.Tensor:
    """Global-view maps (B x C x gh x gw) read at the local patch centres: B x C x lh x lw.

    Bilinear weights sum to one with border padding, so distributions stay distributions.
    """
    return F.grid_sample(maps, alignment.grid.to(maps.dtype), mode="bilinear", padding_mode="border",
                         align_corners=False)
