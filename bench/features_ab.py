"""The feature stage of one checkout on a folder of JPEGs, as a Snakemake job runs it: a fresh
process, ``extract_shard`` run twice — cold (the CUDA context and cuBLAS made in it, as in every
job) and warm — one JSON line per run. Run it once per checkout on the same folder to compare two
versions of the stage in one session (the bench's JPEGs are drawn per index, so
``bench/features.py``'s folder is the same for both):

    python bench/features_ab.py --write-jpegs /tmp/j --images 8192 --size 224x224
    python bench/features_ab.py --repo /path/to/old/checkout /tmp/j --images 8192 --size 224x224 --device cuda
    python bench/features_ab.py /tmp/j --images 8192 --size 224x224 --device cuda
    python bench/features_ab.py /tmp/j --images 1024 --size 224x224 --device cpu --model-kwargs '{"depth": 1}' \
        --decode device --threads 1 --workers 1 --batch-size 64 --warm-runs 2   # the host side, on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="JPEGs and manifest.csv (bench/features.py's)")
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1],
                        help="the checkout whose pipeline runs (default: this one)")
    parser.add_argument("--write-jpegs", action="store_true", help="only write the folder's JPEGs and manifest")
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--size", default="224x224", help="WIDTHxHEIGHT")
    parser.add_argument("--model", default="vit_small_patch16_224.dino")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=12)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--weights", default="random", help="bench/features.py's --weights (random-file: the "
                        "same file of random weights, in the folder, for every checkout; checkouts from 2026-11-27 on)")
    parser.add_argument("--model-kwargs", type=json.loads, default={},
                        help='backbone.model_kwargs as JSON, e.g. \'{"depth": 1}\': a cheap forward, so that the '
                        "stage's host side shows on a CPU")
    parser.add_argument("--decode", default="auto", choices=["auto", "pil", "device", "workers"],
                        help="features.decode")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--warm-runs", type=int, default=1, help="runs after the cold one")
    parser.add_argument("--label", default="", help="the JSON lines' code label (default: the checkout's path)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    # The checkout's own bench helpers and pipeline package, ahead of any installed one.
    sys.path[:0] = [str(args.repo), str(args.repo / "bench")]
    import features as bench_features

    import pipeline
    from pipeline.features import extract_shard

    imported = time.perf_counter() - began
    width, height = (int(v) for v in args.size.lower().split("x"))
    if args.write_jpegs:
        args.folder.mkdir(parents=True, exist_ok=True)
        bench_features.write_jpegs(args.folder, args.images, width, height)
        return 0
    bench_args = bench_features.parse_args([
        "--images", str(args.images), "--batch-size", str(args.batch_size), "--size", args.size,
        "--workers", str(args.workers), "--device", args.device, "--model", args.model, "--weights", args.weights])
    params = bench_features.stage_params(bench_features.with_weights_file(bench_args, args.folder))
    # Set here rather than through the checkout's bench flags: an older checkout's bench lacks them.
    params["backbone"]["model_kwargs"] = args.model_kwargs
    params["features"]["decode"] = args.decode
    shard = args.folder / "ab.safetensors"
    for run in ["cold"] + ["warm"] * args.warm_runs:
        shard.unlink(missing_ok=True)  # as Snakemake does before a job: replacing a big file is slow
        start = time.perf_counter()
        phases = extract_shard(args.folder / "manifest.csv", 0, shard, params, threads=args.threads)
        seconds = time.perf_counter() - start
        print(json.dumps({"code": args.label or str(args.repo), "model": args.model, "run": run,
                          "images": args.images, "seconds": round(seconds, 3),
                          "images_per_s": round(args.images / seconds),
                          "phases": {k: round(v, 3) for k, v in phases.items()}, "import_s": round(imported, 2),
                          "pipeline": os.path.dirname(pipeline.__file__)}), flush=True)
    shard.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
