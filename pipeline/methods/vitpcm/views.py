"""ViT-PCM's two branches' views (paper 001 Sec. 4-5): the main view and the ET tiles, merged
2 x 2 into mosaics (the merge m) and split back."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.errors import ConfigError
from pipeline.training.augment import apply_jitter, draw_jitter_if, jitter_batch, render, render_batch
from pipeline.training.data import AugmentedViewDataset, derived_seed, multi_hot, source_pixels, to_unit_range

# ---------------------------------------------------------------------------------------------
# The two branches' views


@dataclass(frozen=True)
class MosaicViews:
    """Main view of ``size`` px (= the source), ET tiles of ``size / 2`` px."""

    size: int
    patch: int
    crop_size: int
    crop_probability: float
    flip: bool
    jitter: bool

    @property
    def tile_size(self) -> int:
        return self.size // 2

    def check(self) -> None:
        if self.size % (2 * self.patch):
            raise ConfigError(f"train.global_size {self.size}: ViT-PCM needs a multiple of twice the patch size "
                              f"({2 * self.patch}) so that the 2 x 2 mosaic of tiles has the main view's patch grid")


def fair_coin(generator: torch.Generator) -> bool:
    return float(torch.rand((), generator=generator)) < 0.5


def dihedral(generator: torch.Generator, flip: bool) -> torch.Tensor:
    """2 x 2 map view -> source of the official augmentation: flip left-right, flip up-down, then
    transpose, each with p = 0.5 (the view is transpose(flip_ud(flip_lr(x))), so the coordinate
    map is LR @ UD @ T)."""
    lr, ud, transpose = (fair_coin(generator) for _ in range(3)) if flip else (False, False, False)
    lr_map = torch.diag(torch.tensor([-1.0 if lr else 1.0, 1.0]))
    ud_map = torch.diag(torch.tensor([1.0, -1.0 if ud else 1.0]))
    t_map = torch.tensor([[0.0, 1.0], [1.0, 0.0]]) if transpose else torch.eye(2)
    return lr_map @ ud_map @ t_map


def main_affine(generator: torch.Generator, flip: bool) -> torch.Tensor:
    """theta (2 x 3) of the main branch: flips and transpose of the whole image."""
    return torch.cat([dihedral(generator, flip), torch.zeros(2, 1)], dim=1)


def crop_window(generator: torch.Generator, size: int, crop: int, patch: int) -> tuple[int, int]:
    """Top-left (y, x) of the ET crop: each drawn from 0, patch, 2 patch, ..., size and clamped to
    size - crop, as the official ``bbox_for_crop`` (the last start is thus more likely)."""
    starts = range(0, size + 1, patch)
    y, x = (min(starts[int(torch.randint(len(starts), (), generator=generator))], size - crop) for _ in range(2))
    return y, x


def et_affine(generator: torch.Generator, views: MosaicViews) -> torch.Tensor:
    """theta (2 x 3) of the ET tile: crop (or the whole image), scaled to the tile, then flips and
    transpose; the scale is implicit in rendering the window at ``tile_size`` px."""
    if float(torch.rand((), generator=generator)) < views.crop_probability:
        y, x = crop_window(generator, views.size, views.crop_size, views.patch)
        side = views.crop_size / views.size
        centre = torch.tensor([[(x + views.crop_size / 2) / views.size * 2 - 1],
                               [(y + views.crop_size / 2) / views.size * 2 - 1]])
    else:
        side, centre = 1.0, torch.zeros(2, 1)
    return torch.cat([side * dihedral(generator, views.flip), centre], dim=1)


class MosaicViewDataset(AugmentedViewDataset):
    """Item i: the normalised main view and ET tile, their thetas, the multi-hot target, i; without
    ``render_in_worker``, the uint8 source and the jitter draws instead of the views.

    Every random choice comes from a generator seeded by (seed, epoch, i). Each branch jitters
    the colours of the source independently before its geometric transform (official order).
    """

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = self.images[index]
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch, index))
        pixels = source_pixels(image.image_path, self.views.size)
        theta_main = main_affine(generator, self.views.flip)
        jitter_main = draw_jitter_if(generator, self.views.jitter)
        theta_tile = et_affine(generator, self.views)
        jitter_tile = draw_jitter_if(generator, self.views.jitter)
        item = {"theta_main": theta_main, "theta_tile": theta_tile,
                "target": multi_hot(list(image.labels), self.num_classes), "index": torch.tensor(index)}
        if not self.render_in_worker:
            return {**item, "source": pixels, "jitter_main": jitter_main, "jitter_tile": jitter_tile}
        source = to_unit_range(pixels)
        main = render(self._branch_source(source, jitter_main), theta_main, self.views.size)
        tile = render(self._branch_source(source, jitter_tile), theta_tile, self.views.tile_size)
        return {**item, "image": (main - self.mean) / self.std, "tile": (tile - self.mean) / self.std}

    def _branch_source(self, source: torch.Tensor, jitter: torch.Tensor) -> torch.Tensor:
        return apply_jitter(source, jitter) if self.views.jitter else source


def render_mosaic_batch(batch: dict[str, torch.Tensor], views: MosaicViews, mean: torch.Tensor, std: torch.Tensor,
                        device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised main views and ET tiles of a batch of ``MosaicViewDataset`` items built
    with ``render_in_worker=False``, jittered and rendered on ``device``: the worker path per
    image, batched."""
    sources = to_unit_range(batch["source"].to(device, non_blocking=True))
    mean, std = mean.to(device, non_blocking=True), std.to(device, non_blocking=True)

    def branch(jitter: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
        jittered = jitter_batch(sources, jitter) if views.jitter else sources
        return (render_batch(jittered, theta.to(device, non_blocking=True), size) - mean) / std

    return (branch(batch["jitter_main"], batch["theta_main"], views.size),
            branch(batch["jitter_tile"], batch["theta_tile"], views.tile_size))


# ---------------------------------------------------------------------------------------------
# The merge m and its inverse


def tile_mosaic(tiles: torch.Tensor) -> torch.Tensor:
    """m: B tiles (B x ch x t x t) -> ceil(B / 4) mosaics (x ch x 2t x 2t), tiles 4j..4j+3 of the
    batch in row-major order in mosaic j. A batch that is not a multiple of 4 completes its last
    mosaic with its first tiles again (the official code drops those images instead)."""
    count = 4 * math.ceil(tiles.shape[0] / 4)
    order = torch.arange(count, device=tiles.device) % tiles.shape[0]
    quads = tiles[order].reshape(count // 4, 2, 2, *tiles.shape[1:])  # j, row, column, ch, t, t
    return quads.permute(0, 3, 1, 4, 2, 5).reshape(count // 4, tiles.shape[1], 2 * tiles.shape[2], 2 * tiles.shape[3])


def untile_mosaic(maps: torch.Tensor, count: int) -> torch.Tensor:
    """m^-1: mosaic maps (M x C x 2g x 2g) -> the first ``count`` tiles' maps (x C x g x g)."""
    m, c, h, w = maps.shape
    quads = maps.reshape(m, c, 2, h // 2, 2, w // 2).permute(0, 2, 4, 1, 3, 5)
    return quads.reshape(4 * m, c, h // 2, w // 2)[:count]


