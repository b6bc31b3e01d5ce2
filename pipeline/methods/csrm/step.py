"""One CSRM training step (paper 004 eq. 14) and the loss settings.

L = L_c + L_s + lambda_s2c L_s2c + lambda_u L_u + lambda_m L_m, with lambda_s2c = lambda_u =
lambda_m = 0 during the warm-up epochs. The teacher (EMA of the student, eval mode) sees the
un-augmented batch: its CAMs make the pseudo-labels of L_s (``pseudo``), its segmentation the
targets of L_s2c and L_u and the entropy groups of L_m. The student sees the un-augmented batch
(L_c, L_s, L_s2c, L_m) and, while L_u is on, the ClassMix batch (L_u) in the same forward.
"""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from pipeline.crf import CrfParams
from pipeline.methods.csrm.classmix import classmix_masks, mix
from pipeline.methods.csrm.contrast import ContrastSettings, NegativeBank, contrast_loss
from pipeline.methods.csrm.losses import (
    classification_loss,
    consistency_loss,
    linear_ramp,
    psi_normalise,
    s2c_loss,
    segmentation_loss,
)
from pipeline.methods.csrm.model import CSRMNet
from pipeline.methods.csrm.pseudo import IGNORE, pseudo_labels


@dataclass(frozen=True)
class CSRMLossSettings:
    """Paper 004 values (Sec. 4 unless noted); the code's readings in config.yaml's comments."""

    delta_bg: float = 0.05
    delta_fg: float = 0.35
    in_loop_crf: bool = True
    # sigma_s2c of eq. 8, linear over training (Sec. 4: 0.10 -> 1.00).
    sigma_start: float = 0.1
    sigma_end: float = 1.0
    # lambda_s2c (not given): 1 -> 1; CSRM's code ramps it 0.1 -> 1 and keeps sigma at 0.5.
    lambda_s2c_start: float = 1.0
    lambda_s2c_end: float = 1.0
    lambda_u: float = 1.0
    lambda_m: float = 1.0
    # alpha of eq. 11 and of L_m's entropy groups, linear over training (0.2 -> 0).
    alpha_start: float = 0.2
    alpha_end: float = 0.0
    warmup_epochs: int = 1
    classmix_probability: float = 0.5
    # Table 1's ablation: L_s alone, + L_s2c, + L_u, + L_m.
    use_s2c: bool = True
    use_u: bool = True
    use_m: bool = True
    contrast: ContrastSettings = ContrastSettings()

    def __post_init__(self) -> None:
        if not 0.0 <= self.delta_bg <= self.delta_fg <= 1.0:
            raise ValueError(f"need 0 <= delta_bg <= delta_fg <= 1, got {self.delta_bg}, {self.delta_fg}")
        for name in ("alpha_start", "alpha_end", "classmix_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], not {getattr(self, name)}")
        if self.warmup_epochs < 0 or self.contrast.queries < 1 or self.contrast.negatives < 1:
            raise ValueError("warmup_epochs >= 0, queries >= 1 and negatives >= 1 are required")
        if self.contrast.temperature <= 0 or not 1 <= self.contrast.rank_low < self.contrast.rank_high:
            raise ValueError("temperature > 0 and 1 <= rank_low < rank_high are required")

    @classmethod
    def from_params(cls, params: dict) -> CSRMLossSettings:
        """From a mapping with these field names and ContrastSettings' (flat); unknown keys are an error."""
        own = {f.name for f in fields(cls)} - {"contrast"}
        contrast = {f.name for f in fields(ContrastSettings)}
        unknown = sorted(set(params) - own - contrast)
        if unknown:
            raise ValueError(f"unknown CSRM settings: {', '.join(unknown)}")
        return cls(**{k: v for k, v in params.items() if k in own},
                   contrast=ContrastSettings(**{k: v for k, v in params.items() if k in contrast}))


@dataclass(frozen=True)
class LossWeights:
    s2c: float
    u: float
    m: float
    sigma: float
    alpha: float


def loss_weights(settings: CSRMLossSettings, epoch: int, progress: float) -> LossWeights:
    """The weights of eq. 14 and the ramps at ``progress`` (0 at the first step, 1 at the end)."""
    warm = epoch >= settings.warmup_epochs
    s2c = linear_ramp(settings.lambda_s2c_start, settings.lambda_s2c_end, progress)
    return LossWeights(
        s2c=s2c if warm and settings.use_s2c else 0.0,
        u=settings.lambda_u if warm and settings.use_u else 0.0,
        m=settings.lambda_m if warm and settings.use_m else 0.0,
        sigma=linear_ramp(settings.sigma_start, settings.sigma_end, progress),
        alpha=linear_ramp(settings.alpha_start, settings.alpha_end, progress),
    )


def ema_momentum(step: int, warmup_steps: int, momentum: float) -> float:
    """The teacher's EMA momentum at ``step`` (CSRM's code; the paper gives none): a plain copy
    of the student during the warm-up, then min(1 - 1 / (1 + steps since the warm-up), momentum)."""
    if step < warmup_steps:
        return 0.0
    return min(1.0 - 1.0 / (1 + step - warmup_steps), momentum)


def training_step(student: CSRMNet, teacher: CSRMNet, images: torch.Tensor, rgb: torch.Tensor,
                  labels: torch.Tensor, epoch: int, progress: float, bank: NegativeBank,
                  settings: CSRMLossSettings, crf: CrfParams | None, generator: torch.Generator,
                  pool: Executor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 14 on one batch: ``images`` B x 3 x H x W normalised, ``rgb`` B x H x W x 3 uint8 (for the
    CRF), ``labels`` B x K multi-hot (background 0 included). Networks under the caller's autocast;
    losses in float32. Returns the total and the detached parts c, s, s2c, u, m."""
    weights = loss_weights(settings, epoch, progress)
    size = tuple(images.shape[-2:])
    foreground = labels[:, 1:]
    with torch.no_grad():
        teacher.eval()
        taught = teacher(images)
        teacher_probs = F.softmax(taught.segmentation.float(), dim=1)
        cams = psi_normalise(taught.cams.float(), size) * foreground[:, :, None, None]
        cam_labels = pseudo_labels(rgb, cams, settings.delta_bg, settings.delta_fg, crf, pool)
        if weights.u > 0:
            masks, partners = classmix_masks(teacher_probs.argmax(dim=1), settings.classmix_probability, generator)
    batch = images.shape[0]
    out = student(torch.cat([images, mix(images, masks, partners)]) if weights.u > 0 else images)
    zero = out.logits.sum() * 0.0
    with torch.autocast(images.device.type, enabled=False):
        segmentation = out.segmentation.float()
        log_probs = F.log_softmax(segmentation[:batch], dim=1)
        parts = {
            "c": classification_loss(out.logits[:batch].float(), foreground),
            "s": segmentation_loss(log_probs, cam_labels, cam_labels != IGNORE),
            "s2c": zero, "u": zero, "m": zero,
        }
        if weights.s2c > 0:
            student_cams = F.interpolate(out.cams[:batch].float(), size=size, mode="bilinear", align_corners=False)
            parts["s2c"] = s2c_loss(segmentation[:batch, 0], student_cams, teacher_probs, weights.sigma)
        if weights.u > 0:
            parts["u"] = consistency_loss(F.log_softmax(segmentation[batch:], dim=1),
                                          mix(teacher_probs, masks, partners), weights.alpha)
        if weights.m > 0:
            grid = tuple(out.representation.shape[-2:])
            parts["m"] = contrast_loss(
                out.representation[:batch].float(), taught.representation.float(),
                F.interpolate(teacher_probs, size=grid, mode="bilinear", align_corners=False),
                F.interpolate(cam_labels[:, None].float(), size=grid, mode="nearest")[:, 0].long(),
                labels, weights.alpha, bank, settings.contrast, generator)
    total = parts["c"] + parts["s"] + weights.s2c * parts["s2c"] + weights.u * parts["u"] + weights.m * parts["m"]
    return total, {name: value.detach() for name, value in parts.items()}
