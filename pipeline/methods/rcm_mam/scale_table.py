"""CAM quality per inference scale (paper 003 Tables 2 and 5): the train images with GT masks
predicted from the CAMs of each single scale (with its flip) and of all scales fused (the
msinf-CAMs the prediction stage uses), each image's CAMs restricted to its GT image labels as
the CAM evaluations of the WSSS papers do; mIoU, precision and recall of each row (weak mode: the
CAM channels are the dataset's classes)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from pipeline import metrics
from pipeline.atomic import write_csv
from pipeline.datasets import parse_labels, read_manifest
from pipeline.devices import mixed_precision, resolve_device
from pipeline.imageio import load_mask, load_rgb
from pipeline.methods.rcm_mam.infer import class_scores, masks_from_scores
from pipeline.methods.rcm_mam.model import forward_scale, fuse_scales
from pipeline.predict import load_predictor

log = logging.getLogger(__name__)

ALL_SCALES = "msinf"


@torch.no_grad()
def scale_views(net, image: torch.Tensor, scales: tuple[float, ...]) -> dict[float, list[torch.Tensor]]:
    """Per scale, the CAMs of the image and of its flip (B x N x H x W, max-normalised)."""
    return {scale: [forward_scale(net, image, scale).cams, forward_scale(net, image.flip(-1), scale).cams.flip(-1)]
            for scale in scales}


def cam_scale_table(manifest_path: Path, model_path: Path, params: dict, split: str, out_csv: Path,
                    threads: int) -> pd.DataFrame:
    """Write and return the table: one row per scale and one for all scales fused."""
    torch.set_num_threads(max(1, threads))
    device = resolve_device(params["predict"]["device"])
    predictor = load_predictor(Path(model_path), params["backbone"], device, None, params["predict"])
    num_classes = predictor.num_classes
    mean = torch.tensor(predictor.mean).view(1, 3, 1, 1)
    std = torch.tensor(predictor.std).view(1, 3, 1, 1)
    rows = read_manifest(manifest_path)
    rows = rows[(rows["split"] == split) & (rows["mask_path"] != "") & rows["has_labels"]]
    names = [*(f"{s:g}" for s in predictor.scales), ALL_SCALES]
    confusion = {name: np.zeros((num_classes, num_classes), np.int64) for name in names}
    for row in tqdm(rows.itertuples(), total=len(rows), desc=f"CAMs per scale ({split})", unit="img"):
        rgb = torch.from_numpy(np.array(load_rgb(row.image_path))).permute(2, 0, 1)[None].float() / 255
        image = ((rgb - mean) / std).to(device)
        labels = torch.zeros(1, num_classes - 1, device=device)
        labels[0, [c - 1 for c in parse_labels(row.labels) if 0 < c < num_classes]] = 1
        gt = load_mask(row.mask_path, image_path=row.image_path)
        with mixed_precision(device):
            views = scale_views(predictor.model, image, predictor.scales)
        fused = {f"{s:g}": fuse_scales(v) for s, v in views.items()}
        fused[ALL_SCALES] = fuse_scales([cam for v in views.values() for cam in v])
        for name, cams in fused.items():
            mask = masks_from_scores(class_scores(cams.float(), labels, predictor.background))[0].cpu().numpy()
            confusion[name] += metrics.image_confusion(mask, gt, num_classes, num_classes, image_id=row.image_id)
    table = pd.DataFrame([scale_row(name, confusion[name], len(rows)) for name in names])
    write_csv(out_csv, table, float_format="%.6g")
    log.info("CAMs per scale on %d %s images: %s", len(rows), split,
             ", ".join(f"{r.scale} mIoU {100 * r.miou:.1f}" for r in table.itertuples()))
    return table


def scale_row(name: str, confusion: np.ndarray, images: int) -> dict:
    precision, recall = metrics.per_class_precision_recall(confusion)
    return {"scale": name, "images": images, "miou": metrics.mean_iou(metrics.per_class_iou(confusion)),
            "precision": metrics.mean_over_classes(precision), "recall": metrics.mean_over_classes(recall)}
