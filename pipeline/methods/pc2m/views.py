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

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from pipeline.training.augment import apply_jitter, draw_jitter_if, jitter_batch, random_affine, render, render_batch
from pipeline.training.data import (
    AugmentedViewDataset,
    LabelledImage,
    derived_seed,
    multi_hot,
    source_pixels,
    to_unit_range,
)

# The local view's size in px (train.local_view_size): `equal` to the global view (paper 000: both
# branches have K = (n/d)^2 patches, Algorithm 1's pg, pl (b, K, C)) or train.local_size.
LOCAL_VIEW_SIZES = ("equal", "local_size")


@dataclass(frozen=True)
class ViewSettings:
    """Sizes in pixels (square views) as rendered; scales are the side of the view as a fraction
    of the source's side (before rotation)."""

    global_size: int
    local_size: int
    global_scale: tuple[float, float]
    local_scale: tuple[float, float]
    max_rotation_deg: float
    flip: bool
    jitter: bool


@dataclass
class ViewDraws:
    """Every random choice of one item's two views, in the order they are drawn."""

    theta_global: torch.Tensor  # 2 x 3
    theta_local: torch.Tensor  # 2 x 3
    jitter_global: torch.Tensor  # JITTER_DRAWS (unused without train.jitter)
    jitter_local: torch.Tensor


@dataclass
class ViewPair:
    global_view: torch.Tensor  # 3 x Sg x Sg, in [0, 1]
    local_view: torch.Tensor  # 3 x Sl x Sl, in [0, 1]
    theta_global: torch.Tensor  # 2 x 3
    theta_local: torch.Tensor  # 2 x 3


def draw_views(settings: ViewSettings, generator: torch.Generator) -> ViewDraws:
    theta_g = random_affine(generator, settings.global_scale, settings.max_rotation_deg, settings.flip)
    theta_l = random_affine(generator, settings.local_scale, settings.max_rotation_deg, settings.flip)
    jitter_g = draw_jitter_if(generator, settings.jitter)
    return ViewDraws(theta_g, theta_l, jitter_g, draw_jitter_if(generator, settings.jitter))


def make_views(source: torch.Tensor, settings: ViewSettings, generator: torch.Generator) -> ViewPair:
    """Both views of a 3 x H x W source in [0, 1], every random choice drawn from ``generator``."""
    draws = draw_views(settings, generator)
    global_view = render(source, draws.theta_global, settings.global_size)
    local_view = render(source, draws.theta_local, settings.local_size)
    if settings.jitter:
        global_view = apply_jitter(global_view, draws.jitter_global)
        local_view = apply_jitter(local_view, draws.jitter_local)
    return ViewPair(global_view, local_view, draws.theta_global, draws.theta_local)


def render_view_batch(batch: dict[str, torch.Tensor], settings: ViewSettings, mean: torch.Tensor,
                      std: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised global and local views of a batch of ``TwoViewDataset`` items built with
    ``render_in_worker=False``, rendered and jittered on ``device``: ``make_views`` per image,
    batched."""
    sources = to_unit_range(batch["source"].to(device, non_blocking=True))
    global_views = render_batch(sources, batch["theta_global"].to(device, non_blocking=True), settings.global_size)
    local_views = render_batch(sources, batch["theta_local"].to(device, non_blocking=True), settings.local_size)
    if settings.jitter:
        global_views = jitter_batch(global_views, batch["jitter_global"])
        local_views = jitter_batch(local_views, batch["jitter_local"])
    mean, std = mean.to(device, non_blocking=True), std.to(device, non_blocking=True)
    return (global_views - mean) / std, (local_views - mean) / std


class TwoViewDataset(AugmentedViewDataset):
    """Item i: normalised global and local views, their thetas, the multi-hot target, i; without
    ``render_in_worker``, the uint8 source and the jitter draws instead of the views."""

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = self.images[index]
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch, index))
        item = {"target": multi_hot(list(image.labels), self.num_classes), "index": torch.tensor(index)}
        pixels = source_pixels(image.image_path, self.views.global_size)
        if not self.render_in_worker:
            draws = draw_views(self.views, generator)
            return {**item, "source": pixels, "theta_global": draws.theta_global, "theta_local": draws.theta_local,
                    "jitter_global": draws.jitter_global, "jitter_local": draws.jitter_local}
        pair = make_views(to_unit_range(pixels), self.views, generator)
        return {
            **item,
            "global": (pair.global_view - self.mean) / self.std,
            "local": (pair.local_view - self.mean) / self.std,
            "theta_global": pair.theta_global,
            "theta_local": pair.theta_local,
        }


class PlainImageDataset(Dataset):
    """Item i: image i at ``size`` x ``size`` as uint8 pixels, no augmentation (the source of the
    training views; the offline pass of eqs. 6-7 predicts on it, normalised (:meth:`normalise`) where the
    model runs: a worker hands over a quarter of the bytes, and skips the float conversion — 35-40%
    of its time per image at 384 px, bench/RESULTS.md)."""

    def __init__(self, images: Sequence[LabelledImage], size: int, mean: Sequence[float],
                 std: Sequence[float]) -> None:
        self.paths = [image.image_path for image in images]
        self.size = size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return source_pixels(self.paths[index], self.size)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B x) 3 x size x size pixels, on any device -> the model's input: the same
        operations, so the same numbers, on every device."""
        mean = self.mean.to(pixels.device, non_blocking=True)
        std = self.std.to(pixels.device, non_blocking=True)
        return (to_unit_range(pixels) - mean) / std
