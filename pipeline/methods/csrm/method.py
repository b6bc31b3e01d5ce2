"""CSRM (paper 004) as a plug-in of the shared trainer, and its predictor.

Start (Sec. 3.2.6): trunk and classification branch from a CAM classifier (``train.csrm.init``:
the ``cam_baseline`` stage's model.pt, a Puzzle-CAM / P-NOC file, or ``none`` for ImageNet
weights only, ``train.cam.weights``); S and R Kaiming-initialised; the teacher a copy.
Training (Sec. 4): SGD, lr 0.007 for the pretrained weights and 0.07 for the new branches, linear
decay over all steps, weight decay 1e-4 (momentum 0.9, Nesterov, biases without decay: CSRM's
code; the paper is silent); the teacher follows the EMA of the student after every step
(``step.ema_momentum``); the negative bank lives across steps and checkpoints.
Inference: the teacher's segmentation branch (CSRM's code keeps the teacher), softmax averaged over
the scales of ``predict.csrm.scales`` and their flips (multi-scale TTA, Sec. 4), on a stride-8 grid.
"""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.crf import resolve_params, worker_pool
from pipeline.devices import mixed_precision
from pipeline.errors import ConfigError, WeightsError
from pipeline.methods.cam.method import CAMTrainSettings, section
from pipeline.methods.csrm.contrast import NegativeBank
from pipeline.methods.csrm.data import SquareViewDataset, SquareViews
from pipeline.methods.csrm.model import REPRESENTATION_DIM, CSRMNet, build_features, load_cam_weights
from pipeline.methods.csrm.step import CSRMLossSettings, ema_momentum, loss_weights, training_step
from pipeline.training.checkpoints import WHOLE_RUN_RESUMABLE_KEYS
from pipeline.training.data import derived_seed
from pipeline.training.ema import ema_update, teacher_copy
from pipeline.training.method import MethodRun, TrainContext
from pipeline.training.optim import CSRM_GROUPS, param_groups, poly_lr, set_learning_rates

MODEL_FORMAT = "csrm-model/1"
PREDICTION_STRIDE = 8
LINEAR = 1.0  # poly power of a linear decay
RESUMABLE_KEYS = WHOLE_RUN_RESUMABLE_KEYS  # the rates and ramps span all epochs
NO_INIT = "none"
# train.csrm keys that are not CSRMLossSettings fields.
_RUN_KEYS = ("init", "image_size", "flip", "lr", "weight_decay", "momentum", "nesterov", "ema_momentum", "crf_preset")


@dataclass(frozen=True)
class CSRMTrainSettings:
    trunk: str
    trunk_weights: str
    init: str
    views: SquareViews
    lr: float
    weight_decay: float
    momentum: float
    nesterov: bool
    ema_momentum: float
    crf_preset: str
    losses: CSRMLossSettings

    @classmethod
    def from_params(cls, train: dict) -> CSRMTrainSettings:
        cam = CAMTrainSettings.from_params(train)  # CSRM's trunk is its CAM classifier's
        values = section(train, "csrm", _RUN_KEYS)
        try:
            losses = CSRMLossSettings.from_params({k: v for k, v in values.items() if k not in _RUN_KEYS})
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"train.csrm: {exc}") from None
        if int(values["image_size"]) < 32 or not 0.0 <= float(values["ema_momentum"]) < 1.0:
            raise ConfigError("train.csrm: image_size must be >= 32 and ema_momentum in [0, 1)")
        resolve_params({"preset": values["crf_preset"]})  # a ConfigError for an unknown preset
        return cls(cam.backbone, cam.weights, str(values["init"]), SquareViews(int(values["image_size"]),
                   bool(values["flip"])), float(values["lr"]), float(values["weight_decay"]),
                   float(values["momentum"]), bool(values["nesterov"]), float(values["ema_momentum"]),
                   str(values["crf_preset"]), losses)


def check_settings(train: dict) -> None:
    settings = CSRMTrainSettings.from_params(train)
    if settings.init != NO_INIT and not Path(settings.init).is_file():
        raise ConfigError(f"train.csrm.init: {settings.init}: no such CAM model file (or `none`)")


def prepare(context: TrainContext) -> MethodRun:
    return CSRMRun(context)


class CSRMRun(MethodRun):
    def __init__(self, context: TrainContext) -> None:
        self.settings = s = CSRMTrainSettings.from_params(context.params["train"])
        self.context = context
        self.device = context.device
        weights = s.trunk_weights if s.init == NO_INIT else "random"  # the CAM model has them
        features = build_features(s.trunk, weights, "train.cam.backbone")
        self.model = CSRMNet(features, context.num_classes)
        if s.init != NO_INIT:
            load_cam_weights(self.model, Path(s.init))
        self.teacher = teacher_copy(self.model)
        self.bank = NegativeBank(context.num_classes, s.losses.contrast.negatives, REPRESENTATION_DIM)
        self.dataset = SquareViewDataset(context.images, context.num_classes, s.views, features.mean, features.std,
                                         context.seed)
        self.crf = resolve_params({"preset": s.crf_preset}) if s.losses.in_loop_crf else None
        self.pool: Executor | None = None
        self.steps_per_epoch, self.max_steps = context.steps_per_epoch, context.total_steps
        self.warmup_steps = s.losses.warmup_epochs * self.steps_per_epoch
        self.global_step = 0
        self.optimizer_in_use: torch.optim.Optimizer | None = None

    def optimizer(self, epoch: int) -> tuple[list[nn.Parameter], torch.optim.Optimizer]:
        s = self.settings
        groups = param_groups(self.model, s.lr, s.weight_decay, CSRM_GROUPS)
        self.optimizer_in_use = torch.optim.SGD(groups, lr=s.lr, momentum=s.momentum,
                                                nesterov=s.nesterov and s.momentum > 0)
        self.teacher.to(self.device)
        self.bank.to(self.device)
        return [p for group in groups for p in group["params"]], self.optimizer_in_use

    def epoch_columns(self, epoch: int) -> dict:
        step = epoch * self.steps_per_epoch
        weights = loss_weights(self.settings.losses, epoch, step / self.max_steps)
        return {"lr": poly_lr(self.settings.lr, step, self.max_steps, LINEAR), "lambda_s2c": weights.s2c,
                "lambda_u": weights.u, "lambda_m": weights.m, "sigma_s2c": weights.sigma, "alpha": weights.alpha}

    def _crf_pool(self) -> Executor | None:
        """Worker processes for the in-loop CRF (one image each), as many as the job's threads."""
        if self.pool is None and self.crf is not None and torch.get_num_threads() > 1:
            self.pool = worker_pool(torch.get_num_threads())
        return self.pool

    def step(self, batch: dict[str, torch.Tensor], epoch: int, index: int) -> dict[str, torch.Tensor]:
        self.global_step = epoch * self.steps_per_epoch + index
        set_learning_rates(self.optimizer_in_use, self.settings.lr, self.global_step, self.max_steps, LINEAR)
        generator = torch.Generator().manual_seed(derived_seed(self.context.seed, epoch, index,
                                                               self.context.processes.rank))
        with mixed_precision(self.device):
            total, parts = training_step(
                self.model, self.teacher, batch["image"].to(self.device, non_blocking=True), batch["rgb"],
                batch["target"].to(self.device), epoch, self.global_step / self.max_steps, self.bank,
                self.settings.losses, self.crf, generator, self._crf_pool())
        return {"loss": total, **parts}

    def after_step(self) -> None:
        momentum = ema_momentum(self.global_step, self.warmup_steps, self.settings.ema_momentum)
        ema_update(self.teacher, self.model, momentum)

    def state_dict(self) -> dict:
        return {"teacher": self.teacher.state_dict(), "bank": self.bank.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.bank.load_state_dict(state["bank"])

    def architecture(self) -> dict:
        return {"method": "csrm", "num_classes": self.context.num_classes, "backbone": "", "trunk": self.settings.trunk}

    def model_payload(self) -> dict:
        return {"format": MODEL_FORMAT, "arch": self.architecture(),
                "model": {k: v.cpu() for k, v in self.teacher.state_dict().items()}}

    def summary(self) -> dict:
        return {"architecture": self.architecture(), "steps": self.max_steps, "init": self.settings.init}


class SegmentationPredictor:
    """``predict(images, flip)``: B x K x gh x gw class probabilities (background 0) on the stride-8
    grid: the segmentation softmax averaged over ``scales`` (and their flips)."""

    def __init__(self, model: CSRMNet, scales: tuple[float, ...]) -> None:
        self.model = model
        self.num_classes = model.num_classes
        self.stride = PREDICTION_STRIDE
        self.mean, self.std = model.features.mean, model.features.std
        self.scales = scales

    @torch.no_grad()
    def predict(self, images: torch.Tensor, flip: bool) -> torch.Tensor:
        size = tuple(images.shape[-2:])
        total = torch.zeros(images.shape[0], self.num_classes, *size, device=images.device)
        views = 0
        for scale in self.scales:
            scaled = images if scale == 1.0 else F.interpolate(
                images, scale_factor=scale, mode="bilinear", align_corners=False, recompute_scale_factor=False)
            for flipped in (False, True) if flip else (False,):
                logits = self.model(scaled.flip(-1) if flipped else scaled).segmentation.float()
                probs = F.interpolate(F.softmax(logits, dim=1), size=size, mode="bilinear", align_corners=False)
                total += probs.flip(-1) if flipped else probs
                views += 1
        grid = (size[0] // self.stride, size[1] // self.stride)
        return F.adaptive_avg_pool2d(total / views, grid)


def load_predictor(payload: dict, backbone: dict, device: torch.device, model_path: Path,
                   predict: dict) -> SegmentationPredictor:
    """CSRM's trained network of a model.pt (every tensor from the file)."""
    arch = payload["arch"]
    model = CSRMNet(build_features(arch["trunk"], "random", "model.pt trunk"), int(arch["num_classes"]))
    try:
        model.load_state_dict(payload["model"], strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{model_path}: not a CSRM model of trunk {arch['trunk']!r} "
                           f"({str(exc).splitlines()[0]})") from None
    scales = tuple(float(s) for s in (predict.get("csrm") or {}).get("scales", (0.5, 1.0, 1.5, 2.0)))
    return SegmentationPredictor(model.to(device).eval(), scales)
