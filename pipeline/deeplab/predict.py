"""Predict masks with a trained DeepLab: one palette PNG per image of a split, then ``.done``.

Test geometry of the DeepLab codebases (PRIOR-ART: test 513, multi-scale [0.5, 0.75, 1, 1.25,
1.5] + flip in ViT-PCM's and CSRM's DeepLab-v2 verification): the image keeps its own size and
is padded bottom/right to ``pad_to`` x ``pad_to`` with the mean colour (0 after normalisation;
an image larger than ``pad_to`` is not padded on that side), so every VOC image (at most
500 px) is seen on the same 513 canvas the network trained around. The padded input is then
scaled by each of ``test_scales`` (and, with ``test_flip``, also flipped horizontally); each
view's logits are upsampled back to the padded size (and unflipped), turned into a softmax, and
the softmaxes averaged; the average is cropped back to the image before the argmax. ``pad_to:
null`` and ``test_scales: [1]`` without flip (the demo) run the network once on the image as is.

Predicting the *train* split gives the masks of a next self-training round (COMUS, paper 002).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline.atomic import atomic_dir, write_json
from pipeline.background import MASKS_IN_FLIGHT, background_writes
from pipeline.datasets import read_manifest
from pipeline.deeplab.model import DeepLab, load_trained_deeplab
from pipeline.deeplab.train import resolve_deeplab_device
from pipeline.errors import BadInputError
from pipeline.imageio import load_rgb, safe_child, write_label_png

log = logging.getLogger(__name__)

DONE_MARKER = ".done"


@dataclass(frozen=True)
class PredictSettings:
    scales: tuple[float, ...]
    flip: bool
    pad_to: int | None
    num_workers: int
    device: str

    @classmethod
    def from_params(cls, params: dict) -> PredictSettings:
        cfg = params["deeplab"]
        return cls(
            scales=tuple(float(s) for s in cfg["test_scales"]),
            flip=bool(cfg["test_flip"]),
            pad_to=None if cfg["pad_to"] is None else int(cfg["pad_to"]),
            num_workers=int(cfg["num_workers"]),
            device=str(cfg["device"]),
        )


class SplitImages(Dataset):
    """(uint8 H x W x 3 tensor, error) per image of one split, in manifest order.

    A bad file gives an error message, not an exception (see ``PseudoMaskSamples``)."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        try:
            return torch.from_numpy(np.array(load_rgb(self.paths[index]))), ""  # a writable copy
        except BadInputError as exc:
            return torch.zeros(0), str(exc)


def pad_to_canvas(image: torch.Tensor, size: int | None) -> torch.Tensor:
    """``image`` (normalised, 1 x 3 x H x W) padded bottom/right with 0 (the mean colour) to at
    least ``size`` x ``size``; unchanged for ``None``."""
    if size is None:
        return image
    height, width = image.shape[-2:]
    return F.pad(image, (0, max(size - width, 0), 0, max(size - height, 0)))


def to_input(rgb: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 H x W x 3 -> normalised float 1 x 3 x H x W."""
    image = rgb.permute(2, 0, 1).float().div(255.0)
    mean_t = torch.tensor(mean, device=image.device).view(3, 1, 1)
    std_t = torch.tensor(std, device=image.device).view(3, 1, 1)
    return ((image - mean_t) / std_t).unsqueeze(0)


@torch.inference_mode()
def class_probabilities(model: DeepLab, image: torch.Tensor, settings: PredictSettings) -> torch.Tensor:
    """Softmax (C x H x W) at the image's size, averaged over test scales and flips of the padded image."""
    height, width = image.shape[-2:]
    padded = pad_to_canvas(image, settings.pad_to)
    canvas = padded.shape[-2:]
    total = None
    views = 0
    for scale in settings.scales:
        size = (max(1, round(canvas[0] * scale)), max(1, round(canvas[1] * scale)))
        scaled = padded if size == tuple(canvas) else F.interpolate(padded, size=size, mode="bilinear",
                                                                    align_corners=False)
        for flipped in (False, True) if settings.flip else (False,):
            batch = scaled.flip(-1) if flipped else scaled
            with torch.autocast(device_type=image.device.type, dtype=torch.bfloat16,
                                enabled=image.device.type == "cuda"):
                logits = model(batch)
            logits = logits.flip(-1) if flipped else logits
            probs = F.interpolate(logits.float(), size=canvas, mode="bilinear", align_corners=False).softmax(dim=1)[0]
            total = probs if total is None else total + probs
            views += 1
    return (total / views)[:, :height, :width]


def predict_deeplab(
    manifest_path: str | Path, split: str, model_path: str | Path, out_masks_dir: str | Path,
    params: dict, threads: int,
) -> None:
    """Write ``out_masks_dir/{image_id}.png`` for every image of ``split``, then ``.done``."""
    settings = PredictSettings.from_params(params)
    torch.set_num_threads(max(1, threads))
    manifest = read_manifest(manifest_path)
    rows = manifest[manifest["split"] == split]
    if rows.empty:
        raise BadInputError(f"{manifest_path}: no images in split {split!r} to predict")
    model = load_trained_deeplab(model_path)
    log.info("predicting %d %s images with %s", len(rows), split, model_path)
    predict_rows(model, rows, Path(out_masks_dir), settings, f"deeplab {split}",
                 {"split": split, "model": str(model_path)}, threads)


def predict_rows(model: DeepLab, rows: pd.DataFrame, out_dir: Path, settings: PredictSettings, desc: str,
                 record: dict, threads: int) -> None:
    """Masks of the manifest ``rows`` into ``out_dir`` (complete, with ``.done`` + ``record``, or absent);
    their PNGs encoded by ``threads`` threads while the next images run."""
    device = resolve_deeplab_device(settings.device)
    model = model.to(device).eval()
    mean, std = model.normalisation
    loader = DataLoader(SplitImages(list(rows["image_path"])), batch_size=None,
                        num_workers=settings.num_workers)
    log.info("%s: %d images (scales %s, flip %s) on %s", desc, len(rows), list(settings.scales), settings.flip,
             device)
    progress = tqdm(zip(rows["image_id"], loader), total=len(rows), desc=desc,
                    unit="img", mininterval=0.5 if sys.stderr.isatty() else 30)
    # The folder appears complete (with .done) or not at all: a killed job leaves no partial one.
    # A PNG (~6 ms at VOC size) is encoded by a thread (Pillow releases the GIL) while the next
    # image runs; .done is written only after every PNG.
    with atomic_dir(out_dir) as tmp_dir:
        with background_writes(threads, MASKS_IN_FLIGHT, "masks") as png_writes:
            for image_id, (rgb, error) in progress:
                if error:
                    raise BadInputError(error)
                probs = class_probabilities(model, to_input(rgb.to(device), mean, std), settings)
                mask = probs.argmax(dim=0).to(torch.uint8).cpu().numpy()
                png_writes.submit(write_label_png, safe_child(tmp_dir, image_id), mask)
        write_json(tmp_dir / DONE_MARKER, {"images": len(rows), **record, "scales": list(settings.scales),
                                           "flip": settings.flip, "pad_to": settings.pad_to})
    log.info("wrote %d masks to %s", len(rows), out_dir)
