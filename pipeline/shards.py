"""Per-image tensors of one shard in one safetensors file: tensor ``"{image_id}/{name}"``.

Shared by every sharded stage (features, spectral segments, segment features, predictions), so
that a stage reads its inputs the same way whatever wrote them. Files are written atomically and
byte-reproducibly (metadata in sorted order).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from pipeline.atomic import atomic_path
from pipeline.errors import BadInputError

# safetensors' dtype names (the format's spec).
_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


# A tensor's place in a shard before its values exist: dtype and shape.
TensorSpec = tuple[torch.dtype, tuple[int, ...]]
# Puts one tensor of a shard being written in its place (:func:`shard_writer`).
ShardWrite = Callable[[str, torch.Tensor], None]


def tensor_spec(tensor: torch.Tensor) -> TensorSpec:
    return tensor.dtype, tuple(tensor.shape)


def safetensors_header(specs: dict[str, TensorSpec], metadata: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    """The file's first bytes (length + JSON header) and where each tensor's data starts in the file.

    Canonical, so identical inputs give identical files: metadata and tensors sorted by name
    (safetensors' own writer orders its metadata from a Rust HashMap, which changes from process
    to process); tensors with wider elements first, so every tensor starts aligned to its element
    size, as safetensors' writer arranges too.
    """
    order = sorted(specs, key=lambda key: (-specs[key][0].itemsize, key))
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offsets, offset = {}, 0
    for key in order:
        dtype, shape = specs[key]
        if dtype not in _DTYPES:
            raise TypeError(f"{key}: dtype {dtype} has no safetensors name")
        size = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offsets[key] = offset
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    # The format wants the data to start 8-byte aligned; pad the header with spaces as it does.
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    return len(text).to_bytes(8, "little") + text, {key: start + offset for key, offset in offsets.items()}


def write_shard(out_path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write ``tensors`` (names ``"{image_id}/{name}"``) and JSON-encoded ``metadata`` atomically.

    A safetensors file, written tensor by tensor straight from the tensors' memory: no second
    copy of a shard (1.2 GB for 8,192 images' keys) is ever held — safetensors' Python writers
    first copy every tensor into ``bytes``, ``save`` then once more into one blob."""
    # Only CPU, contiguous tensors can be written from memory; copies are made only where needed.
    tensors = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    with shard_writer(out_path, {key: tensor_spec(value) for key, value in tensors.items()}, metadata) as write:
        for key, value in tensors.items():
            write(key, value)


@contextlib.contextmanager
def shard_writer(out_path: Path, specs: dict[str, TensorSpec], metadata: dict) -> Iterator[ShardWrite]:
    """A shard written while its tensors are made: the header goes first, from ``specs``; each
    ``write(key, tensor)`` puts the tensor's bytes at its place, in any order, so a stage never
    holds the whole shard (the feature stage writes every batch as it comes back). The file is
    the one :func:`write_shard` writes for the same tensors, and appears (atomically) only when
    the block ends with every tensor written."""
    encoded = {key: json.dumps(value, sort_keys=True) for key, value in metadata.items()}
    header, starts = safetensors_header(specs, encoded)
    missing = set(specs)

    def write(key: str, tensor: torch.Tensor) -> None:
        if key not in missing:
            raise ValueError(f"{out_path}: tensor {key} is {'written twice' if key in specs else 'not in the shard'}")
        if tensor_spec(tensor) != specs[key]:
            raise ValueError(f"{out_path}: tensor {key} is {tensor_spec(tensor)}, the shard has room for {specs[key]}")
        _pwrite_all(fd, _raw_bytes(tensor.detach().cpu().contiguous()), starts[key])
        missing.discard(key)

    with atomic_path(out_path) as tmp:
        fd = os.open(tmp, os.O_WRONLY)
        try:
            _pwrite_all(fd, memoryview(header), 0)
            yield write
        finally:
            os.close(fd)
        if missing:
            raise ValueError(f"{out_path}: {len(missing)} tensors were never written (e.g. {min(missing)})")


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """All of ``data`` at ``offset`` (one call writes at most ~2 GiB on Linux)."""
    data = data.cast("B")
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes, without copying them."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def per_image_tensors(per_image: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{image_id: {name: tensor}} -> {"image_id/name": tensor}."""
    return {f"{image_id}/{name}": value for image_id, named in per_image.items() for name, value in named.items()}


# What safetensors raises for a truncated or corrupt file (SafetensorError is none of the others).
SHARD_ERRORS = (OSError, ValueError, RuntimeError, SafetensorError)


def read_meta(path: str | Path) -> dict:
    path = _existing(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return {key: json.loads(value) for key, value in (fh.metadata() or {}).items()}
    except SHARD_ERRORS as exc:
        raise BadInputError(f"{path}: unreadable shard ({exc})") from None


def read_images(
    path: str | Path, images: set[str] | None = None, names: set[str] | None = None
) -> dict[str, dict[str, torch.Tensor]]:
    """Tensors of a shard grouped by image, {image_id: {name: tensor}}, restricted to ``images``
    and ``names`` when given (cheap on big shards: only those tensors are read)."""
    path = _existing(path)
    out: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            for key in fh.keys():
                image_id, slash, name = key.rpartition("/")
                if not slash:
                    raise BadInputError(f"{path}: tensor {key!r} is not named <image_id>/<name>")
                if (images is None or image_id in images) and (names is None or name in names):
                    out.setdefault(image_id, {})[name] = fh.get_tensor(key)
    except SHARD_ERRORS as exc:  # safetensors' errors on a corrupt file
        raise BadInputError(f"{path}: unreadable shard ({exc})") from None
    return out


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: shard not found")
    return path

