"""CSRM's network (paper 004 Sec. 3.1) and the CAM classifier it starts from (Sec. 3.2.6).

``CAMClassifier``: a timm ResNet / ResNeSt at output stride 16 (``features``) and a bias-free
1x1 conv to the C foreground CAMs (``classifier``); the image logits are GAP of the CAMs (eq. 1).
It is the CAM baseline (Puzzle-CAM, ``pipeline.methods.cam``) and CSRM's classification branch.

``CSRMNet``: the same ``features`` + ``classifier`` (so a CAM model's weights load by name), plus
the segmentation branch S (a DeepLabV3+ decoder to K = C + 1 classes) and the representation branch
R (the same decoder to 256 channels), both Kaiming-initialised (Sec. 3.2.6). S and R run at the
decoder's stride 4; S's logits are upsampled to the input (eq. 3: H x W), R stays at stride 4 (a
256-d map at full resolution would take 8.6 GB per 32 images of 512 px: docs/FIDELITY.md).

The trunk's BatchNorm layers are frozen (eval mode, no gradient), as CSRM's code trains ResNeSt
(``mode=fix``); the decoders' BatchNorm trains.

External CAM checkpoints (``load_cam_weights``): this project's own CAM model.pt, or the state
dict of a Puzzle-CAM (``model.*`` trunk keys, ``stage*`` duplicates) or P-NOC / CSRM (``backbone.*``)
classifier, whose ResNeSt key names are timm's ``resnest101e`` ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.backbone import describe_mismatch
from pipeline.checkpoint import load_checkpoint
from pipeline.deeplab.model import CnnFeatures, V3PlusHead, init_new_layers, scaled_rates
from pipeline.errors import ConfigError, WeightsError

OUTPUT_STRIDE = 16  # Puzzle-CAM / P-NOC / CSRM: ResNeSt with dilation 2 in the last stage
ASPP_RATES = (6, 12, 18)  # DeepLabV3+ at output stride 16 (Chen et al. 2018)
REPRESENTATION_DIM = 256  # paper 004 eq. 4
_TRUNK_PREFIXES = ("module.", "model.", "backbone.")


def build_features(name: str, weights: str, key: str) -> CnnFeatures:
    """The trunk: ``random``, ``timm`` (timm's ImageNet download) or a local ImageNet classifier file."""
    features = CnnFeatures(name, OUTPUT_STRIDE, key=key, pretrained=weights == "timm")
    if weights not in ("random", "timm"):
        features.load_weights(Path(weights), name)
    return features


class FrozenTrunkBatchNorm(nn.Module):
    """Keeps the trunk's BatchNorm layers in eval mode with no gradient."""

    features: CnnFeatures

    def freeze_trunk_batchnorm(self) -> None:
        for module in self._trunk_batchnorms():
            module.requires_grad_(False)

    def _trunk_batchnorms(self) -> list[nn.Module]:
        return [m for m in self.features.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self._trunk_batchnorms():
            module.eval()
        return self


class CAMClassifier(FrozenTrunkBatchNorm):
    """``forward(x)`` -> (deep features B x F x h x w, raw CAMs B x C x h x w); logits = GAP(CAMs)."""

    def __init__(self, features: CnnFeatures, num_foreground: int, freeze_batchnorm: bool) -> None:
        super().__init__()
        self.features = features
        self.num_classes = num_foreground
        self.classifier = nn.Conv2d(features.high_channels, num_foreground, 1, bias=False)
        nn.init.kaiming_normal_(self.classifier.weight)
        self.frozen_batchnorm = freeze_batchnorm
        if freeze_batchnorm:
            self.freeze_trunk_batchnorm()

    def train(self, mode: bool = True):
        if self.frozen_batchnorm:
            return super().train(mode)
        return nn.Module.train(self, mode)

    def new_layers(self) -> list[nn.Module]:
        return [self.classifier]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, deep = self.features(images)
        return deep, self.classifier(deep)


@dataclass
class CSRMOutput:
    """cams B x C x h x w (raw, stride 16); logits B x C (GAP, eq. 1); segmentation B x K x H x W
    (logits at the input size, eq. 3); representation B x 256 x H/4 x W/4 (eq. 4)."""

    cams: torch.Tensor
    logits: torch.Tensor
    segmentation: torch.Tensor
    representation: torch.Tensor


class CSRMNet(FrozenTrunkBatchNorm):
    def __init__(self, features: CnnFeatures, num_classes: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"CSRM needs background + at least one class, got {num_classes} classes")
        self.features = features
        self.num_classes = num_classes
        self.classifier = nn.Conv2d(features.high_channels, num_classes - 1, 1, bias=False)
        nn.init.kaiming_normal_(self.classifier.weight)
        rates = scaled_rates(ASPP_RATES, OUTPUT_STRIDE, features.high_stride)
        self.segmentation = V3PlusHead(features.high_channels, features.low_channels, num_classes, rates)
        self.representation = V3PlusHead(features.high_channels, features.low_channels, REPRESENTATION_DIM, rates)
        init_new_layers(self.segmentation)
        init_new_layers(self.representation)
        self.freeze_trunk_batchnorm()

    def new_layers(self) -> list[nn.Module]:
        """The branches trained from scratch (paper 004 Sec. 4: lr 0.07 where the rest has 0.007)."""
        return [self.segmentation, self.representation]

    def forward(self, images: torch.Tensor) -> CSRMOutput:
        low, deep = self.features(images)
        cams = self.classifier(deep)
        segmentation = F.interpolate(self.segmentation(low, deep), size=images.shape[-2:], mode="bilinear",
                                     align_corners=False)
        return CSRMOutput(cams, cams.mean(dim=(-2, -1)), segmentation, self.representation(low, deep))


def cam_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The trunk + classifier tensors of a CAM model file, under CSRMNet's names
    (``features.body.*``, ``classifier.weight``)."""
    payload = load_checkpoint(path)
    if isinstance(payload, dict) and isinstance(payload.get("arch"), dict) and "model" in payload:
        if payload["arch"].get("method") != "cam":
            raise WeightsError(f"{path}: a {payload['arch'].get('method')!r} model, not a CAM classifier")
        payload = payload["model"]
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        payload = payload["state_dict"]
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise WeightsError(f"{path}: not a state dict of a CAM classifier")
    renamed = {}
    for key, value in payload.items():
        if key.startswith("stage") or key.startswith("module.stage"):
            continue  # Puzzle-CAM's stage1..5 alias its trunk: the same tensors again
        if key.startswith("features.") or key == "classifier.weight":
            renamed[key] = value
            continue
        for prefix in _TRUNK_PREFIXES:
            key = key.removeprefix(prefix)
        renamed["classifier.weight" if key == "classifier.weight" else f"features.body.{key}"] = value
    return renamed


def load_cam_weights(model: CSRMNet | CAMClassifier, path: Path) -> None:
    """Trunk and classifier of ``model`` from a CAM classifier file; everything must fit exactly."""
    state_dict = cam_state_dict(Path(path))
    expected = {k: v for k, v in model.state_dict().items() if k.startswith("features.") or k == "classifier.weight"}
    # BatchNorm step counters are not in every codebase's files.
    state_dict.update({k: v for k, v in expected.items() if k.endswith("num_batches_tracked") and k not in state_dict})
    problems = describe_mismatch(state_dict, expected)
    if problems:
        raise WeightsError(f"{path} does not fit the CAM classifier of this trunk ({'; '.join(problems)})")
    model.load_state_dict(state_dict, strict=False)
