"""Stage `spectral_segments`: per image of a feature shard, the K smallest eigenpairs of the patch
graph Laplacian and the patch-level segment map (paper 000 Sec. 3.3).

Images with the same patch grid are solved together, ``spectral.batch_size`` at a time, in one
batched dense eigensolve (on the GPU when there is one).
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from pipeline import shards
from pipeline.devices import resolve_device
from pipeline.errors import BadInputError
from pipeline.geometry import unpack
from pipeline.patch_sizes import fit_to_patch
from pipeline.spectral import colour_knn_affinity, key_affinity, segment_patches, smallest_eigenpairs

log = logging.getLogger(__name__)
FORMAT = "spectral-v1"


def check_finite(image_id: str, keys: torch.Tensor, path: Path) -> None:
    if not torch.isfinite(keys).all():
        bad = int((~torch.isfinite(keys)).any(-1).sum())
        raise BadInputError(f"{path}: image {image_id!r} has {bad} patch(es) with NaN/inf keys")


def group_by_grid(grids: dict[str, tuple[int, int]], batch_size: int) -> list[list[str]]:
    """Batches of image ids sharing a patch grid, in a deterministic order."""
    groups: dict[tuple[int, int], list[str]] = defaultdict(list)
    for image_id in sorted(grids):
        groups[grids[image_id]].append(image_id)
    return [ids[i : i + batch_size]
            for grid in sorted(groups) for ids in [groups[grid]] for i in range(0, len(ids), batch_size)]


def patch_colours(rgb: np.ndarray, geometry: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The image as the backbone saw it (resized, cropped/padded), averaged over each patch:
    N×3 in [0, 1], the colour input of the kNN affinity."""
    _, rh, rw, fh, fw = (int(round(v)) for v in geometry.tolist())
    resized = np.asarray(Image.fromarray(rgb).resize((rw, rh), Image.Resampling.BICUBIC))
    canvas = np.zeros((fh, fw, 3), np.uint8)
    canvas[: min(rh, fh), : min(rw, fw)] = resized[:fh, :fw]
    small = cv2.resize(canvas, (grid[1], grid[0]), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(small.reshape(-1, 3).astype(np.float32) / 255.0)


def affinity(keys: torch.Tensor, colours: torch.Tensor | None, grid: tuple[int, int], cfg: dict) -> torch.Tensor:
    """Feature affinity (paper 000 eq. 10), plus λ × the colour kNN affinity when λ > 0."""
    w = key_affinity(keys)
    if colours is not None and cfg["colour_weight"] > 0:
        w = w + cfg["colour_weight"] * colour_knn_affinity(
            colours, grid, cfg["colour_neighbors"], cfg["colour_xy_weight"])
    return w


def run_spectral_shard(features_path: Path, manifest_path: Path, out_path: Path, params: dict, threads: int) -> None:
    from pipeline.datasets import read_manifest
    from pipeline.imageio import load_rgb

    cfg = params["spectral"]
    torch.set_num_threads(max(1, threads))
    device = resolve_device(cfg["device"])
    manifest = read_manifest(manifest_path).set_index("image_id")
    wanted = set(manifest.index[manifest["split"].isin(cfg["splits"])])
    images = {i: t for i, t in shards.read_images(features_path, names={"keys", "grid", "geometry"}).items()
              if i in wanted}
    for image_id, tensors in images.items():
        if "keys" not in tensors:
            raise BadInputError(f"{features_path}: no attention keys stored (add `keys` to features.keep)")
        check_finite(image_id, tensors["keys"], features_path)
    grids = {image_id: tuple(int(v) for v in t["grid"].tolist()) for image_id, t in images.items()}
    use_colour = cfg["colour_weight"] > 0

    out: dict[str, dict[str, torch.Tensor]] = {}
    batches = group_by_grid(grids, cfg["batch_size"])
    for batch in tqdm(batches, desc=f"spectral {features_path.name}", unit="batch"):
        keys = torch.stack([images[i]["keys"] for i in batch]).to(device)
        colours = None
        if use_colour:
            colours = torch.stack(
                [patch_colours(load_rgb(manifest.loc[i, "image_path"]), images[i]["geometry"], grids[i]) for i in batch]
            ).to(device)
        values, vectors = smallest_eigenpairs(affinity(keys, colours, grids[batch[0]], cfg), cfg["num_eigenvectors"])
        values, vectors = values.cpu(), vectors.cpu()
        for row, image_id in enumerate(batch):
            segments = segment_patches(
                values[row],
                vectors[row],
                grids[image_id],
                n_segments=cfg["num_segments"],
                max_segments=cfg["max_segments"],
                background=cfg["background"],
                seed=params["seed"],
            )
            out[image_id] = {
                "eigenvalues": values[row],
                "eigenvectors": vectors[row].half(),
                "segments": segments.to(torch.int64),
                "grid": torch.tensor(grids[image_id], dtype=torch.int32),
                # carried along so that consumers can map the patch grid back onto the image
                "geometry": images[image_id]["geometry"],
            }
    meta = {"format": FORMAT, "image_ids": sorted(out), "spectral": cfg, "seed": params["seed"]}
    shards.write_shard(out_path, shards.per_image_tensors(out), meta)
    log.info("%s: %d images (splits %s), %d batches", out_path, len(out), cfg["splits"], len(batches))


# ---------------------------------------------------------------------------------------------
# Stage `segment_features`: the CLS feature of each non-background segment's crop (paper 000 Sec. 3.3)

# Morphology on the patch grid with the 4-connected cross, the footprint Deep Spectral Methods'
# boxes get (skimage's default); outside the grid counts as set, so the image edge erodes nothing.
CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))


def erode_keeping_last(mask: np.ndarray, iterations: int) -> np.ndarray:
    """``iterations`` erosions, stopping at the last non-empty one: a segment too small for the
    full erosion keeps what its earlier erosions left instead of vanishing."""
    for _ in range(iterations):
        eroded = cv2.erode(mask, CROSS)
        if not eroded.any():
            break
        mask = eroded
    return mask


def patch_box(mask: np.ndarray, erode: int, dilate: int) -> tuple[int, int, int, int] | None:
    """Box (y0, x0, y1, x1; end exclusive) in patches of a segment given on the patch grid, after
    ``erode`` erosions (they cut a bridge up to 2·erode patches wide to a neighbouring region)
    and ``dilate`` dilations (context of ``dilate`` patches each side, within the grid), as Deep
    Spectral Methods makes its crops. None for an empty mask."""
    work = erode_keeping_last(mask.astype(np.uint8), erode)
    if dilate > 0:
        work = cv2.dilate(work, CROSS, iterations=dilate)
    ys, xs = np.nonzero(work)
    if ys.size == 0:
        return None
    return int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1


def grid_side_to_image(start: int, end: int, cells: int, patch: int, resized: int, original: int) -> tuple[int, int]:
    """Patches [start, end) of a side of ``cells`` -> pixels [a, b) of the original image side.
    The last patch owns the rest of the resized side (the sliver a crop fit removed; the padding
    a pad fit added is not image), and the resized side maps back linearly, as in
    ``pipeline.geometry.grid_to_image``; integer arithmetic, rounded outwards."""
    lo = start * patch
    hi = resized if end == cells else end * patch
    a = lo * original // resized
    b = -(-hi * original // resized)
    return a, max(a + 1, min(original, b))


def segment_box(
    mask: np.ndarray, patch: int, resized_hw: tuple[int, int], image_hw: tuple[int, int], erode: int, dilate: int
) -> tuple[int, int, int, int] | None:
    """Crop box (y0, x0, y1, x1; end exclusive) on the original image of a segment given on the
    patch grid: ``patch_box`` scaled by the patch size and mapped back to the image."""
    box = patch_box(mask, erode, dilate)
    if box is None:
        return None
    (gh, gw), (rh, rw), (height, width) = mask.shape, resized_hw, image_hw
    y0, y1 = grid_side_to_image(box[0], box[2], gh, patch, rh, height)
    x0, x1 = grid_side_to_image(box[1], box[3], gw, patch, rw, width)
    return y0, x0, y1, x1


def crop_tensor(rgb: np.ndarray, box: tuple[int, int, int, int], size: int, mean, std) -> torch.Tensor:
    y0, x0, y1, x1 = box
    crop = Image.fromarray(rgb[y0:y1, x0:x1]).resize((size, size), Image.Resampling.BICUBIC)
    image = torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1).float().div_(255.0)
    return (image - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def run_segment_features_shard(
    spectral_path: Path, features_path: Path, manifest_path: Path, out_path: Path, params: dict, threads: int
) -> None:
    from pipeline.backbone import build_backbone, embed_dim, extract_features, normalisation, patch_size
    from pipeline.datasets import read_manifest
    from pipeline.imageio import load_rgb

    cfg = params["segment_features"]
    torch.set_num_threads(max(1, threads))
    device = resolve_device(params["features"]["device"])
    backbone = params["backbone"]
    # Same seed as the feature stage: `weights: random` must give the same network (and crop
    # features) on every run, and the same one the feature stage used.
    torch.manual_seed(int(params["seed"]))
    model = build_backbone(
        backbone["name"], backbone["weights"], backbone["checkpoint_key"], backbone["model_kwargs"]
    ).to(device)
    mean, std = normalisation(model)
    patch = patch_size(model)
    crop_size = fit_to_patch("segment_features.crop_size", cfg["crop_size"], patch)
    rows = read_manifest(manifest_path).set_index("image_id")
    spectral = shards.read_images(spectral_path, names={"segments"})
    geometry = shards.read_images(features_path, names={"geometry"})

    owners: list[tuple[str, int, tuple[int, int, int, int]]] = []
    features: list[torch.Tensor] = []
    pending: list[torch.Tensor] = []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def flush() -> None:
        # Crops are forwarded a batch at a time, so memory does not grow with the shard.
        if pending:
            with autocast:
                batch = torch.stack(pending).to(device)
                features.append(extract_features(model, batch, keys=False, cls=True).cls.float().cpu())
            pending.clear()

    for image_id in tqdm(sorted(spectral), desc=f"crops {spectral_path.name}", unit="image"):
        _, resized_hw, _ = unpack(geometry[image_id]["geometry"])
        rgb = load_rgb(rows.loc[image_id, "image_path"])
        segments = spectral[image_id]["segments"].numpy()
        for segment_id in (int(s) for s in np.unique(segments) if s != 0):
            box = segment_box(segments == segment_id, patch, resized_hw, rgb.shape[:2], cfg["erode"], cfg["dilate"])
            if box is None:
                continue
            pending.append(crop_tensor(rgb, box, crop_size, mean, std))
            owners.append((image_id, segment_id, box))
            if len(pending) == cfg["batch_size"]:
                flush()
    flush()
    cls = torch.cat(features) if features else []

    dim = embed_dim(model)
    # Every image gets entries, an image without foreground segments with zero rows.
    per_image: dict[str, dict[str, list]] = {i: {"cls": [], "segment_ids": [], "boxes": []} for i in spectral}
    for (image_id, segment_id, box), feature in zip(owners, cls):
        per_image[image_id]["cls"].append(feature)
        per_image[image_id]["segment_ids"].append(segment_id)
        per_image[image_id]["boxes"].append(box)
    tensors = {
        image_id: {
            "cls": torch.stack(entry["cls"]).half() if entry["cls"] else torch.zeros(0, dim, dtype=torch.float16),
            "segment_ids": torch.tensor(entry["segment_ids"], dtype=torch.int64),
            "boxes": torch.tensor(entry["boxes"], dtype=torch.int32).reshape(-1, 4),
        }
        for image_id, entry in per_image.items()
    }
    meta = {"format": "segment-features-v1", "image_ids": sorted(spectral), "segment_features": cfg}
    shards.write_shard(out_path, shards.per_image_tensors(tensors), meta)
    log.info("%s: %d crops from %d images", out_path, len(owners), len(spectral))
