"""``train.vitpcm``: ViT-PCM's own values (the official code's, see the package docstring)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import ConfigError
from pipeline.methods.pc2m.model import LSTM_PRECISIONS


@dataclass(frozen=True)
class ViTPCMSettings:
    """``train.vitpcm``: ViT-PCM's own values (the rest of ``train`` is shared with PC2M)."""

    lstm_hidden: int = 192  # HV-BiLSTM units per direction (MODEL.HIDDEN_SIZE)
    dropout: float = 0.2  # HV-BiLSTM and classifier inputs (SOLVER.DROPOUT)
    l2: float = 0.01  # Keras L2 on the classifier kernel: l2 * sum W^2 in the loss
    crop_size: int = 128  # ET crop side in px of the global_size image (IMAGE.SIZE.CROP)
    crop_probability: float = 0.3  # ET crop, else the whole image (AUGMENTATIONS.PROB_CROP)
    et_weight: float = 1.0  # eq. 9: L = L_MCE + L_ET
    use_hv_bilstm: bool = True  # Table 1 ablations: false = the plain linear patch classifier
    use_et: bool = True  # Table 1 ablations: false = L_MCE only (no ET branch)
    # HV-BiLSTM scans in training: float32 (the official code's Keras LSTM) or bfloat16 (autocast;
    # faster with cuDNN, changes the numbers).
    lstm_precision: str = "float32"

    def check(self, global_size: int) -> None:
        if self.lstm_precision not in LSTM_PRECISIONS:
            raise ConfigError(f"train.vitpcm.lstm_precision: {self.lstm_precision!r} is not one of "
                              f"{', '.join(LSTM_PRECISIONS)}")
        if self.lstm_hidden < 1:
            raise ConfigError(f"train.vitpcm.lstm_hidden: {self.lstm_hidden} must be >= 1")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"train.vitpcm.dropout: {self.dropout} must be in [0, 1)")
        if not 0 < self.crop_size <= global_size:
            raise ConfigError(f"train.vitpcm.crop_size: {self.crop_size} must be in 1..{global_size} (global_size)")
        if not 0 <= self.crop_probability <= 1:
            raise ConfigError(f"train.vitpcm.crop_probability: {self.crop_probability} must be in [0, 1]")
        if self.l2 < 0 or self.et_weight < 0:
            raise ConfigError("train.vitpcm.l2 and train.vitpcm.et_weight must be >= 0")
