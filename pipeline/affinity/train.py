"""Train AffinityNet on the confident regions of the train split's class-probability maps.

Recipe of AffinityNet's public code (jiwoon-ahn/psa, README and ``train_aff.py``): 8 epochs of
batches of 8 random 256 x 256 crops (padded with ignored labels where the image is smaller),
horizontal flip and colour jitter (brightness, contrast, saturation 0.3, hue 0.1); SGD at lr 0.07
with weight decay 5e-4, the new layers at 10x, poly decay with power 0.9. Its optimiser hands the
weight decay to ``torch.optim.SGD`` as the positional *momentum* argument, so it runs with
momentum 5e-4, i.e. none: momentum is a key here and 0 by default (docs/FIDELITY.md).

Labels (:mod:`pipeline.affinity.labels`): each train image's probabilities are brought to the
image (``pipeline.geometry.grid_to_image``), turned into a confident label map at the two
background strengths, cropped with the image, pooled to the stride-8 grid and turned into pair
labels within the radius.

The sample stream is a pure function of (seed, sample number), shared with DeepLab's trainer
(``pipeline.deeplab.train``): sample k shows image ``permutation(seed, k // n)[k % n]`` augmented
with a generator seeded by (seed, k). Files in ``out_dir``: ``history.csv`` (mean losses per
epoch), ``model.pt``, then ``done.json``.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline import shards
from pipeline.affinity.labels import IGNORE, affinity_labels, confident_labels, neighbour_offsets, pool_labels
from pipeline.affinity.loss import affinity_loss
from pipeline.affinity.model import STRIDE, AffinityNet, pair_affinities, trained_payload
from pipeline.atomic import write_csv, write_json
from pipeline.checkpoint import save_checkpoint
from pipeline.config import require_fields
from pipeline.datasets import read_manifest
from pipeline.deeplab.train import augment_rng, normalise, poly_lr, sample_image_index
from pipeline.devices import resolve_device
from pipeline.errors import BadInputError, ConfigError, PipelineError
from pipeline.geometry import grid_to_image
from pipeline.imageio import load_rgb

log = logging.getLogger(__name__)

TRAIN_SPLIT = "train"
# Colour jitter of the public code (torchvision ColorJitter(0.3, 0.3, 0.3, 0.1)).
JITTER = {"brightness": 0.3, "contrast": 0.3, "saturation": 0.3, "hue": 0.1}


def section_fields(cls, section: dict, name: str = "affinity") -> dict:
    """The keys of config section ``name`` that the settings dataclass ``cls`` holds (others are
    the other stage's: training and walking read the same section)."""
    require_fields(cls, section, name)
    return {field: section[field] for field in cls.__dataclass_fields__}


@dataclass(frozen=True)
class TrainSettings:
    """The ``affinity`` keys that shape training (schema: workflow/schemas/config.schema.yaml)."""

    backbone: str
    backbone_weights: str
    radius: int
    alpha_fg: float
    alpha_bg: float
    epochs: int
    batch_size: int
    crop_size: int
    lr: float
    head_lr_multiplier: float
    momentum: float
    weight_decay: float
    poly_power: float
    num_workers: int
    device: str

    @classmethod
    def from_params(cls, section: dict) -> TrainSettings:
        settings = cls(**section_fields(cls, section))
        if settings.crop_size % STRIDE:
            raise ConfigError(f"affinity.crop_size must be a multiple of {STRIDE}, not {settings.crop_size}")
        if not settings.alpha_fg <= settings.alpha_bg:
            raise ConfigError("affinity.alpha_fg must not exceed affinity.alpha_bg (PSA: 4 and 32)")
        return settings


@dataclass(frozen=True)
class TrainImage:
    image_id: str
    image_path: str
    height: int
    width: int
    probs: torch.Tensor  # C x gh x gw float16, on the patch grid of the predicting stage
    geometry: torch.Tensor


def train_images(manifest_path: Path, probs_shards: Sequence[Path]) -> list[TrainImage]:
    """Train-split images of the manifest, in its order, with their probability maps."""
    manifest = read_manifest(manifest_path)
    rows = manifest[manifest["split"] == TRAIN_SPLIT]
    wanted = set(rows["image_id"])
    maps: dict[str, dict[str, torch.Tensor]] = {}
    for path in probs_shards:
        maps.update(shards.read_images(path, images=wanted, names={"probs", "geometry"}))
    if rows.empty:
        raise BadInputError(f"{manifest_path}: no train images to train AffinityNet on")
    missing = sorted(wanted - set(maps))
    if missing:
        raise BadInputError(f"image {missing[0]!r}: no probability map in the given shards "
                            f"({len(missing)} of {len(rows)} train images lack one)")
    # float16 as stored: VOC's 10,582 maps of 21 x 60 x 60 stay at 1.6 GB
    return [TrainImage(r.image_id, r.image_path, int(r.height), int(r.width), maps[r.image_id]["probs"].half(),
                       maps[r.image_id]["geometry"].float()) for r in rows.itertuples()]


def jitter(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Colour jitter in a random order with factors drawn from ``rng`` (not torch's global RNG)."""
    image = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)  # a writable copy
    ops = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
           "saturation": TF.adjust_saturation, "hue": TF.adjust_hue}
    for name in rng.permutation(list(ops)):
        spread = JITTER[name]
        factor = rng.uniform(-spread, spread) if name == "hue" else rng.uniform(1 - spread, 1 + spread)
        image = ops[name](image, float(factor))
    return image.permute(1, 2, 0).numpy()


def random_crop(rgb: np.ndarray, labels: np.ndarray, crop: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A crop x crop window (image padded with 0 = the mean after normalisation, labels with
    IGNORE where the image is smaller), flipped horizontally with probability 1/2."""
    pad_h, pad_w = max(crop - labels.shape[0], 0), max(crop - labels.shape[1], 0)
    rgb = np.pad(rgb, ((0, pad_h), (0, pad_w), (0, 0)))
    labels = np.pad(labels, ((0, pad_h), (0, pad_w)), constant_values=IGNORE)
    top = int(rng.integers(0, labels.shape[0] - crop + 1))
    left = int(rng.integers(0, labels.shape[1] - crop + 1))
    rgb, labels = rgb[top:top + crop, left:left + crop], labels[top:top + crop, left:left + crop]
    if rng.random() < 0.5:
        rgb, labels = rgb[:, ::-1], labels[:, ::-1]
    return np.ascontiguousarray(rgb), np.ascontiguousarray(labels)


class AffinitySamples(Dataset):
    """Item k: (image 3 x crop x crop, bg_pos, fg_pos, neg labels K x crop/8 x crop/8, error)."""

    def __init__(self, images: list[TrainImage], settings: TrainSettings, seed: int, length: int,
                 mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.images, self.settings, self.seed, self.length = images, settings, seed, length
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, sample: int):
        s = self.settings
        image = self.images[sample_image_index(self.seed, sample, len(self.images))]
        try:
            rgb = load_rgb(image.image_path)
            if rgb.shape[:2] != (image.height, image.width):
                raise BadInputError(f"{image.image_path}: image is {rgb.shape[1]}x{rgb.shape[0]}, the manifest says "
                                    f"{image.width}x{image.height}")
        except BadInputError as exc:
            # placeholders of the right shapes (the batch is collated); the loop raises the error
            cells = s.crop_size // STRIDE
            pairs = torch.zeros(len(neighbour_offsets(s.radius)), cells, cells)
            return torch.zeros(3, s.crop_size, s.crop_size), pairs, pairs, pairs, str(exc)
        probs = grid_to_image(image.probs.float(), image.geometry, (image.height, image.width)).numpy()
        labels = confident_labels(probs, s.alpha_fg, s.alpha_bg)
        rng = augment_rng(self.seed, sample)
        rgb, labels = random_crop(jitter(rgb, rng), labels, s.crop_size, rng)
        pair_labels = affinity_labels(pool_labels(labels, STRIDE), s.radius)
        tensor = torch.from_numpy(normalise(rgb, self.mean, self.std)).permute(2, 0, 1).contiguous()
        return (tensor, *(torch.from_numpy(p) for p in pair_labels), "")


def make_optimizer(model: AffinityNet, s: TrainSettings) -> torch.optim.SGD:
    new = {id(p) for p in model.new_parameters()}
    backbone = [p for p in model.parameters() if p.requires_grad and id(p) not in new]
    groups = [{"params": backbone, "lr_multiplier": 1.0},
              {"params": model.new_parameters(), "lr_multiplier": s.head_lr_multiplier}]
    return torch.optim.SGD(groups, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)


def train_affinity(manifest_path: str | Path, probs_shards: Sequence[str | Path], out_dir: str | Path, params: dict,
                   threads: int) -> None:
    """Train on the train split's probability maps; write ``out_dir/model.pt`` and ``done.json``."""
    settings, seed = TrainSettings.from_params(params["affinity"]), int(params["seed"])
    out_dir = Path(out_dir)
    torch.set_num_threads(max(1, threads))
    images = train_images(Path(manifest_path), [Path(p) for p in probs_shards])
    device = resolve_device(settings.device)
    torch.manual_seed(seed)
    model = AffinityNet(settings.backbone, settings.backbone_weights).to(device).train()
    optimizer = make_optimizer(model, settings)
    # Batches run across epoch boundaries (as DeepLab's): every batch is full.
    iterations = max(1, len(images) // settings.batch_size) * settings.epochs
    samples = AffinitySamples(images, settings, seed, iterations * settings.batch_size, model.mean, model.std)
    loader = DataLoader(samples, batch_size=settings.batch_size, shuffle=False, num_workers=settings.num_workers,
                        pin_memory=device.type == "cuda")
    log.info("training AffinityNet (%s) on %d images: %d iterations of %d crops, device %s", settings.backbone,
             len(images), iterations, settings.batch_size, device)
    history = run_iterations(model, optimizer, loader, settings, iterations, device)
    write_csv(out_dir / "history.csv", pd.DataFrame(history))
    save_checkpoint(out_dir / "model.pt", trained_payload(model.cpu()))
    write_json(out_dir / "done.json", {"iterations": iterations, "images": len(images),
                                       "final_loss": history[-1]["loss"], "settings": asdict(settings), "seed": seed})


def run_iterations(model: AffinityNet, optimizer: torch.optim.Optimizer, loader: DataLoader,
                   settings: TrainSettings, iterations: int, device: torch.device) -> list[dict]:
    """The training loop; returns one history row (mean losses) per epoch."""
    per_epoch = max(1, iterations // settings.epochs)
    history, window = [], []
    for iteration, (batch, bg_pos, fg_pos, neg, errors) in enumerate(
            tqdm(loader, desc="affinity", unit="it", mininterval=0.5 if sys.stderr.isatty() else 30)):
        bad = [error for error in errors if error]
        if bad:
            raise BadInputError(bad[0])
        lr = poly_lr(settings.lr, iteration, iterations, settings.poly_power)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_multiplier"]
        affinity = pair_affinities(model(batch.to(device)), settings.radius)
        loss, parts = affinity_loss(affinity, bg_pos.to(device), fg_pos.to(device), neg.to(device))
        if not math.isfinite(loss.item()):
            raise PipelineError(f"AffinityNet training diverged: loss {loss.item()} at iteration {iteration + 1} "
                                f"(lr {lr:.3g}); lower affinity.lr?")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        window.append({"loss": loss.item(), **parts})
        if (iteration + 1) % per_epoch == 0 or iteration + 1 == iterations:
            row = {"iteration": iteration + 1, "lr": lr,
                   **{key: float(np.mean([w[key] for w in window])) for key in window[0]}}
            log.info("iteration %d: loss %.4f (bg %.4f, fg %.4f, neg %.4f)", row["iteration"], row["loss"],
                     row["bg_loss"], row["fg_loss"], row["neg_loss"])
            history.append(row)
            window.clear()
    return history
