"""Inference of every training method (its ``load_predictor``): class-probability maps of every
image of a manifest shard (all splits), and their argmax masks at image size (the baseline
pseudo-masks, BPM, of paper 001).

Images are resized so that their longer side is ``predict.max_size`` (paper 001 infers at 960 px
for +2-3 mIoU; ``upscale: true`` lets small images grow to it, as ViT-PCM's 960 x 960 input does,
while keeping the aspect) and padded bottom/right to the patch size, with the geometry of the
feature stage, so ``pipeline.geometry.grid_to_image`` maps the grid back.

Shard format (``FORMAT_VERSION``) per image ``<id>``: ``<id>/probs`` float16 C x gh x gw (each
patch a distribution over the classes, background 0 first) and ``<id>/geometry`` float32
[scale, resized_h, resized_w, final_h, final_w].

``restrict_to_labels`` zeroes the classes an image is not labelled with (ViT-PCM does this for
its train pseudo-masks), for TRAIN images only: GT labels in weak mode, the clustering
pseudo-labels in unsupervised mode (GT is never read there). Val images are never restricted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from pipeline import shards
from pipeline.atomic import atomic_dir
from pipeline.background import MASKS_IN_FLIGHT, background_writes
from pipeline.checkpoint import load_error_reason, model_file_kind
from pipeline.config import require_fields
from pipeline.datasets import parse_labels
from pipeline.devices import mixed_precision, resolve_device
from pipeline.errors import ConfigError, WeightsError
from pipeline.features import (
    Geometry,
    ShardImages,
    batch_images,
    batches_by_size,
    check_decode,
    fit_side,
    image_geometry,
    jpeg_decoder,
    make_loader,
    shard_rows,
)
from pipeline.geometry import grid_to_image
from pipeline.imageio import safe_child, write_label_png
from pipeline.methods import METHODS, load_method
from pipeline.training.data import TRAIN_SPLIT

log = logging.getLogger(__name__)

FORMAT_VERSION = "pc2m-predictions/1"


@dataclass(frozen=True)
class PredictSettings:
    max_size: int
    upscale: bool
    fit: str
    batch_size: int
    num_workers: int
    device: str
    restrict_to_labels: bool
    flip: bool
    decode: str

    @classmethod
    def from_params(cls, predict: dict) -> PredictSettings:
        require_fields(cls, predict, "predict")
        # Sub-sections named after a method (``predict.rcm_mam``) are that method's own settings.
        settings = cls(**{k: v for k, v in predict.items() if k not in METHODS})
        if settings.fit not in ("crop", "pad"):
            raise ConfigError(f"predict.fit: {settings.fit!r} is not crop or pad")
        check_decode(settings.decode, "predict")
        return settings


def prediction_geometry(height: int, width: int, settings: PredictSettings, patch: int) -> Geometry:
    """The feature stage's geometry, or the same with the longer side scaled up to max_size."""
    if not settings.upscale or max(height, width) >= settings.max_size:
        return image_geometry(height, width, settings.max_size, patch, settings.fit)
    scale = settings.max_size / max(height, width)
    rh, rw = max(1, round(height * scale)), max(1, round(width * scale))
    fh, fw = fit_side(rh, patch, settings.fit), fit_side(rw, patch, settings.fit)
    return Geometry(scale=scale, resized=(rh, rw), final=(fh, fw), grid=(fh // patch, fw // patch))


def read_model_payload(model_path: Path) -> dict:
    """model.pt as {"format", "arch": {"method", "num_classes", "backbone", ...}, "model": weights};
    a plain state dict (written before the record existed) is a PC2M network."""
    if not Path(model_path).is_file():
        raise WeightsError(f"{model_path}: trained model not found")
    try:
        payload = torch.load(model_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure: not a usable model file
        raise WeightsError(f"{model_path}: not a trained model file ({load_error_reason(exc)})") from None
    if isinstance(payload, dict) and isinstance(payload.get("arch"), dict) and "model" in payload \
            and payload["arch"].get("method") in METHODS:
        return payload
    kind = model_file_kind(payload)
    if kind.startswith("a PC2M model") and "classifier.weight" in payload:
        arch = {"method": "pc2m", "num_classes": int(payload["classifier.weight"].shape[0]), "lstm_hidden": 0}
        return {"format": "pc2m-model/1", "arch": arch, "model": payload}
    raise WeightsError(f"{model_path}: not a model trained by `train`: {kind}")


def load_predictor(model_path: Path, backbone: dict, device: torch.device, num_classes: int | None = None,
                   predict: dict | None = None):
    """The trained network of any method as a predictor (``predict(images, flip)``, ``stride``,
    ``mean``, ``std``, ``num_classes``); ``num_classes``: what the model must predict, when the
    caller knows (applying a run's model); ``predict``: the ``predict`` section (a method's own
    inference settings under its name)."""
    payload = read_model_payload(model_path)
    arch = payload["arch"]
    if num_classes is not None and int(arch["num_classes"]) != num_classes:
        raise WeightsError(f"{model_path}: predicts {arch['num_classes']} classes where {num_classes} are expected")
    if arch.get("backbone") and arch["backbone"] != backbone["name"]:
        raise WeightsError(f"{model_path}: trained with backbone {arch['backbone']!r}, but config key backbone.name is"
                           f" {backbone['name']!r}")
    return load_method(arch["method"]).load_predictor(payload, backbone, device, Path(model_path), predict or {})


def restriction_labels(rows: pd.DataFrame, mode: str, labels_path: Path | None) -> dict[str, list[int]]:
    """Foreground labels allowed per TRAIN image of the shard (weak: GT; unsupervised: pseudo)."""
    train = rows[rows["split"] == TRAIN_SPLIT]
    if mode == "weak":
        return {r.image_id: parse_labels(r.labels) for r in train.itertuples() if r.has_labels}
    if labels_path is None:
        raise ConfigError("predict.restrict_to_labels in unsupervised mode needs the pseudo-label file")
    pseudo = pd.read_csv(labels_path, dtype={"image_id": str, "labels": str, "has_labels": bool},
                         keep_default_na=False, na_filter=False).set_index("image_id")
    return {i: parse_labels(pseudo.loc[i, "labels"]) for i in train["image_id"]
            if i in pseudo.index and bool(pseudo.loc[i, "has_labels"])}


def restrict(probs: torch.Tensor, labels: list[int]) -> torch.Tensor:
    """C x gh x gw probabilities with only background and ``labels`` kept, renormalised."""
    keep = torch.zeros(probs.shape[0], dtype=probs.dtype, device=probs.device)
    keep[0] = 1
    keep[[c for c in labels if c < probs.shape[0]]] = 1
    masked = probs * keep[:, None, None]
    return masked / masked.sum(dim=0, keepdim=True).clamp_min(1e-12)


def predict_shard(
    manifest_path: str | Path,
    shard: int,
    model_path: str | Path,
    out_probs: str | Path,
    out_masks_dir: str | Path,
    params: dict,
    threads: int,
    labels_path: str | Path | None = None,
) -> None:
    """Probability maps of ``shard`` into ``out_probs`` and masks ``<out_masks_dir>/<id>.png``.

    ``params`` = {"backbone": {...}, "predict": {...}, "mode": ..., optional "num_classes" the model
    must predict}; ``labels_path`` is the pseudo-label file (unsupervised mode with
    ``restrict_to_labels`` only).
    """
    settings = PredictSettings.from_params(params["predict"])
    torch.set_num_threads(max(1, int(threads)))
    device = resolve_device(settings.device)
    rows = shard_rows(Path(manifest_path), shard)
    predictor = load_predictor(Path(model_path), params["backbone"], device, params.get("num_classes"),
                               params["predict"])
    patch, mean, std = predictor.stride, predictor.mean, predictor.std
    allowed = (restriction_labels(rows, params["mode"], Path(labels_path) if labels_path else None)
               if settings.restrict_to_labels else {})
    sizes = [(int(r.height), int(r.width)) for r in rows.itertuples()]
    geometries = [prediction_geometry(h, w, settings, patch) for h, w in sizes]
    batches = batches_by_size([g.final for g in geometries], settings.batch_size)
    dataset = ShardImages(rows["image_path"].tolist(), sizes, geometries, mean, std,
                          jpeg_decoder=jpeg_decoder(settings.decode, device))
    loader = make_loader(dataset, batches, settings.num_workers, device.type == "cuda")
    tensors: dict[str, torch.Tensor] = {}
    # An image's mask (its probabilities upsampled to the image, then argmax: ~20 ms of one CPU
    # core at VOC size) is made on the model's device, and its PNG (~6 ms) encoded by a thread
    # (Pillow releases the GIL): on a GPU the main thread only feeds the model. The same
    # operations on the CPU, the same numbers. The masks folder appears complete or not at all
    # (a killed job leaves no partial folder); it is closed after the PNGs under way.
    with (atomic_dir(out_masks_dir) as masks_tmp, mixed_precision(device),
          background_writes(int(threads), MASKS_IN_FLIGHT, "masks") as png_writes):
        for batch in tqdm(loader, desc=f"predict shard {shard}", unit="batch"):
            probs = predictor.predict(batch_images(batch, dataset, device), settings.flip)
            for index, image_probs in zip(batch.indices, probs):
                image_id = rows["image_id"][index]
                if image_id in allowed:
                    image_probs = restrict(image_probs, allowed[image_id])
                geometry = geometries[index].as_tensor()
                tensors[f"{image_id}/probs"] = image_probs.half().cpu()
                tensors[f"{image_id}/geometry"] = geometry
                on_image = grid_to_image(image_probs, geometry, sizes[index], mode="bilinear")
                mask = on_image.argmax(dim=0).to(torch.uint8).cpu().numpy()
                png_writes.submit(write_label_png, safe_child(masks_tmp, image_id), mask)
    shards.write_shard(Path(out_probs), tensors, {
        "format": FORMAT_VERSION, "image_ids": rows["image_id"].tolist(), "num_classes": predictor.num_classes,
        "patch_size": patch, "max_size": settings.max_size, "upscale": settings.upscale, "fit": settings.fit,
        "flip": settings.flip, "restricted_images": sorted(allowed), "mode": params["mode"],
    })
    log.info("predicted %d images of shard %d (%d restricted to their labels)", len(rows), shard, len(allowed))
