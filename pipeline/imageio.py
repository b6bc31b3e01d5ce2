"""Reading images and label masks, writing label PNGs, and keeping image ids safe.

Every reader raises ``BadFileError`` (a ``BadInputError``) whose message starts with the file's
path, so a bad dataset file is reported by name, whichever stage trips over it.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps

from pipeline.atomic import atomic_path
from pipeline.errors import BadInputError

log = logging.getLogger(__name__)

# A truncated image must be an error, never silently padded with grey: this is Pillow's default,
# restated here because any other library flipping it would make corrupt files look fine.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# What Pillow raises for unreadable, corrupt or truncated files (SyntaxError and struct/zlib
# problems surface as these too; DecompressionBombError for absurd sizes).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)

# EXIF orientations that swap width and height (90 or 270 degree rotations, with or without flip).
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}

# What ImageOps.exif_transpose does to an image of each EXIF orientation; masks get the same.
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class BadFileError(BadInputError):
    """A dataset file is unusable; keeps the path and the reason apart for skipped.csv."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = printable_path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def printable_path(path: str | os.PathLike) -> str:
    """``path`` as text that can be printed and written to a UTF-8 CSV: bytes of a file name that
    are not UTF-8 (which Python keeps as lone surrogates) shown as ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _check_nonempty_file(path: Path) -> None:
    if not path.exists():
        raise BadFileError(path, _absence(path))
    if not path.is_file():
        raise BadFileError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise BadFileError(path, "empty file (0 bytes)")


def _absence(path: Path) -> str:
    """Why an existing-looking path cannot be opened: a link loop, a broken link, or no file."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop (the link leads back to itself)"
    if os.path.islink(path):
        return f"broken symbolic link (to {printable_path(os.readlink(path))}, which does not exist)"
    return "missing file"


def _open_decoded(path: Path) -> Image.Image:
    """Open and fully decode ``path`` (``.load()`` is what notices truncation)."""
    _check_nonempty_file(path)
    try:
        im = Image.open(path)
        im.load()
    except _DECODE_ERRORS as exc:
        raise BadFileError(path, f"corrupt, truncated or unreadable image ({exc})") from None
    return im


def _orientation(im: Image.Image, path: Path) -> int:
    try:
        return int(im.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception as exc:  # noqa: BLE001 - malformed EXIF must not reject a decodable image
        log.warning("%s: unreadable EXIF (%s); using the stored orientation", path, exc)
        return 1


def _exif_upright(im: Image.Image, path: Path) -> Image.Image:
    if _orientation(im, path) == 1:
        return im
    try:
        return ImageOps.exif_transpose(im)
    except Exception as exc:  # noqa: BLE001 - same policy as _orientation
        log.warning("%s: cannot apply EXIF orientation (%s); using the stored one", path, exc)
        return im


def _to_uint8_gray(im: Image.Image) -> np.ndarray:
    """8-bit view of a single-channel image of any depth, scaled by its nominal range."""
    arr = np.asarray(im)
    if im.mode.startswith("I;16"):
        return (arr.astype(np.uint16) >> 8).astype(np.uint8)
    if im.mode == "I":
        # 32-bit integer: old Pillow (and some TIFFs) use it for 16-bit data, others for 8-bit.
        lo, hi = int(arr.min()), int(arr.max())
        if lo >= 0 and hi <= 255:
            return arr.astype(np.uint8)
        if lo >= 0 and hi <= 65535:
            return (arr >> 8).astype(np.uint8)
        return _rescale_to_uint8(arr.astype(np.float64))
    if im.mode == "F":
        arr = np.nan_to_num(arr.astype(np.float64))
        if arr.min() >= 0.0 and arr.max() <= 1.0:
            return np.round(arr * 255.0).astype(np.uint8)
        return _rescale_to_uint8(arr)
    return np.asarray(im.convert("L"))


def _rescale_to_uint8(arr: np.ndarray) -> np.ndarray:
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    if im.mode == "RGB":
        return np.asarray(im)
    if im.mode in ("P", "PA"):
        # Palette transparency is alpha, not colour: go through RGBA and drop the alpha.
        return np.asarray(im.convert("RGBA"))[..., :3]
    if im.mode in ("RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(im.convert("RGB"))
    if im.mode in ("LA", "La"):
        im = im.getchannel("L")
    gray = _to_uint8_gray(im)
    return np.repeat(gray[..., None], 3, axis=2)


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """Decode an image to uint8 H x W x 3 RGB, upright according to its EXIF orientation."""
    path = Path(path)
    im = _exif_upright(_open_decoded(path), path)
    try:
        rgb = _to_rgb_array(im)
    except _DECODE_ERRORS as exc:
        raise BadFileError(path, f"unsupported image mode {im.mode!r} ({exc})") from None
    return np.ascontiguousarray(rgb, dtype=np.uint8)


def load_rgb_resized(path: str | os.PathLike, size: tuple[int, int],
                     resample: int) -> tuple[np.ndarray, tuple[int, int]]:
    """``load_rgb`` resized to ``size`` = (height, width), and the decoded (height, width).

    The decoded Pillow image is resized directly, so a huge file costs one decoded copy, not
    three (decode, array, array back to an image); the pixels equal those of resizing
    ``load_rgb``'s array."""
    path = Path(path)
    im = _exif_upright(_open_decoded(path), path)
    decoded = (im.height, im.width)
    if im.mode != "RGB":
        try:
            im = Image.fromarray(np.ascontiguousarray(_to_rgb_array(im), dtype=np.uint8))
        except _DECODE_ERRORS as exc:
            raise BadFileError(path, f"unsupported image mode {im.mode!r} ({exc})") from None
    if decoded != tuple(size):
        im = im.resize((size[1], size[0]), resample)
    return np.ascontiguousarray(np.asarray(im), dtype=np.uint8), decoded


def _stored_size_and_orientation(path: Path) -> tuple[tuple[int, int], int]:
    """(width, height) of the stored pixels and the EXIF orientation, from the header only."""
    _check_nonempty_file(path)
    try:
        with Image.open(path) as im:
            return im.size, _orientation(im, path)
    except _DECODE_ERRORS as exc:
        raise BadFileError(path, f"unreadable image header ({exc})") from None


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) after EXIF orientation, from the header only (no pixel decoding)."""
    (width, height), orientation = _stored_size_and_orientation(Path(path))
    if orientation in _TRANSPOSING_ORIENTATIONS:
        return height, width
    return width, height


def load_mask(path: str | os.PathLike, image_path: str | os.PathLike | None = None) -> np.ndarray:
    """Decode a label mask to uint8 H x W class indices (palette PNGs give indices, not colours).

    With ``image_path`` (a dataset's annotation of that image) the mask is made upright as
    ``load_rgb`` makes the image, by :func:`upright_mask`. Masks this pipeline writes
    (predictions, pseudo-masks) are upright already: they are read without ``image_path``.
    """
    mask = _decode_mask(Path(path))
    if image_path is None:
        return mask
    stored_size, orientation = _stored_size_and_orientation(Path(image_path))
    return upright_mask(mask, orientation, stored_size)


def upright_mask(mask: np.ndarray, orientation: int, stored_size: tuple[int, int]) -> np.ndarray:
    """The mask of an image whose stored pixels are ``stored_size`` = (width, height) and whose
    EXIF tag is ``orientation``, transposed as the image is when it is read.

    Annotations are taken to be drawn on the stored pixels (COCO's JSON sizes and polygons are
    the stored ones, so are its masks), so they get the image's flip or rotation. Except: for the
    orientations that swap the sides (5-8), a mask already at the displayed size (drawn in a tool
    that showed the photo upright) is taken as it is. A square image cannot tell the two apart;
    its mask is taken as stored. Orientations 2-4 keep the size, so they are always applied.
    """
    method = _UPRIGHT.get(orientation)
    if method is None:
        return mask
    width, height = stored_size
    if orientation in _TRANSPOSING_ORIENTATIONS and width != height and mask.shape == (width, height):
        return mask
    return np.array(Image.fromarray(mask).transpose(method))


def _decode_mask(path: Path) -> np.ndarray:
    im = _open_decoded(path)
    if im.mode in ("P", "L"):
        return np.array(im, dtype=np.uint8)
    if im.mode == "1":
        return np.array(im, dtype=np.uint8)
    if im.mode in ("LA", "PA"):
        return np.array(im.getchannel(0), dtype=np.uint8)
    if im.mode == "I" or im.mode.startswith("I;16"):
        values = np.asarray(im)
        if values.min() < 0 or values.max() > 255:
            raise BadFileError(path, f"mask values span {values.min()}..{values.max()}, not 0..255")
        return values.astype(np.uint8)
    raise BadFileError(
        path, f"mask has mode {im.mode!r}; expected a label-index PNG (palette or grayscale)"
    )


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map: (n, 3) uint8, class i's colour from the bits of i."""
    palette = np.zeros((n, 3), dtype=np.uint8)
    for index in range(n):
        value, r, g, b = index, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (value & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        palette[index] = (r, g, b)
    return palette


def write_label_png(
    path: str | os.PathLike, mask: np.ndarray, palette: np.ndarray | None = None
) -> None:
    """Atomically write a 2-D uint8 label mask as a palette PNG (VOC colours by default)."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise ValueError(f"label mask must be 2-D uint8, got {mask.shape} {mask.dtype}")
    colours = voc_palette() if palette is None else np.asarray(palette, dtype=np.uint8)
    im = Image.fromarray(mask, mode="P")
    im.putpalette(colours.reshape(-1).tolist())
    with atomic_path(path) as tmp:
        # The temporary name ends in .partial, so the format cannot come from the extension.
        im.save(tmp, format="PNG")


# Longest id component, in bytes: every file named after an id (``<id>.png``) must fit NAME_MAX
# (255 bytes on common file systems) even as its atomic temporary ``.<id>.png.<8 chars>.partial``.
MAX_ID_COMPONENT_BYTES = 255 - len(".png") - len("..12345678.partial")


def check_image_id(image_id: str) -> str:
    """Return ``image_id`` if it is a safe relative posix path; ids become file names later."""
    if not isinstance(image_id, str) or image_id == "":
        raise BadInputError(f"unsafe image id {image_id!r}: empty")
    try:
        encoded = image_id.encode("utf-8")
    except UnicodeEncodeError:
        raise BadInputError(f"image id '{printable_path(image_id)}' is not valid UTF-8: rename the file") from None
    longest = max(len(part) for part in encoded.split(b"/"))
    if longest > MAX_ID_COMPONENT_BYTES:
        raise BadInputError(f"image id {image_id[:40]!r}... has a name of {longest} bytes, over the "
                            f"{MAX_ID_COMPONENT_BYTES} that files named after it allow: shorten the name")
    for bad, what in (("\\", "a backslash"), ("\x00", "a NUL byte"), ("\n", "a newline"),
                      ("\r", "a carriage return")):
        if bad in image_id:
            raise BadInputError(f"unsafe image id {image_id!r}: contains {what}")
    if image_id.startswith("/"):
        raise BadInputError(f"unsafe image id {image_id!r}: absolute path")
    # Split by hand: pathlib would silently drop '.' and empty components.
    parts = image_id.split("/")
    if ".." in parts:
        raise BadInputError(f"unsafe image id {image_id!r}: contains a '..' component")
    if "." in parts or "" in parts:
        raise BadInputError(f"unsafe image id {image_id!r}: contains an empty or '.' component")
    return image_id


def safe_child(folder: str | os.PathLike, image_id: str, suffix: str = ".png") -> Path:
    """``<folder>/<image_id><suffix>``, refusing an id that would land outside ``folder``
    (``../x``, absolute paths, ...): every writer of per-image files names them through here."""
    check_image_id(image_id)
    folder = Path(folder)
    path = folder / f"{image_id}{suffix}"
    root = os.path.abspath(folder)
    if os.path.commonpath([root, os.path.abspath(path)]) != root:
        raise BadInputError(f"unsafe image id {image_id!r}: escapes {folder}")
    return path


def overlay(rgb: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image with its mask's VOC-palette colours blended in (``alpha`` = mask weight);
    ignored pixels (255) keep the image. uint8 H x W x 3."""
    if rgb.shape[:2] != mask.shape:
        raise ValueError(f"overlay of a {mask.shape} mask on a {rgb.shape[:2]} image")
    colours = voc_palette()[mask].astype(np.float32)
    blended = (1.0 - alpha) * rgb.astype(np.float32) + alpha * colours
    blended[mask == 255] = rgb[mask == 255]
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def mask_in_folders(folders, image_id: str) -> Path | None:
    """The first ``<folder>/<image_id>.png`` that exists (a stage's masks are spread over one
    folder per shard), or None."""
    for folder in folders:
        path = Path(folder) / f"{image_id}.png"
        if path.is_file():
            return path
    return None
