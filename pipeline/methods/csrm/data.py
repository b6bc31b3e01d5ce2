"""CSRM's training images (paper 004 Sec. 4): "resized to a common resolution of 512 per 512 pixels
and augmented with random flip" (the aspect is not kept; ClassMix, the strong augmentation, runs
on the batch in the step). Each item also carries the uint8 pixels for the in-loop dense CRF.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.training.data import AugmentedViewDataset, derived_seed, multi_hot, source_image


@dataclass(frozen=True)
class SquareViews:
    size: int
    flip: bool


class SquareViewDataset(AugmentedViewDataset):
    """Item i: ``image`` (normalised 3 x S x S), ``rgb`` (S x S x 3 uint8, the same pixels), ``target``
    (multi-hot, background included), ``index``; the flip drawn from (seed, epoch, i)."""

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = self.images[index]
        rgb = source_image(image.image_path, self.views.size)
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch, index))
        if self.views.flip and float(torch.rand((), generator=generator)) < 0.5:
            rgb = rgb.flip(-1)
        pixels = (rgb * 255.0).round().to(torch.uint8).permute(1, 2, 0).contiguous()
        return {"image": (pixels.permute(2, 0, 1).float() / 255.0 - self.mean) / self.std, "rgb": pixels,
                "target": multi_hot(list(image.labels), self.num_classes), "index": torch.tensor(index)}
