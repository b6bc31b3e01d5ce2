"""Refine one shard of class-probability maps by AffinityNet's random walk.

Per image, as the public code's ``infer_aff.py`` does: the image (longer side at most
``affinity.max_size``, our bound on the dense N x N transition matrix) is padded bottom/right to a
multiple of 8; its probabilities, brought to that size, get the background raised to
``alpha_walk`` (PSA's alpha 16, :func:`pipeline.affinity.labels.background_scaled`) and are
average-pooled to the stride-8 grid; the random walk (:mod:`pipeline.affinity.random_walk`)
propagates them with the network's affinities.

Outputs, in the formats of the prediction stage so that every consumer reads them alike: a
probability shard (per image ``probs`` C x h x w float16 on the stride-8 grid, the walked scores
normalised per cell, and ``geometry`` [scale, resized_h, resized_w, padded_h, padded_w] for
``pipeline.geometry.grid_to_image``) and a folder of argmax masks, complete or absent.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline import shards
from pipeline.affinity.labels import background_scaled
from pipeline.affinity.model import STRIDE, load_trained, pair_affinities
from pipeline.affinity.random_walk import refine_scores
from pipeline.affinity.train import section_fields
from pipeline.atomic import atomic_dir
from pipeline.datasets import read_manifest
from pipeline.deeplab.predict import to_input
from pipeline.devices import resolve_device
from pipeline.errors import BadInputError
from pipeline.geometry import grid_to_image
from pipeline.imageio import load_rgb, safe_child, write_label_png

log = logging.getLogger(__name__)

FORMAT_VERSION = "affinity-predictions/1"


@dataclass(frozen=True)
class WalkSettings:
    """The ``affinity`` keys of the walk (schema: workflow/schemas/config.schema.yaml)."""

    radius: int
    alpha_walk: float
    beta: float
    log_t: int
    max_size: int
    device: str

    @classmethod
    def from_params(cls, section: dict) -> WalkSettings:
        return cls(**section_fields(cls, section))


def walk_geometry(height: int, width: int, max_size: int) -> torch.Tensor:
    """[scale, resized_h, resized_w, padded_h, padded_w]: longer side at most ``max_size``,
    padded to multiples of the stride."""
    scale = min(1.0, max_size / max(height, width))
    rh, rw = max(1, round(height * scale)), max(1, round(width * scale))
    fh, fw = -(-rh // STRIDE) * STRIDE, -(-rw // STRIDE) * STRIDE
    return torch.tensor([scale, rh, rw, fh, fw], dtype=torch.float32)


@torch.no_grad()
def refine_image(model, rgb: torch.Tensor, probs: torch.Tensor, grid_geometry: torch.Tensor,
                 settings: WalkSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """(walked probabilities C x h x w on the stride-8 grid, their geometry) of one image."""
    height, width = rgb.shape[:2]
    geometry = walk_geometry(height, width, settings.max_size)
    _, rh, rw, fh, fw = (int(v) for v in geometry.tolist())
    device = next(model.parameters()).device
    image = to_input(rgb.to(device), model.mean, model.std)
    image = F.interpolate(image, size=(rh, rw), mode="bilinear", align_corners=False) if (rh, rw) != (height, width) \
        else image
    image = F.pad(image, (0, fw - rw, 0, fh - rh))
    scores = grid_to_image(probs.float(), grid_geometry, (rh, rw)).numpy()
    scores = torch.from_numpy(background_scaled(scores, settings.alpha_walk)).to(device)
    scores = F.avg_pool2d(F.pad(scores, (0, fw - rw, 0, fh - rh))[None], STRIDE)[0]
    affinity = pair_affinities(model(image), settings.radius)[0].float()
    walked = refine_scores(scores, affinity, settings.radius, settings.beta, settings.log_t)
    walked = walked / walked.sum(dim=0, keepdim=True).clamp_min(1e-12)
    return walked.cpu(), geometry


def refine_shard(probs_shard: str | Path, manifest_path: str | Path, model_path: str | Path,
                 out_probs: str | Path, out_masks_dir: str | Path, params: dict, threads: int) -> None:
    """Walked probabilities of every image of ``probs_shard`` into ``out_probs``, masks
    ``<out_masks_dir>/<image_id>.png``."""
    settings = WalkSettings.from_params(params["affinity"])
    torch.set_num_threads(max(1, threads))
    device = resolve_device(settings.device)
    model = load_trained(model_path).to(device).eval()
    maps = shards.read_images(probs_shard, names={"probs", "geometry"})
    manifest = read_manifest(manifest_path).set_index("image_id")
    tensors: dict[str, torch.Tensor] = {}
    with atomic_dir(out_masks_dir) as masks_tmp:
        for image_id in tqdm(sorted(maps), desc="random walk", unit="img"):
            if image_id not in manifest.index:
                raise BadInputError(f"{probs_shard}: image {image_id!r} is not in {manifest_path}")
            row = manifest.loc[image_id]
            rgb = torch.from_numpy(load_rgb(row["image_path"]).copy())
            if tuple(rgb.shape[:2]) != (int(row["height"]), int(row["width"])):
                raise BadInputError(f"{row['image_path']}: image is {rgb.shape[1]}x{rgb.shape[0]}, the manifest says "
                                    f"{row['width']}x{row['height']}")
            walked, geometry = refine_image(model, rgb, maps[image_id]["probs"], maps[image_id]["geometry"], settings)
            tensors[f"{image_id}/probs"] = walked.half()
            tensors[f"{image_id}/geometry"] = geometry
            on_image = grid_to_image(walked, geometry, tuple(rgb.shape[:2]))
            write_label_png(safe_child(masks_tmp, image_id), on_image.argmax(dim=0).to(torch.uint8).numpy())
        shards.write_shard(Path(out_probs), tensors, {
            "format": FORMAT_VERSION, "image_ids": sorted(maps),
            "walk": {key: value for key, value in asdict(settings).items() if key != "device"},
        })
    log.info("random walk (beta %s, t = 2^%d, radius %d) on %d images -> %s", settings.beta, settings.log_t,
             settings.radius, len(maps), out_masks_dir)
