"""The DeepLab networks of the verification recipes, on a timm backbone.

Three heads, chosen by the recipe (config ``deeplab.recipes.<name>.head``):

- ``v2``: DeepLab-v2 (Chen et al., TPAMI 2018), the network papers 001 and 004 verify with
  ("DeepLabV2, ResNet-101"). The backbone runs at output stride 8 and its deepest map feeds
  DeepLab-v2's ASPP: one 3x3 convolution *straight to the classes* per atrous rate, the
  per-rate score maps summed. Rates 6/12/18/24 are the paper's "ASPP-L", the head of its
  released ResNet-101 model. "LargeFOV" in the TPAMI paper is the single-branch VGG variant (one
  3x3 conv at rate 12); the WSSS literature (e.g. paper 003's "DeepLab-LargeFOV") uses the name
  loosely for this ResNet-101 model. ``aspp_rates: [12]`` gives the single-branch head.
  No BatchNorm, dropout or decoder in the head; BatchNorm of the backbone is frozen (eval-mode
  statistics, no gradients), as DeepLab-v2 trains with batch 10.
- ``v3``: DeepLabv3 (Chen et al., 2017), COMUS's self-training network (paper 002 Table 11):
  ASPP (a 1x1 branch, three 3x3 atrous branches, image pooling; concatenated, projected to 256,
  dropout 0.5), a 3x3 conv of 256 and a 1x1 classifier: torchvision's ``DeepLabHead`` layout.
- ``v3plus``: DeepLabV3+ (Chen et al., ECCV 2018), CSRM's second verification network:
  ASPP as above with dropout 0.1 (the official TensorFlow code's keep_prob 0.9), then the
  decoder: the stride-4 map projected to 48 channels, concatenated with the upsampled ASPP output,
  two 3x3 convolutions of 256, a 1x1 classifier. Regular instead of depthwise-separable convs.

All heads upsample their logits bilinearly to the input size.

The CNN backbone is a timm model built ``features_only`` at the recipe's output stride (ResNets
dilate their last stages). Atrous rates are given at that stride; a backbone whose deepest map
has another stride (a ViT: its patch size) gets them scaled to the same field of view.

ViT option (our simple choice; the papers verify with CNNs only): a timm ViT gives patch
tokens reshaped to a map at stride = patch size. The *last* block's tokens are the deep map and
the tokens of block ``depth // 4`` (1-based; the 3rd of 12) stand in for the low-level map of
V3+, so its decoder fuses an early and a late representation at the same resolution. Inputs are
zero-padded (bottom/right) to a multiple of the patch size and the logits cropped back.

Initial weights come from exactly one explicit place (config ``deeplab.init``): ``random``,
``dino_resnet50`` (the self-supervised DINO ResNet-50 file, the label-free start COMUS uses), or
``file`` (any local timm/torchvision state dict, e.g. supervised ImageNet weights for the *weak*
presets). A file for another architecture is a :class:`WeightsError` naming it, never a partial
load. A classifier head in the file (``fc.*``, ``head.*``) is dropped: DeepLab replaces it.
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

HEADS = ("v2", "v3", "v3plus")
INITS = ("random", "dino_resnet50", "file")
ASPP_CHANNELS = 256
LOW_LEVEL_CHANNELS = 48
DECODER_CHANNELS = 256
# ASPP dropout: 0.1 in the official DeepLabV3+ TensorFlow code (keep_prob 0.9), 0.5 in
# torchvision's DeepLabv3 ASPP.
ASPP_DROPOUT = {"v3": 0.5, "v3plus": 0.1}
# DeepLab-v2's Caffe model initialises its ASPP classifiers from N(0, 0.01), biases 0.
V2_INIT_STD = 0.01
LOW_LEVEL_STRIDE = 4

DINO_RESNET50_URL = "https://dl.fbaipublicfiles.com/dino/dino_resnet50_pretrain/dino_resnet50_pretrain.pth"

# Classifier heads of ImageNet / self-supervised checkpoints: not part of the DeepLab encoder.
_CLASSIFIER_PREFIXES = ("fc.", "head.", "classifier.", "head_drop.")

# pipeline.backbone names the feature stage's config keys in its messages; these are ours.
_KEY_RENAMES = (("backbone.weights", "deeplab.init_file"), ("backbone.name", "deeplab.backbone"),
                ("backbone.checkpoint_key", "the DINO checkpoint key"))


def _renamed(exc: PipelineError) -> PipelineError:
    message = str(exc)
    for old, new in _KEY_RENAMES:
        message = message.replace(old, new)
    return type(exc)(message)


def initial_weights(init: str, init_file: str | None, backbone: str) -> str:
    """``random`` or the path of the weights file ``deeplab.init`` asks for (checked to exist)."""
    if init not in INITS:
        raise ConfigError(f"deeplab.init: {init!r} is not one of {', '.join(INITS)}")
    if init == "random":
        return "random"
    if init == "dino_resnet50":
        if get_arch_name(backbone) != "resnet50":
            raise ConfigError(f"deeplab.init: dino_resnet50 initialises a resnet50, but deeplab.backbone is "
                              f"{backbone!r}")
        if not init_file or not Path(init_file).is_file():
            raise WeightsError(
                f"deeplab.init_file: {init_file} not found. deeplab.init: dino_resnet50 reads the self-supervised "
                f"DINO ResNet-50 of facebookresearch/dino, release file dino_resnet50_pretrain.pth "
                f"({DINO_RESNET50_URL}): download it to that path, or set deeplab.init: random (untrained start, "
                f"as the demo does)"
            )
    if not init_file:
        raise ConfigError(f"deeplab.init: {init} needs deeplab.init_file, the path of the weights file")
    return str(init_file)


# ---------------------------------------------------------------------------------------------
# Backbones: (low-level map, deep map) for an image batch


class CnnFeatures(nn.Module):
    """A timm CNN built ``features_only`` at ``output_stride``; low level = its stride-4 map."""

    def __init__(self, name: str, output_stride: int, key: str = "deeplab.backbone", pretrained: bool = False) -> None:
        """``key``: the config key naming the network, for error messages; ``pretrained``: timm's
        own ImageNet weights (downloaded by timm)."""
        super().__init__()
        try:
            self.body = timm.create_model(name, pretrained=False, features_only=True, output_stride=output_stride)
        except (TypeError, RuntimeError, ValueError, AssertionError) as exc:
            raise ConfigError(
                f"{key}: {name!r} cannot be built as a feature extractor at output "
                f"stride {output_stride} ({exc}); use a ResNet (resnet18/50/101) or a ViT"
            ) from None
        reductions = self.body.feature_info.reduction()
        if LOW_LEVEL_STRIDE not in reductions:
            raise ConfigError(f"{key}: {name!r} has no stride-4 feature map ({reductions})")
        if pretrained:
            # Built again only now: the random build has validated the name and the stride, so an
            # error here is about the download.
            self.body = timm.create_model(name, pretrained=True, features_only=True, output_stride=output_stride)
        self.low_index = reductions.index(LOW_LEVEL_STRIDE)
        self.low_channels = self.body.feature_info.channels()[self.low_index]
        self.high_channels = self.body.feature_info.channels()[-1]
        self.high_stride = min(reductions[-1], output_stride)
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
                f"deeplab.init_file: {path} does not fit {name!r} (weights for another "
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


def build_features(name: str, weights: str, output_stride: int) -> CnnFeatures | VitFeatures:
    if not timm.is_model(name):
        raise ConfigError(f"deeplab.backbone: {name!r} is not a timm model")
    if is_vit(name):
        return VitFeatures(name, weights)
    features = CnnFeatures(name, output_stride)
    if weights != "random":
        features.load_weights(Path(weights), name)
    return features


# ---------------------------------------------------------------------------------------------
# Heads


def conv_bn_relu(in_channels: int, out_channels: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def scaled_rates(rates: tuple[int, ...], output_stride: int, stride: int) -> tuple[int, ...]:
    """Rates given at ``output_stride``, for a deep map at ``stride``: the same field of view."""
    return tuple(max(1, round(rate * output_stride / stride)) for rate in rates)


class AsppV2(nn.Module):
    """DeepLab-v2's ASPP: per rate one 3x3 atrous conv to the classes; score maps summed."""

    def __init__(self, in_channels: int, num_classes: int, rates: tuple[int, ...]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=rate, dilation=rate) for rate in rates
        )
        for conv in self.branches:
            nn.init.normal_(conv.weight, std=V2_INIT_STD)
            nn.init.zeros_(conv.bias)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        return torch.stack([branch(high) for branch in self.branches]).sum(dim=0)


class ImagePooling(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.project = conv_bn_relu(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.project(F.adaptive_avg_pool2d(x, 1))
        return pooled.expand(-1, -1, *x.shape[-2:])


class ASPP(nn.Module):
    """DeepLabv3's ASPP: 1x1, atrous 3x3 per rate, image pooling; concatenated and projected."""

    def __init__(self, in_channels: int, rates: tuple[int, ...], dropout: float) -> None:
        super().__init__()
        branches = [conv_bn_relu(in_channels, ASPP_CHANNELS, 1)]
        branches += [conv_bn_relu(in_channels, ASPP_CHANNELS, 3, dilation=rate) for rate in rates]
        branches.append(ImagePooling(in_channels, ASPP_CHANNELS))
        self.branches = nn.ModuleList(branches)
        self.project = nn.Sequential(
            conv_bn_relu(ASPP_CHANNELS * len(branches), ASPP_CHANNELS, 1), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.branches], dim=1))


class V3Head(nn.Module):
    """DeepLabv3: ASPP, a 3x3 conv, the classifier (torchvision's ``DeepLabHead``)."""

    def __init__(self, in_channels: int, num_classes: int, rates: tuple[int, ...]) -> None:
        super().__init__()
        self.aspp = ASPP(in_channels, rates, ASPP_DROPOUT["v3"])
        self.fuse = conv_bn_relu(ASPP_CHANNELS, ASPP_CHANNELS, 3)
        self.classifier = nn.Conv2d(ASPP_CHANNELS, num_classes, 1)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.fuse(self.aspp(high)))


class V3PlusHead(nn.Module):
    """DeepLabV3+: ASPP on the deep map, decoder fusing the low-level map."""

    def __init__(self, in_channels: int, low_channels: int, num_classes: int, rates: tuple[int, ...]) -> None:
        super().__init__()
        self.aspp = ASPP(in_channels, rates, ASPP_DROPOUT["v3plus"])
        self.reduce_low = conv_bn_relu(low_channels, LOW_LEVEL_CHANNELS, 1)
        self.fuse = nn.Sequential(
            conv_bn_relu(ASPP_CHANNELS + LOW_LEVEL_CHANNELS, DECODER_CHANNELS, 3),
            conv_bn_relu(DECODER_CHANNELS, DECODER_CHANNELS, 3),
        )
        self.classifier = nn.Conv2d(DECODER_CHANNELS, num_classes, 1)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        low = self.reduce_low(low)
        context = F.interpolate(self.aspp(high), size=low.shape[-2:], mode="bilinear", align_corners=False)
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


def build_head(head: str, features: CnnFeatures | VitFeatures, num_classes: int,
               rates: tuple[int, ...]) -> nn.Module:
    if head == "v2":
        return AsppV2(features.high_channels, num_classes, rates)  # its own N(0, 0.01) init
    if head == "v3":
        module = V3Head(features.high_channels, num_classes, rates)
    elif head == "v3plus":
        module = V3PlusHead(features.high_channels, features.low_channels, num_classes, rates)
    else:
        raise ConfigError(f"deeplab head {head!r} is not one of {', '.join(HEADS)}")
    init_new_layers(module)
    return module


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm))


# ---------------------------------------------------------------------------------------------
# The network


class DeepLab(nn.Module):
    """Logits (B, num_classes, H, W) at the input size for a normalised image batch.

    The defaults are DeepLabV3+ at output stride 16 (rates 6/12/18)."""

    def __init__(self, backbone: str, num_classes: int, head: str = "v3plus", output_stride: int = 16,
                 aspp_rates: tuple[int, ...] = (6, 12, 18), freeze_bn: bool = False,
                 weights: str = "random") -> None:
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"DeepLab needs at least 2 classes (background + 1), got {num_classes}")
        aspp_rates = tuple(int(rate) for rate in aspp_rates)
        self.arch = {"backbone": backbone, "num_classes": int(num_classes), "head": head,
                     "output_stride": int(output_stride), "aspp_rates": list(aspp_rates),
                     "freeze_bn": bool(freeze_bn)}
        self.backbone = build_features(backbone, weights, output_stride)
        rates = scaled_rates(aspp_rates, output_stride, self.backbone.high_stride)
        self.head = build_head(head, self.backbone, num_classes, rates)
        self.freeze_bn = freeze_bn
        if freeze_bn:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.requires_grad_(False)
            self.train(self.training)

    def train(self, mode: bool = True) -> DeepLab:
        """Frozen BatchNorm stays in eval mode (running statistics) while the rest trains."""
        super().train(mode)
        if self.freeze_bn:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    @property
    def normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) of the backbone's pretraining (ImageNet for ResNets and DINO)."""
        return tuple(self.backbone.mean), tuple(self.backbone.std)

    @property
    def pools_over_the_batch(self) -> bool:
        """Training BatchNorm of a 1x1 image-pooling map: needs 2+ images per batch."""
        return self.arch["head"] != "v2" and not self.freeze_bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        low, high = self.backbone(x)
        logits = self.head(low, high)
        logits = F.interpolate(
            logits, size=self.backbone.aligned_size(height, width), mode="bilinear", align_corners=False
        )
        return logits[..., :height, :width]


# ---------------------------------------------------------------------------------------------
# Trained model files: {"arch": {...}, "model": state_dict}

_ARCH_KEYS = ("backbone", "num_classes", "head", "output_stride", "aspp_rates", "freeze_bn")


def trained_payload(model: DeepLab) -> dict:
    return {"arch": dict(model.arch), "model": model.state_dict()}


def load_trained_deeplab(path: str | Path) -> DeepLab:
    """The model saved by training (``model.pt``), rebuilt from its own architecture record."""
    path = Path(path)
    payload = load_checkpoint(path)
    kind = model_file_kind(payload)
    if not kind.startswith("a DeepLab model") or not {"backbone", "num_classes"} <= set(payload["arch"]):
        raise WeightsError(f"{path}: not a DeepLab model file: {kind}")
    model = DeepLab(**{key: payload["arch"][key] for key in _ARCH_KEYS if key in payload["arch"]})
    problems = vit_backbone.describe_mismatch(payload["model"], model.state_dict())
    if problems:
        raise WeightsError(f"{path}: does not fit its recorded architecture: {'; '.join(problems)}")
    model.load_state_dict(payload["model"], strict=True)
    return model
