"""What a training method plugs into the shared trainer (``pipeline.training.trainer``).

A method is a package under ``pipeline/methods/`` registered in ``pipeline.methods.METHODS``; its
``prepare(context)`` builds a ``MethodRun``: the network, the dataset of augmented views, and the
hooks the trainer calls. The trainer owns everything the methods share: labels, seeding, the
data loader, data parallelism, the non-finite-loss stop,
checkpoints with exact resume, history.csv, model.pt and done.json.

Order of the calls, per run: ``prepare`` (under ``torch.manual_seed(seed)``), ``load_state_dict``
when resuming; per epoch: ``phase`` (when it changes: ``optimizer``), ``epoch_columns``, one
``step`` + ``after_step`` per batch, ``end_epoch``; at each checkpoint ``state_dict`` and
``write_logs``; at the end ``model_payload`` and ``summary``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from pipeline.training.data import LabelledImage
from pipeline.training.distributed import Processes


@dataclass(frozen=True)
class TrainContext:
    """What the trainer knows before the method builds anything."""

    params: dict  # {"backbone": {...}, "train": {...}, "mode": ..., "seed": int}
    images: list[LabelledImage]
    num_classes: int  # background included
    manifest_path: Path
    device: torch.device
    processes: Processes

    @property
    def mode(self) -> str:
        return self.params["mode"]

    @property
    def seed(self) -> int:
        return int(self.params["seed"])

    @property
    def steps_per_epoch(self) -> int:
        """Optimiser steps per epoch (the trainer drops the last partial global batch)."""
        return len(self.images) // int(self.params["train"]["batch_size"])

    @property
    def total_steps(self) -> int:
        """Optimiser steps of the whole run (at least 1): what the learning-rate schedules span."""
        return max(1, int(self.params["train"]["epochs"]) * self.steps_per_epoch)


class MethodRun(ABC):
    """One training run of a method. ``model`` is what the checkpoints hold; ``dataset`` yields dict
    batches and has an ``epoch`` attribute the trainer sets (augmentations seeded per epoch)."""

    model: nn.Module
    dataset: Dataset

    def phase(self, epoch: int) -> int:
        """Which parameters train in ``epoch``; a new phase gets a new optimiser."""
        return 0

    @abstractmethod
    def optimizer(self, epoch: int) -> tuple[list[nn.Parameter], torch.optim.Optimizer]:
        """The trainable parameters of ``phase(epoch)`` and their optimiser."""

    def epoch_columns(self, epoch: int) -> dict:
        """History columns known when the epoch starts (learning rate, schedules); also where a
        method prepares the epoch's step."""
        return {}

    @abstractmethod
    def step(self, batch: dict[str, torch.Tensor], epoch: int, index: int) -> dict[str, torch.Tensor]:
        """Loss terms of one batch; ``"loss"`` is the total the trainer back-propagates."""

    def after_step(self) -> None:
        """After the optimiser step (EMA teachers)."""
        return None  # nothing by default

    def end_epoch(self, epoch: int) -> dict:
        """History columns computed at the end of the epoch (the method's own diagnostics)."""
        return {}

    def state_dict(self) -> dict:
        """The method's state beside the model and optimiser (tensors and plain values)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()`` when resuming."""
        return None  # nothing by default

    def write_logs(self, out_dir: Path) -> None:
        """The method's own log files beside history.csv."""
        return None  # nothing by default

    @abstractmethod
    def model_payload(self) -> dict:
        """model.pt's content: a ``format`` key, ``arch`` (with ``method``) and the weights."""

    def summary(self) -> dict:
        """The method's entries of done.json."""
        return {}
