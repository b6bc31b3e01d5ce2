"""The training stage of every method (``train.method``, ``pipeline.methods.METHODS``): one loop
that owns what the methods share, each method plugged in as a ``MethodRun``
(``pipeline.training.method``).

The trainer: reads the training images and their labels (weak: image labels; unsupervised: the
clustering pseudo-labels), seeds, builds the method's run under ``torch.manual_seed(seed)``, and
runs the epochs: a DataLoader over this process's share of each global batch
(``data.epoch_batches``), the method's step, backward, the gradient all-reduce of data-parallel
runs, the optimiser step; a non-finite loss stops the run before any checkpoint of the spoiled
weights is written. After every epoch: ``checkpoints/epoch-NNNN.pt`` and ``last.pt``,
``history.csv`` (one row per epoch: the method's columns and the mean of each loss term) and the
method's own logs; at the end ``model.pt`` (the method's payload) and ``done.json`` last.

A run finding ``checkpoints/last.pt`` resumes after it and ends with the same weights as an
uninterrupted run: every random choice is drawn from generators seeded by (seed, epoch[, image]),
never from state carried across epochs, and the global RNG states are checkpointed.

Data parallel: launched by torchrun with WORLD_SIZE > 1 (``pipeline.devices launch``), see
``pipeline.training.distributed``.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.atomic import atomic_path, write_csv, write_json
from pipeline.config import require_fields
from pipeline.devices import resolve_device
from pipeline.errors import ConfigError, PipelineError
from pipeline.methods import METHODS, load_method
from pipeline.training.checkpoints import (
    CHECKPOINT_FORMAT,
    RESUMABLE_KEYS,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    settings_fingerprint,
)
from pipeline.training.data import check_label_range, derived_seed, epoch_batches, number_of_classes, training_images
from pipeline.training.distributed import Processes, average_gradients, init_processes
from pipeline.training.method import MethodRun, TrainContext

log = logging.getLogger(__name__)

HOST_READ_EVERY = 32  # training steps between two reads of device values (see _train_epoch)


@dataclass(frozen=True)
class TrainerSettings:
    """The keys of ``train`` the trainer reads; the method reads the rest."""

    method: str
    epochs: int
    batch_size: int
    num_workers: int
    device: str
    keep_checkpoints: int

    @classmethod
    def from_params(cls, train: dict) -> TrainerSettings:
        require_fields(cls, train, "train")
        settings = cls(str(train["method"]), int(train["epochs"]), int(train["batch_size"]),
                       int(train["num_workers"]), str(train["device"]), int(train["keep_checkpoints"]))
        if settings.method not in METHODS:
            raise ConfigError(f"train.method: {settings.method!r} is not one of {', '.join(METHODS)}")
        if settings.epochs < 1 or settings.batch_size < 1:
            raise ConfigError("train.epochs and train.batch_size must be >= 1")
        return settings


def train(
    manifest_path: str | Path,
    classes_path: str | Path,
    labels_path: str | Path | None,
    out_dir: str | Path,
    params: dict,
    threads: int,
) -> None:
    """Train ``train.method``; ``params`` = {"backbone": {...}, "train": {...}, "mode": ..., "seed": int}."""
    settings = TrainerSettings.from_params(params["train"])
    method = load_method(settings.method)
    method.check_settings(params["train"])
    mode, seed = params["mode"], int(params["seed"])
    manifest_path, classes_path, out_dir = Path(manifest_path), Path(classes_path), Path(out_dir)
    labels_path = Path(labels_path) if labels_path is not None else None
    torch.set_num_threads(max(1, threads))
    torch.use_deterministic_algorithms(True, warn_only=True)
    device = resolve_device(settings.device)
    processes = init_processes(device)
    if settings.batch_size % processes.world:
        raise ConfigError(
            f"train.batch_size {settings.batch_size} is not a multiple of the {processes.world} processes"
        )

    images = training_images(mode, manifest_path, labels_path)
    num_classes = number_of_classes(mode, classes_path, labels_path, images)
    check_label_range(images, num_classes, str(labels_path if mode == "unsupervised" else manifest_path))
    if len(images) < settings.batch_size:
        raise ConfigError(f"train.batch_size {settings.batch_size} exceeds the {len(images)} training images")
    context = TrainContext(params, images, num_classes, manifest_path, device, processes)
    torch.manual_seed(seed)
    run = method.prepare(context)

    history: list[dict] = []
    start_epoch, optimizer_state, optimizer_phase = 0, None, None
    last = out_dir / "checkpoints" / "last.pt"
    fingerprint = settings_fingerprint(params, images, num_classes,
                                       getattr(method, "RESUMABLE_KEYS", RESUMABLE_KEYS))
    state = load_checkpoint(last) if last.is_file() else None
    if state is not None and (state.get("format") != CHECKPOINT_FORMAT or state.get("fingerprint") != fingerprint):
        # Snakemake reruns this job when its inputs or params changed: the old checkpoints are
        # of another run, never to be resumed (nor left to be pruned in place of the new ones).
        log.warning("%s was written with other settings or training data; starting over", last)
        if processes.main:
            for stale in (out_dir / "checkpoints").glob("*.pt"):
                stale.unlink()
        state = None
    if state is not None:
        run.model.load_state_dict(state["model"])
        run.load_state_dict(state["method"])
        history = state["history"]
        start_epoch, optimizer_state, optimizer_phase = state["epochs_done"], state["optimizer"], state["phase"]
        set_rng_state(state["rng"])
        log.info("resuming from %s after epoch %d", last, start_epoch)
    run.model.to(device)

    optimizer, phase, parameters = None, None, []
    started = time.monotonic()
    for epoch in range(start_epoch, settings.epochs):
        if run.phase(epoch) != phase:
            phase = run.phase(epoch)
            parameters, optimizer = run.optimizer(epoch)
            if optimizer_state is not None and optimizer_phase == phase:
                optimizer.load_state_dict(optimizer_state)
        row = _train_epoch(run, optimizer, parameters, settings, epoch, seed, device, processes)
        history.append(row)
        if processes.main:
            state = {
                "format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "epochs_done": epoch + 1,
                "model": run.model.state_dict(), "optimizer": optimizer.state_dict(), "phase": phase,
                "method": run.state_dict(), "history": history, "rng": rng_state(),
            }
            save_checkpoint(out_dir, state, max(1, settings.keep_checkpoints))
            _write_logs(out_dir, history, run)
        if processes.world > 1:
            dist.barrier()

    if processes.main:
        # Also when resuming a run killed after its last epoch: Snakemake deleted the logs.
        _write_logs(out_dir, history, run)
        with atomic_path(out_dir / "model.pt") as tmp:
            torch.save(run.model_payload(), tmp)
        write_json(out_dir / "done.json", {
            "method": settings.method, **run.summary(), "mode": mode, "epochs": settings.epochs,
            "num_classes": num_classes, "num_images": len(images),
            "final_loss": history[-1]["loss"] if history else None,
            "seconds_this_run": round(time.monotonic() - started, 1), "processes": processes.world,
        })
    if processes.world > 1:
        dist.barrier()


def _write_logs(out_dir: Path, history: list[dict], run: MethodRun) -> None:
    write_csv(out_dir / "history.csv", pd.DataFrame(history), float_format="%.6g")
    run.write_logs(out_dir)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _check_finite(unread: list[tuple[int, dict[str, torch.Tensor], torch.Tensor]], epoch: int, world: int) -> None:
    """Raise for the first step whose loss was not finite in every process."""
    flags = torch.cat([finite for _, _, finite in unread]).cpu()
    bad = torch.nonzero(flags != world).flatten()
    if bad.numel():
        index, terms, _ = unread[int(bad[0])]
        parts = ", ".join(f"{k} {v.item():.4g}" for k, v in terms.items() if k != "loss")
        raise PipelineError(
            f"training diverged: non-finite loss at epoch {epoch} batch {index} ({parts}); "
            "the last good checkpoint is kept"
        )


def _train_epoch(run: MethodRun, optimizer: torch.optim.Optimizer, parameters: list, settings: TrainerSettings,
                 epoch: int, seed: int, device: torch.device, processes: Processes) -> dict:
    """One epoch; returns its history row."""
    _seed_everything(derived_seed(seed, epoch, 1))
    reducer = processes.reducer
    columns = run.epoch_columns(epoch)
    run.dataset.epoch = epoch
    batches = epoch_batches(len(run.dataset), settings.batch_size, seed, epoch, processes.rank, processes.world)
    loader = DataLoader(run.dataset, batch_sampler=batches, num_workers=settings.num_workers,
                        pin_memory=device.type == "cuda")
    run.model.train()
    began = time.monotonic()
    progress = tqdm(loader, desc=f"epoch {epoch}", unit="batch", disable=not processes.main, leave=False)
    # Reading a device value stalls the host until the GPU catches up, and then the GPU idles
    # while the host queues the next step: the finite check, the running sums and the progress
    # bar stay on the device and are read every HOST_READ_EVERY steps and at the epoch's end.
    # A non-finite step is still reported by its batch and terms before any checkpoint is
    # written, so the weights it spoiled are never saved.
    sums: dict[str, torch.Tensor] = {}
    unread: list[tuple[int, dict[str, torch.Tensor], torch.Tensor]] = []
    for index, batch in enumerate(progress):
        terms = run.step(batch, epoch, index)
        finite = reducer.sum(torch.isfinite(terms["loss"].detach()).float().reshape(1))
        unread.append((index, {k: v.detach() for k, v in terms.items()}, finite))
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        average_gradients(parameters, processes)
        optimizer.step()
        run.after_step()
        for key, value in terms.items():
            sums[key] = sums.get(key, 0.0) + value.detach().double()
        if len(unread) == HOST_READ_EVERY or index == len(batches) - 1:
            _check_finite(unread, epoch, processes.world)
            progress.set_postfix(loss=f"{unread[-1][1]['loss'].item():.3f}")
            unread.clear()
    steps = max(len(batches), 1)
    # float32 as before the sums stayed on the device: the same history numbers for the same seed.
    means = {k: float(reducer.sum((v / steps).float().to(device))) / processes.world for k, v in sums.items()}
    log.info("epoch %d: %s", epoch, ", ".join(f"{k} {v:.4f}" for k, v in means.items()))
    row = {"epoch": epoch, **columns, **means, "seconds": round(time.monotonic() - began, 2)}
    row.update(run.end_epoch(epoch))
    return row
