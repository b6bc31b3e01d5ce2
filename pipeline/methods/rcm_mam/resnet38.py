"""Backbones of RCM+MAM (paper 003, Sec. 4.2 and Appendix C): the wide ResNet-38 and timm ResNets.

ResNet-38 (Wu et al., "Wider or deeper", the ``ResNet38d`` of the PSA / AffinityNet / SEAM
codebases) is pre-activation: every block starts with BN + ReLU, the stem is one 3x3 conv.
Stages (channels in, middle, out; stride; dilation):

- ``conv1a`` 3 -> 64
- ``b2``, ``b2_1``, ``b2_2``: 128, stride 2 (1/2)
- ``b3``, ``b3_1``, ``b3_2``: 256, stride 2 (1/4)
- ``b4``, ``b4_1`` .. ``b4_5``: 512, stride 2 (1/8)
- ``b5``, ``b5_1``, ``b5_2``: (512, 1024), dilation 2 (first conv of ``b5`` undilated)
- ``b6``: bottleneck 1024 -> (512, 1024, 2048), dilation 4, dropout 0.3
- ``b7``: bottleneck 2048 -> (1024, 2048, 4096), dilation 4, dropout 0.5
- ``bn7`` + ReLU: the 4096-channel feature map at output stride 8.

The attribute names are exactly the codebases' so that their converted ImageNet checkpoint
(the MXNet ``.params`` turned into a torch state dict: ``conv1a.weight``,
``b2.bn_branch2a.weight``, ``b2.conv_branch2a.weight``, ..., ``bn7.running_var``) loads as it is.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.backbone import describe_mismatch, read_weights_file
from pipeline.errors import ConfigError, WeightsError

# BatchNorm keeps a step counter that the converted MXNet checkpoints do not have; with the BN
# frozen it is never read, so its absence is not a mismatch.
_BN_COUNTER = "num_batches_tracked"

# The codebases freeze the stem and the first stage ("not_training" of PSA's and SEAM's
# classification nets): low-level filters stay as ImageNet trained them.
RESNET38_FROZEN = ("conv1a", "b2", "b2_1", "b2_2")


class PreActBlock(nn.Module):
    """Two 3x3 convolutions after BN + ReLU; a 1x1 projection when the shape changes."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, stride: int = 1, dilation: int = 1,
                 first_dilation: int | None = None) -> None:
        super().__init__()
        first = dilation if first_dilation is None else first_dilation
        self.same_shape = in_ch == out_ch and stride == 1
        self.bn_branch2a = nn.BatchNorm2d(in_ch)
        self.conv_branch2a = nn.Conv2d(in_ch, mid_ch, 3, stride, padding=first, dilation=first, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(mid_ch)
        self.conv_branch2b1 = nn.Conv2d(mid_ch, out_ch, 3, padding=dilation, dilation=dilation, bias=False)
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn_branch2a(x))
        shortcut = x if self.same_shape else self.conv_branch1(pre)
        branch = self.conv_branch2b1(F.relu(self.bn_branch2b1(self.conv_branch2a(pre))))
        return shortcut + branch


class PreActBottleneck(nn.Module):
    """1x1 -> dilated 3x3 -> 1x1 (out/4, out/2, out channels) after BN + ReLU, with dropout."""

    def __init__(self, in_ch: int, out_ch: int, dilation: int, dropout: float) -> None:
        super().__init__()
        self.bn_branch2a = nn.BatchNorm2d(in_ch)
        self.conv_branch2a = nn.Conv2d(in_ch, out_ch // 4, 1, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(out_ch // 4)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(out_ch // 4, out_ch // 2, 3, padding=dilation, dilation=dilation,
                                        bias=False)
        self.bn_branch2b2 = nn.BatchNorm2d(out_ch // 2)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(out_ch // 2, out_ch, 1, bias=False)
        # Both bottlenecks change the width, so the projection always exists.
        self.conv_branch1 = nn.Conv2d(in_ch, out_ch, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn_branch2a(x))
        branch = self.conv_branch2a(pre)
        branch = self.conv_branch2b1(self.dropout_2b1(F.relu(self.bn_branch2b1(branch))))
        branch = self.conv_branch2b2(self.dropout_2b2(F.relu(self.bn_branch2b2(branch))))
        return self.conv_branch1(pre) + branch


class ResNet38(nn.Module):
    """ResNet-38 trunk: B x 3 x H x W -> B x 4096 x ceil(H/8) x ceil(W/8)."""

    out_channels = 4096
    output_stride = 8
    frozen_modules = RESNET38_FROZEN

    def __init__(self) -> None:
        super().__init__()
        self.conv1a = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.b2 = PreActBlock(64, 128, 128, stride=2)
        self.b2_1 = PreActBlock(128, 128, 128)
        self.b2_2 = PreActBlock(128, 128, 128)
        self.b3 = PreActBlock(128, 256, 256, stride=2)
        self.b3_1 = PreActBlock(256, 256, 256)
        self.b3_2 = PreActBlock(256, 256, 256)
        self.b4 = PreActBlock(256, 512, 512, stride=2)
        for i in range(1, 6):
            setattr(self, f"b4_{i}", PreActBlock(512, 512, 512))
        self.b5 = PreActBlock(512, 512, 1024, dilation=2, first_dilation=1)
        self.b5_1 = PreActBlock(1024, 512, 1024, dilation=2)
        self.b5_2 = PreActBlock(1024, 512, 1024, dilation=2)
        self.b6 = PreActBottleneck(1024, 2048, dilation=4, dropout=0.3)
        self.b7 = PreActBottleneck(2048, 4096, dilation=4, dropout=0.5)
        self.bn7 = nn.BatchNorm2d(4096)
        self._order = ["b2", "b2_1", "b2_2", "b3", "b3_1", "b3_2", "b4", *[f"b4_{i}" for i in range(1, 6)],
                       "b5", "b5_1", "b5_2", "b6", "b7"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1a(x)
        for name in self._order:
            x = getattr(self, name)(x)
        return F.relu(self.bn7(x))


def load_resnet38_weights(model: ResNet38, path: str | Path) -> None:
    """Load a converted ImageNet checkpoint (PSA / SEAM key names) into ``model``, strictly.

    Read with ``torch.load(weights_only=True)`` (``pipeline.backbone.read_weights_file``: a
    ``state_dict`` / ``model`` nesting and a ``module.`` prefix are unwrapped). Any missing,
    unexpected or misshapen key is a WeightsError naming them; only BatchNorm's step counter may
    be absent.
    """
    path = Path(path)
    try:
        state_dict = read_weights_file(path)
    except WeightsError as exc:
        if path.suffix == ".params":
            raise WeightsError(
                f"{exc}; an MXNet .params file must first be converted to a torch state dict "
                "(the PSA / SEAM `convert_mxnet_to_torch` renaming, then torch.save)"
            ) from None
        raise
    expected = model.state_dict()
    filled = {k: v for k, v in expected.items() if k.endswith(_BN_COUNTER) and k not in state_dict}
    state_dict = {**state_dict, **filled}
    problems = describe_mismatch(state_dict, expected)
    if problems:
        raise WeightsError(f"{path} does not fit ResNet-38 (PSA/SEAM key names expected): {'; '.join(problems)}")
    model.load_state_dict(state_dict, strict=True)


class TimmTrunk(nn.Module):
    """The last stage of a timm ResNet-family model, dilated to ``output_stride``."""

    frozen_modules: tuple[str, ...] = ()

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.body = model
        self.out_channels = int(model.feature_info.channels()[-1])
        self.output_stride = int(model.feature_info.reduction()[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)[-1]


def timm_backbone(name: str, output_stride: int = 16, weights: str = "random") -> TimmTrunk:
    """A timm ResNet / ResNeSt (``features_only``, last stage) at output stride 8, 16 or 32.

    ``weights``: ``random``, ``timm`` (timm's own download) or the path of a local checkpoint of
    the full classifier (its ``fc.*`` head is dropped; everything else must fit exactly).
    """
    if output_stride not in (8, 16, 32):
        raise ConfigError(f"output_stride: {output_stride} (timm ResNets dilate to 8, 16 or 32)")
    if not timm.is_model(name):
        raise ConfigError(f"backbone name: {name!r} is not a timm model")
    kwargs = {"features_only": True, "out_indices": (-1,), "output_stride": output_stride}
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, RuntimeError) as exc:
        raise ConfigError(f"backbone name: {name!r} cannot be dilated to output stride {output_stride} "
                          f"by timm ({exc}); use a ResNet or ResNeSt") from None
    if weights == "timm":
        # Built again only now: the random build has validated the name and the stride, so an
        # error here is about the download.
        model = timm.create_model(name, pretrained=True, **kwargs)
    trunk = TimmTrunk(model)
    if weights not in ("random", "timm"):
        _load_timm_classifier_weights(trunk, Path(weights), name)
    return trunk


def _load_timm_classifier_weights(trunk: TimmTrunk, path: Path, name: str) -> None:
    state_dict = read_weights_file(path)
    expected = trunk.body.state_dict()
    # features_only models keep the classifier's module names but not its head.
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
    problems = describe_mismatch(state_dict, expected)
    if problems:
        raise WeightsError(f"{path} does not fit timm {name!r}: {'; '.join(problems)}")
    trunk.body.load_state_dict(state_dict, strict=True)
