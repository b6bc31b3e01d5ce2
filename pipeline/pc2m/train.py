"""PC2M training runtime (paper 000 Sec. 4.2, Algorithm 1), shared by its baseline ViT-PCM
(paper 001; ``train.method: vitpcm``, its views, step and loss in ``vitpcm.py``).

Schedule: ``warmup_epochs`` (1) with the backbone frozen and only the patch classifier training,
then the last ``unfreeze_blocks`` (5) blocks and the final norm unfrozen; Adam at ``lr`` (1e-3)
scaled by ``lr_after_warmup_factor`` (0.1) after the warm-up. alpha-tilde (eq. 7) is updated at the
end of every epoch. Instead of Algorithm 1's second pass over the dataset, q (eq. 6) is averaged
over the global-view predictions seen during the epoch (our choice: it halves the cost; the
global view retains most of the image, and eq. 7's q_{m-1} is "the dataset's current predictions").
ViT-PCM trains the same way (its official schedule has the same values: 1 warm-up epoch at 1e-3
with the HV-BiLSTM and classifier only, then 5 blocks + final norm at 1e-4), without transport:
its alpha-tilde is only the diagnostic EMA of the predicted areas (``alpha.csv``, ``js_alpha_*``),
and its ``epsilon`` column is empty.

Outputs in ``out_dir``: ``history.csv``, ``alpha.csv`` (alpha-tilde used in each epoch),
``checkpoints/epoch-NNNN.pt`` (NNNN = epochs completed) and ``checkpoints/last.pt`` after every
epoch, ``model.pt`` (``model.model_payload``: architecture record + state dict) and ``done.json``
last. A run finding ``checkpoints/last.pt`` resumes after it, and ends with the same weights as an
uninterrupted run: every random choice is drawn from generators seeded by (seed, epoch[, image]),
never from state carried across epochs.

Data parallel: launched by torchrun with WORLD_SIZE > 1, each process takes its share of every
global batch; the Sinkhorn sums, nu_b, the match-loss normaliser and the area estimate are
reduced over processes, and gradients are averaged with one flat all-reduce per step (the
frozen/unfrozen phases change which parameters train, which a DDP wrapper fixes at construction).
ViT-PCM's mosaics are formed within each process's share of the batch (4 tiles each), so its
data-parallel runs differ from single-process ones, as the official 4-GPU training does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline.atomic import atomic_path, write_csv, write_json
from pipeline.backbone import build_backbone, normalisation, patch_size
from pipeline.checkpoint import load_error_reason
from pipeline.config import require_fields
from pipeline.datasets import read_classes, read_manifest
from pipeline.devices import resolve_device
from pipeline.errors import BadInputError, ConfigError, PipelineError
from pipeline.imageio import load_mask
from pipeline.patch_sizes import fit_view_sizes
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
from pipeline.pc2m.model import (
    Architecture,
    PatchClassifier,
    build_network,
    mixed_precision,
    model_payload,
    set_trainable,
)
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
from pipeline.pc2m.vitpcm import MosaicViewDataset, MosaicViews, ViTPCMSettings, vitpcm_step

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "pc2m-checkpoint/1"
# Settings that may change when a run is resumed (they do not change the result).
_RESUMABLE_KEYS = ("epochs", "num_workers", "device", "keep_checkpoints")
MODES = ("weak", "unsupervised")
METHODS = ("pc2m", "vitpcm")
# One training step: the batch -> named loss terms ("loss" = the total) and the detached
# probabilities of the full-image branch (B x C x gh x gw, for the area diagnostics).
Step = Callable[[dict[str, torch.Tensor]], tuple[dict[str, torch.Tensor], torch.Tensor]]


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
    # ViT-PCM's own values (``train.vitpcm``; its defaults are in ViTPCMSettings).
    vitpcm: ViTPCMSettings = field(default_factory=ViTPCMSettings)

    @classmethod
    def from_params(cls, train: dict) -> TrainSettings:
        require_fields(cls, train, "train")
        values = dict(train)
        values["global_scale"] = tuple(float(v) for v in values["global_scale"])
        values["local_scale"] = tuple(float(v) for v in values["local_scale"])
        values["vitpcm"] = ViTPCMSettings(**(values.get("vitpcm") or {}))
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
        if self.method == "vitpcm":
            self.vitpcm.check(self.global_size)

    def fitted_to_patch(self, patch: int) -> TrainSettings:
        """The view and crop sizes rounded to multiples of ``patch`` (``pipeline.patch_sizes``)."""
        global_size, local_size, crop_size = fit_view_sizes(self.method, self.global_size, self.local_size,
                                                            self.vitpcm.crop_size, patch)
        return replace(self, global_size=global_size, local_size=local_size,
                       vitpcm=replace(self.vitpcm, crop_size=crop_size))

    def views(self) -> ViewSettings:
        return ViewSettings(self.global_size, self.local_size, self.global_scale, self.local_scale,
                            self.max_rotation, self.flip, self.jitter)

    def mosaic_views(self, patch: int) -> MosaicViews:
        return MosaicViews(self.global_size, patch, self.vitpcm.crop_size, self.vitpcm.crop_probability,
                           self.flip, self.jitter)

    def losses(self) -> LossSettings:
        return LossSettings(self.use_ot, self.use_match, self.sinkhorn_iterations)

    def architecture(self, num_classes: int, backbone: str) -> Architecture:
        with_lstm = self.method == "vitpcm" and self.vitpcm.use_hv_bilstm
        return Architecture(self.method, num_classes, self.vitpcm.lstm_hidden if with_lstm else 0, backbone)

    def head_dropout(self) -> float:
        return self.vitpcm.dropout if self.method == "vitpcm" else 0.0

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


def _settings_fingerprint(params: dict, images: list[LabelledImage] | None = None,
                          num_classes: int | None = None) -> str:
    """What a checkpoint must match to be resumed: the recipe and the training data (image ids
    and their labels: new pseudo-labels must not resume a model trained on the old ones)."""
    train = {k: v for k, v in params["train"].items() if k not in _RESUMABLE_KEYS}
    record = {"backbone": params["backbone"], "train": train, "mode": params["mode"], "seed": params["seed"]}
    if images is not None:
        data = json.dumps({"num_classes": num_classes, "images": [[i.image_id, list(i.labels)] for i in images]})
        record["data"] = hashlib.sha256(data.encode()).hexdigest()
    return json.dumps(record, sort_keys=True, default=str)


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
    """epoch-NNNN.pt written atomically, then last.pt pointed at it (hard link, atomic rename)."""
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
        raise BadInputError(f"{path}: unreadable checkpoint ({load_error_reason(exc)}); delete it to restart") from None


# ---------------------------------------------------------------------------------------------
# Logs



def _write_logs(out_dir: Path, history: list[dict], alphas: list[list[float]]) -> None:
    write_csv(out_dir / "history.csv", pd.DataFrame(history), float_format="%.6g")
    frame = pd.DataFrame(alphas, columns=[f"class_{c}" for c in range(len(alphas[0]))])
    frame.insert(0, "epoch", range(len(alphas)))
    write_csv(out_dir / "alpha.csv", frame, float_format="%.6g")


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
        raise ConfigError(
            f"train.batch_size {settings.batch_size} is not a multiple of the {processes.world} processes"
        )

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
    arch = settings.architecture(num_classes, params["backbone"]["name"])
    model = build_network(backbone, arch, settings.head_dropout())
    mean, std = normalisation(backbone)
    patch = patch_size(backbone)
    settings = settings.fitted_to_patch(patch)
    dataset = _training_dataset(settings, images, num_classes, patch, mean, std, seed)

    alpha_tilde = nu_dataset.clone()  # alpha-tilde_0 = nu_D (Sec. 3.2)
    alphas: list[list[float]] = [alpha_tilde.tolist()]
    history: list[dict] = []
    start_epoch, optimizer_state, optimizer_phase = 0, None, None
    last = out_dir / "checkpoints" / "last.pt"
    fingerprint = _settings_fingerprint(params, images, num_classes)
    state = _load_checkpoint(last) if last.is_file() else None
    if state is not None and (state.get("format") != CHECKPOINT_FORMAT or state.get("fingerprint") != fingerprint):
        # Snakemake reruns this job when its inputs or params changed: the old checkpoints are
        # of another run, never to be resumed (nor left to be pruned in place of the new ones).
        log.warning("%s was written with other settings or training data; starting over", last)
        if processes.main:
            for stale in (out_dir / "checkpoints").glob("*.pt"):
                stale.unlink()
        state = None
    if state is not None:
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
            # Fused Adam (one kernel for all tensors) on CUDA; the CPU keeps the reference
            # implementation, so CPU runs give the same numbers as before.
            optimizer = torch.optim.Adam(parameters, lr=settings.learning_rate(epoch),
                                         fused=device.type == "cuda" or None)
            if optimizer_state is not None and optimizer_phase == phase:
                optimizer.load_state_dict(optimizer_state)
            log.info("epoch %d: %d backbone blocks unfrozen, %d trainable tensors, lr %g",
                     epoch, phase, len(parameters), settings.learning_rate(epoch))
        epsilon, step = _epoch_step(model, settings, epoch, alpha_tilde, nu_dataset, patch, device, processes.reducer)
        row, area_mean = _train_epoch(model, optimizer, parameters, dataset, settings, epoch, seed, epsilon, step,
                                      device, processes)
        new_alpha = ema_update(alpha_tilde, area_mean, settings.gamma)
        row["js_alpha_change"] = js_divergence(new_alpha, alpha_tilde)
        row["js_alpha_gt"] = js_divergence(new_alpha, gt_areas) if gt_areas is not None else float("nan")
        alpha_tilde = new_alpha
        alphas.append(alpha_tilde.tolist())
        history.append(row)
        log.info("epoch %d: eps %.3f, JS(alpha, gt) %.4f", epoch, row["epsilon"], row["js_alpha_gt"])
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
        # Also when resuming a run killed after its last epoch: Snakemake deleted the logs.
        _write_logs(out_dir, history, alphas)
        with atomic_path(out_dir / "model.pt") as tmp:
            torch.save(model_payload(model, arch), tmp)
        write_json(out_dir / "done.json", {
            "method": settings.method, "architecture": asdict(arch), "mode": mode, "epochs": settings.epochs,
            "num_classes": num_classes, "num_images": len(images), "absent_classes": absent,
            "alpha_tilde": alpha_tilde.tolist(),
            "final_loss": history[-1]["loss"] if history else None,
            "seconds_this_run": round(time.monotonic() - started, 1), "processes": processes.world,
        })
    if processes.world > 1:
        dist.barrier()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _training_dataset(settings: TrainSettings, images: list[LabelledImage], num_classes: int, patch: int,
                      mean: tuple[float, ...], std: tuple[float, ...], seed: int) -> Dataset:
    if settings.method == "vitpcm":
        views = settings.mosaic_views(patch)
        views.check()
        return MosaicViewDataset(images, num_classes, views, mean, std, seed)
    return TwoViewDataset(images, num_classes, settings.views(), mean, std, seed)


def _epoch_step(model: PatchClassifier, settings: TrainSettings, epoch: int, alpha_tilde: torch.Tensor,
                nu_dataset: torch.Tensor, patch: int, device: torch.device, reducer: Reducer) -> tuple[float, Step]:
    """The method's training step for ``epoch`` and its Sinkhorn epsilon (NaN: no transport)."""
    if settings.method == "vitpcm":
        tile_grid = (settings.mosaic_views(patch).tile_size // patch,) * 2
        return float("nan"), _vitpcm_step(model, settings.vitpcm, tile_grid, device, reducer)
    epsilon = epsilon_at(epoch, settings.epsilon_start, settings.epsilon_end, settings.epsilon_rate)
    local_grid = (settings.local_size // patch,) * 2
    return epsilon, _pc2m_step(model, settings, epsilon, alpha_tilde, nu_dataset, local_grid, device, reducer)


def _pc2m_step(model: PatchClassifier, settings: TrainSettings, epsilon: float, alpha_tilde: torch.Tensor,
               nu_dataset: torch.Tensor, local_grid: tuple[int, int], device: torch.device, reducer: Reducer) -> Step:
    """One batch of Algorithm 1: both views forward, alpha (eq. 5), the PC2M loss."""
    alpha_tilde_dev, nu_dataset_dev = alpha_tilde.to(device), nu_dataset.to(device)

    def step(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        global_views = batch["global"].to(device, non_blocking=True)
        local_views = batch["local"].to(device, non_blocking=True)
        targets = batch["target"].to(device)
        with mixed_precision(device):
            global_pred, local_pred = model(global_views), model(local_views)
        alpha = batch_class_marginal(alpha_tilde_dev, multi_hot_frequencies(targets, reducer), nu_dataset_dev)
        alignment = local_to_global(batch["theta_global"].to(device), batch["theta_local"].to(device), local_grid)
        terms = pc2m_loss(global_pred, local_pred, alignment, targets, alpha, epsilon, settings.losses(), reducer)
        return {"loss": terms.total, "mce": terms.mce, "match": terms.match}, global_pred.probs.detach()

    return step


def _vitpcm_step(model: PatchClassifier, settings: ViTPCMSettings, tile_grid: tuple[int, int], device: torch.device,
                 reducer: Reducer) -> Step:
    """One batch of ViT-PCM (``vitpcm.vitpcm_step``)."""

    def step(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        terms, probs = vitpcm_step(model, batch, settings, tile_grid, device, reducer)
        return {"loss": terms.total, "mce": terms.mce, "et": terms.et, "l2": terms.l2}, probs

    return step


HOST_READ_EVERY = 32  # training steps between two reads of device values (see _train_epoch)


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


def _train_epoch(model: PatchClassifier, optimizer: torch.optim.Optimizer, parameters: list, dataset: Dataset,
                 settings: TrainSettings, epoch: int, seed: int, epsilon: float, step: Step, device: torch.device,
                 processes: Processes) -> tuple[dict, torch.Tensor]:
    """One epoch; returns the history row and (1/T) sum_X q(X) of the epoch (eq. 6 on the
    full-image branch)."""
    _seed_everything(derived_seed(seed, epoch, 1))
    reducer = processes.reducer
    dataset.epoch = epoch
    batches = epoch_batches(len(dataset), settings.batch_size, seed, epoch, processes.rank, processes.world)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=settings.num_workers,
                        pin_memory=device.type == "cuda")
    model.train()
    area_sum = torch.zeros(model.num_classes, dtype=torch.float64, device=device)
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
        terms, probs = step(batch)
        finite = reducer.sum(torch.isfinite(terms["loss"].detach()).float().reshape(1))
        unread.append((index, {k: v.detach() for k, v in terms.items()}, finite))
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        average_gradients(parameters, processes)
        optimizer.step()
        area_sum += image_class_areas(probs).double().sum(dim=0)
        for key, value in terms.items():
            sums[key] = sums.get(key, 0.0) + value.detach().double()
        if len(unread) == HOST_READ_EVERY or index == len(batches) - 1:
            _check_finite(unread, epoch, processes.world)
            progress.set_postfix(loss=f"{unread[-1][1]['loss'].item():.3f}")
            unread.clear()
    steps = max(len(batches), 1)
    images_seen = reducer.sum(torch.tensor(float(sum(len(b) for b in batches)), device=device))
    area_mean = (reducer.sum(area_sum) / images_seen).float().cpu()
    # float32 as before the sums stayed on the device: the same history numbers for the same seed.
    means = {k: float(reducer.sum((v / steps).float().to(device))) / processes.world for k, v in sums.items()}
    log.info("epoch %d: %s", epoch, ", ".join(f"{k} {v:.4f}" for k, v in means.items()))
    row = {"epoch": epoch, "unfrozen_blocks": settings.phase(epoch), "lr": settings.learning_rate(epoch),
           "epsilon": epsilon, **means, "seconds": round(time.monotonic() - began, 2)}
    return row, area_mean
