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

import dataclasses
import functools
import io
import itertools
import json
import logging
import math
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

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
    key_dim,
    normalisation,
    num_prefix_tokens,
    patch_size,
)
from pipeline.background import background_writes
from pipeline.devices import resolve_device
from pipeline.errors import BadInputError, ConfigError
from pipeline.imageio import load_rgb_resized

log = logging.getLogger(__name__)

FORMAT_VERSION = "pc2m-features/1"
KEEP_CHOICES = ("keys", "cls", "tokens")
FIT_CHOICES = ("crop", "pad")
DECODE_CHOICES = ("auto", "pil", "device", "workers")
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
    decode: str

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
        check_decode(features["decode"], "features")
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
            decode=features["decode"],
        )


def check_decode(decode: object, section: str) -> None:
    """ConfigError unless ``decode`` is one of ``DECODE_CHOICES`` (``section``.decode)."""
    if decode not in DECODE_CHOICES:
        raise ConfigError(f"{section}.decode: {decode!r} is not one of {', '.join(DECODE_CHOICES)}")


def jpeg_decoder(decode: str, device: torch.device) -> str:
    """Who decodes the JPEGs for ``device`` (``features.decode``, ``predict.decode``): ``pil``
    (Pillow prepares each image in the workers), ``device`` (batches decoded on ``device``:
    nvjpeg on a GPU) or ``workers`` (libjpeg in the workers, resized and normalised on
    ``device``). ``auto`` is ``device`` on CUDA, where Pillow was the limit, and ``pil``
    elsewhere."""
    if decode == "auto":
        return "device" if device.type == "cuda" else "pil"
    return decode


# ---------------------------------------------------------------------------------------------
# Geometry (pure)


@dataclass(frozen=True)
class Geometry:
    """How one image of the manifest becomes the backbone's input; sizes are (height, width)."""

    scale: float
    resized: tuple[int, int]
    final: tuple[int, int]
    grid: tuple[int, int]

    def values(self) -> list[float]:
        """The shard's ``geometry`` row, in ``GEOMETRY_FIELDS`` order."""
        return [self.scale, *self.resized, *self.final]

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor(self.values(), dtype=torch.float32)


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
    """One image from a worker: prepared on the CPU (``image``), or its JPEG bytes (``data``) for
    the batched device decoder, or its pixels decoded by the worker (``pixels``, uint8 3 x H x W,
    to be prepared on the device), or the error that stops the stage."""

    index: int
    image: torch.Tensor | None
    error: str | None
    data: bytes | None = None
    pixels: torch.Tensor | None = None


@dataclass
class SampleBatch:
    """A batch as it crosses from a worker: the JPEG bytes of the images the device decodes,
    end to end in one tensor; the pixels of the images the worker decoded, end to end in one
    tensor; the CPU-prepared images in one stack (a batch has one final size). At most three
    tensors a batch, not one per image: every tensor a worker hands over costs a file-descriptor
    exchange with the main process, which on a GPU took more of a feature job's time than the
    model."""

    indices: list[int]
    errors: list[str | None]
    jpeg_positions: list[int]  # positions in the batch of the images in ``jpeg``
    jpeg_ends: list[int]  # where each one's bytes end in ``jpeg``
    jpeg: torch.Tensor | None
    prepared_positions: list[int]  # positions in the batch of the images in ``prepared``
    prepared: torch.Tensor | None
    pixel_positions: list[int] = dataclasses.field(default_factory=list)  # ... of the images in ``pixels``
    pixel_shapes: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)  # each one's 3 x H x W
    pixels: torch.Tensor | None = None

    def jpegs(self) -> list[torch.Tensor]:
        """Each image's bytes: views of ``jpeg``."""
        starts = [0, *self.jpeg_ends[:-1]]
        return [self.jpeg[start:end] for start, end in zip(starts, self.jpeg_ends)]

    def pin_memory(self) -> SampleBatch:
        """Called by the DataLoader's pin-memory thread: page-locked tensors copy to the GPU
        asynchronously."""
        return dataclasses.replace(self, jpeg=_pinned(self.jpeg), prepared=_pinned(self.prepared),
                                   pixels=_pinned(self.pixels))


def _pieces(flat: torch.Tensor, shapes: Sequence[tuple[int, ...]]) -> list[torch.Tensor]:
    """Views of ``flat`` (pieces end to end) in the given shapes."""
    ends = list(itertools.accumulate(math.prod(shape) for shape in shapes))
    return [flat[start:end].view(shape) for start, end, shape in zip([0, *ends[:-1]], ends, shapes)]


def _pinned(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.pin_memory()


def device_decodable(data: bytes, expected: tuple[int, int]) -> bool:
    """Whether the batched device decoder may take these bytes: a complete (end-of-image marker
    present), upright (EXIF orientation 1: the GPU decoder ignores EXIF) RGB or greyscale JPEG of
    the manifest's size. Everything else — PNGs, CMYK, truncated or corrupt files, rotated
    photos — goes through Pillow, whose errors and conversions are the stage's reference.
    Reads the header only."""
    if not (data.startswith(b"\xff\xd8\xff") and data.rstrip(b"\0").endswith(b"\xff\xd9")):
        return False
    try:
        with Image.open(io.BytesIO(data)) as im:
            upright = im.getexif().get(0x0112, 1) == 1  # EXIF Orientation
            return (im.format == "JPEG" and im.mode in ("RGB", "L") and upright
                    and (im.height, im.width) == tuple(expected))
    except Exception:  # noqa: BLE001 - any header problem: let Pillow's full decode report it
        return False


# The JPEG decoders that hand over whole decoded images (``device``, ``workers``) take an image
# only if its decoded area is at most this many times its resized area (4x per side): a batch's
# decoded pixels then take at most 16x its resized uint8 pixels (4x the float32 images the Pillow
# path hands over), in GPU memory or in the workers' shared memory. Bigger images (a phone's
# 12-megapixel photo at 512 px: 61x) are decoded and shrunk one at a time by Pillow in the workers.
DECODED_AREA_LIMIT = 16


class ShardImages(Dataset):
    """Decoded, resized, normalised images; with ``jpeg_decoder`` ``device``, the raw bytes of
    the JPEGs the device decodes instead, with ``workers``, their decoded pixels (see
    :func:`jpeg_decoder`). A decode failure travels as ``Sample.error`` so the main
    process can raise it with its original message (DataLoader workers would wrap it)."""

    def __init__(
        self,
        paths: Sequence[str],
        sizes: Sequence[tuple[int, int]],
        geometries: Sequence[Geometry],
        mean: Sequence[float],
        std: Sequence[float],
        jpeg_decoder: str = "pil",
    ) -> None:
        if jpeg_decoder not in ("pil", "device", "workers"):
            raise ValueError(f"jpeg_decoder: {jpeg_decoder!r} is not pil, device or workers")
        self.paths = list(paths)
        self.sizes = list(sizes)
        self.geometries = list(geometries)
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.jpeg_decoder = jpeg_decoder

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Sample:
        if self.jpeg_decoder != "pil" and self.decoded_area_fits(index):
            try:
                data = Path(self.paths[index]).read_bytes()
            except OSError:
                data = b""  # Pillow's path below reports it by name
            if device_decodable(data, self.sizes[index]):
                if self.jpeg_decoder == "device":
                    return Sample(index, None, None, data)
                pixels = worker_decoded(data, self.sizes[index])
                if pixels is not None:
                    return Sample(index, None, None, pixels=pixels)
        return self.prepared(index)

    def decoded_area_fits(self, index: int) -> bool:
        """Whether image ``index`` is small enough for the decoders of whole images
        (``DECODED_AREA_LIMIT``)."""
        (height, width), (resized_h, resized_w) = self.sizes[index], self.geometries[index].resized
        return height * width <= DECODED_AREA_LIMIT * resized_h * resized_w

    def prepared(self, index: int) -> Sample:
        """The image decoded by Pillow and prepared on the CPU."""
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


def worker_decoded(data: bytes, expected: tuple[int, int]) -> torch.Tensor | None:
    """uint8 3 x H x W RGB pixels of a JPEG that :func:`device_decodable` accepted, decoded by
    libjpeg on the CPU (in a worker: ``features.decode: workers``), or None if it fails or comes
    out at another size (then Pillow's path decodes it and reports its error)."""
    try:
        pixels = decode_jpegs([torch.frombuffer(bytearray(data), dtype=torch.uint8)], torch.device("cpu"))[0]
    except RuntimeError:
        return None
    return pixels if tuple(pixels.shape[-2:]) == tuple(expected) else None


def collate_samples(samples: list[Sample]) -> SampleBatch:
    """The worker's samples packed into a :class:`SampleBatch`; a failed one keeps its error
    (raised by :func:`batch_images` in the main process)."""
    jpeg = [position for position, s in enumerate(samples) if s.data is not None]
    decoded = [position for position, s in enumerate(samples) if s.pixels is not None]
    prepared = [position for position, s in enumerate(samples) if s.image is not None]
    jpeg_ends = list(itertools.accumulate(len(samples[p].data) for p in jpeg))
    return SampleBatch(
        indices=[s.index for s in samples],
        errors=[s.error for s in samples],
        jpeg_positions=jpeg,
        jpeg_ends=jpeg_ends,
        jpeg=_joined_bytes([samples[p].data for p in jpeg], jpeg_ends[-1]) if jpeg else None,
        prepared_positions=prepared,
        prepared=(torch.stack([samples[p].image for p in prepared],
                              out=_batch_tensor((len(prepared), *samples[prepared[0]].image.shape), torch.float32))
                  if prepared else None),
        pixel_positions=decoded,
        pixel_shapes=[tuple(samples[p].pixels.shape) for p in decoded],
        pixels=(torch.cat([samples[p].pixels.reshape(-1) for p in decoded],
                          out=_batch_tensor((sum(samples[p].pixels.numel() for p in decoded),), torch.uint8))
                if decoded else None),
    )


def _batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor for a batch, allocated in shared memory when made in a DataLoader worker
    (as torch's default collate does): a tensor in private memory is copied into shared memory
    when the worker hands it over — for a batch of 256 images at 224 px, 38 MB of pixels or
    154 MB of prepared float32 images, a second copy on the worker's CPU."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    try:
        storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    except AttributeError:  # a private call (torch's collate makes it): without it, copied once more
        return torch.empty(shape, dtype=dtype).share_memory_()
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def _joined_bytes(pieces: list[bytes], total: int) -> torch.Tensor:
    """``pieces`` end to end in one uint8 tensor (see :func:`_batch_tensor`)."""
    out = _batch_tensor((total,), torch.uint8)
    flat = out.numpy()
    start = 0
    for piece in pieces:
        flat[start : start + len(piece)] = np.frombuffer(piece, dtype=np.uint8)
        start += len(piece)
    return out


def prepare_decoded(
    images: torch.Tensor, geometry: Geometry, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """:func:`prepare_image` on a stack of decoded uint8 n x 3 x H x W images of one size, on their
    device, in one call per step: antialiased bicubic resize (torch's ``antialias=True`` bicubic is
    Pillow's filter), rounded and clipped to uint8 levels as Pillow's resize of a uint8 image is,
    then the same normalisation (``mean`` / ``std``: 3 x 1 x 1 on the images' device) and
    bottom/right crop or pad. One call for the stack, not one per image: on a GPU, per-image
    calls are thousands of small kernel launches a shard."""
    rh, rw = geometry.resized
    pixels = images.float()
    if pixels.shape[-2:] != (rh, rw):
        pixels = torch.nn.functional.interpolate(
            pixels, size=(rh, rw), mode="bicubic", antialias=True, align_corners=False
        ).round_().clamp_(0, 255)
    pixels = (pixels / 255.0 - mean) / std
    fh, fw = geometry.final
    out = torch.zeros(images.shape[0], 3, fh, fw, dtype=torch.float32, device=images.device)
    h, w = min(rh, fh), min(rw, fw)
    out[..., :h, :w] = pixels[..., :h, :w]
    return out


def channel_constants(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """Per-channel constants as a 3 x 1 x 1 tensor on ``device``. Copied without waiting: a
    blocking copy from pageable memory would stall the host until the device's queue drains."""
    return torch.tensor(values, dtype=torch.float32).view(3, 1, 1).to(device, non_blocking=True)


def decode_jpegs(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """RGB uint8 3 x H x W tensors on ``device`` from JPEG bytes, in one batched call (nvjpeg on a
    GPU, libjpeg on the CPU)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders for TorchCodec's; they remain its nvjpeg path.
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def batch_images(batch: SampleBatch, dataset: ShardImages, device: torch.device) -> torch.Tensor:
    """The batch as one normalised tensor on ``device``: CPU-prepared images copied there, JPEG
    bytes decoded there in one call, pixels the workers decoded copied there in one piece; the
    decoded ones resized and normalised there. If the device decoder refuses the batch, its
    images take Pillow's path (whose error, for a really bad file, is the one raised)."""
    for error in batch.errors:
        if error is not None:
            raise BadInputError(error)
    final = dataset.geometries[batch.indices[0]].final
    out = torch.empty(len(batch.indices), 3, *final, device=device)
    if batch.prepared is not None:
        _put_rows(out, batch.prepared_positions, batch.prepared.to(device, non_blocking=True))
    if batch.pixels is not None:
        pixels = _pieces(batch.pixels.to(device, non_blocking=True), batch.pixel_shapes)
        _put_decoded(out, batch.pixel_positions, [batch.indices[p] for p in batch.pixel_positions], pixels, dataset)
    if batch.jpeg is None:
        return out
    indices = [batch.indices[position] for position in batch.jpeg_positions]
    try:
        images = decode_jpegs(batch.jpegs(), device)
    except RuntimeError as exc:
        log.warning("device JPEG decoder failed on a batch (%s): decoding it with Pillow", exc)
        return batch_images(collate_samples([dataset.prepared(i) for i in batch.indices]), dataset, device)
    if any(tuple(image.shape[-2:]) != dataset.sizes[index] for index, image in zip(indices, images)):
        return batch_images(collate_samples([dataset.prepared(i) for i in batch.indices]), dataset, device)
    _put_decoded(out, batch.jpeg_positions, indices, images, dataset)
    return out


def _put_decoded(
    out: torch.Tensor, positions: list[int], indices: list[int], images: list[torch.Tensor], dataset: ShardImages
) -> None:
    """Decoded uint8 ``images`` (of the dataset's ``indices``, on ``out``'s device) prepared into
    ``out``'s rows ``positions``; images of one original size share their geometry: one stack."""
    mean, std = channel_constants(dataset.mean, out.device), channel_constants(dataset.std, out.device)
    by_size: dict[tuple[int, int], list[int]] = {}
    for member, index in enumerate(indices):
        by_size.setdefault(dataset.sizes[index], []).append(member)
    for members in by_size.values():
        prepared = prepare_decoded(torch.stack([images[m] for m in members]), dataset.geometries[indices[members[0]]],
                                   mean, std)
        _put_rows(out, [positions[m] for m in members], prepared)


def _put_rows(out: torch.Tensor, positions: list[int], rows: torch.Tensor) -> None:
    """``out[positions] = rows``; a run of consecutive positions (the usual batch: one source
    size, one decoder) as a slice, without an index tensor to copy to the device."""
    if positions == list(range(positions[0], positions[0] + len(positions))):
        out[positions[0] : positions[0] + len(positions)] = rows
    else:
        out[torch.tensor(positions, device=out.device)] = rows


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
) -> dict[str, float]:
    """Write the features of the manifest's ``shard`` to ``out_path`` (one safetensors file).
    Returns the seconds of its phases — ``model`` (reading the manifest, building the model),
    ``features`` (starting the workers, moving the model to the device, the batches, each written
    to the shard as it comes back), ``write`` (closing the shard) — also logged: on a GPU the
    fixed phases weigh on a shard's time as much as its images do (bench/features.py)."""
    began = time.perf_counter()
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
    )  # moved to the device by compute_features, once its workers have started
    patch = patch_size(model)
    geometries = [
        image_geometry(int(h), int(w), settings.max_size, patch, settings.fit)
        for h, w in zip(rows["height"], rows["width"])
    ]
    log.info(
        "shard %s: %d images, %s (%s) on %s, keep %s, JPEGs decoded by %s",
        shard, len(rows), backbone["name"], backbone["weights"], device, ",".join(settings.keep),
        {"pil": "Pillow in the workers", "device": f"batches on {device}", "workers": "libjpeg in the workers"}[
            jpeg_decoder(settings.decode, device)],
    )
    image_ids = list(rows["image_id"])
    fixed = shard_fixed_tensors(image_ids, geometries)
    specs = {**{key: (batch.dtype, tuple(batch.shape[1:])) for keys, batch in fixed for key in keys},
             **feature_specs(model, image_ids, geometries, settings.keep)}
    metadata = shard_metadata(model, params, settings, image_ids, shard)
    built = time.perf_counter()
    with shards.shard_writer(Path(out_path), specs, metadata) as write:
        write.batches(fixed)
        compute_features(model, rows, geometries, settings, device, write, desc=f"shard {shard}")
        computed = time.perf_counter()
    seconds = {"model": built - began, "features": computed - built, "write": time.perf_counter() - computed}
    log.info("wrote %s (%d tensors); model %.1f s, features %.1f s (%.0f images/s, written as they came), "
             "closing the shard %.1f s", out_path, len(specs), seconds["model"], seconds["features"],
             len(rows) / max(seconds["features"], 1e-9), seconds["write"])
    return seconds


# Batches whose features may wait for the shard's writer thread (compute_features).
WRITES_IN_FLIGHT = 2


def compute_features(
    model: torch.nn.Module,
    rows: pd.DataFrame,
    geometries: list[Geometry],
    settings: FeatureSettings,
    device: torch.device,
    write: shards.ShardWriter,
    desc: str = "features",
) -> None:
    """Per image (in ``rows`` order): the kept features as float16, handed to ``write`` as
    ``"{image_id}/{name}"`` while the next batches run.

    Overlap: workers read (and, on the CPU path, decode) the next batches while the main process
    runs this one; a batch's features are copied back without waiting (pinned memory, an event)
    and written by a writer thread, which waits for the copy, while the main thread decodes and
    queues the next batches: writing a 224 px ViT-S/16 batch of 256 is ~40 MB, tens of
    milliseconds of the one thread that also feeds the GPU. At most ``WRITES_IN_FLIGHT`` batches
    wait for the writer (the host memory a shard's features take stays a few batches). The
    workers start before ``model`` moves to ``device``: forked before the process has a CUDA
    context, they start faster, and read their first batches while the context is made.
    """
    mean, std = normalisation(model)
    sizes = [(int(h), int(w)) for h, w in zip(rows["height"], rows["width"])]
    dataset = ShardImages(list(rows["image_path"]), sizes, geometries, mean, std,
                          jpeg_decoder=jpeg_decoder(settings.decode, device))
    batches = batches_by_size([g.final for g in geometries], settings.batch_size)
    loader = make_loader(dataset, batches, settings.num_workers, pin_memory=device.type == "cuda")
    image_ids = list(rows["image_id"])
    wants = {name: name in settings.keep for name in KEEP_CHOICES}
    loaded = iter(loader)
    model.to(device)

    def write_batch(indices: list[int], host: dict[str, torch.Tensor], ready: torch.cuda.Event | None) -> None:
        if ready is not None:
            ready.synchronize()
        # Written straight from the (page-locked, from a GPU) copy: nothing of the batch is kept,
        # so the caching host allocator hands its memory to the next batches.
        write.batches([([f"{image_ids[index]}/{name}" for index in indices], host[name]) for name in settings.keep])

    # Unattended runs (cluster logs) get a line every 30 s instead of a redrawn bar.
    progress = tqdm(total=len(dataset), desc=desc, unit="img", mininterval=0.5 if sys.stderr.isatty() else 30)
    # The shard's file is closed, or removed after an error, only once the writes under way end.
    with progress, background_writes(1, WRITES_IN_FLIGHT, "shard-writer") as writes:
        for batch in loaded:
            images = batch_images(batch, dataset, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = extract_features(model, images, **wants)
            host = {name: getattr(out, name).to(torch.float16).to("cpu", non_blocking=True)
                    for name in settings.keep}
            ready = None
            if device.type == "cuda":
                ready = torch.cuda.Event()
                ready.record()
            writes.submit(write_batch, batch.indices, host, ready,
                          done=functools.partial(progress.update, len(batch.indices)))


def feature_specs(
    model: torch.nn.Module, image_ids: list[str], geometries: list[Geometry], keep: Sequence[str]
) -> dict[str, shards.TensorSpec]:
    """The float16 features' shapes per image before they are computed (the shard's header goes
    first): keys and tokens one row per patch of the grid, cls one vector."""
    widths = {"keys": key_dim(model), "cls": embed_dim(model), "tokens": embed_dim(model)}
    specs = {}
    for image_id, geometry in zip(image_ids, geometries):
        patches = geometry.grid[0] * geometry.grid[1]
        for name in keep:
            shape = (widths[name],) if name == "cls" else (patches, widths[name])
            specs[f"{image_id}/{name}"] = (torch.float16, shape)
    return specs


def shard_fixed_tensors(image_ids: list[str], geometries: list[Geometry]) -> list[tuple[list[str], torch.Tensor]]:
    """Each image's patch grid and resize geometry (known before any feature), as the shard
    writer's batches: (keys, one row per image)."""
    return [
        ([f"{image_id}/grid" for image_id in image_ids],
         torch.tensor([g.grid for g in geometries], dtype=torch.int32).view(-1, 2)),
        ([f"{image_id}/geometry" for image_id in image_ids],
         torch.tensor([g.values() for g in geometries], dtype=torch.float32).view(-1, len(GEOMETRY_FIELDS))),
    ]


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
