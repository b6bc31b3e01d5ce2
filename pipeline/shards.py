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
from collections.abc import Iterator, Sequence
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


# Buffers one pwritev call takes (Linux: 1024).
_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 16  # POSIX's least
if _IOV_MAX <= 0:  # -1: no limit
    _IOV_MAX = 1024

# A tensor's place in a shard before its values exist: dtype and shape.
TensorSpec = tuple[torch.dtype, tuple[int, ...]]


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
    # The JSON is assembled entry by entry (a shard of 8,192 images has 32,768): the same text
    # json.dumps gives for the nested dicts, in a third of its time.
    entries = [f'"__metadata__":{_json(dict(sorted(metadata.items())))}'] if metadata else []
    offsets, offset = {}, 0
    for key in order:
        dtype, shape = specs[key]
        if dtype not in _DTYPES:
            raise TypeError(f"{key}: dtype {dtype} has no safetensors name")
        size = math.prod(shape) * dtype.itemsize
        entries.append(f'{_json(key)}:{{"dtype":"{_DTYPES[dtype]}","shape":[{",".join(map(str, shape))}],'
                       f'"data_offsets":[{offset},{offset + size}]}}')
        offsets[key] = offset
        offset += size
    text = ("{" + ",".join(entries) + "}").encode("utf-8")
    # The format wants the data to start 8-byte aligned; pad the header with spaces as it does.
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    return len(text).to_bytes(8, "little") + text, {key: start + offset for key, offset in offsets.items()}


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def write_shard(out_path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write ``tensors`` (names ``"{image_id}/{name}"``) and JSON-encoded ``metadata`` atomically.

    A safetensors file, written tensor by tensor straight from the tensors' memory: no second
    copy of a shard (1.2 GB for 8,192 images' keys) is ever held — safetensors' Python writers
    first copy every tensor into ``bytes``, ``save`` then once more into one blob."""
    with shard_writer(out_path, {key: tensor_spec(value) for key, value in tensors.items()}, metadata) as write:
        write.batches([([key], value.unsqueeze(0)) for key, value in tensors.items()])


class ShardWriter:
    """Puts the tensors of a shard being written (:func:`shard_writer`) at their places, checked
    against the header: a tensor the header has no room for, or one written twice, is refused."""

    def __init__(self, fd: int, out_path: Path, specs: dict[str, TensorSpec], starts: dict[str, int]) -> None:
        self.fd, self.out_path, self.specs, self.starts = fd, out_path, specs, starts
        self.missing = set(specs)

    def batches(self, batches: Sequence[tuple[Sequence[str], torch.Tensor]]) -> None:
        """Row ``i`` of each ``(keys, batch)`` at the place of ``keys[i]``. The shape is checked
        once per batch and each row's bytes are a slice of the batch's (only CPU, contiguous
        batches are written from memory; a copy is made where needed): a feature shard of 8,192
        images is 32,768 tensors, and per-tensor work was a tenth of a GPU feature job's time.
        Rows that lie end to end in the file (an image's tensors, consecutive images) go in one
        call."""
        pieces, written = [], set()
        for keys, batch in batches:
            if len(keys) != batch.shape[0]:
                raise ValueError(f"{self.out_path}: {len(keys)} keys for a batch of {batch.shape[0]} rows")
            row_spec = (batch.dtype, tuple(batch.shape[1:]))
            for key in keys:
                if key not in self.missing or key in written:
                    raise ValueError(f"{self.out_path}: tensor {key} is "
                                     f"{'written twice' if key in self.specs else 'not in the shard'}")
                if self.specs[key] != row_spec:
                    raise ValueError(f"{self.out_path}: tensor {key} is {row_spec}, the shard has room for "
                                     f"{self.specs[key]}")
                written.add(key)
            data = _raw_bytes(batch.detach().cpu().contiguous())
            size = len(data) // len(keys) if keys else 0
            pieces += [(self.starts[key], data[row * size : (row + 1) * size]) for row, key in enumerate(keys)]
        _pwrite_pieces(self.fd, sorted(pieces, key=lambda piece: piece[0]))
        # Only now: a call refused or failed halfway leaves its tensors still to be written.
        self.missing -= written


@contextlib.contextmanager
def shard_writer(out_path: Path, specs: dict[str, TensorSpec], metadata: dict) -> Iterator[ShardWriter]:
    """A shard written while its tensors are made: the header goes first, from ``specs``; each
    tensor written (:class:`ShardWriter`) goes to its place, in any order, so a stage never holds
    the whole shard (the feature stage writes every batch as it comes back). The file is the one
    :func:`write_shard` writes for the same tensors, and appears (atomically) only when the block
    ends with every tensor written."""
    encoded = {key: json.dumps(value, sort_keys=True) for key, value in metadata.items()}
    header, starts = safetensors_header(specs, encoded)
    with atomic_path(out_path) as tmp:
        fd = os.open(tmp, os.O_WRONLY)
        try:
            _pwrite_all(fd, memoryview(header), 0)
            writer = ShardWriter(fd, out_path, specs, starts)
            yield writer
        finally:
            os.close(fd)
        if writer.missing:
            raise ValueError(f"{out_path}: {len(writer.missing)} tensors were never written "
                             f"(e.g. {min(writer.missing)})")


def _pwrite_pieces(fd: int, pieces: list[tuple[int, memoryview]]) -> None:
    """``(offset, bytes)`` pieces sorted by offset: each run of pieces that lie end to end in one
    ``pwritev`` call (at most IOV_MAX buffers)."""
    run: list[memoryview] = []
    run_start = run_end = 0
    for offset, data in pieces:
        if run and (offset != run_end or len(run) == _IOV_MAX):
            _pwritev_all(fd, run, run_start)
            run = []
        if not run:
            run_start = run_end = offset
        run.append(data)
        run_end += len(data)
    if run:
        _pwritev_all(fd, run, run_start)


def _pwritev_all(fd: int, buffers: list[memoryview], offset: int) -> None:
    """``buffers`` end to end at ``offset``; what a partial write leaves goes buffer by buffer."""
    written = os.pwritev(fd, buffers, offset) if hasattr(os, "pwritev") else 0
    for data in buffers:
        if written < len(data):
            _pwrite_all(fd, data[written:], offset + written)
        offset, written = offset + len(data), max(0, written - len(data))


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

