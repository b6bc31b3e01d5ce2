"""Training views rendered on the training device (train.views_on, issue 15 item 3): the workers
only decode and draw the random choices; the batch is rendered, jittered and normalised where the
model runs. Checked on the CPU against the worker path (torchvision's per-image jitter), so the
GPU runs the same code with the same draws."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from pipeline.errors import ConfigError
from pipeline.methods.pc2m.views import TwoViewDataset, render_view_batch
from pipeline.methods.vitpcm.views import MosaicViewDataset, MosaicViews, render_mosaic_batch
from pipeline.training.augment import (
    BRIGHTNESS,
    CONTRAST,
    GREYSCALE_P,
    HUE,
    SATURATION,
    apply_jitter,
    colour_jitter,
    draw_jitter,
    jitter_batch,
    render,
    render_batch,
)
from pipeline.training.data import LabelledImage, views_on_device
from pipeline.training.trainer import train
from test_pc2m import BACKBONE, make_demo, train_settings

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The views are checked on the CPU always, and on a GPU where there is one.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def hard_images(count: int, seed: int) -> torch.Tensor:
    """Random images with what the HSV formulas special-case: grey pixels (no hue), channel ties
    (which formula gives the hue), black and white."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(count, 3, 23, 31, generator=generator)
    images[0] = 0.5
    images[1, :, :6] = images[1, :1, :6]
    images[2] = torch.round(images[2] * 3) / 3
    images[3, :, :, :4] = 0.0
    images[3, :, :, 4:8] = 1.0
    return images


def test_colour_jitter_draws_in_the_order_it_always_did():
    """colour_jitter = torchvision's five operations with uniforms drawn brightness, contrast,
    saturation, hue, then the greyscale coin: the worker path's numbers for a seed do not move.
    The ranges are ViT-PCM's (PRIOR-ART.md; paper 000 says only "jittering")."""
    assert (BRIGHTNESS, CONTRAST, SATURATION, HUE, GREYSCALE_P) == (0.2, (0.5, 2.0), (0.5, 1.5), 0.1, 0.1)
    image = hard_images(5, 0)[4]
    for seed in range(8):
        generator = torch.Generator().manual_seed(seed)

        def uniform(low, high, generator=generator):
            return low + (high - low) * float(torch.rand((), generator=generator))

        expected = TF.adjust_brightness(image, uniform(1 - BRIGHTNESS, 1 + BRIGHTNESS))
        expected = TF.adjust_contrast(expected, uniform(*CONTRAST))
        expected = TF.adjust_saturation(expected, uniform(*SATURATION))
        expected = TF.adjust_hue(expected, uniform(-HUE, HUE))
        if float(torch.rand((), generator=generator)) < GREYSCALE_P:
            expected = TF.rgb_to_grayscale(expected, num_output_channels=3)
        actual = colour_jitter(image, torch.Generator().manual_seed(seed))
        assert torch.equal(actual, expected.clamp(0, 1)), seed


def test_batched_jitter_equals_torchvision_per_image():
    images = hard_images(24, 1)
    generator = torch.Generator().manual_seed(2)
    factors = torch.stack([draw_jitter(generator) for _ in range(24)])
    factors[4, 4] = factors[9, 4] = 1.0  # greyscale
    factors[5, 3], factors[6, 3], factors[7, 3] = HUE, -HUE, 0.0  # hue at both ends, none
    factors[8, :3] = torch.tensor([1.2, 0.5, 1.5], dtype=torch.float64)  # range ends
    expected = torch.stack([apply_jitter(image, f) for image, f in zip(images, factors, strict=True)])
    torch.testing.assert_close(jitter_batch(images, factors), expected, atol=1e-5, rtol=0)
    # Each image gets its own factors: swapping two rows swaps those two outputs only.
    swapped = factors[[1, 0] + list(range(2, 24))]
    assert not torch.allclose(jitter_batch(images, swapped)[:2], expected[:2], atol=1e-3)


def test_batched_render_equals_per_image_render():
    sources = hard_images(6, 3)
    scales = torch.linspace(0.5, 1, 6)[:, None, None]
    thetas = torch.tensor([[[0.7, -0.2, 0.1], [0.2, 0.7, -0.2]]]).repeat(6, 1, 1) * scales
    expected = torch.stack([render(s, t, 17) for s, t in zip(sources, thetas, strict=True)])
    assert torch.equal(render_batch(sources, thetas, 17), expected)


def test_views_on_resolves_by_device_and_refuses_other_values():
    assert views_on_device("auto", torch.device("cuda", 0)) and not views_on_device("auto", torch.device("cpu"))
    assert views_on_device("device", torch.device("cpu")) and not views_on_device("workers", torch.device("cuda"))
    with pytest.raises(ConfigError, match="train.views_on"):
        views_on_device("gpu", torch.device("cpu"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("device_views"), 8, 2, 64, 48)


def demo_images(index) -> list[LabelledImage]:
    manifest = pd.read_csv(index / "manifest.csv", dtype=str, keep_default_na=False)
    return [LabelledImage(r.image_id, r.image_path, (1, 2)) for r in manifest.itertuples()][:6]


def collate(dataset, count: int) -> dict[str, torch.Tensor]:
    items = [dataset[i] for i in range(count)]
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("jitter", [True, False])
def test_pc2m_views_on_the_device_equal_the_workers_views(demo, jitter, device):
    from pipeline.methods.pc2m.settings import TrainSettings

    views = TrainSettings.from_params(train_settings(global_size=40, jitter=jitter, max_rotation=15.0)).views()
    workers = TwoViewDataset(demo_images(demo), 3, views, MEAN, STD, seed=5)
    drawn = TwoViewDataset(demo_images(demo), 3, views, MEAN, STD, seed=5, render_in_worker=False)
    workers.epoch = drawn.epoch = 2
    expected, batch = collate(workers, 6), collate(drawn, 6)
    assert batch["source"].dtype == torch.uint8 and "global" not in batch  # the workers only decode
    for key in ("theta_global", "theta_local", "target"):
        assert torch.equal(batch[key], expected[key]), key
    global_views, local_views = render_view_batch(batch, views, workers.mean, workers.std, torch.device(device))
    torch.testing.assert_close(global_views.cpu(), expected["global"], atol=3e-5, rtol=0)
    torch.testing.assert_close(local_views.cpu(), expected["local"], atol=3e-5, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("jitter", [True, False])
def test_vitpcm_views_on_the_device_equal_the_workers_views(demo, jitter, device):
    views = MosaicViews(size=48, patch=8, crop_size=32, crop_probability=0.5, flip=True, jitter=jitter)
    workers = MosaicViewDataset(demo_images(demo), 3, views, MEAN, STD, seed=7)
    drawn = MosaicViewDataset(demo_images(demo), 3, views, MEAN, STD, seed=7, render_in_worker=False)
    expected, batch = collate(workers, 6), collate(drawn, 6)
    for key in ("theta_main", "theta_tile", "target"):
        assert torch.equal(batch[key], expected[key]), key
    assert not torch.equal(batch["theta_tile"][0], batch["theta_tile"][1])  # draws differ per image
    main, tile = render_mosaic_batch(batch, views, workers.mean, workers.std, torch.device(device))
    torch.testing.assert_close(main.cpu(), expected["image"], atol=3e-5, rtol=0)
    torch.testing.assert_close(tile.cpu(), expected["tile"], atol=3e-5, rtol=0)


@pytest.mark.parametrize("method", ["pc2m", "vitpcm"])
def test_training_with_views_on_the_device_follows_the_workers_run(demo, tmp_path, method, monkeypatch):
    """The whole trainer both ways on the CPU (the warm-up epoch, then the offline pass): the same
    losses to float rounding and nearly the same weights; only the device run renders batches."""
    import pipeline.methods.pc2m.method as pc2m_method
    import pipeline.methods.vitpcm.method as vitpcm_method

    module, name = ((pc2m_method, "render_view_batch") if method == "pc2m"
                    else (vitpcm_method, "render_mosaic_batch"))
    rendered = []
    original = getattr(module, name)
    monkeypatch.setattr(module, name,
                        lambda batch, *args: rendered.append(len(batch["source"])) or original(batch, *args))
    runs, calls = {}, {}
    for views_on in ("workers", "device"):
        settings = train_settings(method=method, epochs=1, batch_size=2, global_size=48, views_on=views_on)
        if method == "vitpcm":
            settings["vitpcm"] = {"crop_size": 32}
        train(demo / "manifest.csv", demo / "classes.json", None, tmp_path / views_on,
              {"backbone": BACKBONE, "train": settings, "mode": "weak", "seed": 0}, 2)
        runs[views_on] = (pd.read_csv(tmp_path / views_on / "history.csv"),
                          torch.load(tmp_path / views_on / "model.pt", weights_only=True)["model"])
        calls[views_on] = len(rendered)
    assert calls == {"workers": 0, "device": 4}  # 8 train images in batches of 2
    (workers_history, workers_model), (device_history, device_model) = runs["workers"], runs["device"]
    assert workers_history["loss"].notna().all()
    pd.testing.assert_series_equal(device_history["loss"], workers_history["loss"], atol=1e-4, rtol=0)
    for name, tensor in workers_model.items():
        torch.testing.assert_close(device_model[name], tensor, atol=1e-3, rtol=0, msg=name)
