"""The ``train`` section of the patch-classifier methods, PC2M (paper 000 Sec. 4.2) and its
baseline ViT-PCM (paper 001; its own values under ``train.vitpcm``).

Schedule: ``warmup_epochs`` (1) with the backbone frozen and only the patch classifier (and
ViT-PCM's HV-BiLSTM) training, then the last ``unfreeze_blocks`` (5) blocks and the final norm
unfrozen; Adam at ``lr`` (1e-3) scaled by ``lr_after_warmup_factor`` (0.1) after the warm-up
(ViT-PCM's official schedule has the same values).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from pipeline.config import require_fields
from pipeline.errors import ConfigError
from pipeline.methods.pc2m.losses import LossSettings
from pipeline.methods.pc2m.model import Architecture
from pipeline.methods.pc2m.ot import ALPHA_INITS, CLASS_AREA_UPDATES, EPSILON_SCHEDULES, epsilon_at
from pipeline.methods.pc2m.views import LOCAL_VIEW_SIZES, ViewSettings
from pipeline.methods.vitpcm.settings import ViTPCMSettings
from pipeline.methods.vitpcm.views import MosaicViews
from pipeline.patch_sizes import fit_view_sizes
from pipeline.training.compile import COMPILE_SETTINGS, compile_setting
from pipeline.training.data import VIEWS_ON

PATCH_METHODS = ("pc2m", "vitpcm")
OTHER_METHODS = ("rcm_mam", "cam", "csrm")  # their own sub-sections of train


@dataclass(frozen=True)
class TrainSettings:
    method: str
    epochs: int
    warmup_epochs: int
    unfreeze_blocks: int
    batch_size: int
    lr: float
    lr_after_warmup_factor: float
    global_size: int
    local_size: int
    local_view_size: str
    global_scale: tuple[float, float]
    local_scale: tuple[float, float]
    max_rotation: float
    flip: bool
    jitter: bool
    gamma: float
    epsilon_start: float
    epsilon_end: float
    epsilon_rate: float
    epsilon_schedule: str
    sinkhorn_iterations: int
    use_ot: bool
    use_match: bool
    match_weight: float
    alpha_init: str
    class_area_update: str
    keep_checkpoints: int
    num_workers: int
    device: str
    views_on: str
    # Speed only: regional compilation of the backbone's blocks (pipeline.training.compile).
    compile: str = "off"
    # ViT-PCM's own values (``train.vitpcm``; its defaults are in ViTPCMSettings).
    vitpcm: ViTPCMSettings = field(default_factory=ViTPCMSettings)

    @classmethod
    def from_params(cls, train: dict) -> TrainSettings:
        require_fields(cls, train, "train")
        # Other methods' own sub-sections (train.rcm_mam, ...) are theirs; ViT-PCM's is kept here.
        values = {k: v for k, v in train.items() if k not in OTHER_METHODS}
        values["global_scale"] = tuple(float(v) for v in values["global_scale"])
        values["local_scale"] = tuple(float(v) for v in values["local_scale"])
        values["vitpcm"] = ViTPCMSettings(**(values.get("vitpcm") or {}))
        values["compile"] = compile_setting(values.get("compile", "off"))
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        if self.method not in PATCH_METHODS:
            raise ConfigError(f"train.method: {self.method!r} is not one of {', '.join(PATCH_METHODS)}")
        for key in ("global_scale", "local_scale"):
            low, high = getattr(self, key)
            if not 0 < low <= high <= 1:
                raise ConfigError(f"train.{key}: {[low, high]} must satisfy 0 < min <= max <= 1")
        if not 0 <= self.gamma <= 1:
            raise ConfigError(f"train.gamma: {self.gamma} must be in [0, 1]")
        if self.epsilon_schedule not in EPSILON_SCHEDULES:
            raise ConfigError(f"train.epsilon_schedule: {self.epsilon_schedule!r} is not one of "
                              f"{', '.join(EPSILON_SCHEDULES)}")
        for key, allowed in (("alpha_init", ALPHA_INITS), ("class_area_update", CLASS_AREA_UPDATES),
                             ("local_view_size", LOCAL_VIEW_SIZES), ("views_on", VIEWS_ON),
                             ("compile", COMPILE_SETTINGS)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"train.{key}: {getattr(self, key)!r} is not one of {', '.join(allowed)}")
        if not 0 < self.epsilon_start <= self.epsilon_end:
            raise ConfigError("train.epsilon_start must be > 0 and <= train.epsilon_end")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("train.epochs and train.batch_size must be >= 1")
        if self.method == "vitpcm":
            self.vitpcm.check(self.global_size)

    def fitted_to_patch(self, patch: int) -> TrainSettings:
        """The view and crop sizes rounded to multiples of ``patch`` (``pipeline.patch_sizes``)."""
        global_size, local_size, crop_size = fit_view_sizes(self.method, self.global_size, self.local_size,
                                                            self.vitpcm.crop_size, patch)
        return replace(self, global_size=global_size, local_size=local_size,
                       vitpcm=replace(self.vitpcm, crop_size=crop_size))

    def views(self) -> ViewSettings:
        """PC2M's views; the local crop is rendered at the global size unless ``local_view_size``
        is ``local_size`` (paper 000's K patches per branch, config.yaml)."""
        local = self.global_size if self.local_view_size == "equal" else self.local_size
        return ViewSettings(self.global_size, local, self.global_scale, self.local_scale,
                            self.max_rotation, self.flip, self.jitter)

    def mosaic_views(self, patch: int) -> MosaicViews:
        return MosaicViews(self.global_size, patch, self.vitpcm.crop_size, self.vitpcm.crop_probability,
                           self.flip, self.jitter)

    def losses(self) -> LossSettings:
        return LossSettings(self.use_ot, self.use_match, self.sinkhorn_iterations, self.match_weight)

    def epsilon(self, epoch: int) -> float:
        """The Sinkhorn epsilon of ``epoch`` under ``epsilon_schedule`` (App. B)."""
        return epsilon_at(epoch, self.epsilon_start, self.epsilon_end, self.epsilon_rate, self.epsilon_schedule,
                          self.epochs)

    def architecture(self, num_classes: int, backbone: str) -> Architecture:
        with_lstm = self.method == "vitpcm" and self.vitpcm.use_hv_bilstm
        return Architecture(self.method, num_classes, self.vitpcm.lstm_hidden if with_lstm else 0, backbone)

    def head_dropout(self) -> float:
        return self.vitpcm.dropout if self.method == "vitpcm" else 0.0

    def lstm_precision(self) -> str:
        """The HV-BiLSTM's precision in training (``train.vitpcm.lstm_precision``; not part of the
        architecture: a trained model predicts with float32 LSTMs)."""
        return self.vitpcm.lstm_precision

    def phase(self, epoch: int) -> int:
        """Number of unfrozen backbone blocks in ``epoch`` (0 during the warm-up)."""
        return 0 if epoch < self.warmup_epochs else self.unfreeze_blocks

    def learning_rate(self, epoch: int) -> float:
        return self.lr if epoch < self.warmup_epochs else self.lr * self.lr_after_warmup_factor


# ---------------------------------------------------------------------------------------------
# Processes
