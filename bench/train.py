"""PC2M training throughput (images/s) with a breakdown of one step, random weights.

Per step: data (waiting for the DataLoader: decode, resize, two views, jitter), forward (both
views), Sinkhorn (the two transport plans, inside the loss), loss + backward + Adam step. Runs
the fine-tune phase (last 5 blocks + norm + classifier train), as every epoch after the first.

    python bench/train.py                                   # ViT-S/16 and ViT-B/16 at 384, CPU
    python bench/train.py --device cuda --batch-size 32 --iterations 20
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pipeline.pc2m.losses as losses  # noqa: E402
from pipeline.backbone import build_backbone, normalisation, patch_size  # noqa: E402
from pipeline.features import resolve_device  # noqa: E402
from pipeline.pc2m.data import LabelledImage, TwoViewDataset  # noqa: E402
from pipeline.pc2m.model import PatchClassifier, set_trainable  # noqa: E402
from pipeline.pc2m.ot import batch_class_marginal, multi_hot_frequencies  # noqa: E402
from pipeline.pc2m.views import ViewSettings, local_to_global  # noqa: E402

MODELS = {"S/16": "vit_small_patch16_224.dino", "B/16": "vit_base_patch16_224.dino"}
NUM_CLASSES = 21  # VOC


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), help=f"any of {list(MODELS)} or timm names")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--global-size", type=int, default=384)
    parser.add_argument("--local-size", type=int, default=192)
    parser.add_argument("--iterations", type=int, default=3, help="timed steps (after one warm-up step)")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def synthetic_images(folder: Path, count: int) -> list[LabelledImage]:
    rng = np.random.default_rng(0)
    images = []
    for index in range(count):
        path = folder / f"{index}.jpg"
        Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(path, quality=90)
        images.append(LabelledImage(str(index), str(path), (1 + index % 20,)))
    return images


class Timer:
    def __init__(self, device: torch.device) -> None:
        self.device, self.totals = device, {}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def add(self, key: str, seconds: float) -> None:
        self.totals[key] = self.totals.get(key, 0.0) + seconds


def bench_model(name: str, args: argparse.Namespace, device: torch.device, images: list[LabelledImage]) -> dict:
    torch.manual_seed(0)
    model = PatchClassifier(build_backbone(name, "random"), NUM_CLASSES).to(device).train()
    parameters = set_trainable(model, 5)
    optimizer = torch.optim.Adam(parameters, lr=1e-4)
    views = ViewSettings(args.global_size, args.local_size, (0.8, 1.0), (0.3, 0.6), 10.0, True, True)
    dataset = TwoViewDataset(images, NUM_CLASSES, views, *normalisation(model.backbone), seed=0)
    steps = args.iterations + 1
    batches = [list(range(i * args.batch_size, (i + 1) * args.batch_size)) for i in range(steps)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=args.num_workers)
    local_grid = (args.local_size // patch_size(model.backbone),) * 2
    nu_dataset = torch.full((NUM_CLASSES,), 1.0 / NUM_CLASSES, device=device)
    alpha_tilde = nu_dataset.clone()
    timer = Timer(device)
    real_sinkhorn = losses.sinkhorn

    def timed_sinkhorn(*a, **k):
        timer.sync()
        began = time.perf_counter()
        out = real_sinkhorn(*a, **k)
        timer.sync()
        timer.add("sinkhorn", time.perf_counter() - began)
        return out

    losses.sinkhorn = timed_sinkhorn
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        iterator = iter(loader)
        for step in range(steps):
            if step == 1:  # the first step (allocations, worker start-up) is not timed
                timer.totals.clear()
            began = time.perf_counter()
            batch = next(iterator)
            timer.add("data", time.perf_counter() - began)
            began = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                global_pred = model(batch["global"].to(device))
                local_pred = model(batch["local"].to(device))
            timer.sync()
            timer.add("forward", time.perf_counter() - began)
            began = time.perf_counter()
            targets = batch["target"].to(device)
            alpha = batch_class_marginal(alpha_tilde, multi_hot_frequencies(targets), nu_dataset)
            alignment = local_to_global(batch["theta_global"].to(device), batch["theta_local"].to(device), local_grid)
            terms = losses.pc2m_loss(global_pred, local_pred, alignment, targets, alpha, 0.1,
                                     losses.LossSettings(True, True, 3))
            optimizer.zero_grad(set_to_none=True)
            terms.total.backward()
            optimizer.step()
            timer.sync()
            timer.add("loss+backward+step", time.perf_counter() - began)
    finally:
        losses.sinkhorn = real_sinkhorn
    timer.totals["loss+backward+step"] -= timer.totals.get("sinkhorn", 0.0)
    total = sum(timer.totals.values())
    images_done = args.iterations * args.batch_size
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"model": name, "images/s": images_done / total, **{k: v / args.iterations for k, v in timer.totals.items()},
            "peak MiB": peak}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as folder:
        images = synthetic_images(Path(folder), args.batch_size * (args.iterations + 1))
        rows = [bench_model(MODELS.get(m, m), args, device, images) for m in args.models]
    memory = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "ru_maxrss of the process (cumulative)"
    print(f"# PC2M training step, {device} ({platform.processor() or platform.machine()}, {args.threads} threads), "
          f"batch {args.batch_size}, views {args.global_size}/{args.local_size}, {args.iterations} timed steps; "
          f"seconds per step; peak memory: {memory}\n")
    keys = ["model", "images/s", "data", "forward", "sinkhorn", "loss+backward+step", "peak MiB"]
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{row[k]:.3g}" if isinstance(row[k], float) else str(row[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
