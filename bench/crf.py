"""CRF stage throughput with 1 and 2 worker processes, in one run.

The whole stage (``pipeline.crf.crf_shard``: read the probs shard, upsample each image's grid
probabilities, decode the image, dense CRF, write the PNG) on synthetic VOC-sized inputs:
500 × 375 images, 21 classes on a 23 × 31 grid (ViT/16 on the image cropped to 496 × 368),
10 iterations with the deeplab-v2 pairwise terms. With 2 workers a fresh stage process also pays
once for starting them (a forkserver that imports torch, then forks); that start-up is timed on
its own, first, so the steady-state speed-up can be read apart. The machine may be shared: the
load average is printed before and after, and a speed-up below 2 on a loaded 2-core machine says
as much about the load as the code.

    python bench/crf.py                   # 12 images
    python bench/crf.py --images 24 --out bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import print_and_append
from pipeline import crf, shards
from pipeline.datasets import MANIFEST_COLUMNS

WIDTH, HEIGHT, PATCH = 500, 375, 16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--preset", default="deeplab-v2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="append the table to this Markdown file")
    return parser.parse_args(argv)


def write_inputs(root: Path, images: int, num_classes: int, seed: int) -> tuple[Path, Path]:
    """Photo-like images made of coloured regions, a probs shard whose grid probabilities roughly
    follow the regions, and a one-shard manifest."""
    rng = np.random.default_rng(seed)
    final_h, final_w = HEIGHT // PATCH * PATCH, WIDTH // PATCH * PATCH
    grid_h, grid_w = final_h // PATCH, final_w // PATCH
    tensors, rows = {}, []
    for index in range(images):
        image_id = f"img{index:04d}"
        regions = rng.integers(0, num_classes, size=(4, 5))
        colours = rng.integers(0, 256, size=(num_classes, 3))
        region_map = np.kron(regions, np.ones((HEIGHT // 4 + 1, WIDTH // 5 + 1), np.int64))[:HEIGHT, :WIDTH]
        image = np.clip(colours[region_map] + rng.normal(0, 8, (HEIGHT, WIDTH, 3)), 0, 255).astype(np.uint8)
        path = root / "images" / f"{image_id}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
        logits = rng.normal(0, 1, (num_classes, grid_h, grid_w))
        cells = region_map[PATCH // 2 : final_h : PATCH, PATCH // 2 : final_w : PATCH]
        np.put_along_axis(logits, cells[None], 3.0, axis=0)
        probs = torch.softmax(torch.from_numpy(logits), dim=0)
        tensors[f"{image_id}/probs"] = probs.to(torch.float16)
        tensors[f"{image_id}/geometry"] = torch.tensor([1.0, HEIGHT, WIDTH, final_h, final_w])
        rows.append({"image_id": image_id, "image_path": str(path), "mask_path": "", "labels": "",
                     "has_labels": False, "split": "val", "width": WIDTH, "height": HEIGHT, "shard": 0})
    pd.DataFrame(rows, columns=MANIFEST_COLUMNS).to_csv(root / "manifest.csv", index=False)
    shards.write_shard(root / "probs.safetensors", tensors, {})
    return root / "probs.safetensors", root / "manifest.csv"


def worker_startup_seconds(workers: int) -> float:
    """Time to get ``workers`` ready CRF workers from a cold start: the stage's forkserver
    (imports the CRF module and torch once) plus the forks. Run before anything else started it."""
    start = time.perf_counter()
    with crf.worker_pool(workers) as pool:
        list(pool.map(abs, range(workers)))
    return time.perf_counter() - start


def timed_task(job: tuple[crf.ImageTask, crf.CrfParams]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one image's work, measured inside the process doing it."""
    cpu, wall = time.process_time(), time.perf_counter()
    crf._run_task(job)
    return time.process_time() - cpu, time.perf_counter() - wall


def cpu_accounting(probs: Path, manifest: Path, out: Path, params: dict, workers: int) -> tuple[float, float]:
    """(CPU s per image, CPU share obtained = CPU time / (wall time × workers)) of the per-image
    work, in-process for 1 worker and in the stage's worker pool for more. A share well below 1
    means other jobs took the cores: the speed-up is then bounded by the machine, not the code."""
    p = crf.resolve_params(params)
    jobs = [(task, p) for task in crf.build_tasks(probs, manifest, out)]
    start = time.perf_counter()
    if workers == 1:
        measured = [timed_task(job) for job in jobs]
    else:
        with crf.worker_pool(workers) as pool:
            measured = list(pool.map(timed_task, jobs))
    wall = time.perf_counter() - start
    cpu = sum(m[0] for m in measured)
    return cpu / len(jobs), cpu / (wall * workers)


def timed_stage(probs: Path, manifest: Path, out: Path, params: dict, threads: int) -> float:
    start = time.perf_counter()
    crf.crf_shard(probs, manifest, out, params, threads=threads)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    params = {"preset": args.preset, "iterations": args.iterations}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        probs, manifest = write_inputs(root, args.images, args.classes, args.seed)
        startup = worker_startup_seconds(2)
        one = timed_stage(probs, manifest, root / "one", params, threads=1)
        two = timed_stage(probs, manifest, root / "two", params, threads=2)
        cpu_one, share_one = cpu_accounting(probs, manifest, root / "acc1", params, 1)
        cpu_two, share_two = cpu_accounting(probs, manifest, root / "acc2", params, 2)
    load_after = os.getloadavg()
    n = args.images
    cold_two = two + startup
    lines = [
        f"## CRF stage: 1 vs 2 workers ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; load average before "
        f"{load_before[0]:.2f} / {load_before[1]:.2f} / {load_before[2]:.2f}, after "
        f"{load_after[0]:.2f} / {load_after[1]:.2f} / {load_after[2]:.2f}. {n} images {WIDTH}×{HEIGHT}, "
        f"{args.classes} classes, preset {args.preset}, {args.iterations} iterations.",
        "",
        "| workers | time (s) | images/s | speed-up |",
        "|---:|---:|---:|---:|",
        f"| 1 | {one:.1f} | {n / one:.2f} | 1.00 |",
        f"| 2 (forkserver already running) | {two:.1f} | {n / two:.2f} | {one / two:.2f} |",
        f"| 2 (fresh process: + {startup:.1f} s worker start-up) | {cold_two:.1f} | {n / cold_two:.2f} "
        f"| {one / cold_two:.2f} |",
        "",
        "CPU accounting (a second pass over the same images, time measured inside the workers):",
        "",
        "| workers | CPU s / image | share of a core each worker got | speed-up if each got a whole core |",
        "|---:|---:|---:|---:|",
        f"| 1 | {cpu_one:.2f} | {share_one:.0%} | 1.00 |",
        f"| 2 | {cpu_two:.2f} | {share_two:.0%} | {2 * cpu_one / cpu_two:.2f} |",
        "",
    ]
    text = "\n".join(lines)
    print_and_append(text, args.out)


if __name__ == "__main__":
    main()
