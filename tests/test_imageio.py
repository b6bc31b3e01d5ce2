"""Image and mask reading: every PIL mode we meet in datasets, EXIF orientation, bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from pipeline.errors import BadInputError
from pipeline.imageio import check_image_id, image_size, load_mask, load_rgb, voc_palette, write_label_png

RNG = np.random.default_rng(0)


def _noise_rgb(h: int = 24, w: int = 32) -> np.ndarray:
    return RNG.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _truncated_copy(src: Path, dest: Path) -> Path:
    data = src.read_bytes()
    dest.write_bytes(data[: len(data) // 2])
    return dest


# --- modes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif", ".webp"])
def test_lossless_formats_round_trip_exactly(tmp_path, suffix):
    rgb = _noise_rgb()
    path = tmp_path / f"x{suffix}"
    Image.fromarray(rgb).save(path, **({"lossless": True} if suffix == ".webp" else {}))
    out = load_rgb(path)
    assert out.dtype == np.uint8 and out.shape == (24, 32, 3)
    np.testing.assert_array_equal(out, rgb)


def test_jpeg_loads_close_to_original(tmp_path):
    rgb = np.full((16, 16, 3), (200, 40, 90), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.jpg", quality=95)
    assert np.abs(load_rgb(tmp_path / "x.jpg").astype(int) - rgb).max() <= 4


def test_grayscale_is_replicated_to_three_channels(tmp_path):
    gray = RNG.integers(0, 256, size=(10, 12), dtype=np.uint8)
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    out = load_rgb(tmp_path / "g.png")
    assert out.shape == (10, 12, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_gray_alpha_keeps_gray_drops_alpha(tmp_path):
    gray = np.full((4, 4), 77, dtype=np.uint8)
    alpha = np.zeros((4, 4), dtype=np.uint8)
    Image.fromarray(np.stack([gray, alpha], -1), mode="LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(load_rgb(tmp_path / "la.png"), np.full((4, 4, 3), 77))


def test_rgba_drops_alpha_without_compositing(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., :3] = (10, 200, 30)
    rgba[0, 0, 3] = 0  # fully transparent pixel keeps its colour
    rgba[1:, :, 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(load_rgb(tmp_path / "a.png"), np.broadcast_to([10, 200, 30],
                                                                                (4, 4, 3)))


def test_palette_with_transparency_gives_palette_colours(tmp_path):
    indices = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    im = Image.fromarray(indices, mode="P")
    im.putpalette([5, 6, 7, 250, 0, 0, 0, 0, 250] + [0] * (253 * 3))
    im.save(tmp_path / "p.png", transparency=1)
    assert Image.open(tmp_path / "p.png").mode == "P"
    out = load_rgb(tmp_path / "p.png")
    np.testing.assert_array_equal(out[0, 0], [5, 6, 7])
    np.testing.assert_array_equal(out[0, 1], [250, 0, 0])
    np.testing.assert_array_equal(out[1, 0], [0, 0, 250])


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0x0000, 0x1234], [0x8000, 0xFFFF]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    np.testing.assert_array_equal(load_rgb(tmp_path / "g16.png")[..., 1],
                                  [[0x00, 0x12], [0x80, 0xFF]])


def test_16bit_big_endian_tiff_is_scaled(tmp_path):
    values = np.array([[0x1234, 0xFF00]], dtype=">u2")
    Image.frombytes("I;16B", (2, 1), values.tobytes()).save(tmp_path / "g16b.tif")
    assert Image.open(tmp_path / "g16b.tif").mode == "I;16B"
    np.testing.assert_array_equal(load_rgb(tmp_path / "g16b.tif")[..., 0], [[0x12, 0xFF]])


def test_32bit_int_image_is_scaled_by_its_range(tmp_path):
    Image.fromarray(np.array([[0, 65535]], dtype=np.int32), mode="I").save(tmp_path / "i.tif")
    np.testing.assert_array_equal(load_rgb(tmp_path / "i.tif")[..., 0], [[0, 255]])
    Image.fromarray(np.array([[-100, 100]], dtype=np.int32), mode="I").save(tmp_path / "n.tif")
    np.testing.assert_array_equal(load_rgb(tmp_path / "n.tif")[..., 0], [[0, 255]])


def test_cmyk_is_converted_to_rgb(tmp_path):
    Image.new("CMYK", (3, 2), (255, 0, 0, 0)).save(tmp_path / "c.tif")  # pure cyan
    np.testing.assert_array_equal(load_rgb(tmp_path / "c.tif"), np.broadcast_to([0, 255, 255],
                                                                               (2, 3, 3)))


def test_one_bit_image_maps_to_black_and_white(tmp_path):
    bits = Image.fromarray(np.array([[0, 255], [255, 0]], dtype=np.uint8)).convert("1")
    bits.save(tmp_path / "b.png")
    np.testing.assert_array_equal(load_rgb(tmp_path / "b.png")[..., 2], [[0, 255], [255, 0]])


def _exif_rotated_jpeg(path: Path) -> None:
    """Stored 40 wide x 20 tall, red block top-left, EXIF orientation 6 (display rotated CW)."""
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:8, :8] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(path, exif=exif.tobytes(), quality=95)


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rot.jpg"
    _exif_rotated_jpeg(path)
    out = load_rgb(path)
    assert out.shape == (40, 20, 3)  # portrait once upright
    # Rotating clockwise moves the stored top-left corner to the top-right.
    assert out[2, -3, 0] > 200 and out[2, -3, 1] < 60
    assert out[2, 2, 0] < 60 and out[-3, -3, 0] < 60
    assert image_size(path) == (20, 40)


def test_image_size_reads_only_the_header(tmp_path):
    Image.fromarray(_noise_rgb(30, 50)).save(tmp_path / "full.jpg")
    truncated = _truncated_copy(tmp_path / "full.jpg", tmp_path / "half.jpg")
    assert image_size(truncated) == (50, 30)  # header intact, pixels never decoded
    with pytest.raises(BadInputError, match="half.jpg"):
        load_rgb(truncated)


# --- bad files -------------------------------------------------------------------------------


def _bad_file(tmp_path: Path, kind: str) -> Path:
    if kind == "missing":
        return tmp_path / "missing.png"
    if kind == "empty":
        path = tmp_path / "empty.png"
        path.write_bytes(b"")
        return path
    if kind == "garbage":
        path = tmp_path / "garbage.jpg"
        path.write_bytes(b"this is not an image at all" * 10)
        return path
    suffix = ".jpg" if kind == "truncated_jpeg" else ".png"
    Image.fromarray(_noise_rgb(64, 64)).save(tmp_path / f"full{suffix}")
    return _truncated_copy(tmp_path / f"full{suffix}", tmp_path / f"cut{suffix}")


@pytest.mark.parametrize("kind", ["missing", "empty", "garbage", "truncated_jpeg",
                                  "truncated_png"])
def test_bad_image_raises_naming_the_file(tmp_path, kind):
    path = _bad_file(tmp_path, kind)
    with pytest.raises(BadInputError, match=path.name):
        load_rgb(path)
    with pytest.raises(BadInputError, match=path.name):
        load_mask(path)


@pytest.mark.parametrize("kind", ["missing", "empty", "garbage"])
def test_image_size_of_bad_file_raises_naming_it(tmp_path, kind):
    path = _bad_file(tmp_path, kind)
    with pytest.raises(BadInputError, match=path.name):
        image_size(path)


def test_truncated_images_are_never_tolerated():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# --- masks -----------------------------------------------------------------------------------


def test_palette_mask_gives_indices_not_colours(tmp_path):
    labels = np.array([[0, 1, 2], [15, 255, 3]], dtype=np.uint8)
    write_label_png(tmp_path / "m.png", labels)
    stored = Image.open(tmp_path / "m.png")
    assert stored.mode == "P"
    assert stored.getpalette()[3:6] == [128, 0, 0]  # VOC colour of class 1
    np.testing.assert_array_equal(load_mask(tmp_path / "m.png"), labels)
    assert not list(tmp_path.glob("*.partial"))


def test_grayscale_mask_gives_values(tmp_path):
    labels = np.array([[0, 7], [255, 1]], dtype=np.uint8)
    Image.fromarray(labels, mode="L").save(tmp_path / "m.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "m.png"), labels)


def test_rgb_mask_is_rejected(tmp_path):
    Image.fromarray(_noise_rgb(4, 4)).save(tmp_path / "colour.png")
    with pytest.raises(BadInputError, match="colour.png"):
        load_mask(tmp_path / "colour.png")


def test_voc_palette_known_colours():
    palette = voc_palette()
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    assert palette[0].tolist() == [0, 0, 0]
    assert palette[1].tolist() == [128, 0, 0]
    assert palette[2].tolist() == [0, 128, 0]
    assert palette[15].tolist() == [192, 128, 128]  # person
    assert palette[255].tolist() == [224, 224, 192]  # ignore
    assert voc_palette(4).shape == (4, 3)


# --- ids -------------------------------------------------------------------------------------


@pytest.mark.parametrize("image_id", ["a", "dir/sub/a", "2007_000032", "a.b", "a b", "..a"])
def test_safe_ids_pass(image_id):
    assert check_image_id(image_id) == image_id


@pytest.mark.parametrize("image_id", ["", "/etc/passwd", "../x", "a/../../b", "a/..", "a\\b",
                                      "a\x00b", "a\nb", "a\rb", "a//b", "./a", "a/"])
def test_unsafe_ids_are_rejected(image_id):
    with pytest.raises(BadInputError, match="unsafe image id"):
        check_image_id(image_id)
