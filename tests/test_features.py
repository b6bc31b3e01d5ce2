"""Feature stage: geometry, batching, the shard file (shapes, determinism, atomicity, errors)."""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline import features as fx
from pipeline import shards
from pipeline.backbone import build_backbone, extract_features
from pipeline.cli import main as cli_main
from pipeline.errors import BadInputError, ConfigError
from pipeline.features import (
    Geometry,
    ShardReader,
    batches_by_size,
    extract_shard,
    image_geometry,
    prepare_image,
    read_shard,
    read_shard_meta,
)

TINY = {"depth": 2, "embed_dim": 48, "num_heads": 3}
COLUMNS = ["image_id", "image_path", "mask_path", "labels", "has_labels", "split", "width",
           "height", "shard"]
# (image_id, width, height, shard): two of one size, a portrait, one smaller than a patch, one
# larger than max_size, and one image of another shard.
IMAGES = [("b", 40, 30, 0), ("a/x", 40, 30, 0), ("c", 20, 50, 0), ("tiny", 9, 7, 0),
          ("big", 300, 200, 0), ("other", 40, 30, 1)]


def params(**features) -> dict:
    return {
        "backbone": {"name": "vit_small_patch16_224.dino", "weights": "random",
                     "checkpoint_key": "teacher", "model_kwargs": TINY},
        "features": {"max_size": 64, "fit": "crop", "keep": ["keys", "cls"], "batch_size": 2,
                     "num_workers": 0, "device": "cpu", "decode": "auto", **features},
        "seed": 0,
    }


def write_image(path: Path, width: int, height: int, seed: int) -> None:
    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


@pytest.fixture()
def manifest(tmp_path) -> Path:
    rows = []
    for seed, (image_id, width, height, shard) in enumerate(IMAGES):
        path = tmp_path / "images" / f"{image_id.replace('/', '_')}.png"
        path.parent.mkdir(exist_ok=True)
        write_image(path, width, height, seed)
        rows.append([image_id, str(path), "", "", False, "train", width, height, shard])
    out = tmp_path / "manifest.csv"
    pd.DataFrame(rows, columns=COLUMNS).to_csv(out, index=False)
    return out


# ---------------------------------------------------------------------------------------------
# Geometry and batching


def test_crop_and_pad_to_patch_multiples():
    assert image_geometry(100, 75, 512, 16, "crop") == Geometry(1.0, (100, 75), (96, 64), (6, 4))
    assert image_geometry(100, 75, 512, 16, "pad") == Geometry(1.0, (100, 75), (112, 80), (7, 5))


def test_a_side_shorter_than_a_patch_is_always_padded():
    assert image_geometry(10, 40, 512, 16, "crop").final == (16, 32)
    assert image_geometry(3, 5, 512, 14, "crop").final == (14, 14)
    assert image_geometry(3, 5, 512, 14, "pad").grid == (1, 1)


def test_longer_side_downscaled_to_max_size_never_upscaled():
    g = image_geometry(1000, 500, 512, 16, "crop")
    assert g.scale == pytest.approx(0.512) and g.resized == (512, 256) and g.final == (512, 256)
    g = image_geometry(375, 500, 448, 8, "pad")
    assert g.resized == (336, 448) and g.final == (336, 448)
    assert image_geometry(50, 60, 512, 16, "crop").scale == 1.0
    assert image_geometry(50, 60, 512, 16, "crop").resized == (50, 60)
    # Extreme aspect ratios keep at least one pixel, hence one patch.
    assert image_geometry(10000, 3, 100, 16, "crop").final == (96, 16)


def test_batches_group_equal_sizes_in_first_seen_order():
    sizes = [(32, 48), (48, 32), (32, 48), (32, 48), (48, 32), (16, 16)]
    assert batches_by_size(sizes, 2) == [[0, 2], [3], [1, 4], [5]]
    assert batches_by_size(sizes, 8) == [[0, 2, 3], [1, 4], [5]]


def test_prepare_image_normalises_then_crops_or_pads_bottom_right():
    rgb = np.zeros((20, 30, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.5, 1.0)
    cropped = prepare_image(rgb, image_geometry(20, 30, 512, 16, "crop"), mean, std)
    assert cropped.shape == (3, 16, 16)
    assert torch.all(cropped[0] == 2.0) and torch.all(cropped[1] == -1.0)
    padded = prepare_image(rgb, image_geometry(20, 30, 512, 16, "pad"), mean, std)
    assert padded.shape == (3, 32, 32)
    assert torch.all(padded[:, :20, :30] == cropped[:, :1, :1])
    assert torch.all(padded[:, 20:] == 0) and torch.all(padded[:, :, 30:] == 0)
    resized = prepare_image(rgb, image_geometry(20, 30, 15, 4, "crop"), mean, std)
    assert resized.shape == (3, 8, 12)


# ---------------------------------------------------------------------------------------------
# The shard file


def test_shard_contents(manifest, tmp_path):
    out = tmp_path / "shard-00000.safetensors"
    extract_shard(manifest, 0, out, params(), threads=2)
    meta = read_shard_meta(out)
    assert meta["image_ids"] == ["b", "a/x", "c", "tiny", "big"]  # manifest order, shard 0 only
    assert meta["patch_size"] == 16 and meta["embed_dim"] == 48 and meta["keep"] == ["keys", "cls"]
    assert meta["backbone"] == "vit_small_patch16_224.dino" and meta["weights"] == "random"
    assert meta["format"] == fx.FORMAT_VERSION and meta["geometry_fields"] == list(fx.GEOMETRY_FIELDS)

    shard = read_shard(out)
    assert list(shard) == meta["image_ids"]
    expected_grid = {"b": (1, 2), "a/x": (1, 2), "c": (3, 1), "tiny": (1, 1), "big": (2, 4)}
    for image_id, tensors in shard.items():
        assert set(tensors) == {"keys", "cls", "grid", "geometry"}
        gh, gw = tensors["grid"].tolist()
        assert tensors["grid"].dtype == torch.int32 and (gh, gw) == expected_grid[image_id]
        assert tensors["keys"].shape == (gh * gw, 48) and tensors["keys"].dtype == torch.float16
        assert tensors["cls"].shape == (48,) and tensors["cls"].dtype == torch.float16
        assert tensors["geometry"].dtype == torch.float32
    # 300 x 200 with max_size 64: resized to 64 x 43 (w x h), cropped to 64 x 32.
    assert shard["big"]["geometry"].tolist() == pytest.approx([64 / 300, 43, 64, 32, 64])
    assert shard["tiny"]["geometry"].tolist() == [1.0, 7, 9, 16, 16]


def test_stored_keys_are_the_backbone_keys_of_the_prepared_image(manifest, tmp_path):
    out = tmp_path / "s.safetensors"
    extract_shard(manifest, 0, out, params(fit="pad"), threads=2)
    torch.manual_seed(0)  # the seed that extract_shard draws the random weights from
    model = build_backbone("vit_small_patch16_224.dino", "random", model_kwargs=TINY)
    geometry = image_geometry(50, 20, 64, 16, "pad")
    rgb = np.asarray(Image.open(manifest.parent / "images" / "c.png").convert("RGB"))
    image = prepare_image(rgb, geometry, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    expected = extract_features(model, image[None], keys=True, cls=True)
    with ShardReader(out) as reader:
        assert "c" in reader and len(reader) == 5
        assert torch.equal(reader.get("c", "keys"), expected.keys[0].half())
        assert torch.equal(reader.get("c", "cls"), expected.cls[0].half())


def test_identical_bytes_across_runs_and_worker_counts(manifest, tmp_path):
    first, second = tmp_path / "1.safetensors", tmp_path / "2.safetensors"
    extract_shard(manifest, 0, first, params(), threads=2)
    extract_shard(manifest, 0, second, params(num_workers=1), threads=2)
    assert first.read_bytes() == second.read_bytes()


def test_shard_file_is_canonical_safetensors_whatever_the_metadata_order(tmp_path):
    from safetensors.torch import load_file

    tensors = {"x/keys": torch.arange(6, dtype=torch.float16).view(2, 3),
               "x/grid": torch.tensor([1, 2], dtype=torch.int32), "a/flag": torch.tensor(True),
               "y/geometry": torch.rand(5, dtype=torch.float64)}
    meta = {f"k{i}": str(i) for i in range(20)}
    paths = [tmp_path / "1.safetensors", tmp_path / "2.safetensors"]
    for path, items in zip(paths, (sorted(meta.items()), sorted(meta.items(), reverse=True))):
        shards.write_shard(path, tensors, dict(items))
    assert paths[0].read_bytes() == paths[1].read_bytes()
    loaded = load_file(paths[0])  # safetensors' own reader takes the file
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], v) for k, v in tensors.items())
    assert shards.read_meta(paths[0]) == meta


def test_shard_header_is_the_json_of_its_nested_dicts():
    """The header text is assembled entry by entry for speed: it must be json.dumps' text of the
    header as a dict, escapes, non-ASCII names, 0-d and empty tensors included."""
    specs = {"é\"x\\/ü/keys": (torch.float16, (3, 4)), "a/flag": (torch.bool, ()),
             "a/empty": (torch.float16, (0, 3)), "b/geometry": (torch.float64, (5,))}
    metadata = {"z": '["x", 1]', "a": "é\"q\n"}
    header, starts = shards.safetensors_header(specs, metadata)
    order = sorted(specs, key=lambda key: (-specs[key][0].itemsize, key))
    expected, offset = {"__metadata__": dict(sorted(metadata.items()))}, 0
    names = {torch.float16: "F16", torch.bool: "BOOL", torch.float64: "F64"}
    for key in order:
        size = math.prod(specs[key][1]) * specs[key][0].itemsize
        expected[key] = {"dtype": names[specs[key][0]], "shape": list(specs[key][1]),
                         "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(expected, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    assert header == len(text).to_bytes(8, "little") + text
    assert starts == {key: 8 + len(text) + expected[key]["data_offsets"][0] for key in specs}


def test_shard_writer_takes_batch_views_without_sharing_storage(tmp_path):
    batch = torch.randn(3, 4, 5)
    path = tmp_path / "views.safetensors"
    shards.write_shard(path, {f"{i}/keys": batch[i] for i in range(3)} | {"t/keys": batch[:, 1].T}, {})
    loaded = shards.read_images(path)
    assert all(torch.equal(loaded[str(i)]["keys"], batch[i]) for i in range(3))
    assert torch.equal(loaded["t"]["keys"], batch[:, 1].T)


def test_shard_written_tensor_by_tensor_in_any_order_is_the_file_of_write_shard(tmp_path):
    tensors = {"x/keys": torch.randn(4, 3).half(), "x/grid": torch.tensor([2, 2], dtype=torch.int32),
               "y/keys": torch.randn(2, 3).half(), "y/geometry": torch.rand(5, dtype=torch.float64),
               "y/empty": torch.zeros(0, 3, dtype=torch.float16)}
    meta = {"image_ids": ["x", "y"], "n": 2}
    whole, streamed = tmp_path / "whole.safetensors", tmp_path / "streamed.safetensors"
    shards.write_shard(whole, tensors, meta)
    specs = {key: shards.tensor_spec(value) for key, value in tensors.items()}
    with shards.shard_writer(streamed, specs, meta) as write:
        assert not streamed.exists()  # nothing under the final name before the last tensor
        for key in reversed(list(tensors)):
            write.batches([([key], tensors[key][None])])
    assert streamed.read_bytes() == whole.read_bytes()


def test_shard_written_in_batches_of_rows_is_the_file_of_write_shard(tmp_path, monkeypatch):
    """Rows of batches, two names interleaved in the file, in as few calls as their places allow
    (each image's cls and keys lie end to end, and the images too), partial writes completed."""
    keys, cls = torch.randn(5, 4, 3).half(), torch.randn(5, 3).half()
    ids = [f"im{i}" for i in range(5)]
    tensors = {f"{i}/keys": keys[n] for n, i in enumerate(ids)} | {f"{i}/cls": cls[n] for n, i in enumerate(ids)}
    whole, batched = tmp_path / "whole.safetensors", tmp_path / "batched.safetensors"
    shards.write_shard(whole, tensors, {"n": 5})
    calls, real_pwritev = [], os.pwritev

    def partial_pwritev(fd, buffers, offset):  # writes at most 7 bytes a call, as a real one may
        calls.append(len(buffers))
        return os.pwrite(fd, b"".join(buffers)[:7], offset)

    monkeypatch.setattr(os, "pwritev", partial_pwritev)
    specs = {key: shards.tensor_spec(value) for key, value in tensors.items()}
    with shards.shard_writer(batched, specs, {"n": 5}) as write:
        write.batches([([f"{i}/keys" for i in ids[3:]], keys[3:]), ([f"{i}/cls" for i in ids[3:]], cls[3:])])
        write.batches([([f"{i}/cls" for i in ids[:3]], cls[:3]), ([f"{i}/keys" for i in ids[:3]], keys[:3])])
    assert batched.read_bytes() == whole.read_bytes()
    assert calls == [4, 6]  # one call a batch: its rows lie end to end
    monkeypatch.setattr(shards, "_IOV_MAX", 4)  # at most 4 buffers a call
    calls.clear()
    with shards.shard_writer(batched, specs, {"n": 5}) as write:
        write.batches([([f"{i}/keys" for i in ids], keys), ([f"{i}/cls" for i in ids], cls)])
    assert batched.read_bytes() == whole.read_bytes() and calls == [4, 4, 2]
    monkeypatch.setattr(os, "pwritev", real_pwritev)
    out = tmp_path / "s.safetensors"
    for wrong, match in ((["im0/cls", "im0/cls"], "written twice"), (["im0/cls"], "1 keys for a batch of 2"),
                         (["im0/keys", "im1/keys"], "room for")):
        with pytest.raises(ValueError, match=match), shards.shard_writer(out, specs, {}) as write:
            write.batches([(wrong, cls[:2])])
        assert not out.exists()
    # A refused batch writes nothing of its call: its good rows are still to be written.
    with pytest.raises(ValueError, match="never written"), shards.shard_writer(out, specs, {}) as write:
        with pytest.raises(ValueError, match="room for"):
            write.batches([(["im0/cls"], cls[:1]), (["im1/keys"], cls[1:2])])
        assert {"im0/cls", "im1/keys"} <= write.missing
    assert not out.exists()


def test_shard_writer_refuses_what_the_header_has_no_room_for_and_leaves_no_file(tmp_path):
    specs = {"x/keys": (torch.float16, (4, 3)), "x/cls": (torch.float16, (3,))}
    out = tmp_path / "s.safetensors"
    for wrong, match in ((("x/keys", torch.zeros(4, 2, dtype=torch.float16)), "room for"),
                         (("x/keys", torch.zeros(4, 3)), "room for"),
                         (("x/tokens", torch.zeros(3, dtype=torch.float16)), "not in the shard")):
        with pytest.raises(ValueError, match=match), shards.shard_writer(out, specs, {}) as write:
            write.batches([([wrong[0]], wrong[1][None])])
        assert list(tmp_path.iterdir()) == []
    cls = torch.zeros(1, 3, dtype=torch.float16)
    with pytest.raises(ValueError, match="written twice"), shards.shard_writer(out, specs, {}) as write:
        write.batches([(["x/cls"], cls)])
        write.batches([(["x/cls"], cls)])
    with pytest.raises(ValueError, match=r"1 tensors were never written \(e\.g\. x/keys\)"):
        with shards.shard_writer(out, specs, {}) as write:
            write.batches([(["x/cls"], cls)])
    assert list(tmp_path.iterdir()) == []


def test_features_are_written_by_a_thread_while_the_next_batches_run(manifest, tmp_path, monkeypatch):
    """The stage never holds the shard and never waits for its disk: a writer thread writes each
    batch while the main thread runs the next ones, never more than WRITES_IN_FLIGHT behind."""
    import pipeline.features as features

    forwards = []
    second_forward = threading.Event()
    real = features.extract_features

    def counted(*args, **kwargs):
        forwards.append(1)
        if len(forwards) == 2:
            second_forward.set()
        return real(*args, **kwargs)

    monkeypatch.setattr(features, "extract_features", counted)
    written_after, writing_threads = {}, set()

    class Writer:
        def batches(self, batches: list[tuple[list[str], torch.Tensor]]) -> None:
            writing_threads.add(threading.current_thread())
            if not written_after:  # the first batch's write lasts until the next batch has run
                assert second_forward.wait(timeout=60), "the main thread waited for the first batch's write"
            for keys, _ in batches:
                assert not set(keys) & set(written_after)
                written_after.update(dict.fromkeys(keys, len(forwards)))

    rows = features.shard_rows(manifest, 0)
    settings = features.FeatureSettings.from_params(params()["features"])  # batches of 2
    torch.manual_seed(0)
    model = features.build_backbone("vit_small_patch16_224.dino", "random", model_kwargs=TINY)
    geometries = [image_geometry(int(h), int(w), 64, 16, "crop") for h, w in zip(rows["height"], rows["width"])]
    features.compute_features(model, rows, geometries, settings, torch.device("cpu"), Writer())
    batches = batches_by_size([g.final for g in geometries], 2)
    assert len(forwards) == len(batches) == 4
    assert threading.main_thread() not in writing_threads
    for number, batch in enumerate(batches):
        for index in batch:
            for name in ("keys", "cls"):  # after its forward, before the forward WRITES_IN_FLIGHT + 1 later
                assert number + 1 <= written_after[f"{rows['image_id'].iloc[index]}/{name}"] <= min(
                    number + features.WRITES_IN_FLIGHT + 1, len(batches))


def test_keep_list_is_respected(manifest, tmp_path):
    out = tmp_path / "tokens.safetensors"
    extract_shard(manifest, 1, out, params(keep=["tokens"]), threads=1)
    shard = read_shard(out)
    assert list(shard) == ["other"]
    assert set(shard["other"]) == {"tokens", "grid", "geometry"}
    assert shard["other"]["tokens"].shape == (2, 48)
    with pytest.raises(ConfigError, match=r"features\.keep.*unknown: attn"):
        extract_shard(manifest, 1, out, params(keep=["keys", "attn"]), threads=1)


def test_failed_write_leaves_no_shard(manifest, tmp_path, monkeypatch):
    def write_half_a_tensor_and_die(fd: int, buffers: list[memoryview], offset: int) -> None:
        os.pwrite(fd, buffers[0][: len(buffers[0]) // 2], offset)
        raise KeyboardInterrupt

    monkeypatch.setattr(shards, "_pwritev_all", write_half_a_tensor_and_die)
    out = tmp_path / "features" / "shard-00000.safetensors"
    with pytest.raises(KeyboardInterrupt):
        extract_shard(manifest, 0, out, params(), threads=1)
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_error_names_the_file(manifest, tmp_path, workers):
    bad = tmp_path / "images" / "c.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    out = tmp_path / "shard.safetensors"
    with pytest.raises(BadInputError, match=rf"^{bad}: corrupt") as info:
        extract_shard(manifest, 0, out, params(num_workers=workers), threads=1)
    assert "Traceback" not in str(info.value)
    assert not out.exists()


def test_unknown_shard_is_an_error(manifest, tmp_path):
    with pytest.raises(BadInputError, match=r"manifest\.csv: no image belongs to shard 7"):
        extract_shard(manifest, 7, tmp_path / "x.safetensors", params(), threads=1)


def test_cli_runs_the_stage_and_reports_bad_weights_in_one_line(manifest, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    argv = ["extract-features", "--manifest", str(manifest), "--shard", "1", "--out", str(out),
            "--threads", "1"]
    assert cli_main([*argv, "--params", json.dumps(params())]) == 0
    assert read_shard_meta(out)["image_ids"] == ["other"]
    bad = params()
    bad["backbone"]["weights"] = str(tmp_path / "nope.pth")
    assert cli_main([*argv, "--params", json.dumps(bad)]) == 2
    assert "nope.pth: no such file" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Decoding JPEGs in batches on the feature device (nvjpeg on a GPU; libjpeg when run on the CPU)


def photo(width: int, height: int, seed: int) -> np.ndarray:
    """Smooth gradients plus mild noise: JPEG-friendly, like a photo."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = 127 + 100 * np.sin(xx[..., None] / 23 + yy[..., None] / 31 + rng.uniform(0, 6, 3))
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture()
def jpegs(tmp_path) -> tuple[list[str], list[tuple[int, int]]]:
    """Colour JPEGs at (and above) max_size, sharing a final size, and a greyscale one."""
    paths, sizes = [], []
    for seed, (width, height) in enumerate([(64, 48), (200, 150), (192, 143)]):
        path = tmp_path / f"p{seed}.jpg"
        Image.fromarray(photo(width, height, seed)).save(path, quality=92)
        paths.append(str(path))
        sizes.append((height, width))
    gray = tmp_path / "gray.jpg"
    Image.fromarray(photo(64, 48, 9)[..., 0]).save(gray, quality=92)
    return paths + [str(gray)], sizes + [(48, 64)]


MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def decoded_batch(paths, sizes, decoder: str, device: str = "cpu") -> torch.Tensor:
    geometries = [image_geometry(h, w, 64, 16, "crop") for h, w in sizes]
    dataset = fx.ShardImages(paths, sizes, geometries, MEAN, STD, jpeg_decoder=decoder)
    samples = [dataset[i] for i in range(len(paths))]
    # every one took the path asked for
    assert all((s.data is not None) == (decoder == "device") for s in samples)
    assert all((s.pixels is not None) == (decoder == "workers") for s in samples)
    return fx.batch_images(fx.collate_samples(samples), dataset, torch.device(device)).cpu()


def as_levels(normalised: torch.Tensor) -> torch.Tensor:
    """Normalised images back to 0-255 grey levels."""
    return (normalised * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)) * 255


def test_device_decode_on_the_cpu_agrees_with_the_pillow_path(jpegs):
    paths, sizes = jpegs
    pil = as_levels(decoded_batch(paths, sizes, decoder="pil"))
    device = as_levels(decoded_batch(paths, sizes, decoder="device"))
    diff = (device - pil).abs()
    # Same libjpeg, so the decoded pixels are equal (images that need no resize match exactly);
    # torch's antialiased bicubic and Pillow's round to different levels at most one apart.
    assert diff[[0, 3]].max() < 1e-3
    assert diff.mean() < 0.25 and diff.max() < 1.01


def test_device_decode_prepares_each_size_as_one_stack_in_the_batchs_order(jpegs):
    """The batch is prepared one stack per original size (images 0 and 3 share theirs, and
    sit apart): every row must be the image's own, as prepared alone."""
    paths, sizes = jpegs
    order = [3, 1, 0, 2]
    batch = decoded_batch([paths[i] for i in order], [sizes[i] for i in order], decoder="device")
    for row, index in enumerate(order):
        assert torch.equal(batch[row], decoded_batch([paths[index]], [sizes[index]], decoder="device")[0])
    assert not torch.equal(batch[0], batch[2])  # the two 64x48 images are different pictures


def test_a_batch_crosses_from_its_worker_as_two_tensors_whatever_mixes_in_it(jpegs, tmp_path):
    """JPEGs for the device decoder and images Pillow prepared (a PNG) in one batch: the worker
    hands over one tensor of bytes and one stack, and every row is still the image's own."""
    paths, sizes = jpegs
    pngs = [tmp_path / "p5.png", tmp_path / "p6.png"]
    for seed, png in enumerate(pngs, start=5):
        Image.fromarray(photo(64, 48, seed)).save(png)
    order = [str(pngs[0]), paths[0], paths[3], str(pngs[1])]
    order_sizes = [(48, 64)] * 4
    geometries = [image_geometry(h, w, 64, 16, "crop") for h, w in order_sizes]
    dataset = fx.ShardImages(order, order_sizes, geometries, MEAN, STD, jpeg_decoder="device")
    batch = fx.collate_samples([dataset[i] for i in range(4)])
    assert batch.indices == [0, 1, 2, 3] and batch.errors == [None] * 4
    assert batch.jpeg_positions == [1, 2] and batch.prepared_positions == [0, 3]
    assert [bytes(b.numpy()) for b in batch.jpegs()] == [Path(paths[i]).read_bytes() for i in (0, 3)]
    assert batch.prepared.shape == (2, 3, 48, 64)
    images = fx.batch_images(batch, dataset, torch.device("cpu"))
    for row, path in enumerate(order):
        alone = decoded_batch([path], [(48, 64)], "device" if path.endswith(".jpg") else "pil")[0]
        assert torch.equal(images[row], alone)
    assert not torch.equal(images[0], images[3])


@pytest.mark.parametrize("failure", ["raises", "wrong size"])
def test_a_batch_the_device_decoder_fails_on_is_decoded_by_pillow(jpegs, monkeypatch, failure):
    paths, sizes = jpegs
    pillow = decoded_batch(paths[:2], sizes[:2], decoder="pil")

    def failing_decoder(data, device):
        if failure == "raises":
            raise RuntimeError("nvjpeg: unsupported")
        return [torch.zeros(3, 8, 8, dtype=torch.uint8) for _ in data]

    monkeypatch.setattr(fx, "decode_jpegs", failing_decoder)
    assert torch.equal(decoded_batch(paths[:2], sizes[:2], decoder="device"), pillow)


def test_worker_decode_gives_the_device_decoders_pixels_on_the_cpu(jpegs):
    """The workers decode with the libjpeg the CPU's device path uses, and their pixels are
    prepared by the same code: the same batch, exactly, whatever the order and sizes."""
    paths, sizes = jpegs
    order = [3, 1, 0, 2]
    paths, sizes = [paths[i] for i in order], [sizes[i] for i in order]
    assert torch.equal(decoded_batch(paths, sizes, "workers"), decoded_batch(paths, sizes, "device"))


def test_a_worker_decoded_batch_crosses_as_one_tensor_of_pixels_beside_pillows_stack(jpegs, tmp_path):
    paths, sizes = jpegs
    png = tmp_path / "p5.png"
    Image.fromarray(photo(64, 48, 5)).save(png)
    order = [paths[0], str(png), paths[3]]
    geometries = [image_geometry(48, 64, 64, 16, "crop")] * 3
    dataset = fx.ShardImages(order, [(48, 64)] * 3, geometries, MEAN, STD, jpeg_decoder="workers")
    batch = fx.collate_samples([dataset[i] for i in range(3)])
    assert batch.pixel_positions == [0, 2] and batch.prepared_positions == [1] and batch.jpeg is None
    assert batch.pixels.shape == (2 * 3 * 48 * 64,) and batch.pixel_shapes == [(3, 48, 64)] * 2
    images = fx.batch_images(batch, dataset, torch.device("cpu"))
    for row, path in enumerate(order):
        alone = decoded_batch([path], [(48, 64)], "workers" if path.endswith(".jpg") else "pil")[0]
        assert torch.equal(images[row], alone)
    assert not torch.equal(images[0], images[2])


def test_a_batch_packed_in_a_worker_is_made_in_shared_memory(jpegs, tmp_path, monkeypatch):
    """Inside a DataLoader worker every tensor of the batch is allocated in shared memory (handed
    over without another copy); in the main process, in private memory."""
    paths, sizes = jpegs
    png = tmp_path / "p5.png"
    Image.fromarray(photo(64, 48, 5)).save(png)
    order, order_sizes = [paths[0], str(png), paths[3]], [(48, 64)] * 3
    geometries = [image_geometry(48, 64, 64, 16, "crop")] * 3
    for decoder, kinds in (("workers", ("pixels", "prepared")), ("device", ("jpeg", "prepared"))):
        dataset = fx.ShardImages(order, order_sizes, geometries, MEAN, STD, jpeg_decoder=decoder)
        samples = [dataset[i] for i in range(3)]
        in_main = fx.collate_samples(samples)
        with monkeypatch.context() as patched:
            patched.setattr(torch.utils.data, "get_worker_info", lambda: object())
            in_worker = fx.collate_samples(samples)
        for kind in kinds:
            assert getattr(in_worker, kind).is_shared() and not getattr(in_main, kind).is_shared()
            assert torch.equal(getattr(in_worker, kind), getattr(in_main, kind))


@pytest.mark.parametrize("failure", ["raises", "wrong size"])
def test_an_image_the_worker_fails_to_decode_goes_through_pillow(jpegs, monkeypatch, failure):
    paths, sizes = jpegs

    def failing_decoder(data, device):
        if failure == "raises":
            raise RuntimeError("libjpeg: unsupported")
        return [torch.zeros(3, 8, 8, dtype=torch.uint8) for _ in data]

    monkeypatch.setattr(fx, "decode_jpegs", failing_decoder)
    geometries = [image_geometry(h, w, 64, 16, "crop") for h, w in sizes]
    dataset = fx.ShardImages(paths, sizes, geometries, MEAN, STD, jpeg_decoder="workers")
    sample = dataset[1]
    assert sample.pixels is None and sample.image is not None
    assert torch.equal(sample.image, dataset.prepared(1).image)


def jpeg_manifest(folder: Path) -> Path:
    """Six JPEGs of three sizes (two sharing a final size) and a PNG, one shard."""
    rows = []
    for seed, (width, height) in enumerate([(64, 48), (200, 150), (64, 48), (192, 143), (40, 30), (64, 48)]):
        path = folder / f"j{seed}.jpg"
        Image.fromarray(photo(width, height, seed)).save(path, quality=90)
        rows.append([f"j{seed}", str(path), "", "", False, "train", width, height, 0])
    png = folder / "p.png"
    Image.fromarray(photo(40, 30, 9)).save(png)
    rows.append(["p", str(png), "", "", False, "train", 40, 30, 0])
    out = folder / "manifest.csv"
    pd.DataFrame(rows, columns=COLUMNS).to_csv(out, index=False)
    return out


def test_worker_decode_writes_the_device_paths_shard_through_real_workers(tmp_path):
    """Through the stage with two worker processes (the pixels cross a process boundary): the
    same bytes as JPEGs decoded in the main process by the device path, and not Pillow's."""
    manifest = jpeg_manifest(tmp_path)
    shards_by_decoder = {}
    for decoder in ("workers", "device", "pil"):
        out = tmp_path / f"{decoder}.safetensors"
        extract_shard(manifest, 0, out, params(decode=decoder, num_workers=2, batch_size=3), threads=1)
        shards_by_decoder[decoder] = out.read_bytes()
    assert shards_by_decoder["workers"] == shards_by_decoder["device"]
    assert shards_by_decoder["workers"] != shards_by_decoder["pil"]  # resampled by torch, not Pillow


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvjpeg)")
def test_nvjpeg_decode_agrees_with_the_pillow_path(jpegs):
    paths, sizes = jpegs
    pil = as_levels(decoded_batch(paths, sizes, decoder="pil"))
    gpu = as_levels(decoded_batch(paths, sizes, decoder="device", device="cuda"))
    diff = (gpu - pil).abs()
    assert diff.mean() < 1.5 and diff.max() <= 12  # nvjpeg's IDCT and upsampling differ a little more


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_worker_decoded_pixels_prepared_on_the_gpu_agree_with_the_cpu(jpegs):
    paths, sizes = jpegs
    cpu = decoded_batch(paths, sizes, "workers")
    gpu = decoded_batch(paths, sizes, "workers", device="cuda")
    assert (as_levels(gpu) - as_levels(cpu)).abs().max() < 1.01  # the same pixels, resampled on another device


@pytest.mark.parametrize("decoder", ["device", "workers"])
def test_an_image_far_bigger_than_its_resized_size_is_shrunk_by_pillow_in_the_worker(tmp_path, decoder):
    """A 12-megapixel photo at 512 px would hand 61x its resized pixels to the GPU (or the
    workers' shared memory): past DECODED_AREA_LIMIT times, Pillow decodes and shrinks it."""
    sizes = [(150, 200), (192, 256), (193, 256)]  # each resized to 48 x 64: 9.8x, 16x, just over 16x its area
    paths = []
    for seed, (height, width) in enumerate(sizes):
        path = tmp_path / f"big{seed}.jpg"
        Image.fromarray(photo(width, height, seed)).save(path, quality=92)
        paths.append(str(path))
    geometries = [image_geometry(h, w, 64, 16, "crop") for h, w in sizes]
    assert [g.resized for g in geometries] == [(48, 64), (48, 64), (48, 64)]
    dataset = fx.ShardImages(paths, sizes, geometries, MEAN, STD, jpeg_decoder=decoder)
    whole = [dataset[i].data is not None or dataset[i].pixels is not None for i in range(3)]
    assert whole == [True, True, False]
    assert torch.equal(dataset[2].image, dataset.prepared(2).image)


def test_only_complete_upright_rgb_or_grey_jpegs_go_to_the_device(tmp_path, jpegs):
    paths, sizes = jpegs
    good = Path(paths[0]).read_bytes()
    assert fx.device_decodable(good, sizes[0])
    assert not fx.device_decodable(good, (sizes[0][0] + 1, sizes[0][1]))  # not the manifest's size
    assert not fx.device_decodable(good[: len(good) // 2], sizes[0])  # truncated
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(photo(64, 48, 0)).save(rotated, exif=exif)
    assert not fx.device_decodable(rotated.read_bytes(), (64, 48))
    cmyk = tmp_path / "cmyk.jpg"
    Image.fromarray(photo(64, 48, 0)).convert("CMYK").save(cmyk)
    assert not fx.device_decodable(cmyk.read_bytes(), (48, 64))
    png = tmp_path / "x.png"
    Image.fromarray(photo(64, 48, 0)).save(png)
    assert not fx.device_decodable(png.read_bytes(), (48, 64))


@pytest.mark.parametrize("decoder", ["device", "workers"])
def test_device_decode_leaves_other_formats_on_pillows_path(manifest, tmp_path, decoder):
    pil, device = tmp_path / "pil.safetensors", tmp_path / "device.safetensors"
    extract_shard(manifest, 0, pil, params(decode="pil"), threads=1)
    extract_shard(manifest, 0, device, params(decode=decoder), threads=1)
    assert pil.read_bytes() == device.read_bytes()  # the fixture's images are PNGs


@pytest.mark.parametrize("decoder", ["device", "workers"])
def test_truncated_jpeg_is_reported_by_name_with_device_decode(manifest, tmp_path, decoder):
    bad = tmp_path / "images" / "c.png"  # the name does not make the format: the bytes do
    Image.fromarray(photo(20, 50, 0)).save(bad, format="JPEG")
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(BadInputError, match=rf"^{bad}: corrupt"):
        extract_shard(manifest, 0, tmp_path / "shard.safetensors", params(decode=decoder), threads=1)


@pytest.mark.parametrize(("decode", "device", "decoder"), [
    ("auto", "cpu", "pil"), ("auto", "cuda", "device"), ("pil", "cuda", "pil"), ("device", "cpu", "device"),
    ("workers", "cpu", "workers"), ("workers", "cuda", "workers"),
])
def test_who_decodes_the_jpegs(decode, device, decoder):
    settings = fx.FeatureSettings.from_params(params(decode=decode)["features"])
    assert fx.jpeg_decoder(settings.decode, torch.device(device)) == decoder


def test_unknown_decode_is_a_config_error(manifest, tmp_path):
    with pytest.raises(ConfigError, match=r"features\.decode: 'nvjpeg'"):
        extract_shard(manifest, 0, tmp_path / "s.safetensors", params(decode="nvjpeg"), threads=1)
