"""One training step of RCM+MAM (paper 003, Fig. 2 and eq. 9) and its settings."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Protocol

import torch

from pipeline.methods.rcm_mam.losses import (
    PrototypeMemory,
    class_prototype_sums,
    classification_loss,
    loss_weights,
    mam_loss,
    mean_prototypes,
    rcm_loss,
    region_masks,
)
from pipeline.methods.rcm_mam.model import CAMNet, forward_scales, fuse_scales


class SumReducer(Protocol):
    """Adds a tensor over the data-parallel processes (identity on one process)."""

    def sum(self, tensor: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class RCMMAMSettings:
    """Paper 003 values (Sec. 4.2 unless noted)."""

    scales: tuple[float, ...] = (0.5, 1.0, 2.0)  # Sec. 3.1: I_s, I_m, I_l
    feature_dim: int = 256  # D, Appendix C
    threshold: float = 0.20  # eq. 1, Appendix B
    temperature: float = 0.5  # T of eq. 5
    ema_momentum: float = 0.997  # alpha, Sec. 3.1
    mam_start_epoch: int = 6  # lambda_3 = 0 for the first 6 epochs
    lambda_cls: float = 1.0
    lambda_rcm: float = 1.0
    lambda_mam: float = 1.0

    def __post_init__(self) -> None:
        if 1.0 not in self.scales:
            raise ValueError(f"scales {self.scales} must include 1.0 (I_m: prototypes, contrast, L_cls)")
        if not 0.0 <= self.threshold < 1.0 or self.temperature <= 0 or not 0.0 <= self.ema_momentum <= 1.0:
            raise ValueError(f"invalid RCM+MAM settings: {self}")

    @classmethod
    def from_params(cls, params: dict) -> RCMMAMSettings:
        """From a config mapping with these field names (unknown keys are an error)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"unknown RCM+MAM settings: {', '.join(unknown)}")
        values = dict(params)
        if "scales" in values:
            values["scales"] = tuple(float(s) for s in values["scales"])
        return cls(**values)


def training_step(main: CAMNet, support: CAMNet, images: torch.Tensor, labels: torch.Tensor, epoch: int,
                  memory: PrototypeMemory, settings: RCMMAMSettings,
                  reducer: SumReducer | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_ours = lambda_1 L_cls + lambda_2 L_RCM + lambda_3 L_MAM (eq. 9) on one batch.

    ``images`` B x 3 x H x W (normalised, the view I_m); ``labels`` B x N multi-hot foreground.
    F runs at every scale while lambda_3 > 0, else at scale 1 only (the other scales feed only
    L_MAM); G runs at every scale without gradients, in eval mode. ``memory`` is updated with
    this batch's prototypes (summed over processes by ``reducer``) before the contrast.
    The networks run under the caller's autocast, if any; masks and losses in float32.
    Returns the total (with gradient) and the detached parts ``cls``, ``rcm``, ``mam``.
    """
    weights = loss_weights(epoch, settings.mam_start_epoch, settings.lambda_cls, settings.lambda_rcm,
                           settings.lambda_mam)
    main_scales = settings.scales if weights.mam > 0 else (1.0,)
    main_out = forward_scales(main, images, main_scales)
    with torch.no_grad():
        support.eval()
        support_out = forward_scales(support, images, settings.scales)
    main_middle = main_out[main_scales.index(1.0)]
    # Masks, prototypes and losses run in float32 even when the caller wraps the step in bf16
    # autocast: cosines and a softmax over 1/T-scaled logits lose too much in bf16.
    with torch.autocast(images.device.type, enabled=False):
        with torch.no_grad():
            masks = region_masks(fuse_scales([o.cams for o in support_out]), labels, settings.threshold)
            sums, counts = class_prototype_sums(masks, support_out[settings.scales.index(1.0)].features)
            if reducer is not None:
                sums, counts = reducer.sum(sums), reducer.sum(counts)
            memory.update(mean_prototypes(sums, counts), counts > 0)
        cls = classification_loss(main_middle.logits, labels)
        rcm = rcm_loss(main_middle.features, masks, memory.prototypes, memory.filled, settings.temperature)
        if weights.mam > 0:
            mam = mam_loss(torch.stack([o.cams for o in main_out]), torch.stack([o.cams for o in support_out]),
                           labels)
        else:
            mam = torch.zeros((), device=images.device)
    total = weights.cls * cls + weights.rcm * rcm + weights.mam * mam
    return total, {"cls": cls.detach(), "rcm": rcm.detach(), "mam": mam.detach()}
