"""Train a DeepLab on the pseudo-masks of the train split (the WSSS verification step).

The recipe is chosen by config (``deeplab.recipe``; its values in ``deeplab.recipes.<name>``,
each with its paper): ``v2`` (DeepLab-v2 as papers 001/004 verify: SGD lr 2.5e-4, poly 0.9,
batch 10, crop 321, 10k iterations, x10 lr on the head, frozen BatchNorm), ``v3plus`` (CSRM's
DeepLabV3+: batch 32, 50 epochs, lr 0.007) and ``comus`` (COMUS's DeepLabv3-ResNet50: Adam
6e-5, batch 56, crop 512, 10 epochs). A not-null top-level ``deeplab`` key of the same name
overrides the recipe's value (the demo's tiny run; the COCO presets' values).

Parameter groups: the new head trains at ``head_lr_multiplier`` x the backbone lr; weight decay
applies to convolution / linear weights only, not to normalisation layers or biases (DeepLab-v2's
Caffe model: decay_mult 0 on biases, BatchNorm frozen; the TensorFlow DeepLab code regularises
kernels only). Frozen BatchNorm parameters get no gradient and are in no group.

Augmentation: random scale in ``scale_range``, horizontal flip, random crop; images are padded
with the mean colour (0 after normalisation) and labels with 255 (ignored) when smaller than the
crop. Training length is ``iterations``, or ``epochs`` passes over the train images rounded up
to whole batches.

Exact resumption. The stream of training samples is a pure function of (seed, sample number):
sample k is image ``permutation(seed, epoch = k // n)[k % n]`` augmented with a generator seeded
by (seed, k), and iteration i holds samples i*B .. i*B+B-1 (batches run across epoch boundaries,
so every batch is full, as BatchNorm in the image-pooling branch needs). A checkpoint therefore
needs only the iteration, the model, the optimiser, the RNG state (dropout) and the history; a
run killed at any point and rerun continues from the last checkpoint and ends with the same
weights, bit for bit on the CPU, as an uninterrupted run. DataLoader workers cannot change this.

Files in ``out_dir``: ``checkpoint.pt`` (rewritten atomically every ``checkpoint_every``
iterations and at the end), ``history.csv`` (mean loss per logged window, rewritten with each
checkpoint), then ``model.pt`` and, last, ``done.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline.atomic import atomic_path, write_json
from pipeline.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from pipeline.datasets import read_manifest
from pipeline.datasets.common import IGNORE_INDEX
from pipeline.deeplab.model import DeepLab, initial_weights, is_norm, trained_payload
from pipeline.devices import resolve_device
from pipeline.errors import BadInputError, ConfigError, PipelineError
from pipeline.imageio import load_mask, load_rgb, mask_in_folders

log = logging.getLogger(__name__)

TRAIN_SPLIT = "train"
CHECKPOINT_NAME = "checkpoint.pt"
HISTORY_COLUMNS = ["iteration", "loss", "lr"]


# The recipe's keys that a not-null top-level `deeplab` key of the same name overrides.
OVERRIDABLE = ("iterations", "epochs", "batch_size", "crop_size", "scale_range", "lr", "head_lr_multiplier",
               "momentum", "weight_decay", "poly_power")
OPTIMIZERS = ("sgd", "adam")


def resolve_recipe(cfg: dict) -> dict:
    """The values of recipe ``cfg["recipe"]`` with the not-null overrides of ``cfg`` applied.

    An overriding ``iterations`` drops the recipe's ``epochs`` and vice versa: the length is one or
    the other, never both."""
    name = cfg["recipe"]
    if name not in cfg["recipes"]:
        raise ConfigError(f"deeplab.recipe: {name!r} is not one of deeplab.recipes ({', '.join(cfg['recipes'])})")
    values = dict(cfg["recipes"][name])
    overrides = {key: cfg[key] for key in OVERRIDABLE if cfg.get(key) is not None}
    if {"iterations", "epochs"} <= set(overrides):
        raise ConfigError("deeplab.iterations and deeplab.epochs are both set: the length is one or the other")
    if "iterations" in overrides:
        values["epochs"] = None
    if "epochs" in overrides:
        values["iterations"] = None
    values.update(overrides)
    if (values.get("iterations") is None) == (values.get("epochs") is None):
        raise ConfigError(f"deeplab.recipes.{name}: set exactly one of iterations and epochs")
    return values


@dataclass(frozen=True)
class TrainSettings:
    """The ``deeplab`` config values that shape training (and so the resulting weights)."""

    recipe: str
    head: str
    backbone: str
    init: str
    init_file: str | None
    output_stride: int
    aspp_rates: tuple[int, ...]
    freeze_bn: bool
    optimizer: str
    num_classes: int
    seed: int
    iterations: int | None
    epochs: float | None
    batch_size: int
    crop_size: int
    scale_range: tuple[float, float]
    lr: float
    head_lr_multiplier: float
    momentum: float | None
    weight_decay: float
    poly_power: float

    @classmethod
    def from_params(cls, params: dict) -> TrainSettings:
        cfg = params["deeplab"]
        values = resolve_recipe(cfg)
        low, high = (float(v) for v in values["scale_range"])
        if not 0 < low <= high:
            raise ConfigError(f"deeplab.scale_range: need 0 < low <= high, got {[low, high]}")
        if values["optimizer"] not in OPTIMIZERS:
            raise ConfigError(f"deeplab.recipes.{cfg['recipe']}.optimizer: {values['optimizer']!r} is not one of "
                              f"{', '.join(OPTIMIZERS)}")
        if values["optimizer"] == "sgd" and values.get("momentum") is None:
            raise ConfigError(f"deeplab.recipes.{cfg['recipe']}.momentum: SGD needs a momentum")
        return cls(
            recipe=str(cfg["recipe"]),
            head=str(values["head"]),
            backbone=str(cfg["backbone"]),
            init=str(cfg["init"]),
            init_file=None if cfg["init_file"] is None else str(cfg["init_file"]),
            output_stride=int(values["output_stride"]),
            aspp_rates=tuple(int(r) for r in values["aspp_rates"]),
            freeze_bn=bool(values["freeze_bn"]),
            optimizer=str(values["optimizer"]),
            num_classes=int(params["num_classes"]),
            seed=int(params["seed"]),
            iterations=None if values["iterations"] is None else int(values["iterations"]),
            epochs=None if values["epochs"] is None else float(values["epochs"]),
            batch_size=int(values["batch_size"]),
            crop_size=int(values["crop_size"]),
            scale_range=(low, high),
            lr=float(values["lr"]),
            head_lr_multiplier=float(values["head_lr_multiplier"]),
            momentum=None if values.get("momentum") is None else float(values["momentum"]),
            weight_decay=float(values["weight_decay"]),
            poly_power=float(values["poly_power"]),
        )

    def for_images(self, count: int) -> TrainSettings:
        """With ``iterations`` fixed: ``epochs`` passes over ``count`` images, whole batches."""
        if self.iterations is not None:
            return self
        return replace(self, iterations=max(1, math.ceil(self.epochs * count / self.batch_size)))

    def network(self) -> str:
        """What the report shows: network, backbone and start, e.g. "DeepLab-v2 resnet101 (init: file)"."""
        names = {"v2": "DeepLab-v2", "v3": "DeepLabv3", "v3plus": "DeepLabV3+"}
        rates = "/".join(str(r) for r in self.aspp_rates)
        frozen = ", frozen BN" if self.freeze_bn else ""
        return (f"{names.get(self.head, self.head)} {self.backbone} (ASPP {rates}, output stride {self.output_stride}"
                f"{frozen}; init: {self.init})")


def build_model(s: TrainSettings) -> DeepLab:
    model = DeepLab(s.backbone, s.num_classes, s.head, s.output_stride, s.aspp_rates, s.freeze_bn,
                    initial_weights(s.init, s.init_file, s.backbone))
    if model.pools_over_the_batch and s.batch_size < 2:
        # Image pooling normalises a 1x1 map over the batch: training BatchNorm needs 2 samples.
        raise ConfigError(f"deeplab.batch_size: must be >= 2 for recipe {s.recipe!r}, got {s.batch_size}")
    return model


@dataclass(frozen=True)
class RunSettings:
    """``deeplab`` values that do not change the weights: how often to save/log, where to run."""

    checkpoint_every: int
    log_every: int
    num_workers: int
    device: str

    @classmethod
    def from_params(cls, params: dict) -> RunSettings:
        cfg = params["deeplab"]
        return cls(int(cfg["checkpoint_every"]), int(cfg["log_every"]), int(cfg["num_workers"]),
                   str(cfg["device"]))


@dataclass(frozen=True)
class TrainImage:
    image_id: str
    image_path: str
    mask_path: str


# ---------------------------------------------------------------------------------------------
# Inputs


def train_images(manifest_path: str | Path, masks_dir: str | Path | Sequence[str | Path],
                 only: set[str] | None = None) -> list[TrainImage]:
    """Train-split images in manifest order with their pseudo-masks, looked up in ``masks_dir`` (one
    folder, or one per shard); a missing mask is an error. ``only``: the training set, when it is
    not the whole split (COMUS: images without a proposal or filtered out leave it)."""
    folders = [masks_dir] if isinstance(masks_dir, (str, Path)) else list(masks_dir)
    manifest = read_manifest(manifest_path)
    rows = manifest[manifest["split"] == TRAIN_SPLIT]
    if only is not None:
        rows = rows[rows["image_id"].isin(only)]
    if rows.empty:
        raise BadInputError(f"{manifest_path}: no images in split {TRAIN_SPLIT!r} to train DeepLab on")
    images = [
        TrainImage(image_id, image_path,
                   str(mask_in_folders(folders, image_id) or Path(folders[0]) / f"{image_id}.png"))
        for image_id, image_path in zip(rows["image_id"], rows["image_path"])
    ]
    missing = [image for image in images if not Path(image.mask_path).is_file()]
    if missing:
        first = missing[0]
        raise BadInputError(
            f"image {first.image_id!r}: pseudo-mask {first.mask_path} not found "
            f"({len(missing)} of {len(images)} train images lack one)"
        )
    return images


# Domain tags keep the epoch-order and augmentation generators apart (same seed, same number).
_ORDER_STREAM, _AUGMENT_STREAM = 0, 1


def epoch_permutation(seed: int, epoch: int, count: int) -> np.ndarray:
    return np.random.default_rng([seed, _ORDER_STREAM, epoch]).permutation(count)


def augment_rng(seed: int, sample: int) -> np.random.Generator:
    return np.random.default_rng([seed, _AUGMENT_STREAM, sample])


def sample_image_index(seed: int, sample: int, count: int) -> int:
    """Which image the ``sample``-th training sample shows: epochs are seeded permutations."""
    return int(epoch_permutation(seed, sample // count, count)[sample % count])


def augment(
    image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, crop: int,
    scale_range: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray]:
    """Random scale, horizontal flip, pad (image 0, mask 255) and random crop to crop x crop.

    ``image`` is normalised float32 H x W x 3, so padding with 0 is padding with the mean colour."""
    scale = rng.uniform(*scale_range)
    height, width = mask.shape
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    pad_h, pad_w = max(crop - mask.shape[0], 0), max(crop - mask.shape[1], 0)
    image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), constant_values=0.0)
    mask = np.pad(mask, ((0, pad_h), (0, pad_w)), constant_values=IGNORE_INDEX)
    top = int(rng.integers(0, mask.shape[0] - crop + 1))
    left = int(rng.integers(0, mask.shape[1] - crop + 1))
    return (np.ascontiguousarray(image[top : top + crop, left : left + crop]),
            np.ascontiguousarray(mask[top : top + crop, left : left + crop]))


def normalise(rgb: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    return (rgb.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def load_pair(image: TrainImage, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Image and pseudo-mask, checked: same size, labels in 0..num_classes-1 or 255."""
    rgb, mask = load_rgb(image.image_path), load_mask(image.mask_path)
    if mask.shape != rgb.shape[:2]:
        raise BadInputError(
            f"{image.mask_path}: pseudo-mask is {mask.shape[1]}x{mask.shape[0]} but image "
            f"{image.image_id!r} is {rgb.shape[1]}x{rgb.shape[0]}"
        )
    # Checked here because cross-entropy on a stray label fails cryptically (a CUDA assert).
    stray = np.setdiff1d(np.unique(mask), [*range(num_classes), IGNORE_INDEX])
    if stray.size:
        raise BadInputError(
            f"{image.mask_path}: pseudo-mask values {stray.tolist()} outside the classes "
            f"0..{num_classes - 1} (255 = ignore)"
        )
    return rgb, mask


class PseudoMaskSamples(Dataset):
    """Item k = the k-th training sample of the run (see the module docstring).

    Items are (image 3 x crop x crop, labels crop x crop, error). A bad file gives an error
    message instead of raising: DataLoader workers re-raise exceptions as tracebacks in a
    RuntimeError, and the main process should stop with the one-line BadInputError instead."""

    def __init__(self, images: list[TrainImage], settings: TrainSettings,
                 mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.images, self.settings, self.mean, self.std = images, settings, mean, std

    def __len__(self) -> int:
        return self.settings.iterations * self.settings.batch_size

    def __getitem__(self, sample: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        s = self.settings
        try:
            image = self.images[sample_image_index(s.seed, sample, len(self.images))]
            rgb, mask = load_pair(image, s.num_classes)
        except BadInputError as exc:
            crop = s.crop_size
            return torch.zeros(3, crop, crop), torch.full((crop, crop), IGNORE_INDEX), str(exc)
        image, labels = augment(normalise(rgb, self.mean, self.std), mask,
                                augment_rng(s.seed, sample), s.crop_size, s.scale_range)
        return torch.from_numpy(image).permute(2, 0, 1).contiguous(), torch.from_numpy(labels).long(), ""


# ---------------------------------------------------------------------------------------------
# Optimisation


def poly_lr(base_lr: float, iteration: int, iterations: int, power: float) -> float:
    return base_lr * (1.0 - iteration / iterations) ** power


def parameter_groups(model: DeepLab, head_lr_multiplier: float, weight_decay: float) -> list[dict]:
    """Trainable parameters in up to four groups: (backbone x1 | head x head_lr_multiplier) x
    (decayed weights | normalisation parameters and biases, without weight decay)."""
    head = {id(p) for p in model.head.parameters()}
    no_decay = {id(p) for m in model.modules() if is_norm(m) for p in m.parameters(recurse=False)}
    no_decay |= {id(p) for name, p in model.named_parameters() if name.endswith(".bias")}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = []
    for in_head, multiplier in ((False, 1.0), (True, head_lr_multiplier)):
        for decayed in (True, False):
            params = [p for p in trainable if (id(p) in head) == in_head and (id(p) not in no_decay) == decayed]
            if params:
                groups.append({"params": params, "lr_multiplier": multiplier,
                               "weight_decay": weight_decay if decayed else 0.0})
    return groups


def make_optimizer(model: DeepLab, s: TrainSettings) -> torch.optim.Optimizer:
    """SGD (momentum) or Adam (PyTorch defaults, COMUS Table 11) over :func:`parameter_groups`."""
    groups = parameter_groups(model, s.head_lr_multiplier, s.weight_decay)
    if s.optimizer == "adam":
        return torch.optim.Adam(groups, lr=s.lr)
    return torch.optim.SGD(groups, lr=s.lr, momentum=s.momentum)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_multiplier"]


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over non-ignored pixels; 0 (not NaN) for a batch that is all ignore."""
    total = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (target != IGNORE_INDEX).sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def settings_fingerprint(settings: TrainSettings, images: list[TrainImage]) -> str:
    """What a checkpoint must match to be resumed: the recipe, the training images and their
    pseudo-masks' bytes (new CRF masks must not resume a model trained on the old ones)."""
    masks = hashlib.sha256()
    for image in images:
        masks.update(image.image_id.encode() + b"\0" + Path(image.mask_path).read_bytes())
    record = {"settings": asdict(settings), "images": [i.image_id for i in images], "masks": masks.hexdigest()}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


@dataclass
class Progress:
    """Where training stands; all of it goes into the checkpoint."""

    iteration: int = 0
    history: list[dict] = field(default_factory=list)
    window: list[float] = field(default_factory=list)  # losses since the last logged iteration

    def record(self, loss: float, lr: float, log_every: int, iterations: int) -> dict | None:
        """Count one iteration's loss; return the history row when this iteration is logged."""
        self.window.append(loss)
        self.iteration += 1
        if self.iteration % log_every and self.iteration != iterations:
            return None
        row = {"iteration": self.iteration, "loss": float(np.mean(self.window)), "lr": lr}
        self.history.append(row)
        self.window.clear()
        return row


def checkpoint_payload(model: nn.Module, optimizer: torch.optim.Optimizer, progress: Progress,
                       fingerprint: str) -> dict:
    return {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng_state(),
        "iteration": progress.iteration, "history": progress.history, "window": progress.window,
        "fingerprint": fingerprint,
    }


def resume(path: Path, fingerprint: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> Progress:
    """Restore the checkpoint at ``path`` into model, optimiser and RNGs, if there is a usable one."""
    if not path.is_file():
        return Progress()
    state = load_checkpoint(path)
    if state.get("fingerprint") != fingerprint:
        log.warning("%s was written with other DeepLab settings or images; starting over", path)
        return Progress()
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    log.info("resuming DeepLab training from %s at iteration %d", path, state["iteration"])
    return Progress(int(state["iteration"]), list(state["history"]), list(state["window"]))


def write_history(path: Path, history: list[dict]) -> None:
    with atomic_path(path) as tmp:
        pd.DataFrame(history, columns=HISTORY_COLUMNS).to_csv(tmp, index=False)


# ---------------------------------------------------------------------------------------------
# The training loop


def make_loader(dataset: PseudoMaskSamples, start: int, s: TrainSettings, workers: int,
                pin: bool) -> DataLoader:
    samples = range(start * s.batch_size, len(dataset))
    # Own generator: creating the loader must not draw from the global torch RNG (dropout's).
    return DataLoader(dataset, batch_size=s.batch_size, sampler=samples, num_workers=workers,
                      pin_memory=pin, generator=torch.Generator().manual_seed(s.seed))


def train_deeplab(
    manifest_path: str | Path, masks_dir: str | Path, out_dir: str | Path, params: dict, threads: int,
    only: set[str] | None = None,
) -> None:
    """Train on ``masks_dir/{image_id}.png`` of the train split (of its images in ``only`` when
    given); write ``out_dir/model.pt``."""
    settings, run = TrainSettings.from_params(params), RunSettings.from_params(params)
    out_dir = Path(out_dir)
    torch.set_num_threads(max(1, threads))
    images = train_images(manifest_path, masks_dir, only)
    settings = settings.for_images(len(images))
    device = resolve_deeplab_device(run.device)

    torch.manual_seed(settings.seed)
    model = build_model(settings).to(device)
    optimizer = make_optimizer(model, settings)
    fingerprint = settings_fingerprint(settings, images)
    progress = resume(out_dir / CHECKPOINT_NAME, fingerprint, model, optimizer)

    mean, std = model.normalisation
    loader = make_loader(PseudoMaskSamples(images, settings, mean, std), progress.iteration,
                         settings, run.num_workers, device.type == "cuda")
    log.info("training %s, recipe %s, %d classes, on %d images, iterations %d..%d, device %s",
             settings.network(), settings.recipe, settings.num_classes, len(images), progress.iteration,
             settings.iterations, device)
    run_iterations(model, optimizer, loader, progress, settings, run, out_dir, fingerprint)

    write_history(out_dir / "history.csv", progress.history)
    model_path = out_dir / "model.pt"
    save_checkpoint(model_path, trained_payload(model.cpu()))
    final_loss = progress.history[-1]["loss"] if progress.history else None
    # `recipe` and `network` say which DeepLab verification ran (the report shows them).
    # `masks`: the folders it learnt from (COMUS round r > 1: round r-1's predictions)
    folders = [masks_dir] if isinstance(masks_dir, (str, Path)) else list(masks_dir)
    write_json(out_dir / "done.json", {"recipe": settings.recipe, "network": settings.network(),
                                       "masks": [str(folder) for folder in folders],
                                       "iterations": settings.iterations, "images": len(images),
                                       "final_loss": final_loss, "settings": asdict(settings)})
    log.info("DeepLab model written to %s", model_path)


def run_iterations(
    model: DeepLab, optimizer: torch.optim.Optimizer, loader: DataLoader, progress: Progress,
    settings: TrainSettings, run: RunSettings, out_dir: Path, fingerprint: str,
) -> None:
    """Train from ``progress.iteration`` to the end, checkpointing on the way."""
    device = next(model.parameters()).device
    checkpoint_path = out_dir / CHECKPOINT_NAME
    model.train()
    bar = tqdm(total=settings.iterations, initial=progress.iteration, desc="deeplab", unit="it",
               mininterval=0.5 if sys.stderr.isatty() else 30)
    for batch, target, errors in loader:
        bad = [error for error in errors if error]
        if bad:
            raise BadInputError(bad[0])
        lr = poly_lr(settings.lr, progress.iteration, settings.iterations, settings.poly_power)
        loss = train_step(model, optimizer, batch.to(device), target.to(device), lr)
        if not math.isfinite(loss):
            raise PipelineError(
                f"DeepLab training diverged: loss {loss} at iteration {progress.iteration + 1} "
                f"(lr {lr:.3g}); the last good checkpoint {checkpoint_path} is kept (lower deeplab.lr?)"
            )
        row = progress.record(loss, lr, run.log_every, settings.iterations)
        if row is not None:
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}")
            log.info("iteration %d: loss %.4f, lr %.3g", row["iteration"], row["loss"], lr)
        if progress.iteration % run.checkpoint_every == 0 or progress.iteration == settings.iterations:
            save_checkpoint(checkpoint_path, checkpoint_payload(model, optimizer, progress, fingerprint))
            write_history(out_dir / "history.csv", progress.history)
        bar.update(1)
    bar.close()


def train_step(model: DeepLab, optimizer: torch.optim.Optimizer, batch: torch.Tensor,
               target: torch.Tensor, lr: float) -> float:
    set_lr(optimizer, lr)
    with torch.autocast(device_type=batch.device.type, dtype=torch.bfloat16,
                        enabled=batch.device.type == "cuda"):
        logits = model(batch)
    loss = masked_cross_entropy(logits, target)
    value = loss.item()
    if math.isfinite(value):  # a NaN step must not reach the weights: the caller stops the run
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return value


def resolve_deeplab_device(name: str) -> torch.device:
    try:
        return resolve_device(name)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("features.device", "deeplab.device")) from None
