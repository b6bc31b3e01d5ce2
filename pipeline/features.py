"""Feature extraction: one safetensors file of ViT features per shard of the manifest.

Geometry. Each image is resized so that its longer side is at most ``features.max_size`` (never
upscaled, aspect kept, sides rounded), then both sides are made multiples of the patch size by
cropping (``fit: crop``, bottom/right, so the top-left corner stays aligned) or by padding
(``fit: pad``, bottom/right, zeros after normalisation). A side shorter than one patch is always
padded to one patch. All of this follows from the manifest's width/height, so images of the same
target size are batched together without decoding anything first.

Shard file format (``FORMAT_VERSION``), tensors per image ``<id>``:

- ``<id>/keys``     float16 N x D: last-block attention keys, heads concatenated, N = gh * gw
                    patches in row-major order over the grid (only if ``keys`` is kept);
- ``<id>/cls``      float16 D: final CLS token after the last norm (only if ``cls`` is kept);
- ``<id>/tokens``   float16 N x D: final patch tokens after the last norm (only if ``tokens``);
- ``<id>/grid``     int32 [gh, gw];
- ``<id>/geometry`` float32 [scale, resized_h, resized_w, final_h, final_w] (``GEOMETRY_FIELDS``):
                    the image was resized by ``scale`` (sides rounded) to resized_h x resized_w,
                    then cropped/padded at the bottom/right to final_h x final_w = gh*p x gw*p.

Metadata values are JSON strings (see ``shard_metadata``); ``image_ids`` lists the images in
manifest order. Files are byte-identical for identical inputs on the same machine and software.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from safetensors import safe_open
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline import shards
from pipeline.backbone import (
    build_backbone,
    embed_dim,
    extract_features,
    normalisation,
    num_prefix_tokens,
    patch_size,
)
from pipeline.errors import BadInputError, ConfigError
from pipeline.imageio import load_rgb_resized

log = logging.getLogger(__name__)

FORMAT_VERSION = "pc2m-features/1"
KEEP_CHOICES = ("keys", "cls", "tokens")
FIT_CHOICES = ("crop", "pad")
GEOMETRY_FIELDS = ("scale", "resized_h", "resized_w", "final_h", "final_w")

# One resampling filter everywhere: Pillow's bicubic filter widens with the reduction factor,
# i.e. it antialiases when downscaling (and images are never upscaled).
_RESAMPLE = Image.Resampling.BICUBIC


# ---------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class FeatureSettings:
    max_size: int
    fit: str
    keep: tuple[str, ...]
    batch_size: int
    num_workers: int
    device: str

    @classmethod
    def from_params(cls, features: dict) -> FeatureSettings:
        """Check the ``features`` config section (values the JSON schema may not have seen)."""
        keep = tuple(features["keep"])
        unknown = [k for k in keep if k not in KEEP_CHOICES]
        if unknown or not keep:
            raise ConfigError(
                f"features.keep: {list(keep)} must be a non-empty list of {', '.join(KEEP_CHOICES)}"
                + (f" (unknown: {', '.join(map(str, unknown))})" if unknown else "")
            )
        if len(set(keep)) != len(keep):
            raise ConfigError(f"features.keep: {list(keep)} lists an entry twice")
        if features["fit"] not in FIT_CHOICES:
            raise ConfigError(f"features.fit: {features['fit']!r} is not one of {', '.join(FIT_CHOICES)}")
        for key, minimum in (("max_size", 1), ("batch_size", 1), ("num_workers", 0)):
            value = features[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ConfigError(f"features.{key}: {value!r} must be an integer >= {minimum}")
        return cls(
            max_size=features["max_size"],
            fit=features["fit"],
            keep=keep,
            batch_size=features["batch_size"],
            num_workers=features["num_workers"],
            device=str(features["device"]),
        )


def resolve_device(name: str) -> torch.device:
    """``auto`` is a GPU that no other process has claimed (:mod:`pipeline.devices`) when CUDA is
    available, else the CPU; an explicit CUDA request must be met."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        from pipeline.devices import process_gpu

        index = process_gpu(torch.cuda.device_count())
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"features.device: {name!r} is not auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"features.device: {name!r} requested but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"features.device: {name!r} but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif device.type != "cpu":
        raise ConfigError(f"features.device: {name!r} is not auto, cpu, cuda or cuda:N")
    return device


# ---------------------------------------------------------------------------------------------
# Geometry (pure)


@dataclass(frozen=True)
class Geometry:
    """How one image of the manifest becomes the backbone's input; sizes are (height, width)."""

    scale: float
    resized: tuple[int, int]
    final: tuple[int, int]
    grid: tuple[int, int]

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([self.scale, *self.resized, *self.final], dtype=torch.float32)


def resized_size(height: int, width: int, max_size: int) -> tuple[float, tuple[int, int]]:
    """(scale, (h, w)) with the longer side at most ``max_size``; never upscaled."""
    scale = min(1.0, max_size / max(height, width))
    return scale, (max(1, round(height * scale)), max(1, round(width * scale)))


def fit_side(length: int, patch: int, fit: str) -> int:
    """``length`` made a multiple of ``patch``; shorter than one patch is always padded."""
    if length < patch or fit == "pad":
        return math.ceil(length / patch) * patch
    return length // patch * patch


def image_geometry(height: int, width: int, max_size: int, patch: int, fit: str) -> Geometry:
    scale, (rh, rw) = resized_size(height, width, max_size)
    fh, fw = fit_side(rh, patch, fit), fit_side(rw, patch, fit)
    return Geometry(scale=scale, resized=(rh, rw), final=(fh, fw), grid=(fh // patch, fw // patch))


def batches_by_size(sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Indices grouped by equal size (groups in order of first appearance), chunked to batches."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, size in enumerate(sizes):
        groups.setdefault(tuple(size), []).append(index)
    return [
        members[start : start + batch_size]
        for members in groups.values()
        for start in range(0, len(members), batch_size)
    ]


# ---------------------------------------------------------------------------------------------
# Images


def prepare_image(
    rgb: np.ndarray, geometry: Geometry, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """uint8 H x W x 3 -> normalised float32 3 x final_h x final_w (resized, then crop/pad)."""
    rh, rw = geometry.resized
    if rgb.shape[:2] != (rh, rw):
        rgb = np.asarray(Image.fromarray(rgb).resize((rw, rh), _RESAMPLE))
    image = torch.from_numpy(rgb.astype(np.float32)).permute(2, 0, 1).div_(255.0)
    image = (image - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    fh, fw = geometry.final
    out = torch.zeros(3, fh, fw, dtype=torch.float32)
    h, w = min(rh, fh), min(rw, fw)
    out[:, :h, :w] = image[:, :h, :w]
    return out


@dataclass
class Sample:
    index: int
    image: torch.Tensor | None
    error: str | None


class ShardImages(Dataset):
    """Decoded, resized, normalised images. A decode failure travels as ``Sample.error`` so the
    main process can raise it with its original message (DataLoader workers would wrap it)."""

    def __init__(
        self,
        paths: Sequence[str],
        sizes: Sequence[tuple[int, int]],
        geometries: Sequence[Geometry],
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        self.paths = list(paths)
        self.sizes = list(sizes)
        self.geometries = list(geometries)
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Sample:
        path = self.paths[index]
        try:
            # Resized while still a Pillow image: a huge file is never held as three copies.
            rgb, decoded = load_rgb_resized(path, self.geometries[index].resized, _RESAMPLE)
        except BadInputError as exc:
            return Sample(index, None, str(exc))
        if decoded != self.sizes[index]:
            # The batches were planned from the manifest's size: a changed file would break them.
            h, w = self.sizes[index]
            return Sample(
                index, None,
                f"{path}: decoded size {decoded[1]}x{decoded[0]} differs from the manifest's "
                f"{w}x{h} (file changed since indexing? re-run the index stage)",
            )
        return Sample(index, prepare_image(rgb, self.geometries[index], self.mean, self.std), None)


def collate_samples(samples: list[Sample]) -> tuple[list[int], torch.Tensor | None, str | None]:
    errors = [s.error for s in samples if s.error is not None]
    if errors:
        return [s.index for s in samples], None, errors[0]
    return [s.index for s in samples], torch.stack([s.image for s in samples]), None


def make_loader(
    dataset: ShardImages, batches: list[list[int]], num_workers: int, pin_memory: bool
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=min(num_workers, len(batches)),
        collate_fn=collate_samples,
        pin_memory=pin_memory,
    )


# ---------------------------------------------------------------------------------------------
# The stage


def shard_rows(manifest_path: Path, shard: int) -> pd.DataFrame:
    """The manifest rows of ``shard``, in manifest order."""
    from pipeline.datasets import read_manifest

    manifest = read_manifest(manifest_path)
    rows = manifest[manifest["shard"] == int(shard)].reset_index(drop=True)
    if rows.empty:
        raise BadInputError(f"{manifest_path}: no image belongs to shard {shard}")
    duplicated = rows["image_id"][rows["image_id"].duplicated()].tolist()
    if duplicated:
        raise BadInputError(f"{manifest_path}: duplicate image ids in shard {shard}: {duplicated[:5]}")
    bad_size = rows[(rows["width"] < 1) | (rows["height"] < 1)]
    if not bad_size.empty:
        first = bad_size["image_id"].iloc[0]
        raise BadInputError(f"{manifest_path}: image {first!r} has no valid width/height")
    return rows


def extract_shard(
    manifest_path: Path, shard: int, out_path: Path, params: dict, threads: int
) -> None:
    """Write the features of the manifest's ``shard`` to ``out_path`` (one safetensors file)."""
    settings = FeatureSettings.from_params(params["features"])
    backbone = params["backbone"]
    torch.set_num_threads(max(1, int(threads)))
    device = resolve_device(settings.device)
    rows = shard_rows(Path(manifest_path), shard)
    # Random weights are drawn from this seed, so `weights: random` is reproducible too.
    torch.manual_seed(int(params["seed"]))
    model = build_backbone(
        backbone["name"],
        backbone["weights"],
        checkpoint_key=backbone.get("checkpoint_key", "teacher"),
        model_kwargs=backbone.get("model_kwargs") or {},
    ).to(device)
    patch = patch_size(model)
    geometries = [
        image_geometry(int(h), int(w), settings.max_size, patch, settings.fit)
        for h, w in zip(rows["height"], rows["width"])
    ]
    log.info(
        "shard %s: %d images, %s (%s) on %s, keep %s",
        shard, len(rows), backbone["name"], backbone["weights"], device, ",".join(settings.keep),
    )
    per_image = compute_features(model, rows, geometries, settings, device, desc=f"shard {shard}")
    tensors = shard_tensors(list(rows["image_id"]), per_image, geometries)
    metadata = shard_metadata(model, params, settings, list(rows["image_id"]), shard)
    shards.write_shard(Path(out_path), tensors, metadata)
    log.info("wrote %s (%d tensors)", out_path, len(tensors))


def compute_features(
    model: torch.nn.Module,
    rows: pd.DataFrame,
    geometries: list[Geometry],
    settings: FeatureSettings,
    device: torch.device,
    desc: str = "features",
) -> list[dict[str, torch.Tensor]]:
    """Per image (in ``rows`` order): the kept features as float16 CPU tensors."""
    mean, std = normalisation(model)
    sizes = [(int(h), int(w)) for h, w in zip(rows["height"], rows["width"])]
    dataset = ShardImages(list(rows["image_path"]), sizes, geometries, mean, std)
    batches = batches_by_size([g.final for g in geometries], settings.batch_size)
    loader = make_loader(dataset, batches, settings.num_workers, pin_memory=device.type == "cuda")
    results: list[dict[str, torch.Tensor] | None] = [None] * len(dataset)
    wants = {name: name in settings.keep for name in KEEP_CHOICES}
    # Unattended runs (cluster logs) get a line every 30 s instead of a redrawn bar.
    progress = tqdm(total=len(dataset), desc=desc, unit="img", mininterval=0.5 if sys.stderr.isatty() else 30)
    with progress:
        for indices, images, error in loader:
            if error is not None:
                raise BadInputError(error)
            images = images.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = extract_features(model, images, **wants)
            for row, index in enumerate(indices):
                # clone(): a row of a batch is a view, and safetensors refuses shared storage.
                results[index] = {
                    name: getattr(out, name)[row].to("cpu", torch.float16).clone()
                    for name in settings.keep
                }
            progress.update(len(indices))
    return results


def shard_tensors(
    image_ids: list[str], per_image: list[dict[str, torch.Tensor]], geometries: list[Geometry]
) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for image_id, features, geometry in zip(image_ids, per_image, geometries):
        for name, value in features.items():
            tensors[f"{image_id}/{name}"] = value
        tensors[f"{image_id}/grid"] = torch.tensor(geometry.grid, dtype=torch.int32)
        tensors[f"{image_id}/geometry"] = geometry.as_tensor()
    return tensors


def shard_metadata(
    model: torch.nn.Module, params: dict, settings: FeatureSettings, image_ids: list[str], shard: int
) -> dict:
    """Everything a later stage needs to interpret the shard (stored JSON-encoded)."""
    import timm

    backbone = params["backbone"]
    mean, std = normalisation(model)
    meta = {
        "format": FORMAT_VERSION,
        "backbone": backbone["name"],
        "weights": str(backbone["weights"]),
        "checkpoint_key": backbone.get("checkpoint_key", "teacher"),
        "model_kwargs": backbone.get("model_kwargs") or {},
        "patch_size": patch_size(model),
        "embed_dim": embed_dim(model),
        "num_prefix_tokens": num_prefix_tokens(model),
        "mean": list(mean),
        "std": list(std),
        "keep": list(settings.keep),
        "max_size": settings.max_size,
        "fit": settings.fit,
        "geometry_fields": list(GEOMETRY_FIELDS),
        "shard": int(shard),
        "image_ids": image_ids,
        "seed": int(params["seed"]),
        "torch": torch.__version__,
        "timm": timm.__version__,
    }
    return meta


# ---------------------------------------------------------------------------------------------
# Shard files


def read_shard_meta(path: str | Path) -> dict:
    """The shard's metadata with JSON values decoded (``image_ids`` in manifest order)."""
    path = _existing_shard(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return _decode_meta(fh.metadata(), path)
    except shards.SHARD_ERRORS as exc:
        raise BadInputError(f"{path}: unreadable shard ({exc})") from None


def read_shard(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """All of a shard in memory: ``{image_id: {"keys"|"cls"|"tokens"|"grid"|"geometry": tensor}}``."""
    with ShardReader(path) as reader:
        return {image_id: reader[image_id] for image_id in reader.image_ids}


class ShardReader:
    """Lazy per-image access to a shard; tensors are read from disk only when asked for."""

    def __init__(self, path: str | Path) -> None:
        self.path = _existing_shard(path)
        try:
            self._file = safe_open(str(self.path), framework="pt", device="cpu")
        except shards.SHARD_ERRORS as exc:
            raise BadInputError(f"{self.path}: unreadable shard ({exc})") from None
        self.meta = _decode_meta(self._file.metadata(), self.path)
        self.image_ids: list[str] = list(self.meta["image_ids"])
        self._names = set(self._file.keys())

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._file = None

    def __len__(self) -> int:
        return len(self.image_ids)

    def __iter__(self) -> Iterator[str]:
        return iter(self.image_ids)

    def __contains__(self, image_id: object) -> bool:
        return f"{image_id}/grid" in self._names

    def get(self, image_id: str, name: str) -> torch.Tensor:
        key = f"{image_id}/{name}"
        if key not in self._names:
            raise KeyError(f"{self.path}: no tensor {key!r} (kept: {self.meta['keep']})")
        return self._file.get_tensor(key)

    def __getitem__(self, image_id: str) -> dict[str, torch.Tensor]:
        names = [*self.meta["keep"], "grid", "geometry"]
        return {name: self.get(image_id, name) for name in names}


def _existing_shard(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: feature shard not found")
    return path


def _decode_meta(raw: dict[str, str] | None, path: str | Path) -> dict:
    meta = {key: json.loads(value) for key, value in (raw or {}).items()}
    if meta.get("format") != FORMAT_VERSION:
        raise BadInputError(
            f"{path}: not a feature shard of format {FORMAT_VERSION} (found {meta.get('format')!r})"
        )
    return meta
