"""PC2M's offline area pass (Algorithm 1, eqs. 6-7: every training image predicted once an epoch):
what one DataLoader worker delivers, the stage's items (uint8 pixels, normalised where the model
runs) against the reference (float32 images normalised in the worker, the stage before 2026-12-08),
in the same run. Photo-like JPEGs of VOC size, the global view's size.

    python bench/area_pass.py --images 256 --size 384
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import cpu_model, print_and_append
from pipeline.methods.pc2m.views import PlainImageDataset
from pipeline.training.data import LabelledImage

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class NormalisedInWorker(PlainImageDataset):
    """The reference: each item normalised to float32 in the worker."""

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.normalise(super().__getitem__(index))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=384, help="train.global_size")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="append the table to this Markdown file")
    return parser.parse_args(argv)


def write_photos(folder: Path, count: int) -> list[LabelledImage]:
    """Smooth gradients with mild noise, 500 x 375 (a VOC photo's size), JPEG quality 90."""
    images = []
    yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
    for index in range(count):
        rng = np.random.default_rng(index)
        base = 127 + 100 * np.sin(xx[..., None] / 40 + yy[..., None] / 60 + rng.uniform(0, 2 * np.pi, 3))
        rgb = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"{index}.jpg"
        Image.fromarray(rgb).save(path, quality=90)
        images.append(LabelledImage(str(index), str(path), (1,)))
    return images


def seconds_per_image(dataset: PlainImageDataset, batch_size: int) -> float:
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=1)
    start = time.perf_counter()
    for _ in loader:
        pass
    return (time.perf_counter() - start) / len(dataset)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-area-pass-") as tmp:
        images = write_photos(Path(tmp), args.images)
        datasets = {"stage: uint8 pixels, normalised where the model runs": PlainImageDataset,
                    "reference: float32, normalised in the worker": NormalisedInWorker}
        best = {name: float("inf") for name in datasets}
        for _ in range(args.rounds):
            for name, kind in datasets.items():
                best[name] = min(best[name], seconds_per_image(kind(images, args.size, MEAN, STD), args.batch_size))
    reference = best["reference: float32, normalised in the worker"]
    lines = [f"PC2M offline area pass, one DataLoader worker, {args.images} JPEGs of 500x375 at {args.size} px, "
             f"batches of {args.batch_size}, best of {args.rounds} rounds. Machine: {cpu_model()}.", "",
             "| items | ms per image | images/s a worker delivers | reference / this |", "|---|---:|---:|---:|"]
    for name, seconds in best.items():
        lines.append(f"| {name} | {seconds * 1e3:.2f} | {1 / seconds:.0f} | {reference / seconds:.2f} |")
    print_and_append("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
