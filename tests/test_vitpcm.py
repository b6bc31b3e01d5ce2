"""ViT-PCM (paper 001) as ``train.method: vitpcm``: the HV-BiLSTM, the ET branch's views, mosaic
and soft target, the ET loss, and training / resume / prediction on the demo; tiny CPU models."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from pipeline import shards
from pipeline.backbone import build_backbone
from pipeline.errors import ConfigError
from pipeline.methods.pc2m.model import (
    Architecture,
    HVBiLSTM,
    PatchPredictions,
    build_network,
    image_class_probabilities,
    multilabel_bce,
    same_in_train_and_eval,
)
from pipeline.methods.vitpcm.losses import ETBranch, condition_on_labels, et_target, vitpcm_loss
from pipeline.methods.vitpcm.settings import ViTPCMSettings
from pipeline.methods.vitpcm.step import inference_predictions
from pipeline.methods.vitpcm.views import (
    MosaicViews,
    crop_window,
    et_affine,
    fair_coin,
    main_affine,
    tile_mosaic,
    untile_mosaic,
)
from pipeline.training.augment import local_to_global, resample
from pipeline.training.distributed import LOCAL
from test_pc2m import BACKBONE, NUM_CLASSES, make_demo, predict_settings, train_settings


def vitpcm_settings(**overrides) -> dict:
    vitpcm = dict(lstm_hidden=16, crop_size=16, crop_probability=0.5)
    vitpcm.update(overrides.pop("vitpcm", {}))
    return train_settings(method="vitpcm", global_size=48, vitpcm=vitpcm, **overrides)


# ---------------------------------------------------------------------------------------------
# HV-BiLSTM


def test_hv_bilstm_conditions_each_patch_on_its_row_and_column():
    """Output: [row BiLSTM | column BiLSTM] per patch. Perturbing patch (r, c) changes the row
    half along row r only (every column: bidirectional) and the column half along column c only."""
    torch.manual_seed(0)
    lstm = HVBiLSTM(in_features=8, hidden=5, dropout=0.2).eval()
    grid = torch.randn(2, 4, 6, 8)
    out = lstm(grid)
    assert out.shape == (2, 4, 6, 20) and lstm.out_features == 20
    r, c = 1, 3
    perturbed = grid.clone()
    perturbed[0, r, c] += 1.0
    changed = (lstm(perturbed) - out).abs() > 1e-7
    rows_half, columns_half = changed[0, ..., :10].any(-1), changed[0, ..., 10:].any(-1)
    expected_rows = torch.zeros(4, 6, dtype=torch.bool)
    expected_rows[r] = True
    expected_columns = torch.zeros(4, 6, dtype=torch.bool)
    expected_columns[:, c] = True
    assert torch.equal(rows_half, expected_rows)
    assert torch.equal(columns_half, expected_columns)
    assert not changed[1].any()  # other images untouched
    # Training mode applies dropout; eval mode is deterministic.
    assert not torch.equal(lstm.train()(grid), lstm.train()(grid))


# ---------------------------------------------------------------------------------------------
# The ET branch: views, mosaic, target


def tf_style_view(maps: torch.Tensor, lr: bool, ud: bool, transpose: bool) -> torch.Tensor:
    """The official augmentation on C x H x W: transpose(flip_ud(flip_lr(x)))."""
    if lr:
        maps = maps.flip(-1)
    if ud:
        maps = maps.flip(-2)
    return maps.transpose(-1, -2) if transpose else maps


@pytest.mark.parametrize("drop_path", [0.0, 0.5])
def test_the_stop_gradient_pass_equals_the_whole_network_in_eval_mode(drop_path):
    """The inference pass reuses the main branch's backbone tokens when the backbone's forward is
    the same in both modes (the DINO ViTs): its predictions must equal a full eval-mode forward,
    and a backbone with drop-path (mode-dependent) must run again."""
    torch.manual_seed(0)
    kwargs = {**BACKBONE["model_kwargs"], "drop_path_rate": drop_path}
    backbone = build_backbone(BACKBONE["name"], "random", model_kwargs=kwargs)
    model = build_network(backbone, Architecture("vitpcm", NUM_CLASSES, 6), dropout=0.2).train()
    images = torch.randn(2, 3, 32, 40)
    tokens = model.patch_tokens(images)
    assert same_in_train_and_eval(model.backbone) == model.backbone_same_in_both_modes == (drop_path == 0.0)
    reused = inference_predictions(model, images, tokens)
    assert model.training  # back in training mode
    with torch.no_grad():
        expected = model.eval()(images)
    assert torch.equal(reused.log_probs, expected.log_probs)


@pytest.mark.parametrize("crop_patches", [12, 8])
def test_soft_target_is_the_crop_of_the_full_prediction_in_the_tile_frame(crop_patches):
    """Identifiable random maps on a 24 x 24 grid (384 px, patch 16): the main branch's
    prediction (flipped / transposed image) mapped into the tile's frame equals the crop of the
    source-frame map, flipped / transposed like the tile (crop of 12 patches = the tile: exact;
    8 patches: bilinearly scaled to the tile's 12 as resizing the crop does, except on the tile's
    border, where our bilinear read at the patch centre sees the patches beyond the crop)."""
    source = torch.softmax(torch.randn(1, 5, 24, 24, generator=torch.Generator().manual_seed(0)) * 3, dim=1)[0]
    views = MosaicViews(size=384, patch=16, crop_size=16 * crop_patches, crop_probability=1.0, flip=True, jitter=False)
    for seed in range(12):
        generator = torch.Generator().manual_seed(seed)
        theta_main, theta_tile = main_affine(generator, True), et_affine(generator, views)
        replay = torch.Generator().manual_seed(seed)
        main_flips = (fair_coin(replay), fair_coin(replay), fair_coin(replay))
        torch.rand((), generator=replay)  # the crop coin
        y, x = crop_window(replay, 384, views.crop_size, 16)
        tile_flips = (fair_coin(replay), fair_coin(replay), fair_coin(replay))
        assert y % 16 == 0 and x % 16 == 0

        main_prediction = tf_style_view(source, *main_flips)[None]
        crop = source[:, y // 16 : y // 16 + crop_patches, x // 16 : x // 16 + crop_patches][None]
        crop = F.interpolate(crop, size=(12, 12), mode="bilinear", align_corners=False)
        expected = tf_style_view(crop[0], *tile_flips)

        alignment = local_to_global(theta_main[None], theta_tile[None], (12, 12))
        assert alignment.valid.all()
        mapped = resample(main_prediction, alignment)[0]
        if crop_patches == 12:
            torch.testing.assert_close(mapped, expected, atol=1e-5, rtol=0)
            everything = torch.ones(1, 5)
            torch.testing.assert_close(et_target(main_prediction, alignment, everything),
                                       condition_on_labels(expected[None], everything))
        else:
            torch.testing.assert_close(mapped[:, 1:-1, 1:-1], expected[:, 1:-1, 1:-1], atol=1e-5, rtol=0)


def test_mosaic_tiles_four_images_two_by_two_and_splits_back():
    tiles = torch.arange(6 * 3 * 4 * 4, dtype=torch.float32).reshape(6, 3, 4, 4)
    mosaics = tile_mosaic(tiles)
    assert mosaics.shape == (2, 3, 8, 8)
    torch.testing.assert_close(mosaics[0, :, :4, :4], tiles[0])
    torch.testing.assert_close(mosaics[0, :, :4, 4:], tiles[1])
    torch.testing.assert_close(mosaics[0, :, 4:, :4], tiles[2])
    torch.testing.assert_close(mosaics[0, :, 4:, 4:], tiles[3])
    torch.testing.assert_close(mosaics[1, :, 4:, 4:], tiles[1])  # 6 tiles: the last mosaic reuses 0, 1
    torch.testing.assert_close(untile_mosaic(mosaics, 6), tiles)
    # Patch level: the mosaic's patch grid is the tiles' grids side by side (2 x 2 px patches).
    patch_means = F.avg_pool2d(mosaics, 2)
    torch.testing.assert_close(untile_mosaic(patch_means, 6), F.avg_pool2d(tiles, 2))


def test_labels_condition_the_target():
    """Unlabelled classes vanish, patches stay distributions, and each labelled class, scaled to
    peak 1, is the most likely class at its peak patch, however unlikely it was before."""
    logits = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    logits[:, 2] -= 6.0  # class 2: a small probability everywhere
    probs = torch.softmax(logits, dim=1)
    targets = torch.tensor([[1.0, 0, 1, 0], [1, 1, 1, 1]])
    conditioned = condition_on_labels(probs, targets)
    assert float(conditioned[0, [1, 3]].abs().max()) == 0.0
    torch.testing.assert_close(conditioned.sum(dim=1), torch.ones(2, 3, 3))
    for image, labels in ((0, [0, 2]), (1, [0, 1, 2, 3])):
        for c in labels:
            peak = probs[image, c].flatten().argmax()
            at_peak = conditioned[image].flatten(1)[:, peak]
            assert float(at_peak[c]) == pytest.approx(float(at_peak.max()))


def test_et_loss_vanishes_for_equivariant_predictions_only():
    """Near one-hot predictions that transform exactly like the image give L_ET ~ 0; tile
    predictions that ignore the tile's flips do not."""
    classes = torch.randint(0, 5, (24, 24), generator=torch.Generator().manual_seed(2))
    source_logits = F.one_hot(classes, 5).permute(2, 0, 1).float() * 40
    views = MosaicViews(size=384, patch=16, crop_size=192, crop_probability=1.0, flip=True, jitter=False)
    settings = ViTPCMSettings(l2=0.0)
    for seed in range(20):
        generator = torch.Generator().manual_seed(seed)
        theta_main, theta_tile = main_affine(generator, True), et_affine(generator, views)
        if torch.equal(theta_tile[:, :2].abs(), theta_tile[:, :2]):
            continue  # no flip in this tile: not a test of the flips
        replay = torch.Generator().manual_seed(seed)
        main_flips = (fair_coin(replay), fair_coin(replay), fair_coin(replay))
        torch.rand((), generator=replay)
        y, x = crop_window(replay, 384, 192, 16)
        tile_flips = (fair_coin(replay), fair_coin(replay), fair_coin(replay))
        main_pred = PatchPredictions(F.log_softmax(tf_style_view(source_logits, *main_flips), dim=0)[None])
        crop = source_logits[:, y // 16 : y // 16 + 12, x // 16 : x // 16 + 12]
        equivariant = PatchPredictions(F.log_softmax(tf_style_view(crop, *tile_flips), dim=0)[None])
        unflipped = PatchPredictions(F.log_softmax(crop, dim=0)[None])
        alignment = local_to_global(theta_main[None], theta_tile[None], (12, 12))
        targets = torch.ones(1, 5)
        target = et_target(main_pred.probs, alignment, targets)
        weight = torch.zeros(5, 8)
        good = vitpcm_loss(main_pred, ETBranch(equivariant, target, alignment.valid), targets, weight, settings, LOCAL)
        bad = vitpcm_loss(main_pred, ETBranch(unflipped, target, alignment.valid), targets, weight, settings, LOCAL)
        assert float(good.et) < 1e-4  # float32 rounding of ~one-hot log-probabilities
        assert float(bad.et) > 1.0
        torch.testing.assert_close(good.total, good.mce + good.et)
        return
    pytest.fail("no seed drew a flipped tile")


def test_l2_penalty_and_mce_scale():
    """The L2 term is l2 * ||W||^2 and L_MCE is the PC2M BCE averaged over classes (eq. 1)."""
    predictions = PatchPredictions(F.log_softmax(torch.randn(2, 5, 3, 3), dim=1))
    targets = torch.tensor([[1.0, 1, 0, 0, 0], [1, 0, 0, 1, 1]])
    weight = torch.randn(5, 8)
    terms = vitpcm_loss(predictions, None, targets, weight, ViTPCMSettings(), LOCAL)
    torch.testing.assert_close(terms.l2, 0.01 * weight.pow(2).sum())
    torch.testing.assert_close(terms.mce, multilabel_bce(image_class_probabilities(predictions), targets) / 5)
    assert float(terms.et) == 0.0


def test_settings_defaults_and_checks():
    from pipeline.methods.pc2m.settings import TrainSettings

    settings = TrainSettings.from_params(train_settings(method="vitpcm", global_size=384))
    assert settings.vitpcm == ViTPCMSettings()
    assert (settings.vitpcm.lstm_hidden, settings.vitpcm.crop_size, settings.vitpcm.l2) == (192, 128, 0.01)
    assert settings.architecture(21, "vit").lstm_hidden == 192 and settings.head_dropout() == 0.2
    assert TrainSettings.from_params(train_settings()).architecture(21, "vit").lstm_hidden == 0  # PC2M
    with pytest.raises(ConfigError, match="crop_size"):
        TrainSettings.from_params(train_settings(method="vitpcm", global_size=96))
    with pytest.raises(ConfigError, match="twice the patch"):
        MosaicViews(size=40, patch=8, crop_size=16, crop_probability=0.3, flip=True, jitter=True).check()


# ---------------------------------------------------------------------------------------------
# Training, resume and prediction


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("vitpcm_demo"), 16, 4, 64, 48)


def _train(index, out, settings: dict) -> None:
    from pipeline.training.trainer import train

    train(index / "manifest.csv", index / "classes.json", None, out,
          {"backbone": BACKBONE, "train": settings, "mode": "weak", "seed": 0}, 2)


def test_training_lowers_the_loss_resumes_exactly_and_predicts(demo, tmp_path):
    from pipeline.predict import load_predictor, predict_shard

    settings = vitpcm_settings(epochs=3, lr=3e-3, lr_after_warmup_factor=1.0)
    _train(demo, tmp_path / "straight", settings)
    history = pd.read_csv(tmp_path / "straight" / "history.csv")
    assert {"mce", "et", "l2"} <= set(history.columns) and history["epsilon"].isna().all()
    assert history["loss"].iloc[-1] < history["loss"].iloc[0], history[["loss", "mce", "et"]]
    assert history["et"].gt(0).all()

    # Resume: stop after 2 epochs (optimizer state kept: same phase), then ask for 3: same weights
    # and logs as the straight run.
    _train(demo, tmp_path / "resumed", settings | {"epochs": 2})
    _train(demo, tmp_path / "resumed", settings)
    straight = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "model.pt", weights_only=True)
    assert straight["arch"] == {"method": "vitpcm", "num_classes": NUM_CLASSES, "lstm_hidden": 16,
                                "backbone": "vit_small_patch16_224.dino"}
    assert straight["model"].keys() == resumed["model"].keys()
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    pd.testing.assert_frame_equal(history.drop(columns="seconds"),
                                  pd.read_csv(tmp_path / "resumed" / "history.csv").drop(columns="seconds"))

    model = load_predictor(tmp_path / "straight" / "model.pt", BACKBONE, torch.device("cpu")).model
    assert isinstance(model.conditioning, HVBiLSTM)
    params = {"backbone": BACKBONE, "predict": predict_settings(max_size=64, flip=True), "mode": "weak"}
    predict_shard(demo / "manifest.csv", 0, tmp_path / "straight" / "model.pt", tmp_path / "probs.safetensors",
                  tmp_path / "masks", params, 2)
    images = shards.read_images(tmp_path / "probs.safetensors")
    probs = next(iter(images.values()))["probs"].float()
    assert probs.shape[0] == NUM_CLASSES
    torch.testing.assert_close(probs.sum(0), torch.ones(probs.shape[1:]), atol=2e-2, rtol=0)
    assert len(list((tmp_path / "masks").glob("*.png"))) == len(images)


def test_ablation_without_hv_bilstm_or_et_trains(demo, tmp_path):
    settings = vitpcm_settings(epochs=1, vitpcm={"use_hv_bilstm": False, "use_et": False})
    _train(demo, tmp_path, settings)
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert saved["arch"]["lstm_hidden"] == 0 and not any(k.startswith("conditioning") for k in saved["model"])
    assert pd.read_csv(tmp_path / "history.csv")["et"].eq(0).all()
