"""DeepLabV3+ (Chen et al., ECCV 2018) on a timm backbone.

Architecture (as in the paper, regular instead of depthwise-separable convolutions):

- encoder: the backbone's deepest map at output stride 16 (ResNets: ``features_only=True,
  output_stride=16``, i.e. layer4 dilated) and its stride-4 map (ResNets: layer1);
- ASPP on the deep map: a 1x1 branch, three 3x3 atrous branches (rates 6, 12, 18 at stride 16,
  scaled when the deep map has another stride), image pooling; concatenated, projected to 256
  channels, dropout 0.1 (the official TensorFlow code's keep_prob 0.9);
- decoder: the low-level map projected to 48 channels, concatenated with the ASPP output
  upsampled to its size, two 3x3 convolutions of 256 channels, a 1x1 classifier, and bilinear
  upsampling to the input size.

ViT option (our simple choice; paper 000 verifies with CNNs only): a timm ViT gives patch
tokens reshaped to a map at stride = patch size. The *last* block's tokens are the deep map and
the tokens of block ``depth // 4`` (1-based; the 3rd of 12) stand in for the low-level map, so
both are at the patch stride and the decoder fuses an early and a late representation at the same
resolution. Inputs are zero-padded (bottom/right) to a multiple of the patch size and the logits
cropped back, so pixels stay aligned.

Backbone weights come from exactly one explicit place: ``random`` or a local timm state-dict file
(``.pth`` / ``.safetensors``, read weights-only by :mod:`pipeline.backbone`); a file for another
architecture is a :class:`WeightsError` naming it, never a partial load. A classifier head in the
file (``fc.*``, ``head.*``) is dropped: DeepLab replaces it.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.models import get_arch_name
from torch import nn

from pipeline import backbone as vit_backbone
from pipeline.checkpoint import load_checkpoint, model_file_kind
from pipeline.errors import ConfigError, PipelineError, WeightsError

log = logging.getLogger(__name__)

ASPP_RATES_AT_STRIDE_16 = (6, 12, 18)
ASPP_CHANNELS = 256
LOW_LEVEL_CHANNELS = 48
DECODER_CHANNELS = 256
ASPP_DROPOUT = 0.1
LOW_LEVEL_STRIDE = 4
OUTPUT_STRIDE = 16

# Classifier heads of ImageNet / self-supervised checkpoints: not part of the DeepLab encoder.
_CLASSIFIER_PREFIXES = ("fc.", "head.", "classifier.", "head_drop.")

# pipeline.backbone names the feature stage's config keys in its messages; these are ours.
_KEY_RENAMES = (("backbone.weights", "deeplab.backbone_weights"), ("backbone.name", "deeplab.backbone"),
                ("backbone.checkpoint_key", "the DINO checkpoint key"))


def _renamed(exc: PipelineError) -> PipelineError:
    message = str(exc)
    for old, new in _KEY_RENAMES:
        message = message.replace(old, new)
    return type(exc)(message)


# ---------------------------------------------------------------------------------------------
# Backbones: (low-level map, deep map) for an image batch


class CnnFeatures(nn.Module):
    """A timm CNN built ``features_only`` at output stride 16; low level = its stride-4 map."""

    def __init__(self, name: str) -> None:
        super().__init__()
        try:
            self.body = timm.create_model(
                name, pretrained=False, features_only=True, output_stride=OUTPUT_STRIDE
            )
        except (TypeError, RuntimeError, ValueError, AssertionError) as exc:
            raise ConfigError(
                f"deeplab.backbone: {name!r} cannot be built as a feature extractor at output "
                f"stride {OUTPUT_STRIDE} ({exc}); use a ResNet (resnet18/50/101) or a ViT"
            ) from None
        reductions = self.body.feature_info.reduction()
        if LOW_LEVEL_STRIDE not in reductions:
            raise ConfigError(f"deeplab.backbone: {name!r} has no stride-4 feature map ({reductions})")
        self.low_index = reductions.index(LOW_LEVEL_STRIDE)
        self.low_channels = self.body.feature_info.channels()[self.low_index]
        self.high_channels = self.body.feature_info.channels()[-1]
        self.high_stride = min(reductions[-1], OUTPUT_STRIDE)
        cfg = self.body.pretrained_cfg
        self.mean, self.std = tuple(cfg["mean"]), tuple(cfg["std"])

    def aligned_size(self, height: int, width: int) -> tuple[int, int]:
        return height, width

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.body(x)
        return maps[self.low_index], maps[-1]

    def load_weights(self, path: Path, name: str) -> None:
        state_dict = _read_weights(path)
        expected = self.body.state_dict()
        state_dict = {
            k: v for k, v in state_dict.items() if k in expected or not k.startswith(_CLASSIFIER_PREFIXES)
        }
        problems = vit_backbone.describe_mismatch(state_dict, expected)
        if problems:
            raise WeightsError(
                f"deeplab.backbone_weights: {path} does not fit {name!r} (weights for another "
                f"architecture?): {'; '.join(problems)}"
            )
        self.body.load_state_dict(state_dict, strict=True)
        log.info("loaded %d tensors from %s into %s", len(state_dict), path, name)


class VitFeatures(nn.Module):
    """A timm ViT; low level = tokens of block ``depth // 4``, deep = last block (both normed)."""

    def __init__(self, name: str, weights: str) -> None:
        super().__init__()
        try:
            self.vit = vit_backbone.build_backbone(name, weights)
        except PipelineError as exc:
            raise _renamed(exc) from None
        depth = len(self.vit.blocks)
        self.block_indices = [max(depth // 4, 1) - 1, depth - 1]
        self.patch = vit_backbone.patch_size(self.vit)
        self.low_channels = self.high_channels = vit_backbone.embed_dim(self.vit)
        self.high_stride = self.patch
        self.mean, self.std = vit_backbone.normalisation(self.vit)

    def aligned_size(self, height: int, width: int) -> tuple[int, int]:
        return math.ceil(height / self.patch) * self.patch, math.ceil(width / self.patch) * self.patch

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = self.aligned_size(*x.shape[-2:])
        x = F.pad(x, (0, width - x.shape[-1], 0, height - x.shape[-2]))
        low, high = self.vit.forward_intermediates(
            x, indices=self.block_indices, norm=True, output_fmt="NCHW", intermediates_only=True
        )
        return low, high


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return vit_backbone.read_weights_file(path)
    except PipelineError as exc:
        raise _renamed(exc) from None


def is_vit(name: str) -> bool:
    return get_arch_name(name) in timm.list_models(module="vision_transformer")


def build_features(name: str, weights: str) -> CnnFeatures | VitFeatures:
    if not timm.is_model(name):
        raise ConfigError(f"deeplab.backbone: {name!r} is not a timm model")
    if is_vit(name):
        return VitFeatures(name, weights)
    features = CnnFeatures(name)
    if weights != "random":
        features.load_weights(Path(weights), name)
    return features


# ---------------------------------------------------------------------------------------------
# DeepLabV3+ head


def conv_bn_relu(in_channels: int, out_channels: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def aspp_rates(stride: int) -> tuple[int, ...]:
    """Rates 6/12/18 are for stride 16; the same field of view at another stride scales them."""
    return tuple(max(1, round(rate * OUTPUT_STRIDE / stride)) for rate in ASPP_RATES_AT_STRIDE_16)


class ImagePooling(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.project = conv_bn_relu(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.project(F.adaptive_avg_pool2d(x, 1))
        return pooled.expand(-1, -1, *x.shape[-2:])


class ASPP(nn.Module):
    def __init__(self, in_channels: int, rates: tuple[int, ...]) -> None:
        super().__init__()
        branches = [conv_bn_relu(in_channels, ASPP_CHANNELS, 1)]
        branches += [conv_bn_relu(in_channels, ASPP_CHANNELS, 3, dilation=rate) for rate in rates]
        branches.append(ImagePooling(in_channels, ASPP_CHANNELS))
        self.branches = nn.ModuleList(branches)
        self.project = nn.Sequential(
            conv_bn_relu(ASPP_CHANNELS * len(branches), ASPP_CHANNELS, 1), nn.Dropout(ASPP_DROPOUT)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.branches], dim=1))


class Decoder(nn.Module):
    def __init__(self, low_channels: int, num_classes: int) -> None:
        super().__init__()
        self.reduce_low = conv_bn_relu(low_channels, LOW_LEVEL_CHANNELS, 1)
        self.fuse = nn.Sequential(
            conv_bn_relu(ASPP_CHANNELS + LOW_LEVEL_CHANNELS, DECODER_CHANNELS, 3),
            conv_bn_relu(DECODER_CHANNELS, DECODER_CHANNELS, 3),
        )
        self.classifier = nn.Conv2d(DECODER_CHANNELS, num_classes, 1)

    def forward(self, low: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        low = self.reduce_low(low)
        context = F.interpolate(context, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.fuse(torch.cat([context, low], dim=1)))


def init_new_layers(module: nn.Module) -> None:
    """Kaiming-normal convolutions, unit BatchNorm (paper 000's segmentation branch init)."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)


class DeepLabV3Plus(nn.Module):
    """Logits (B, num_classes, H, W) at the input size for a normalised image batch."""

    def __init__(self, backbone: str, num_classes: int, weights: str = "random") -> None:
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"DeepLab needs at least 2 classes (background + 1), got {num_classes}")
        self.arch = {"backbone": backbone, "num_classes": int(num_classes)}
        self.backbone = build_features(backbone, weights)
        self.aspp = ASPP(self.backbone.high_channels, aspp_rates(self.backbone.high_stride))
        self.decoder = Decoder(self.backbone.low_channels, num_classes)
        init_new_layers(self.aspp)
        init_new_layers(self.decoder)

    @property
    def normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) of the backbone's pretraining (ImageNet for ResNets and DINO)."""
        return tuple(self.backbone.mean), tuple(self.backbone.std)

    def head_parameters(self) -> list[nn.Parameter]:
        """The newly initialised layers (ASPP + decoder), which DeepLab trains at 10x the lr."""
        return [*self.aspp.parameters(), *self.decoder.parameters()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        low, high = self.backbone(x)
        logits = self.decoder(low, self.aspp(high))
        logits = F.interpolate(
            logits, size=self.backbone.aligned_size(height, width), mode="bilinear", align_corners=False
        )
        return logits[..., :height, :width]


# ---------------------------------------------------------------------------------------------
# Trained model files: {"arch": {...}, "model": state_dict}


def trained_payload(model: DeepLabV3Plus) -> dict:
    return {"arch": dict(model.arch), "model": model.state_dict()}


def load_trained_deeplab(path: str | Path) -> DeepLabV3Plus:
    """The model saved by training (``model.pt``), rebuilt from its own architecture record."""
    path = Path(path)
    payload = load_checkpoint(path)
    kind = model_file_kind(payload)
    if not kind.startswith("a DeepLab model") or not {"backbone", "num_classes"} <= set(payload["arch"]):
        raise WeightsError(f"{path}: not a DeepLab model file: {kind}")
    model = DeepLabV3Plus(payload["arch"]["backbone"], payload["arch"]["num_classes"])
    problems = vit_backbone.describe_mismatch(payload["model"], model.state_dict())
    if problems:
        raise WeightsError(f"{path}: does not fit its recorded architecture: {'; '.join(problems)}")
    model.load_state_dict(payload["model"], strict=True)
    return model
