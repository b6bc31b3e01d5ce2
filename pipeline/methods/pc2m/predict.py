"""The trained patch classifier of PC2M / ViT-PCM as a predictor of the shared prediction stage
(``pipeline.predict``): class probabilities per patch, flip-averaged if asked."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.backbone import build_backbone, normalisation, patch_size
from pipeline.errors import WeightsError
from pipeline.methods.pc2m.model import Architecture, PatchClassifier, build_network


class PatchPredictor:
    """``predict(images, flip)``: B x C x gh x gw probabilities on the patch grid (stride = patch)."""

    def __init__(self, model: PatchClassifier) -> None:
        self.model = model
        self.num_classes = model.num_classes
        self.stride = patch_size(model.backbone)
        self.mean, self.std = normalisation(model.backbone)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, flip: bool) -> torch.Tensor:
        """Probabilities, averaged with the horizontally flipped input if ``flip``."""
        probs = self.model(images).probs
        if flip:
            probs = (probs + self.model(images.flip(-1)).probs.flip(-1)) / 2
        return probs.float()


def load_predictor(payload: dict, backbone: dict, device: torch.device, model_path: Path,
                   predict: dict) -> PatchPredictor:
    """The trained network: backbone architecture from the config, the rest of the architecture
    (HV-BiLSTM or none, classes) from model.pt's record, every weight from model.pt. The patch
    classifiers have no inference settings of their own in ``predict``."""
    arch = Architecture(**payload["arch"])
    # `random`: the architecture only; model.pt overwrites every tensor (strict below).
    net = build_backbone(backbone["name"], "random", backbone.get("checkpoint_key", "teacher"),
                         backbone.get("model_kwargs") or {})
    model = build_network(net, arch)
    try:
        model.load_state_dict(payload["model"], strict=True)
    except RuntimeError as exc:
        raise WeightsError(
            f"{model_path}: does not fit backbone {backbone['name']!r} ({str(exc).splitlines()[0]})"
        ) from None
    return PatchPredictor(model.to(device).eval())
