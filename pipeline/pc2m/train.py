"""PC2M training runtime (paper 000 Sec. 4.2, Algorithm 1).

Schedule: ``warmup_epochs`` (1) with the backbone frozen and only the patch classifier training,
then the last ``unfreeze_blocks`` (5) blocks and the final norm unfrozen; Adam at ``lr`` (1e-3)
scaled by ``lr_after_warmup_factor`` (0.1) after the warm-up. alpha-tilde (eq. 7) is updated at the
end of every epoch. Instead of Algorithm 1's second pass over the dataset, q (eq. 6) is averaged
over the global-view predictions seen during the epoch (our choice: it halves the cost; the
global view retains most of the image, and eq. 7's q_{m-1} is "the dataset's current predictions").

Outputs in ``out_dir``: ``history.csv``, ``alpha.csv`` (alpha-tilde used in each epoch),
``checkpoints/epoch-XXXX.pt`` (XXXX = epochs completed) and ``checkpoints/last.pt`` after every
epoch, ``model.pt`` (state dict) and ``done.json`` last. A run finding ``checkpoints/last.pt``
resumes after it, and ends with the same weights as an uninterrupted run: every random choice is
drawn from generators seeded by (seed, epoch[, image]), never from state carried across epochs.

Data parallel: launched by torchrun with WORLD_SIZE > 1, each process takes its share of every
global batch; the Sinkhorn sums, nu_b, the match-loss normaliser and the area estimate are
reduced over processes, and gradients are averaged with one flat all-reduce per step (the
frozen/unfrozen phases change which parameters train, which a DDP wrapper fixes at construction).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.atomic import atomic_path, write_json
from pipeline.backbone import build_backbone, normalisation, patch_size
from pipeline.datasets import read_classes, read_manifest
from pipeline.errors import BadInputError, ConfigError, PipelineError
from pipeline.features import resolve_device
from pipeline.imageio import load_mask
from pipeline.pc2m.data import (
    TRAIN_SPLIT,
    LabelledImage,
    TwoViewDataset,
    check_label_range,
    derived_seed,
    epoch_batches,
    unsupervised_training_images,
    weak_training_images,
)
from pipeline.pc2m.losses import LossSettings, pc2m_loss
from pipeline.pc2m.model import PatchClassifier, set_trainable
from pipeline.pc2m.ot import (
    Reducer,
    absent_classes,
    batch_class_marginal,
    class_frequencies,
    ema_update,
    epsilon_at,
    image_class_areas,
    js_divergence,
    multi_hot_frequencies,
)
from pipeline.pc2m.views import ViewSettings, local_to_global

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "pc2m-checkpoint/1"
# Settings that may change when a run is resumed (they do not change the result).
_RESUMABLE_KEYS = ("epochs", "num_workers", "device", "keep_checkpoints")
MODES = ("weak", "unsupervised")
METHODS = ("pc2m",)


@dataclass(frozen=True)
class TrainSettings:
    method: str
    epochs: int
    warmup_epochs: int
    unfreeze_blocks: int
    batch_size: int
    lr: float
    lr_after_warmup_factor: float
    global_size: int
    local_size: int
    global_scale: tuple[float, float]
    local_scale: tuple[float, float]
    max_rotation: float
    flip: bool
    jitter: bool
    gamma: float
    epsilon_start: float
    epsilon_end: float
    epsilon_rate: float
    sinkhorn_iterations: int
    use_ot: bool
    use_match: bool
    keep_checkpoints: int
    num_workers: int
    device: str

    @classmethod
    def from_params(cls, train: dict) -> TrainSettings:
        values = dict(train)
        values["global_scale"] = tuple(float(v) for v in values["global_scale"])
        values["local_scale"] = tuple(float(v) for v in values["local_scale"])
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"train.method: {self.method!r} is not one of {', '.join(METHODS)}")
        for key in ("global_scale", "local_scale"):
            low, high = getattr(self, key)
            if not 0 < low <= high <= 1:
                raise ConfigError(f"train.{key}: {[low, high]} must satisfy 0 < min <= max <= 1")
        if not 0 <= self.gamma <= 1:
            raise ConfigError(f"train.gamma: {self.gamma} must be in [0, 1]")
        if not 0 < self.epsilon_start <= self.epsilon_end:
            raise ConfigError("train.epsilon_start must be > 0 and <= train.epsilon_end")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("train.epochs and train.batch_size must be >= 1")

    def views(self) -> ViewSettings:
        return ViewSettings(self.global_size, self.local_size, self.global_scale, self.local_scale,
                            self.max_rotation, self.flip, self.jitter)

    def losses(self) -> LossSettings:
        return LossSettings(self.use_ot, self.use_match, self.sinkhorn_iterations)

    def phase(self, epoch: int) -> int:
        """Number of unfrozen backbone blocks in ``epoch`` (0 during the warm-up)."""
        return 0 if epoch < self.warmup_epochs else self.unfreeze_blocks

    def learning_rate(self, epoch: int) -> float:
        return self.lr if epoch < self.warmup_epochs else self.lr * self.lr_after_warmup_factor


# ---------------------------------------------------------------------------------------------
# Processes


@dataclass(frozen=True)
class Processes:
    rank: int
    world: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def reducer(self) -> Reducer:
        return Reducer(distributed=self.world > 1)


def init_processes(device: torch.device) -> Processes:
    """torchrun sets WORLD_SIZE/RANK; gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Processes(0, 1)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Processes(dist.get_rank(), world)


def average_gradients(parameters: list[torch.nn.Parameter], processes: Processes) -> None:
    """Mean of the gradients over processes, in one flat all-reduce."""
    if processes.world <= 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= processes.world
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


# ---------------------------------------------------------------------------------------------
# Labels and diagnostics


def training_images(mode: str, manifest_path: Path, labels_path: Path | None) -> list[LabelledImage]:
    if mode == "weak":
        return weak_training_images(manifest_path)
    if mode == "unsupervised":
        if labels_path is None:
            raise ConfigError("mode unsupervised: training needs the pseudo-label file (labels_path)")
        return unsupervised_training_images(manifest_path, labels_path)
    raise ConfigError(f"mode: {mode!r} is not one of {', '.join(MODES)}")


def number_of_classes(mode: str, classes_path: Path, labels_path: Path | None, images: list[LabelledImage]) -> int:
    """|C| including background: the dataset's classes (weak), or clusters + 1 (unsupervised;
    from the pseudo-label stage's summary.json beside the labels, else the largest cluster id)."""
    if mode == "weak":
        return int(read_classes(classes_path)["num_classes"])
    summary = Path(labels_path).parent / "summary.json"
    if summary.is_file():
        return int(json.loads(summary.read_text(encoding="utf-8"))["num_clusters"]) + 1
    return max((max(i.labels, default=0) for i in images), default=0) + 1


def ground_truth_areas(manifest_path: Path, image_ids: set[str], num_classes: int) -> torch.Tensor | None:
    """alpha* of App. A.1: the mean over train images of each class's area fraction (weak mode
    only: GT classes are the model's classes; in unsupervised mode cluster ids are not, and a
    Hungarian matching belongs to the evaluation stage)."""
    manifest = read_manifest(manifest_path)
    rows = manifest[(manifest["split"] == TRAIN_SPLIT) & manifest["image_id"].isin(image_ids)]
    if (rows["mask_path"] == "").any() or rows.empty:
        return None
    total = torch.zeros(num_classes, dtype=torch.float64)
    for path in rows["mask_path"]:
        mask = load_mask(path)
        counts = np.bincount(mask[mask != 255].ravel(), minlength=num_classes)[:num_classes]
        total += torch.from_numpy(counts / max(counts.sum(), 1))
    return total / len(rows)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _settings_fingerprint(params: dict) -> str:
    train = {k: v for k, v in params["train"].items() if k not in _RESUMABLE_KEYS}
    return json.dumps({"backbone": params["backbone"], "train": train, "mode": params["mode"],
                       "seed": params["seed"]}, sort_keys=True, default=str)


def _rng_state() -> dict:
    """Global RNG states as tensors and plain values (loadable with weights_only=True)."""
    version, internal, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python_version": version,
        "python_internal": torch.tensor(internal, dtype=torch.int64),
        "python_gauss": gauss,
        "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_gauss": float(np_gauss),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python_internal"].tolist()), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(out_dir: Path, state: dict, keep: int) -> None:
    """epoch-XXXX.pt written atomically, then last.pt pointed at it (hard link, atomic rename)."""
    folder = out_dir / "checkpoints"
    path = folder / f"epoch-{state['epochs_done']:04d}.pt"
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    with atomic_path(folder / "last.pt") as tmp:
        tmp.unlink()
        try:
            os.link(path, tmp)
        except OSError:  # file systems without hard links
            shutil.copyfile(path, tmp)
    for old in sorted(folder.glob("epoch-*.pt"))[:-keep]:
        old.unlink()


def _load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure: the file is not a usable checkpoint
        raise BadInputError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc}); delete it to restart") from None


# ---------------------------------------------------------------------------------------------
# Logs


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")


def _write_logs(out_dir: Path, history: list[dict], alphas: list[list[float]]) -> None:
    _write_csv(out_dir / "history.csv", pd.DataFrame(history))
    frame = pd.DataFrame(alphas, columns=[f"class_{c}" for c in range(len(alphas[0]))])
    frame.insert(0, "epoch", range(len(alphas)))
    _write_csv(out_dir / "alpha.csv", frame)


# ---------------------------------------------------------------------------------------------
# Training


def train(
    manifest_path: str | Path,
    classes_path: str | Path,
    labels_path: str | Path | None,
    out_dir: str | Path,
    params: dict,
    threads: int,
) -> None:
    """Train PC2M; ``params`` = {"backbone": {...}, "train": {...}, "mode": ..., "seed": int}."""
    settings = TrainSettings.from_params(params["train"])
    mode, seed = params["mode"], int(params["seed"])
    manifest_path, classes_path, out_dir = Path(manifest_path), Path(classes_path), Path(out_dir)
    labels_path = Path(labels_path) if labels_path is not None else None
    torch.set_num_threads(max(1, threads))
    torch.use_deterministic_algorithms(True, warn_only=True)
    device = resolve_device(settings.device)
    processes = init_processes(device)
    if settings.batch_size % processes.world:
        raise ConfigError(f"train.batch_size {settings.batch_size} is not a multiple of the {processes.world} processes")

    images = training_images(mode, manifest_path, labels_path)
    num_classes = number_of_classes(mode, classes_path, labels_path, images)
    check_label_range(images, num_classes, str(labels_path if mode == "unsupervised" else manifest_path))
    if len(images) < settings.batch_size:
        raise ConfigError(f"train.batch_size {settings.batch_size} exceeds the {len(images)} training images")
    nu_dataset = class_frequencies([i.labels for i in images], num_classes).float()
    absent = absent_classes(nu_dataset)
    if absent:
        log.warning("classes %s never appear in the training labels (nu_D = 0): their area alpha is 0 "
                    "and no patch is transported to them", absent)
    gt_areas = ground_truth_areas(manifest_path, {i.image_id for i in images}, num_classes) if mode == "weak" else None

    torch.manual_seed(seed)
    backbone = build_backbone(params["backbone"]["name"], params["backbone"]["weights"],
                              params["backbone"].get("checkpoint_key", "teacher"),
                              params["backbone"].get("model_kwargs") or {})
    model = PatchClassifier(backbone, num_classes)
    mean, std = normalisation(backbone)
    dataset = TwoViewDataset(images, num_classes, settings.views(), mean, std, seed)
    local_grid = (settings.local_size // patch_size(backbone),) * 2

    alpha_tilde = nu_dataset.clone()  # alpha-tilde_0 = nu_D (Sec. 3.2)
    alphas: list[list[float]] = [alpha_tilde.tolist()]
    history: list[dict] = []
    start_epoch, optimizer_state, optimizer_phase = 0, None, None
    last = out_dir / "checkpoints" / "last.pt"
    fingerprint = _settings_fingerprint(params)
    if last.is_file():
        state = _load_checkpoint(last)
        if state.get("format") != CHECKPOINT_FORMAT or state.get("fingerprint") != fingerprint:
            raise ConfigError(f"{last}: written with other settings (or format); delete {out_dir / 'checkpoints'} to restart")
        model.load_state_dict(state["model"])
        alpha_tilde, alphas, history = state["alpha_tilde"], state["alphas"], state["history"]
        start_epoch, optimizer_state, optimizer_phase = state["epochs_done"], state["optimizer"], state["phase"]
        _set_rng_state(state["rng"])
        log.info("resuming from %s after epoch %d", last, start_epoch)
    model.to(device)

    optimizer, phase, parameters = None, None, []
    started = time.monotonic()
    for epoch in range(start_epoch, settings.epochs):
        if settings.phase(epoch) != phase:
            phase = settings.phase(epoch)
            parameters = set_trainable(model, phase)
            optimizer = torch.optim.Adam(parameters, lr=settings.learning_rate(epoch))
            if optimizer_state is not None and optimizer_phase == phase:
                optimizer.load_state_dict(optimizer_state)
            log.info("epoch %d: %d backbone blocks unfrozen, %d trainable tensors, lr %g",
                     epoch, phase, len(parameters), settings.learning_rate(epoch))
        row, area_mean = _train_epoch(model, optimizer, parameters, dataset, settings, epoch, seed, alpha_tilde,
                                      nu_dataset, local_grid, device, processes)
        new_alpha = ema_update(alpha_tilde, area_mean, settings.gamma)
        row["js_alpha_change"] = js_divergence(new_alpha, alpha_tilde)
        row["js_alpha_gt"] = js_divergence(new_alpha, gt_areas) if gt_areas is not None else float("nan")
        alpha_tilde = new_alpha
        alphas.append(alpha_tilde.tolist())
        history.append(row)
        log.info("epoch %d: loss %.4f (mce %.4f, match %.4f), eps %.3f, JS(alpha, gt) %.4f",
                 epoch, row["loss"], row["mce"], row["match"], row["epsilon"], row["js_alpha_gt"])
        if processes.main:
            state = {
                "format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "epochs_done": epoch + 1,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "phase": phase,
                "alpha_tilde": alpha_tilde, "alphas": alphas, "history": history, "rng": _rng_state(),
            }
            _save_checkpoint(out_dir, state, max(1, settings.keep_checkpoints))
            _write_logs(out_dir, history, alphas)
        if processes.world > 1:
            dist.barrier()

    if processes.main:
        with atomic_path(out_dir / "model.pt") as tmp:
            torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp)
        write_json(out_dir / "done.json", {
            "method": settings.method, "mode": mode, "epochs": settings.epochs, "num_classes": num_classes,
            "num_images": len(images), "absent_classes": absent, "alpha_tilde": alpha_tilde.tolist(),
            "final_loss": history[-1]["loss"] if history else None,
            "seconds_this_run": round(time.monotonic() - started, 1), "processes": processes.world,
        })
    if processes.world > 1:
        dist.barrier()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _train_epoch(model: PatchClassifier, optimizer: torch.optim.Optimizer, parameters: list, dataset: TwoViewDataset,
                 settings: TrainSettings, epoch: int, seed: int, alpha_tilde: torch.Tensor, nu_dataset: torch.Tensor,
                 local_grid: tuple[int, int], device: torch.device,
                 processes: Processes) -> tuple[dict, torch.Tensor]:
    """One epoch of Algorithm 1; returns the history row and (1/T) sum_X q(X) of the epoch."""
    _seed_everything(derived_seed(seed, epoch, 1))
    reducer = processes.reducer
    epsilon = epsilon_at(epoch, settings.epsilon_start, settings.epsilon_end, settings.epsilon_rate)
    dataset.epoch = epoch
    batches = epoch_batches(len(dataset), settings.batch_size, seed, epoch, processes.rank, processes.world)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=settings.num_workers,
                        pin_memory=device.type == "cuda")
    model.train()
    alpha_tilde_dev, nu_dataset_dev = alpha_tilde.to(device), nu_dataset.to(device)
    area_sum = torch.zeros(model.num_classes, dtype=torch.float64, device=device)
    sums = {"loss": 0.0, "mce": 0.0, "match": 0.0}
    began = time.monotonic()
    progress = tqdm(loader, desc=f"epoch {epoch}", unit="batch", disable=not processes.main, leave=False)
    for index, batch in enumerate(progress):
        global_views = batch["global"].to(device, non_blocking=True)
        local_views = batch["local"].to(device, non_blocking=True)
        targets = batch["target"].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            global_pred, local_pred = model(global_views), model(local_views)
        alpha = batch_class_marginal(alpha_tilde_dev, multi_hot_frequencies(targets, reducer), nu_dataset_dev)
        alignment = local_to_global(batch["theta_global"].to(device), batch["theta_local"].to(device), local_grid)
        terms = pc2m_loss(global_pred, local_pred, alignment, targets, alpha, epsilon, settings.losses(), reducer)
        finite = reducer.sum(torch.isfinite(terms.total.detach()).float().reshape(1))
        if int(finite.item()) != processes.world:
            raise PipelineError(
                f"training diverged: non-finite loss at epoch {epoch} batch {index} "
                f"(mce {terms.mce.item():.4g}, match {terms.match.item():.4g}); the last good checkpoint is kept"
            )
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        average_gradients(parameters, processes)
        optimizer.step()
        area_sum += image_class_areas(global_pred.probs.detach()).double().sum(dim=0)
        for key in sums:
            sums[key] += float(getattr(terms, "total" if key == "loss" else key).detach())
        progress.set_postfix(loss=f"{terms.total.item():.3f}")
    steps = max(len(batches), 1)
    images_seen = reducer.sum(torch.tensor(float(sum(len(b) for b in batches)), device=device))
    area_mean = (reducer.sum(area_sum) / images_seen).float().cpu()
    means = {k: float(reducer.sum(torch.tensor(v / steps, device=device))) / processes.world for k, v in sums.items()}
    row = {"epoch": epoch, "unfrozen_blocks": settings.phase(epoch), "lr": settings.learning_rate(epoch),
           "epsilon": epsilon, **means, "seconds": round(time.monotonic() - began, 2)}
    return row, area_mean
