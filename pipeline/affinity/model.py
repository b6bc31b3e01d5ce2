"""AffinityNet (Ahn & Kwak, CVPR 2018, Sec. 3.2) on a timm CNN.

The backbone's three deepest feature maps, all at stride 8 (timm ``output_stride=8`` dilates the
last stages, as the paper's ResNet-38 does), are each reduced by a 1x1 convolution + ELU (to 64,
128 and 256 channels, the public code's sizes), concatenated and passed through one more 1x1
convolution + ELU of 448 channels: the embedding f. The affinity of two cells is
exp(-mean_c |f_i - f_j|): the paper writes the L1 distance, the public code its mean over the
channels; the learned last layer absorbs the constant factor, and the mean keeps the initial
affinities away from 0 for any embedding size (docs/FIDELITY.md).

BatchNorm layers of the backbone are frozen (running statistics and affine parameters), as the
public code freezes its ResNet-38's: AffinityNet trains on batches of 8 crops. Weights come from
``random`` or a local timm state-dict file, never a download.
"""

from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.affinity.labels import neighbour_offsets
from pipeline.backbone import describe_mismatch, read_weights_file
from pipeline.checkpoint import load_checkpoint
from pipeline.errors import ConfigError, PipelineError, WeightsError

log = logging.getLogger(__name__)

STRIDE = 8
BRANCH_CHANNELS = (64, 128, 256)
EMBED_CHANNELS = sum(BRANCH_CHANNELS)  # 448
MODEL_FORMAT = "affinity-model/1"
_CLASSIFIER_PREFIXES = ("fc.", "head.", "classifier.", "head_drop.")


class AffinityNet(nn.Module):
    def __init__(self, backbone: str, weights: str = "random") -> None:
        super().__init__()
        self.backbone_name = backbone
        if not timm.is_model(backbone):
            raise ConfigError(f"affinity.backbone: {backbone!r} is not a timm model")
        try:
            self.body = timm.create_model(backbone, pretrained=False, features_only=True, output_stride=STRIDE)
        except (TypeError, RuntimeError, ValueError, AssertionError) as exc:
            raise ConfigError(f"affinity.backbone: {backbone!r} cannot be built as a feature extractor at "
                              f"output stride {STRIDE} ({exc}); use a ResNet (resnet18/50/101)") from None
        info = self.body.feature_info
        if info.reduction()[-3:] != [STRIDE] * 3:
            raise ConfigError(f"affinity.backbone: {backbone!r} gives no three stride-{STRIDE} maps "
                              f"(strides {info.reduction()})")
        if weights != "random":
            self.load_backbone(Path(weights))
        self.branches = nn.ModuleList(
            nn.Conv2d(c_in, c_out, 1, bias=False) for c_in, c_out in zip(info.channels()[-3:], BRANCH_CHANNELS)
        )
        self.fuse = nn.Conv2d(EMBED_CHANNELS, EMBED_CHANNELS, 1, bias=False)
        for conv in self.branches:
            nn.init.kaiming_normal_(conv.weight)
        # the public code's init of its last layer (Xavier, gain 4)
        nn.init.xavier_uniform_(self.fuse.weight, gain=4)
        cfg = self.body.pretrained_cfg
        self.mean, self.std = tuple(cfg["mean"]), tuple(cfg["std"])
        self.freeze_batchnorm()

    def load_backbone(self, path: Path) -> None:
        try:
            state = read_weights_file(path)
        except PipelineError as exc:
            raise type(exc)(str(exc).replace("backbone.weights", "affinity.backbone_weights")) from None
        expected = self.body.state_dict()
        state = {k: v for k, v in state.items() if k in expected or not k.startswith(_CLASSIFIER_PREFIXES)}
        problems = describe_mismatch(state, expected)
        if problems:
            raise WeightsError(f"affinity.backbone_weights: {path} does not fit {self.backbone_name!r}: "
                               f"{'; '.join(problems)}")
        self.body.load_state_dict(state, strict=True)
        log.info("loaded %d tensors from %s into %s", len(state), path, self.backbone_name)

    def freeze_batchnorm(self) -> None:
        for module in self.body.modules():
            if isinstance(module, nn.BatchNorm2d):
                for param in module.parameters():
                    param.requires_grad_(False)

    def train(self, mode: bool = True) -> AffinityNet:
        super().train(mode)
        for module in self.body.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()  # frozen statistics, also while training
        return self

    def new_parameters(self) -> list[nn.Parameter]:
        """The layers trained from scratch (the public code gives them 10x the learning rate)."""
        return [*self.branches.parameters(), *self.fuse.parameters()]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W (H, W multiples of 8) -> B x 448 x H/8 x W/8 embedding."""
        maps = self.body(images)[-3:]
        reduced = [F.elu(conv(x)) for conv, x in zip(self.branches, maps)]
        return F.elu(self.fuse(torch.cat(reduced, dim=1)))


def pair_affinities(embedding: torch.Tensor, radius: int) -> torch.Tensor:
    """B x D x h x w embedding -> B x K x h x w affinities exp(-mean_c |f(y, x) - f(y+dy, x+dx)|)
    for the K offsets of :func:`neighbour_offsets` (pairs leaving the map: meaningless values,
    which carry no label and no matrix entry)."""
    reach = radius - 1
    padded = F.pad(embedding, (reach, reach, 0, reach))
    height, width = embedding.shape[-2:]
    planes = []
    for dy, dx in neighbour_offsets(radius):
        other = padded[..., dy:dy + height, reach + dx:reach + dx + width]
        planes.append(torch.exp(-(embedding - other).abs().mean(dim=1)))
    return torch.stack(planes, dim=1)


def trained_payload(model: AffinityNet) -> dict:
    return {"format": MODEL_FORMAT, "arch": {"backbone": model.backbone_name}, "model": model.state_dict()}


def load_trained(path: str | Path) -> AffinityNet:
    """The model written by training (``affinity/model.pt``), rebuilt from its record."""
    path = Path(path)
    payload = load_checkpoint(path)
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise WeightsError(f"{path}: not an AffinityNet model file (affinity/model.pt)")
    model = AffinityNet(payload["arch"]["backbone"])
    problems = describe_mismatch(payload["model"], model.state_dict())
    if problems:
        raise WeightsError(f"{path}: does not fit its recorded architecture: {'; '.join(problems)}")
    model.load_state_dict(payload["model"], strict=True)
    return model
