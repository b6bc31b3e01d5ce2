"""Training images of every method: labels per image (weak: GT image labels; unsupervised: the
clustering pseudo-labels), and per-sample augmentation seeded by
(seed, epoch, image index) so that the views do not depend on workers, processes or on where a
run was resumed."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from pipeline.datasets import parse_labels, read_classes, read_manifest
from pipeline.errors import BadInputError, ConfigError
from pipeline.imageio import load_rgb

log = logging.getLogger(__name__)

TRAIN_SPLIT = "train"


@dataclass(frozen=True)
class LabelledImage:
    image_id: str
    image_path: str
    labels: tuple[int, ...]


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (SplitMix-style mixing; Python's hash() is salted per process)."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 31
    return value & 0x7FFFFFFFFFFFFFFF


def weak_training_images(manifest_path: Path) -> list[LabelledImage]:
    """Train-split images with their GT image-level labels (weak supervision, Sec. 3.1)."""
    manifest = read_manifest(manifest_path)
    train = manifest[manifest["split"] == TRAIN_SPLIT]
    unlabelled = train[~train["has_labels"]]
    if len(unlabelled):
        log.warning("%d train images have no labels and are not used for training (e.g. %s)",
                    len(unlabelled), unlabelled["image_id"].iloc[0])
    labelled = train[train["has_labels"]]
    return [LabelledImage(r.image_id, r.image_path, tuple(parse_labels(r.labels))) for r in labelled.itertuples()]


def unsupervised_training_images(manifest_path: Path, labels_path: Path) -> list[LabelledImage]:
    """Train-split images with their clustering pseudo-labels (Sec. 3.3); GT is never read."""
    manifest = read_manifest(manifest_path)
    train = manifest[manifest["split"] == TRAIN_SPLIT]
    if not Path(labels_path).is_file():
        raise BadInputError(f"{labels_path}: pseudo-label file not found")
    pseudo = pd.read_csv(labels_path, dtype={"image_id": str, "labels": str, "has_labels": bool},
                         keep_default_na=False, na_filter=False)
    missing = sorted(set(train["image_id"]) - set(pseudo["image_id"]))
    if missing:
        raise BadInputError(f"{labels_path}: no pseudo-labels for {len(missing)} train images (e.g. {missing[0]})")
    by_id = pseudo.set_index("image_id")
    images = []
    for row in train.itertuples():
        entry = by_id.loc[row.image_id]
        if bool(entry["has_labels"]):
            images.append(LabelledImage(row.image_id, row.image_path, tuple(parse_labels(entry["labels"]))))
    if len(images) < len(train):
        log.warning("%d train images have no pseudo-labels and are not used", len(train) - len(images))
    return images


def check_label_range(images: Sequence[LabelledImage], num_classes: int, source: str) -> None:
    for image in images:
        bad = [c for c in image.labels if not 1 <= c < num_classes]
        if bad:
            raise BadInputError(f"{source}: image {image.image_id} has labels {bad} outside 1..{num_classes - 1}")


def source_pixels(path: str, size: int) -> torch.Tensor:
    """The image as 3 x size x size uint8: ViT-PCM resizes to a square (aspect not kept)."""
    rgb = load_rgb(path)
    if rgb.shape[:2] != (size, size):
        rgb = np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.BICUBIC))
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)


def source_image(path: str, size: int) -> torch.Tensor:
    """``source_pixels`` as floats in [0, 1]."""
    return to_unit_range(source_pixels(path, size))


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [0, 1] (the same numbers on the CPU and on a GPU)."""
    return pixels.float().div_(255.0)


class AugmentedViewDataset(Dataset):
    """Labelled training images whose random views come from a generator seeded by
    (seed, epoch, index), so an epoch's augmentations are the same however it is resumed; the
    trainer sets ``epoch`` before each epoch. Subclasses render the views of one item."""

    def __init__(self, images: Sequence[LabelledImage], num_classes: int, views,
                 mean: Sequence[float], std: Sequence[float], seed: int, render_in_worker: bool = True) -> None:
        self.images = list(images)
        # False: items carry the decoded source (uint8) and the random draws, and the method
        # renders, jitters and normalises the batch on the training device (train.views_on).
        self.render_in_worker = render_in_worker
        self.num_classes = num_classes
        self.views = views
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.images)


# Where the training views are rendered and colour-jittered (train.views_on): in the DataLoader's
# workers, or on the training device from the decoded sources; auto = device on a GPU.
VIEWS_ON = ("auto", "workers", "device")


def views_on_device(views_on: str, device: torch.device) -> bool:
    if views_on not in VIEWS_ON:
        raise ConfigError(f"train.views_on: {views_on!r} is not one of {', '.join(VIEWS_ON)}")
    return views_on == "device" or (views_on == "auto" and device.type == "cuda")


def epoch_batches(num_images: int, batch_size: int, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    """This process's share of each global batch of the epoch's permutation (last partial batch
    dropped). Global batch k is the same set of images whatever the number of processes, which
    makes a data-parallel run equal the single-process run on the same global batch."""
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(derived_seed(seed, epoch))).tolist()
    per_process = batch_size // world
    return [
        order[start + rank * per_process : start + (rank + 1) * per_process]
        for start in range(0, num_images - batch_size + 1, batch_size)
    ]


def multi_hot(labels: list[int], num_classes: int) -> torch.Tensor:
    """Multi-hot target of an image's foreground labels, background included."""
    target = torch.zeros(num_classes, dtype=torch.float32)
    target[0] = 1.0
    target[list(labels)] = 1.0
    return target


MODES = ("weak", "unsupervised")


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
