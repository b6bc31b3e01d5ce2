"""COMUS (paper 002, Algorithm 1): one object proposal per image, the DINO CLS feature of the
image cropped to it, spectral clustering of those features over the dataset, filtering, and
pseudo-masks proposal x (cluster + 1) that the self-training rounds (DeepLab, workflow rules
``comus_train_round`` / ``comus_predict_round``) learn from.

Two stages:

- ``comus-proposals``: per train image a binary proposal, from a saliency folder the user provides
  (``comus.saliency_dir``: paper 002 thresholds an unsupervised saliency network's output at θ;
  MaskContrast distributes those maps for VOC) or, label-free without one, from the spectral
  stage: the foreground (non-background segments) of the image's segment map. Components smaller
  than ``min_object_fraction`` of the image are dropped; an image left with nothing has no
  proposal, leaves the training set and is listed in ``without_proposal.csv``. Each proposal's
  box is cropped, resized to ``crop_size`` (paper 002: 256) and its CLS feature stored.
- ``comus-pseudo-masks``: the features clustered as ``pseudo_labels`` says (COMUS: spectral,
  30 neighbours, clusters = foreground classes, keep 80% of each cluster); a kept image's
  pseudo-mask is proposal x (cluster + 1), background 0; filtered images get none and leave the
  training set (``training_images.csv`` lists who stays).

Both read the train split only (optionally only the images of ``comus.first_round_list``: VOC's
1,464 train images, whose round-2 network then predicts the larger trainaug split); ground truth
is never read.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from threadpoolctl import threadpool_limits

from pipeline import shards
from pipeline.atomic import atomic_dir, write_csv, write_json
from pipeline.datasets import read_manifest
from pipeline.errors import BadInputError
from pipeline.imageio import load_mask, load_rgb, mask_in_folders, safe_child, write_label_png

log = logging.getLogger(__name__)

TRAIN_SPLIT = "train"
MASKS = "masks"
FEATURES = "features.safetensors"
WITHOUT_PROPOSAL = "without_proposal.csv"
BOXES = "proposals.csv"


# ---------------------------------------------------------------------------------------------
# Proposals (pure)


def keep_large_components(binary: np.ndarray, min_fraction: float) -> np.ndarray:
    """``binary`` without its 8-connected components smaller than ``min_fraction`` of the image."""
    binary = np.asarray(binary, dtype=bool)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
    minimum = min_fraction * binary.size
    large = np.zeros(count, dtype=bool)
    large[1:] = stats[1:, cv2.CC_STAT_AREA] >= minimum
    return large[labels]


def saliency_proposal(saliency: np.ndarray, image_hw: tuple[int, int], threshold: float,
                      min_fraction: float) -> np.ndarray:
    """Paper 002's s_i = L(x_i) > θ on a saliency map of 0..255 (θ as a fraction of 255),
    resized to the image when it is not at its size, then the small components dropped."""
    saliency = np.asarray(saliency, dtype=np.float32)
    if saliency.shape != tuple(image_hw):
        saliency = cv2.resize(saliency, (image_hw[1], image_hw[0]), interpolation=cv2.INTER_LINEAR)
    return keep_large_components(saliency > threshold * 255.0, min_fraction)


def spectral_proposal(segments: torch.Tensor, geometry: torch.Tensor, image_hw: tuple[int, int],
                      min_fraction: float) -> np.ndarray:
    """The label-free proposal: the image's non-background segments (patch grid) on its pixels."""
    from pipeline.geometry import grid_to_image

    foreground = grid_to_image((segments != 0).float(), geometry, image_hw, mode="nearest")
    return keep_large_components(foreground.numpy() > 0.5, min_fraction)


def proposal_box(proposal: np.ndarray) -> tuple[int, int, int, int] | None:
    """(y0, x0, y1, x1), end exclusive, around the proposal's pixels (paper 002: crop(x_i, s_i))."""
    ys, xs = np.nonzero(proposal)
    if ys.size == 0:
        return None
    return int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1


def pseudo_mask(proposal: np.ndarray, cluster: int) -> np.ndarray:
    """Paper 002's m_i: the proposal's pixels get pseudo-class cluster + 1 (cluster in 0..k-1), the
    rest background 0."""
    return np.asarray(proposal, dtype=bool).astype(np.uint8) * np.uint8(cluster + 1)


# ---------------------------------------------------------------------------------------------
# Stage comus-proposals


def first_round_images(manifest: pd.DataFrame, list_path: str | None) -> list[str]:
    """The train images COMUS clusters: all of them, or those named in ``list_path`` (one id per line)."""
    train = manifest.loc[manifest["split"] == TRAIN_SPLIT, "image_id"].tolist()
    if list_path is None:
        wanted = train
    else:
        listed = {line.strip() for line in Path(list_path).read_text().splitlines() if line.strip()}
        wanted = [image_id for image_id in train if image_id in listed]
    if not wanted:
        raise BadInputError(f"no train image to propose objects for (comus.first_round_list: {list_path})")
    return wanted


def _spectral_segments(paths: Sequence[Path], wanted: set[str]) -> dict[str, dict[str, torch.Tensor]]:
    found: dict[str, dict[str, torch.Tensor]] = {}
    for path in paths:
        found.update(shards.read_images(path, images=wanted, names={"segments", "geometry"}))
    return found


def run_proposals(manifest_path: Path, spectral_shards: Sequence[Path], out_dir: Path, params: dict,
                  threads: int) -> None:
    """Write ``out_dir/masks/<id>.png`` (0/1), ``proposals.csv`` (boxes), ``features.safetensors``
    (``<id>/cls``) and ``without_proposal.csv``; the folder appears complete or not at all."""
    from pipeline.backbone import build_backbone, extract_features, normalisation, patch_size
    from pipeline.devices import resolve_device
    from pipeline.patch_sizes import fit_to_patch
    from pipeline.segments import crop_tensor

    cfg, backbone = params["comus"], params["backbone"]
    torch.set_num_threads(max(1, threads))
    manifest = read_manifest(manifest_path)
    paths = manifest.set_index("image_id")["image_path"]
    image_ids = first_round_images(manifest, cfg["first_round_list"])
    saliency_dir = cfg["saliency_dir"]
    if saliency_dir and not Path(saliency_dir).is_dir():
        raise BadInputError(f"comus.saliency_dir: {saliency_dir} is not a folder of <image_id>.png saliency maps")
    segments = {} if saliency_dir else _spectral_segments(spectral_shards, set(image_ids))

    device = resolve_device(params["features"]["device"])
    torch.manual_seed(int(params["seed"]))  # `weights: random` gives the feature stage's network
    model = build_backbone(backbone["name"], backbone["weights"], backbone["checkpoint_key"],
                           backbone["model_kwargs"]).to(device)
    mean, std = normalisation(model)
    crop_size = fit_to_patch("comus.crop_size", cfg["crop_size"], patch_size(model))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    boxes, missing, features = [], [], {}
    with atomic_dir(out_dir) as tmp:
        (tmp / MASKS).mkdir()
        for image_id in image_ids:
            rgb = load_rgb(paths[image_id])
            proposal, reason = _proposal(image_id, rgb.shape[:2], saliency_dir, segments, cfg)
            box = None if proposal is None else proposal_box(proposal)
            if box is None:
                missing.append({"image_id": image_id, "reason": reason or "nothing left above min_object_fraction"})
                continue
            write_label_png(safe_child(tmp / MASKS, image_id), proposal.astype(np.uint8))
            boxes.append({"image_id": image_id, "y0": box[0], "x0": box[1], "y1": box[2], "x1": box[3],
                          "pixels": int(proposal.sum())})
            with torch.inference_mode(), autocast:
                crop = crop_tensor(rgb, box, crop_size, mean, std)[None].to(device)
                features[image_id] = {"cls": extract_features(model, crop, keys=False, cls=True).cls[0].float().cpu()}
        write_csv(tmp / BOXES, pd.DataFrame(boxes, columns=["image_id", "y0", "x0", "y1", "x1", "pixels"]))
        write_csv(tmp / WITHOUT_PROPOSAL, pd.DataFrame(missing, columns=["image_id", "reason"]))
        meta = {"format": "comus-proposals-v1", "image_ids": sorted(features), "crop_size": crop_size}
        shards.write_shard(tmp / FEATURES, shards.per_image_tensors(features), meta)
    log.info("COMUS proposals (%s): %d of %d train images, %d without one (listed in %s)",
             f"saliency {saliency_dir}" if saliency_dir else "spectral foreground", len(features), len(image_ids),
             len(missing), out_dir / WITHOUT_PROPOSAL)


def _proposal(image_id: str, image_hw: tuple[int, int], saliency_dir: str | None,
              segments: dict[str, dict[str, torch.Tensor]], cfg: dict) -> tuple[np.ndarray | None, str]:
    """The image's proposal, or (None, why there is none)."""
    if saliency_dir:
        path = mask_in_folders([saliency_dir], image_id)
        if path is None:
            return None, f"no saliency map {Path(saliency_dir) / (image_id + '.png')}"
        return saliency_proposal(load_mask(path), image_hw, cfg["saliency_threshold"], cfg["min_object_fraction"]), ""
    if image_id not in segments or {"segments", "geometry"} - set(segments[image_id]):
        raise BadInputError(f"image {image_id!r} has no segment map in the spectral shards; re-run spectral_segments")
    tensors = segments[image_id]
    return spectral_proposal(tensors["segments"], tensors["geometry"], image_hw, cfg["min_object_fraction"]), ""


# ---------------------------------------------------------------------------------------------
# Stage comus-pseudo-masks


def run_pseudo_masks(proposals_dir: Path, out_masks: Path, out_dir: Path, params: dict, seed: int,
                     threads: int) -> None:
    """Cluster the proposals' features, filter, write the kept images' pseudo-masks into
    ``out_masks`` and ``clusters.csv``, ``training_images.csv``, ``summary.json`` into ``out_dir``."""
    from pipeline.pseudo_labels import cluster_crops

    found = shards.read_images(Path(proposals_dir) / FEATURES, names={"cls"})
    image_ids = sorted(found)
    features = np.stack([found[i]["cls"].numpy() for i in image_ids]) if image_ids else np.zeros((0, 1), np.float32)
    with threadpool_limits(limits=max(1, threads)):
        clusters, kept, distances = cluster_crops(features, params, seed, row_names=image_ids)
    with atomic_dir(out_masks) as tmp:
        for image_id, cluster in zip(np.asarray(image_ids)[kept], clusters[kept]):
            proposal = load_mask(Path(proposals_dir) / MASKS / f"{image_id}.png")
            write_label_png(safe_child(tmp, image_id), pseudo_mask(proposal, int(cluster)))
    frame = pd.DataFrame({"image_id": image_ids, "cluster": clusters + 1, "distance": distances, "kept": kept})
    write_csv(Path(out_dir) / "clusters.csv", frame)
    write_csv(Path(out_dir) / "training_images.csv", frame.loc[frame["kept"], ["image_id"]])
    k = int(params["num_clusters"])
    without = pd.read_csv(Path(proposals_dir) / WITHOUT_PROPOSAL)
    summary = {
        # read by the report as the run's "done" (method, classes) and by the evaluation (clusters)
        "method": "comus",
        "num_classes": k + 1,
        "num_clusters": k,
        "clustering": params["method"],
        "keep_fraction": params["keep_fraction"],
        "seed": seed,
        "images_with_proposal": len(image_ids),
        "images_without_proposal": len(without),
        "images_kept": int(kept.sum()),
        # index i is pseudo-class i + 1
        "cluster_sizes": np.bincount(clusters, minlength=k).tolist(),
        "kept_cluster_sizes": np.bincount(clusters[kept], minlength=k).tolist(),
    }
    write_json(Path(out_dir) / "summary.json", summary)
    log.info("COMUS pseudo-masks: %d of %d proposals kept in %d clusters (%s)", summary["images_kept"],
             len(image_ids), k, params["method"])
