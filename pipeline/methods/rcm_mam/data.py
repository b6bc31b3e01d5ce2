"""RCM+MAM's training views (paper 003 Sec. 4.2): "random cropping and resizing, horizontal
flipping, color jittering; cropped in 192 x 192, resizing range between 0.5 and 1.3".

Per image, every random choice from a generator seeded by (seed, epoch, index): a resize of the
whole image by a factor in ``resize_range`` (bilinear), a horizontal flip with p = 0.5, the
colour jitter shared by every method (``training.augment.colour_jitter``), then a random
``crop_size`` square; an image smaller than the crop is padded with the mean colour (0 after
normalisation), as the PSA / SEAM crops do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.imageio import load_rgb
from pipeline.training.augment import colour_jitter, uniform
from pipeline.training.data import AugmentedViewDataset, derived_seed, multi_hot


@dataclass(frozen=True)
class CropViews:
    crop_size: int
    resize_range: tuple[float, float]  # factor of the image size
    flip: bool
    jitter: bool
    # When set: the longer side is resized to a whole number of pixels drawn from this range
    # instead (Puzzle-CAM's RandomResize(320, 640) for the CAM baseline).
    long_side_range: tuple[int, int] | None = None


def resize_factor(views: CropViews, height: int, width: int, generator: torch.Generator) -> float:
    if views.long_side_range is None:
        return uniform(generator, *views.resize_range)
    low, high = views.long_side_range
    return int(torch.randint(low, high + 1, (), generator=generator)) / max(height, width)


def random_crop_view(image: torch.Tensor, views: CropViews, generator: torch.Generator) -> torch.Tensor:
    """3 x crop x crop view of a 3 x H x W image in [0, 1]; pixels outside the image are NaN (the
    caller fills them with the mean colour after normalising)."""
    height, width = image.shape[1:]
    factor = resize_factor(views, height, width, generator)
    size = (max(1, round(height * factor)), max(1, round(width * factor)))
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0].clamp(0, 1)
    if views.flip and float(torch.rand((), generator=generator)) < 0.5:
        image = image.flip(-1)
    if views.jitter:
        image = colour_jitter(image, generator)
    crop = views.crop_size
    out = torch.full((3, crop, crop), float("nan"))
    # Offsets in the larger of (image, crop): the crop window or the image placed at random.
    dy = int(torch.randint(abs(size[0] - crop) + 1, (), generator=generator))
    dx = int(torch.randint(abs(size[1] - crop) + 1, (), generator=generator))
    src_y, dst_y = (dy, 0) if size[0] >= crop else (0, dy)
    src_x, dst_x = (dx, 0) if size[1] >= crop else (0, dx)
    h, w = min(crop, size[0]), min(crop, size[1])
    out[:, dst_y : dst_y + h, dst_x : dst_x + w] = image[:, src_y : src_y + h, src_x : src_x + w]
    return out


class CropViewDataset(AugmentedViewDataset):
    """Item i: the normalised crop (mean colour outside the image), the multi-hot target, i."""

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = self.images[index]
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch, index))
        rgb = torch.from_numpy(np.array(load_rgb(image.image_path))).permute(2, 0, 1).float() / 255.0
        view = (random_crop_view(rgb, self.views, generator) - self.mean) / self.std
        return {"image": torch.nan_to_num(view, nan=0.0), "target": multi_hot(list(image.labels), self.num_classes),
                "index": torch.tensor(index)}


def imagenet_normalisation() -> tuple[Sequence[float], Sequence[float]]:
    """The mean / std the ResNet-38 and timm ResNet ImageNet weights expect (RGB in [0, 1])."""
    return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
