"""RCM+MAM (paper 003) as a plug-in of the shared trainer, and its predictor.

Training (Sec. 4.2): SGD without momentum on ``param_groups`` (new layers x10), the poly rate
(base ``lr`` 0.01, power 0.9) set before every step from the global step, the SupportNet G
updated as the EMA of F after every optimiser step (alpha 0.997), the prototype memory kept
across steps and checkpoints. Image labels: the GT's in weak mode, the clustering pseudo-labels
in unsupervised mode (the trainer's, as for every method); the CAM head has one channel per
foreground class, no background.

Inference: the MainNet F (the paper does not say which network it infers with: our choice;
G is the smoothed F), multi-scale + flip CAMs (``infer.msinf_cams``), background = the constant
``predict.rcm_mam.background`` score, the scores averaged onto the prediction grid (stride 8 or
the timm trunk's) and normalised to sum 1 per cell, so the shared stages (CRF, masks, DeepLab)
read them like any method's class probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.devices import mixed_precision
from pipeline.errors import ConfigError, WeightsError
from pipeline.methods.rcm_mam.data import CropViewDataset, CropViews, imagenet_normalisation
from pipeline.methods.rcm_mam.infer import class_scores, msinf_cams
from pipeline.methods.rcm_mam.losses import PrototypeMemory, loss_weights
from pipeline.methods.rcm_mam.model import CAMNet
from pipeline.methods.rcm_mam.resnet38 import ResNet38, load_resnet38_weights, timm_backbone
from pipeline.methods.rcm_mam.step import RCMMAMSettings, training_step
from pipeline.training.checkpoints import WHOLE_RUN_RESUMABLE_KEYS
from pipeline.training.ema import ema_update, teacher_copy
from pipeline.training.method import MethodRun, TrainContext
from pipeline.training.optim import param_groups, poly_lr, set_learning_rates

MODEL_FORMAT = "rcm-mam-model/1"
# The poly rate spans all the epochs: a different `epochs` is another schedule, never resumed.
RESUMABLE_KEYS = WHOLE_RUN_RESUMABLE_KEYS
RESNET38 = "resnet38"
# train.rcm_mam keys that are not RCMMAMSettings fields.
_RUN_KEYS = ("backbone", "weights", "output_stride", "lr", "lr_power", "weight_decay", "crop_size", "resize_range",
             "flip", "jitter")


@dataclass(frozen=True)
class RCMMAMTrainSettings:
    backbone: str
    weights: str
    output_stride: int
    lr: float
    lr_power: float
    weight_decay: float
    views: CropViews
    losses: RCMMAMSettings

    @classmethod
    def from_params(cls, train: dict) -> RCMMAMTrainSettings:
        section = dict(train.get("rcm_mam") or {})
        missing = [k for k in _RUN_KEYS if k not in section]
        if missing:
            raise ConfigError(f"--params lack key(s) {', '.join(f'train.rcm_mam.{k}' for k in missing)}")
        try:
            losses = RCMMAMSettings.from_params({k: v for k, v in section.items() if k not in _RUN_KEYS})
        except ValueError as exc:
            raise ConfigError(f"train.rcm_mam: {exc}") from None
        low, high = (float(v) for v in section["resize_range"])
        if not 0 < low <= high or int(section["crop_size"]) < 8:
            raise ConfigError("train.rcm_mam: resize_range must be 0 < min <= max and crop_size >= 8")
        views = CropViews(int(section["crop_size"]), (low, high), bool(section["flip"]), bool(section["jitter"]))
        return cls(str(section["backbone"]), str(section["weights"]), int(section["output_stride"]),
                   float(section["lr"]), float(section["lr_power"]), float(section["weight_decay"]), views, losses)


def check_settings(train: dict) -> None:
    RCMMAMTrainSettings.from_params(train)


def build_trunk(name: str, weights: str, output_stride: int) -> nn.Module:
    """ResNet-38 (weights: ``random`` or a converted ImageNet checkpoint) or a timm ResNet/ResNeSt."""
    if name == RESNET38:
        trunk = ResNet38()
        if weights != "random":
            load_resnet38_weights(trunk, weights)
        return trunk
    return timm_backbone(name, output_stride, weights)


def prepare(context: TrainContext) -> MethodRun:
    return RCMMAMRun(context)


class RCMMAMRun(MethodRun):
    def __init__(self, context: TrainContext) -> None:
        self.settings = RCMMAMTrainSettings.from_params(context.params["train"])
        self.context = context
        self.device = context.device
        trunk = build_trunk(self.settings.backbone, self.settings.weights, self.settings.output_stride)
        foreground = context.num_classes - 1
        self.model = CAMNet(trunk, foreground, self.settings.losses.feature_dim)
        self.support = teacher_copy(self.model)
        self.memory = PrototypeMemory(foreground + 1, self.settings.losses.feature_dim)
        mean, std = imagenet_normalisation()
        self.dataset = CropViewDataset(context.images, context.num_classes, self.settings.views, mean, std,
                                       context.seed)
        self.steps_per_epoch, self.max_steps = context.steps_per_epoch, context.total_steps
        self.optimizer_in_use: torch.optim.Optimizer | None = None

    def optimizer(self, epoch: int) -> tuple[list[nn.Parameter], torch.optim.Optimizer]:
        groups = param_groups(self.model, self.settings.lr, self.settings.weight_decay)
        self.optimizer_in_use = torch.optim.SGD(groups, lr=self.settings.lr)
        self.support.to(self.device)
        return [p for group in groups for p in group["params"]], self.optimizer_in_use

    def epoch_columns(self, epoch: int) -> dict:
        weights = loss_weights(epoch, self.settings.losses.mam_start_epoch, self.settings.losses.lambda_cls,
                               self.settings.losses.lambda_rcm, self.settings.losses.lambda_mam)
        step = epoch * self.steps_per_epoch
        return {"lr": poly_lr(self.settings.lr, step, self.max_steps, self.settings.lr_power),
                "lambda_mam": weights.mam}

    def step(self, batch: dict[str, torch.Tensor], epoch: int, index: int) -> dict[str, torch.Tensor]:
        set_learning_rates(self.optimizer_in_use, self.settings.lr, epoch * self.steps_per_epoch + index,
                           self.max_steps, self.settings.lr_power)
        images = batch["image"].to(self.device, non_blocking=True)
        labels = batch["target"][:, 1:].to(self.device)  # foreground classes only
        with mixed_precision(self.device):
            total, parts = training_step(self.model, self.support, images, labels, epoch, self.memory,
                                         self.settings.losses, self.context.processes.reducer)
        return {"loss": total, **parts}

    def after_step(self) -> None:
        ema_update(self.support, self.model, self.settings.losses.ema_momentum)

    def state_dict(self) -> dict:
        return {"support": self.support.state_dict(), "memory": self.memory.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.support.load_state_dict(state["support"])
        self.memory.load_state_dict(state["memory"])

    def architecture(self) -> dict:
        """model.pt's record: what ``load_predictor`` rebuilds the network from."""
        return {"method": "rcm_mam", "num_classes": self.context.num_classes, "backbone": "",
                "trunk": self.settings.backbone, "output_stride": self.settings.output_stride,
                "feature_dim": self.settings.losses.feature_dim}

    def model_payload(self) -> dict:
        return {"format": MODEL_FORMAT, "arch": self.architecture(),
                "model": {k: v.cpu() for k, v in self.model.state_dict().items()}}

    def summary(self) -> dict:
        return {"architecture": self.architecture(), "steps": self.max_steps}


class CAMPredictor:
    """``predict(images, flip)``: B x C x gh x gw class scores on the trunk's output grid,
    normalised per cell; background channel 0."""

    def __init__(self, model: CAMNet, stride: int, scales: tuple[float, ...], background: float) -> None:
        self.model = model
        self.num_classes = model.num_classes + 1
        self.stride = stride
        self.mean, self.std = imagenet_normalisation()
        self.scales = scales
        self.background = background

    @torch.no_grad()
    def predict(self, images: torch.Tensor, flip: bool) -> torch.Tensor:
        cams = msinf_cams(self.model, images, self.scales, flip=flip).float()
        scores = class_scores(cams, None, self.background)
        grid = (images.shape[-2] // self.stride, images.shape[-1] // self.stride)
        scores = F.adaptive_avg_pool2d(scores, grid)
        return scores / scores.sum(dim=1, keepdim=True).clamp_min(1e-12)


def load_predictor(payload: dict, backbone: dict, device: torch.device, model_path: Path,
                   predict: dict) -> CAMPredictor:
    """The trained MainNet of a model.pt; the trunk is rebuilt from the record (random weights:
    every tensor comes from model.pt)."""
    arch = payload["arch"]
    trunk = build_trunk(arch["trunk"], "random", int(arch["output_stride"]))
    model = CAMNet(trunk, int(arch["num_classes"]) - 1, int(arch["feature_dim"]))
    try:
        model.load_state_dict(payload["model"], strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{model_path}: not an RCM+MAM model of trunk {arch['trunk']!r} "
                           f"({str(exc).splitlines()[0]})") from None
    settings = predict.get("rcm_mam") or {}
    scales = tuple(float(s) for s in settings.get("scales", (0.5, 1.0, 1.5, 2.0)))
    stride = int(getattr(trunk, "output_stride", 8))
    return CAMPredictor(model.to(device).eval(), stride, scales, float(settings.get("background", 0.2)))
