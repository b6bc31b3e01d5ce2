"""ViT-PCM (paper 001) as a plug-in of the shared trainer: the patch-classifier run of PC2M
(network, phases, alpha-tilde diagnostics) with ViT-PCM's mosaic views and step, and no
transport. Its mosaics are formed within each process's share of the batch (4 tiles each), so
its data-parallel runs differ from single-process ones, as the official 4-GPU training does."""

from __future__ import annotations

import torch

from pipeline.methods.pc2m.method import PatchClassifierRun
from pipeline.methods.pc2m.predict import load_predictor  # noqa: F401 - the same patch-classifier predictor
from pipeline.methods.pc2m.settings import TrainSettings
from pipeline.methods.vitpcm.step import vitpcm_step
from pipeline.methods.vitpcm.views import MosaicViewDataset, render_mosaic_batch
from pipeline.training.method import MethodRun, TrainContext


def check_settings(train: dict) -> None:
    TrainSettings.from_params(train)


def prepare(context: TrainContext) -> MethodRun:
    return ViTPCMRun(context)


class ViTPCMRun(PatchClassifierRun):
    def build_dataset(self) -> MosaicViewDataset:
        views = self.settings.mosaic_views(self.patch)
        views.check()
        return MosaicViewDataset(self.context.images, self.context.num_classes, views, self.mean, self.std,
                                 self.context.seed, render_in_worker=not self.views_on_device)

    def epsilon(self, epoch: int) -> float:
        return float("nan")

    def epoch_columns(self, epoch: int) -> dict:
        self.tile_grid = (self.settings.mosaic_views(self.patch).tile_size // self.patch,) * 2
        return super().epoch_columns(epoch)

    def step(self, batch: dict[str, torch.Tensor], epoch: int, index: int) -> dict[str, torch.Tensor]:
        if self.views_on_device:
            main, tile = render_mosaic_batch(batch, self.dataset.views, self.dataset.mean, self.dataset.std,
                                             self.device)
            batch = {**batch, "image": main, "tile": tile}
        terms, probs = vitpcm_step(self.model, batch, self.settings.vitpcm, self.tile_grid, self.device,
                                   self.reducer)
        self.record_areas(probs)
        return {"loss": terms.total, "mce": terms.mce, "et": terms.et, "l2": terms.l2}
