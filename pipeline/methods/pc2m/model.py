"""The patch-classifier networks of PC2M (paper 000 Sec. 3.1, Fig. 2) and ViT-PCM (paper 001
Sec. 5): a timm ViT, an optional HV-BiLSTM conditioning of the patch grid (ViT-PCM only), and one
bias-free patch classifier, softmax per patch.

The HV-BiLSTM lives here rather than in ``vitpcm.py`` because prediction rebuilds either network
from the architecture record saved in ``model.pt`` (``Architecture``), and ``vitpcm.py`` builds on
this module.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from timm.layers import DropPath, PatchDropout
from torch import nn

from pipeline.backbone import embed_dim, num_prefix_tokens, patch_size

log = logging.getLogger(__name__)

# log(0) guard for the BCE on max-pooled probabilities.
_PROB_FLOOR = 1e-6
MODEL_FORMAT = "pc2m-model/1"
# The HV-BiLSTM's precisions (train.vitpcm.lstm_precision).
LSTM_PRECISIONS = ("float32", "bfloat16")


@dataclass
class PatchPredictions:
    """Per-patch class distributions of a batch, on the patch grid: B x C x gh x gw."""

    log_probs: torch.Tensor

    @property
    def probs(self) -> torch.Tensor:
        return self.log_probs.exp()


@dataclass(frozen=True)
class Architecture:
    """What, besides the backbone (from the config), rebuilds a trained network: saved in model.pt."""

    method: str
    num_classes: int
    lstm_hidden: int  # HV-BiLSTM units per direction; 0 = none (PC2M, ViT-PCM's Table 1 ablations)
    # The config's backbone.name at training, so that a model applied with another backbone stops
    # with both names; "" in model files written before it was recorded.
    backbone: str = ""


class HVBiLSTM(nn.Module):
    """ViT-PCM's patch conditioning (paper 001 Sec. 5): a bidirectional LSTM along every row and
    another along every column of the patch grid, their outputs concatenated per patch
    (B x gh x gw x e -> B x gh x gw x 4 hidden: [row fwd, row bwd, column fwd, column bwd]).

    Dropout as the official code: elementwise on the grid (``Dropout`` before both LSTMs), then the
    Keras ``LSTM(dropout=p)`` input mask, one per sequence and shared by all its steps. Keras draws
    that mask per direction; here both directions of a BiLSTM share it (one fused ``nn.LSTM``).
    """

    def __init__(self, in_features: int, hidden: int, dropout: float, precision: str = "float32") -> None:
        super().__init__()
        if precision not in LSTM_PRECISIONS:
            raise ValueError(f"HV-BiLSTM precision {precision!r} is not one of {', '.join(LSTM_PRECISIONS)}")
        self.rows = nn.LSTM(in_features, hidden, batch_first=True, bidirectional=True)
        self.columns = nn.LSTM(in_features, hidden, batch_first=True, bidirectional=True)
        self.dropout = dropout
        self.precision = precision
        self.out_features = 4 * hidden

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        b, gh, gw, e = grid.shape
        # float32 (default): LSTMs in float32 even under bf16 autocast, as the official code's Keras
        # LSTM; recurrent state accumulates rounding. bfloat16 (train.vitpcm.lstm_precision): the
        # two scans under bf16 autocast on whatever device (cuDNN on CUDA, also on the CPU), the
        # weights kept in float32, the output returned in float32.
        reduced = self.precision == "bfloat16"
        with torch.autocast(grid.device.type, dtype=torch.bfloat16, enabled=reduced):
            grid = F.dropout(grid.float(), self.dropout, self.training)
            rows = self._scan(self.rows, grid.reshape(b * gh, gw, e)).reshape(b, gh, gw, -1)
            columns = self._scan(self.columns, grid.transpose(1, 2).reshape(b * gw, gh, e))
            columns = columns.reshape(b, gw, gh, -1).transpose(1, 2)
        if reduced:
            rows, columns = rows.float(), columns.float()
        return torch.cat([rows, columns], dim=-1)

    def _scan(self, lstm: nn.LSTM, sequences: torch.Tensor) -> torch.Tensor:
        """Both directions' outputs at every step of N x L x e sequences: N x L x 2 hidden."""
        if self.training and self.dropout > 0:
            keep = torch.rand(sequences.shape[0], 1, sequences.shape[2], device=sequences.device) >= self.dropout
            sequences = sequences * keep / (1.0 - self.dropout)
        return lstm(sequences)[0]


class PatchClassifier(nn.Module):
    """ViT encoder f, optional conditioning of the patch grid, and the dense layer W in
    R^{e x |C|} (no bias: F_i W^c is a similarity), with dropout on its input (ViT-PCM: 0.2)."""

    def __init__(self, backbone: nn.Module, num_classes: int, conditioning: HVBiLSTM | None = None,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.conditioning = conditioning if conditioning is not None else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        features = conditioning.out_features if conditioning is not None else embed_dim(backbone)
        self.classifier = nn.Linear(features, num_classes, bias=False)
        # ViT-PCM's head initialiser (N(0, 0.05), PRIOR-ART.md); paper 000 does not say.
        nn.init.normal_(self.classifier.weight, std=0.05)
        self.num_classes = num_classes
        # Checked once (a walk over every module): ViT-PCM's stop-gradient pass asks every step.
        self.backbone_same_in_both_modes = same_in_train_and_eval(backbone)

    def forward(self, images: torch.Tensor) -> PatchPredictions:
        """Eq. 1 of paper 000 / eq. 2 of paper 001: P = softmax(F W) per patch; F = the final
        patch tokens (after the last norm), conditioned by the HV-BiLSTM for ViT-PCM."""
        return self.classify(self.patch_tokens(images))

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's final patch tokens as a B x gh x gw x e grid."""
        size = patch_size(self.backbone)
        grid = (images.shape[-2] // size, images.shape[-1] // size)
        tokens = self.backbone.forward_features(images)[:, num_prefix_tokens(self.backbone) :]
        return tokens.reshape(images.shape[0], *grid, -1)

    def classify(self, tokens: torch.Tensor) -> PatchPredictions:
        """Patch predictions from a token grid: the conditioning, then the dense layer W."""
        logits = self.classifier(self.dropout(self.conditioning(tokens))).float()
        return PatchPredictions(F.log_softmax(logits, dim=-1).permute(0, 3, 1, 2).contiguous())


def same_in_train_and_eval(module: nn.Module) -> bool:
    """Whether ``module``'s forward is the same in both modes: no dropout, drop-path or patch
    dropout with a non-zero rate and no batch norm (the DINO ViTs have none of them)."""
    for part in module.modules():
        if isinstance(part, nn.modules.batchnorm._BatchNorm):
            return False
        if isinstance(part, nn.modules.dropout._DropoutNd) and part.p > 0:
            return False
        if isinstance(part, (DropPath, PatchDropout)) and (getattr(part, "drop_prob", 0) or getattr(part, "prob", 0)):
            return False
    return True


def build_network(backbone: nn.Module, arch: Architecture, dropout: float = 0.0,
                  lstm_precision: str = "float32") -> PatchClassifier:
    """The network of ``arch``; ``lstm_precision`` (training only, not saved: prediction runs the
    HV-BiLSTM in float32) as ``HVBiLSTM``'s."""
    conditioning = (HVBiLSTM(embed_dim(backbone), arch.lstm_hidden, dropout, lstm_precision)
                    if arch.lstm_hidden > 0 else None)
    return PatchClassifier(backbone, arch.num_classes, conditioning, dropout)


def model_payload(model: PatchClassifier, arch: Architecture) -> dict:
    """model.pt: the architecture record and the weights (on the CPU)."""
    return {"format": MODEL_FORMAT, "arch": asdict(arch),
            "model": {k: v.cpu() for k, v in model.state_dict().items()}}


def image_class_probabilities(predictions: PatchPredictions, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Global max pooling over the patches: B x C image-level class probabilities (paper 001 eq. 3).

    ``valid`` (B x gh x gw bool) keeps the patches that show the image: a zero-padded corner of a
    rotated view would otherwise vote for whatever class padding looks like. Probabilities are
    >= 0, so a left-out patch is pooled as 0 (the patches around a view's centre, which lies
    inside the image, are always kept).
    """
    probs = predictions.probs
    if valid is not None:
        probs = probs * valid[:, None].to(probs.dtype)
    return probs.amax(dim=(2, 3))


def multilabel_bce(image_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """L_MCE: binary cross-entropy summed over classes, mean over images (paper 000 Algorithm 1,
    MCE; paper 001 eq. 1 averages over the classes instead: ``vitpcm.vitpcm_loss`` divides by |C|).

    ``targets`` is multi-hot B x C with background (class 0) always 1, as in ViT-PCM.
    """
    y = image_probs.clamp(_PROB_FLOOR, 1.0 - _PROB_FLOOR)
    t = targets.to(y)
    return -(t * y.log() + (1.0 - t) * (1.0 - y).log()).sum(dim=1).mean()


def set_trainable(model: PatchClassifier, unfrozen_blocks: int) -> list[nn.Parameter]:
    """Freeze the backbone except its last ``unfrozen_blocks`` blocks (and the final norm when
    any block trains); the conditioning (HV-BiLSTM) and the classifier always train. Returns the
    trainable parameters.

    Paper 000 Sec. 4.2: warm-up with the initialised weights frozen (0 blocks), then the last
    five layers unfrozen; ViT-PCM's code unfreezes the final norm with them, and trains its
    HV-BiLSTM and classifier during the warm-up.
    """
    backbone = model.backbone
    for parameter in backbone.parameters():
        parameter.requires_grad_(False)
    if unfrozen_blocks > 0:
        for block in list(backbone.blocks)[-unfrozen_blocks:]:
            block.requires_grad_(True)
        backbone.norm.requires_grad_(True)
    model.conditioning.requires_grad_(True)
    model.classifier.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]
