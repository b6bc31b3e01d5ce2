"""The CAM baseline as a plug-in of the shared trainer (``train.method: cam``, or the
``cam_baseline`` stage CSRM starts from), and its predictor.

Training (Puzzle-CAM's public recipe, ``train.cam``): SGD on the four PSA / Puzzle-CAM parameter
groups (new classifier x10), the poly rate (power 0.9) from 0.1, weight decay 1e-4, momentum 0 (its
code passes the weight decay where SGD takes the momentum: docs/FIDELITY.md), crops of 512 px after
a resize of the longer side to 320-640 px, horizontal flip; the puzzle loss with alpha up to 4.

Inference: the RCM+MAM CAM predictor (multi-scale + flip CAMs, a constant background score,
``predict.cam``), on the classifier's CAMs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.devices import mixed_precision
from pipeline.errors import ConfigError, WeightsError
from pipeline.methods.cam.puzzle import puzzle_alpha, puzzle_losses
from pipeline.methods.csrm.model import CAMClassifier, build_features
from pipeline.methods.rcm_mam.data import CropViewDataset, CropViews
from pipeline.methods.rcm_mam.method import CAMPredictor
from pipeline.training.checkpoints import WHOLE_RUN_RESUMABLE_KEYS
from pipeline.training.method import MethodRun, TrainContext
from pipeline.training.optim import PSA_GROUPS, param_groups, poly_lr, set_learning_rates

MODEL_FORMAT = "cam-model/1"
PREDICTION_STRIDE = 8  # the CAMs are averaged onto this grid of the image (finer than the trunk's 16)
RESUMABLE_KEYS = WHOLE_RUN_RESUMABLE_KEYS  # the poly rate spans all epochs
# train.cam keys the CAM run reads (epochs / batch_size there are the cam_baseline stage's).
_KEYS = ("backbone", "weights", "lr", "lr_power", "momentum", "weight_decay", "crop_size", "long_side_range",
         "flip", "jitter", "puzzle_alpha", "puzzle_ramp", "freeze_batchnorm")


def section(train: dict, name: str, keys: tuple[str, ...]) -> dict:
    """``train[name]``, with a ConfigError naming every missing key."""
    values = dict(train.get(name) or {})
    missing = [k for k in keys if k not in values]
    if missing:
        raise ConfigError(f"--params lack key(s) {', '.join(f'train.{name}.{k}' for k in missing)}")
    return values


@dataclass(frozen=True)
class CAMTrainSettings:
    backbone: str
    weights: str
    lr: float
    lr_power: float
    momentum: float
    weight_decay: float
    views: CropViews
    puzzle_alpha: float
    puzzle_ramp: float
    freeze_batchnorm: bool

    @classmethod
    def from_params(cls, train: dict) -> CAMTrainSettings:
        values = section(train, "cam", _KEYS)
        low, high = (int(v) for v in values["long_side_range"])
        if not 0 < low <= high or int(values["crop_size"]) < 32:
            raise ConfigError("train.cam: long_side_range must be 0 < min <= max and crop_size >= 32")
        if float(values["puzzle_alpha"]) < 0 or not 0 <= float(values["puzzle_ramp"]) <= 1:
            raise ConfigError("train.cam: puzzle_alpha must be >= 0 and puzzle_ramp in [0, 1]")
        views = CropViews(int(values["crop_size"]), (1.0, 1.0), bool(values["flip"]), bool(values["jitter"]),
                          long_side_range=(low, high))
        return cls(str(values["backbone"]), str(values["weights"]), float(values["lr"]), float(values["lr_power"]),
                   float(values["momentum"]), float(values["weight_decay"]), views, float(values["puzzle_alpha"]),
                   float(values["puzzle_ramp"]), bool(values["freeze_batchnorm"]))


def check_settings(train: dict) -> None:
    CAMTrainSettings.from_params(train)


def prepare(context: TrainContext) -> MethodRun:
    return CAMRun(context)


class CAMRun(MethodRun):
    def __init__(self, context: TrainContext) -> None:
        self.settings = CAMTrainSettings.from_params(context.params["train"])
        self.context = context
        self.device = context.device
        features = build_features(self.settings.backbone, self.settings.weights, "train.cam.backbone")
        self.model = CAMClassifier(features, context.num_classes - 1, self.settings.freeze_batchnorm)
        self.dataset = CropViewDataset(context.images, context.num_classes, self.settings.views, features.mean,
                                       features.std, context.seed)
        self.steps_per_epoch, self.max_steps = context.steps_per_epoch, context.total_steps
        self.optimizer_in_use: torch.optim.Optimizer | None = None

    def optimizer(self, epoch: int) -> tuple[list[nn.Parameter], torch.optim.Optimizer]:
        groups = param_groups(self.model, self.settings.lr, self.settings.weight_decay, PSA_GROUPS)
        self.optimizer_in_use = torch.optim.SGD(groups, lr=self.settings.lr, momentum=self.settings.momentum)
        return [p for group in groups for p in group["params"]], self.optimizer_in_use

    def epoch_columns(self, epoch: int) -> dict:
        step = epoch * self.steps_per_epoch
        return {"lr": poly_lr(self.settings.lr, step, self.max_steps, self.settings.lr_power),
                "puzzle_alpha": self._alpha(step)}

    def _alpha(self, step: int) -> float:
        return puzzle_alpha(self.settings.puzzle_alpha, step, self.max_steps, self.settings.puzzle_ramp)

    def step(self, batch: dict[str, torch.Tensor], epoch: int, index: int) -> dict[str, torch.Tensor]:
        step = epoch * self.steps_per_epoch + index
        set_learning_rates(self.optimizer_in_use, self.settings.lr, step, self.max_steps, self.settings.lr_power)
        images = batch["image"].to(self.device, non_blocking=True)
        labels = batch["target"][:, 1:].to(self.device)  # foreground classes only
        with mixed_precision(self.device):
            total, parts = puzzle_losses(self.model, images, labels, self._alpha(step))
        return {"loss": total, **parts}

    def architecture(self) -> dict:
        return {"method": "cam", "num_classes": self.context.num_classes, "backbone": "",
                "trunk": self.settings.backbone, "freeze_batchnorm": self.settings.freeze_batchnorm}

    def model_payload(self) -> dict:
        return {"format": MODEL_FORMAT, "arch": self.architecture(),
                "model": {k: v.cpu() for k, v in self.model.state_dict().items()}}

    def summary(self) -> dict:
        return {"architecture": self.architecture(), "steps": self.max_steps}


def load_predictor(payload: dict, backbone: dict, device: torch.device, model_path: Path,
                   predict: dict) -> CAMPredictor:
    """The trained CAM classifier of a model.pt (every tensor from the file)."""
    arch = payload["arch"]
    features = build_features(arch["trunk"], "random", "model.pt trunk")
    model = CAMClassifier(features, int(arch["num_classes"]) - 1, bool(arch["freeze_batchnorm"]))
    try:
        model.load_state_dict(payload["model"], strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{model_path}: not a CAM model of trunk {arch['trunk']!r} "
                           f"({str(exc).splitlines()[0]})") from None
    settings = predict.get("cam") or {}
    scales = tuple(float(s) for s in settings.get("scales", (1.0, 0.5, 1.5, 2.0)))
    background = float(settings.get("background", 0.35))
    predictor = CAMPredictor(model.to(device).eval(), PREDICTION_STRIDE, scales, background)
    predictor.mean, predictor.std = features.mean, features.std
    return predictor
