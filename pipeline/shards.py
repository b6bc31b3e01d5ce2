"""Per-image tensors of one shard in one safetensors file: tensor ``"{image_id}/{name}"``.

Shared by every sharded stage (features, spectral segments, segment features, predictions), so
that a stage reads its inputs the same way whatever wrote them. Files are written atomically and
byte-reproducibly (metadata in sorted order).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from pipeline.atomic import atomic_path
from pipeline.errors import BadInputError


def canonical_safetensors(blob: bytes) -> bytes:
    """The same file with its metadata sorted by key.

    safetensors serialises ``__metadata__`` from a Rust HashMap whose order changes from process
    to process, so two identical runs would differ in their header bytes. Data offsets are
    relative to the end of the header, so rewriting (and re-padding) the header is safe.
    """
    header_len = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + header_len])
    ordered = {"__metadata__": dict(sorted(header.pop("__metadata__").items()))} if "__metadata__" in header else {}
    ordered.update(header)
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    # The format wants the data to start 8-byte aligned; pad the header with spaces as it does.
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + blob[8 + header_len :]


def write_shard(out_path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write ``tensors`` (names ``"{image_id}/{name}"``) and JSON-encoded ``metadata`` atomically."""
    encoded = {key: json.dumps(value, sort_keys=True) for key, value in metadata.items()}
    # Own storage per tensor: safetensors refuses tensors that share memory (views of one batch).
    contiguous = {key: value.detach().cpu().contiguous().clone() for key, value in tensors.items()}
    blob = canonical_safetensors(safetensors_bytes(contiguous, metadata=encoded))
    with atomic_path(out_path) as tmp:
        _write_blob(tmp, blob)


def _write_blob(path: Path, blob: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(blob)


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

