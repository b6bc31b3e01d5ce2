"""Wall time of the whole demo pipeline (`snakemake` end to end, from an empty results folder)
with 1 and 2 cores (`--cores 1` vs `--cores 2`) at two dataset sizes, as a Markdown table with
the ratios time(2 cores)/time(1 core) and time(large)/time(small), plus the machine.

    python bench/scaling.py                       # 32 and 128 images (long: tens of minutes on 2 cores)
    python bench/scaling.py --sizes 16 48         # quicker
    python bench/scaling.py --sizes 16 48 --cores 1 2 --keep /tmp/scaling

The training stages use a REDUCED configuration (printed with the table): PC2M 2 epochs at 64/32 px
views, DeepLab 30 iterations, so that the runs take minutes; the feature, spectral, clustering,
inference, CRF and evaluation stages run with the demo's settings. `size` is the number of demo
images (a quarter of them val). Every rule asks for 2 threads, so with `--cores 2` Snakemake runs
one 2-thread job at a time (or two 1-thread jobs when only they are ready); with `--cores 1` each
job gets 1 thread.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import cpu_model

REDUCED = {
    "dataset": {"images_per_shard": 8},
    "train": {"epochs": 2, "global_size": 64, "local_size": 32, "batch_size": 4, "num_workers": 0},
    "features": {"num_workers": 0},
    "predict": {"num_workers": 0},
    "deeplab": {"iterations": 30, "checkpoint_every": 10, "log_every": 10, "num_workers": 0},
}


def config_for(size: int, results: Path) -> dict:
    n_val = max(1, size // 4)
    config = {section: dict(values) for section, values in REDUCED.items()}
    config["results"] = str(results)
    config["dataset"]["demo"] = {"n_train": size - n_val, "n_val": n_val}
    return config


def run_once(size: int, cores: int, work: Path) -> float:
    work.mkdir(parents=True, exist_ok=True)
    configfile = work / "config.yaml"
    configfile.write_text(yaml.safe_dump(config_for(size, work / "results")))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--cores", str(cores),
           "--configfile", str(configfile), "--scheduler", "greedy"]
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-3000:] + result.stderr[-5000:])
        raise SystemExit(f"the pipeline failed with {size} images and {cores} core(s) (work folder {work})")
    return elapsed


def fmt(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"


def table(times: dict[tuple[int, int], float], sizes: list[int], cores: list[int]) -> str:
    lo, hi = cores[0], cores[-1]
    head = ["images (train+val)"] + [f"{c} core{'s' if c > 1 else ''}" for c in cores]
    if len(cores) > 1:
        head.append(f"time({hi} cores) / time({lo} core{'s' if lo > 1 else ''})")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for size in sizes:
        n_val = max(1, size // 4)
        row = [f"{size} ({size - n_val}+{n_val})"] + [fmt(times[size, c]) for c in cores]
        if len(cores) > 1:
            row.append(f"{times[size, hi] / times[size, lo]:.2f}")
        lines.append("| " + " | ".join(row) + " |")
    if len(sizes) > 1:
        small, large = sizes[0], sizes[-1]
        row = [f"time({large}) / time({small})"] + [f"{times[large, c] / times[small, c]:.2f}" for c in cores]
        if len(cores) > 1:
            row.append("")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 128], help="numbers of demo images")
    parser.add_argument("--cores", type=int, nargs="+", default=[1, 2], help="values of snakemake --cores")
    parser.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temporary one)")
    args = parser.parse_args(argv)
    sizes, cores = sorted(args.sizes), sorted(args.cores)
    if min(sizes) < 4:
        parser.error("--sizes: at least 4 images (the training batch)")

    root = args.keep or Path(tempfile.mkdtemp(prefix="scaling-"))
    load_before = os.getloadavg()
    times = {}
    try:
        for size in sizes:
            for c in cores:
                work = root / f"n{size}-c{c}"
                shutil.rmtree(work, ignore_errors=True)
                times[size, c] = run_once(size, c, work)
                print(f"# {size} images, --cores {c}: {times[size, c]:.1f} s", file=sys.stderr, flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    load_after = os.getloadavg()

    print(table(times, sizes, cores))
    print()
    print(f"Machine: {cpu_model()}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}; "
          f"load average (1/5/15 min) {'/'.join(f'{v:.2f}' for v in load_before)} before, "
          f"{'/'.join(f'{v:.2f}' for v in load_after)} after.")
    print(f"Reduced training config (the rest is config.yaml's demo): {json.dumps(REDUCED, separators=(', ', ': '))}")


if __name__ == "__main__":
    main()
