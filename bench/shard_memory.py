"""Peak memory of a feature job: the shard written batch by batch (the stage) against the shard
held in memory and written at the end (the reference: the stage before 2026-11-27).

Each approach runs ``extract_shard`` in a fresh process (as Snakemake starts one per job) on the
same synthetic JPEGs; the reference is the same stage with its shard writer swapped for one that
keeps every batch and writes the file when the last batch is done. Both files must be the same
bytes. A one-block ViT-S/16 keeps the run short while the features are full size (384-wide keys
per patch, as a DINO ViT-S/16 writes).

    python bench/shard_memory.py                          # 2,048 JPEGs of 224 x 224, CPU
    python bench/shard_memory.py --images 4096 --device cuda --out bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from features import write_jpegs

from machine import cpu_model, print_and_append

APPROACHES = {"streamed": "the stage: each batch written as it comes back",
              "held": "reference: every batch held, the shard written at the end"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--size", type=int, default=224, help="square images of this side, features at it")
    parser.add_argument("--depth", type=int, default=1, help="ViT-S/16 blocks (features are full width)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="append the table to this Markdown file")
    parser.add_argument("--child", choices=sorted(APPROACHES), help=argparse.SUPPRESS)
    parser.add_argument("--manifest", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--shard", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def stage_params(args: argparse.Namespace) -> dict:
    return {
        "backbone": {"name": "vit_small_patch16_224.dino", "weights": "random", "checkpoint_key": "teacher",
                     "model_kwargs": {"depth": args.depth}},
        "features": {"max_size": args.size, "fit": "crop", "keep": ["keys", "cls"], "batch_size": args.batch_size,
                     "num_workers": args.workers, "device": args.device, "decode": "auto"},
        "seed": 0,
    }


def hold_the_shard() -> None:
    """The reference: the stage's shard writer replaced by one that keeps every tensor it is given
    and writes the file only at the end (the batches stay alive until then, as they used to)."""
    from pipeline import shards

    real_writer = shards.shard_writer

    class Holder:
        def __init__(self) -> None:
            self.held = []

        def batches(self, batches) -> None:
            self.held += batches

    @contextlib.contextmanager
    def holding_writer(out_path, specs, metadata):
        holder = Holder()
        yield holder
        with real_writer(out_path, specs, metadata) as write:
            write.batches(holder.held)

    shards.shard_writer = holding_writer


def child(args: argparse.Namespace) -> None:
    from pipeline.features import extract_shard

    if args.child == "held":
        hold_the_shard()
    start = time.perf_counter()
    phases = extract_shard(args.manifest, 0, args.shard, stage_params(args), threads=args.threads)
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"seconds": seconds, "phases": phases, "peak_mib": peak_mib}))


def run_child(args: argparse.Namespace, approach: str, manifest: Path, shard: Path) -> dict:
    command = [sys.executable, __file__, "--child", approach, "--manifest", str(manifest), "--shard", str(shard),
               "--size", str(args.size), "--depth", str(args.depth), "--batch-size", str(args.batch_size),
               "--workers", str(args.workers), "--threads", str(args.threads), "--device", args.device]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{approach} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        manifest = write_jpegs(folder, args.images, args.size, args.size)
        runs = {name: run_child(args, name, manifest, folder / f"{name}.safetensors") for name in APPROACHES}
        same = (folder / "streamed.safetensors").read_bytes() == (folder / "held.safetensors").read_bytes()
        shard_mb = (folder / "streamed.safetensors").stat().st_size / 1e6
    if not same:
        raise SystemExit("the two approaches wrote different shards")
    lines = [f"# feature job peak memory: {args.images} JPEGs of {args.size} px, ViT-S/16 with {args.depth} block(s), "
             f"batch {args.batch_size}, {args.workers} workers, {args.device} ({cpu_model()}, {args.threads} threads); "
             f"shard {shard_mb:.0f} MB, the same bytes both ways", "",
             "| approach | peak RSS MiB | vs reference | job s | features s | write s |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, label in APPROACHES.items():
        run = runs[name]
        lines.append(f"| {label} | {run['peak_mib']:.0f} | {run['peak_mib'] / runs['held']['peak_mib']:.2f} | "
                     f"{run['seconds']:.1f} | {run['phases']['features']:.1f} | {run['phases']['write']:.2f} |")
    print_and_append("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
