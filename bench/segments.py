"""The spectral stage's per-image segmentation (k-means on the eigenvectors, `segment_patches`):
the stage's (scikit-learn's k-means on one thread) against the reference (the same k-means with
its default thread pools, the stage before 2026-12-08), in the same run, on an idle machine and
with ``--busy N`` processes spinning beside it (other Snakemake jobs on the same cores). Synthetic
eigenpairs at VOC's patch grid.

    python bench/segments.py --images 24 --busy 0 1
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import cpu_model, print_and_append
from pipeline import spectral


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--grid", default="23x31", help="patch grid ROWSxCOLUMNS (VOC at 496x368, /16)")
    parser.add_argument("--eigenvectors", type=int, default=20, help="spectral.num_eigenvectors")
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 1], help="spinning processes beside the bench")
    parser.add_argument("--out", type=Path, help="append the table to this Markdown file")
    return parser.parse_args(argv)


def eigenpairs(count: int, grid: tuple[int, int], k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Orthonormal vectors with a few well-separated groups of patches, ascending eigenvalues."""
    generator = torch.Generator().manual_seed(0)
    n = grid[0] * grid[1]
    pairs = []
    for _ in range(count):
        groups = torch.randint(0, 4, (n,), generator=generator)
        signal = torch.nn.functional.one_hot(groups, 4).double() + 0.1 * torch.randn(n, 4, generator=generator,
                                                                                      dtype=torch.float64)
        vectors = torch.linalg.qr(torch.cat([signal, torch.randn(n, k - 4, generator=generator,
                                                                 dtype=torch.float64)], dim=1))[0].float()
        values = torch.cat([torch.zeros(1), torch.sort(torch.rand(k - 1, generator=generator))[0] + 0.05])
        values[1:4] *= 0.1  # the group structure: three small eigenvalues, then a gap
        pairs.append((values, vectors))
    return pairs


class NoLimit:
    """The reference's thread pools: a controller whose limit limits nothing (scikit-learn's
    k-means with its default threads)."""

    def limit(self, **_) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


def spin() -> None:
    while True:
        pass


def ms_per_image(pairs, grid, reference: bool) -> tuple[float, list[torch.Tensor]]:
    original = spectral._thread_pools
    if reference:
        spectral._thread_pools = NoLimit
    try:
        start = time.perf_counter()
        labels = [spectral.segment_patches(values, vectors, grid, None, 8, "border", 0) for values, vectors in pairs]
        return (time.perf_counter() - start) / len(pairs) * 1e3, labels
    finally:
        spectral._thread_pools = original


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    grid = tuple(int(v) for v in args.grid.lower().split("x"))
    pairs = eigenpairs(args.images, grid, args.eigenvectors)
    ms_per_image(pairs[:2], grid, reference=False)  # imports and first-call costs, not timed
    lines = [f"Spectral segments (k-means on the eigenvectors), {args.images} images of a {args.grid} grid, K = "
             f"{args.eigenvectors}. Machine: {cpu_model()}, {os.cpu_count()} cores, OMP_NUM_THREADS="
             f"{os.environ.get('OMP_NUM_THREADS', 'unset')}.", "",
             "| processes spinning beside it | stage ms / image | reference ms / image | reference / stage "
             "| same labels |", "|---:|---:|---:|---:|---|"]
    for busy in args.busy:
        spinners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(busy)]
        for process in spinners:
            process.start()
        try:
            stage, ours = ms_per_image(pairs, grid, reference=False)
            reference, theirs = ms_per_image(pairs, grid, reference=True)
        finally:
            for process in spinners:
                process.terminate()
        same = all(torch.equal(a, b) for a, b in zip(ours, theirs))
        lines.append(f"| {busy} | {stage:.1f} | {reference:.1f} | {reference / stage:.1f} | {same} |")
    print_and_append("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
