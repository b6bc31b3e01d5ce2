"""The global and local views of an image and the map between their patch grids (paper 000
Sec. 3.1: "one global view retaining most of the original image, and a local view obtained by
randomly cropping and resizing X", both jittered and affinely transformed).

A view is rendered by ``F.grid_sample`` from the source image with an affine ``theta`` (2 x 3)
that maps the view's normalised coordinates (-1..1, ``align_corners=False``) to the source's.
Keeping theta lets the loss resample the global branch's predictions at the source points seen
by each local patch: local -> source -> global is ``inv(theta_g) o theta_l``. So CE(Q^g, P^l)
and CE(Q^l, P^g) compare the same image regions, whatever the flips, scales and rotations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ViewSettings:
    """Sizes in pixels (square views); scales are the side of the view as a fraction of the
    source's side (before rotation)."""

    global_size: int
    local_size: int
    global_scale: tuple[float, float]
    local_scale: tuple[float, float]
    max_rotation_deg: float
    flip: bool
    jitter: bool


# Colour jitter of ViT-PCM (PRIOR-ART.md): brightness 0.2, contrast [0.5, 2], saturation
# [0.5, 1.5], hue 0.1, greyscale p = 0.1. Paper 000 only says "jittering".
BRIGHTNESS = 0.2
CONTRAST = (0.5, 2.0)
SATURATION = (0.5, 1.5)
HUE = 0.1
GREYSCALE_P = 0.1


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def random_affine(
    generator: torch.Generator, scale: tuple[float, float], max_rotation_deg: float, flip: bool
) -> torch.Tensor:
    """theta (2 x 3): view coordinates -> source coordinates; a square window of side ``s``
    (fraction of the source), rotated by up to ``max_rotation_deg``, mirrored with p = 0.5,
    placed so that its unrotated square lies inside the source."""
    s = _uniform(generator, *scale)
    angle = math.radians(_uniform(generator, -max_rotation_deg, max_rotation_deg))
    mirror = -1.0 if flip and float(torch.rand((), generator=generator)) < 0.5 else 1.0
    tx = _uniform(generator, -(1.0 - s), 1.0 - s)
    ty = _uniform(generator, -(1.0 - s), 1.0 - s)
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

    image = TF.adjust_brightness(image, _uniform(generator, 1 - BRIGHTNESS, 1 + BRIGHTNESS))
    image = TF.adjust_contrast(image, _uniform(generator, *CONTRAST))
    image = TF.adjust_saturation(image, _uniform(generator, *SATURATION))
    image = TF.adjust_hue(image, _uniform(generator, -HUE, HUE))
    if float(torch.rand((), generator=generator)) < GREYSCALE_P:
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    return image.clamp(0.0, 1.0)


@dataclass
class ViewPair:
    global_view: torch.Tensor  # 3 x Sg x Sg, in [0, 1]
    local_view: torch.Tensor  # 3 x Sl x Sl, in [0, 1]
    theta_global: torch.Tensor  # 2 x 3
    theta_local: torch.Tensor  # 2 x 3


def make_views(source: torch.Tensor, settings: ViewSettings, generator: torch.Generator) -> ViewPair:
    """Both views of a 3 x H x W source in [0, 1], every random choice drawn from ``generator``."""
    theta_g = random_affine(generator, settings.global_scale, settings.max_rotation_deg, settings.flip)
    theta_l = random_affine(generator, settings.local_scale, settings.max_rotation_deg, settings.flip)
    global_view = render(source, theta_g, settings.global_size)
    local_view = render(source, theta_l, settings.local_size)
    if settings.jitter:
        global_view = colour_jitter(global_view, generator)
        local_view = colour_jitter(local_view, generator)
    return ViewPair(global_view, local_view, theta_g, theta_l)


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


def local_to_global(theta_global: torch.Tensor, theta_local: torch.Tensor, local_grid: tuple[int, int]) -> Alignment:
    """Compose inv(theta_g) o theta_l at the local patch centres (B x 2 x 3 thetas)."""
    batch = theta_local.shape[0]
    centres = patch_centres(local_grid, batch, theta_local.device)
    ones = torch.ones_like(centres[..., :1])
    local_h = torch.cat([centres, ones], dim=-1)  # B x lh x lw x 3
    to_source = _homogeneous(theta_local.float())
    to_global = torch.linalg.inv(_homogeneous(theta_global.float())) @ to_source
    in_source = torch.einsum("bij,bhwj->bhwi", to_source, local_h)[..., :2]
    in_global = torch.einsum("bij,bhwj->bhwi", to_global, local_h)[..., :2]
    valid = (in_global.abs() <= 1).all(dim=-1) & (in_source.abs() <= 1).all(dim=-1)
    return Alignment(grid=in_global, valid=valid)


def resample(maps: torch.Tensor, alignment: Alignment) -> torch.Tensor:
    """Global-view maps (B x C x gh x gw) read at the local patch centres: B x C x lh x lw.

    Bilinear weights sum to one with border padding, so distributions stay distributions.
    """
    return F.grid_sample(maps, alignment.grid.to(maps.dtype), mode="bilinear", padding_mode="border",
                         align_corners=False)
