"""One ViT-PCM training step: the main branch, the stop-gradient inference pass, the mosaics."""

from __future__ import annotations

import torch

from pipeline.devices import mixed_precision
from pipeline.methods.pc2m.model import PatchClassifier, PatchPredictions
from pipeline.methods.vitpcm.losses import ETBranch, ViTPCMTerms, et_target, vitpcm_loss
from pipeline.methods.vitpcm.settings import ViTPCMSettings
from pipeline.methods.vitpcm.views import tile_mosaic, untile_mosaic
from pipeline.training.augment import local_to_global
from pipeline.training.distributed import Reducer

# ---------------------------------------------------------------------------------------------
# One training step


@torch.no_grad()
def inference_predictions(model: PatchClassifier, images: torch.Tensor, tokens: torch.Tensor) -> PatchPredictions:
    """The stop-gradient pass of the official code (``training=False``: no dropout). ``tokens``:
    the main branch's backbone tokens of the same images. A backbone without dropout or batch
    norm gives the same tokens in both modes, so only the HV-BiLSTM and the classifier run again
    (one ViT forward of three a step saved); any other backbone runs again in eval mode."""
    model.eval()
    try:
        if model.backbone_same_in_both_modes:
            return model.classify(tokens.detach())
        return model(images)
    finally:
        model.train()


def vitpcm_step(model: PatchClassifier, batch: dict[str, torch.Tensor], settings: ViTPCMSettings,
                tile_grid: tuple[int, int], device: torch.device,
                reduce: Reducer) -> tuple[ViTPCMTerms, torch.Tensor]:
    """Loss terms of one batch and the main branch's probabilities (detached, for diagnostics)."""
    images = batch["image"].to(device, non_blocking=True)
    targets = batch["target"].to(device, non_blocking=True)
    with mixed_precision(device):
        tokens = model.patch_tokens(images)
        main_pred = model.classify(tokens)
    branch = None
    if settings.use_et:
        tiles = batch["tile"].to(device, non_blocking=True)
        alignment = local_to_global(batch["theta_main"].to(device, non_blocking=True),
                                    batch["theta_tile"].to(device, non_blocking=True), tile_grid)
        with mixed_precision(device):
            target = et_target(inference_predictions(model, images, tokens).probs, alignment, targets)
            mosaic_pred = model(tile_mosaic(tiles))
        tile_pred = PatchPredictions(untile_mosaic(mosaic_pred.log_probs, tiles.shape[0]))
        branch = ETBranch(tile_pred, target, alignment.valid)
    terms = vitpcm_loss(main_pred, branch, targets, model.classifier.weight, settings, reduce)
    return terms, main_pred.probs.detach()
