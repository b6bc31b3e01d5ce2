"""Run every benchmark and rewrite bench/RESULTS.md with the machine named and the date.

    python bench/run_all.py                 # CPU, sizes that finish in ~15 minutes on 2 cores
    python bench/run_all.py --device cuda   # on a GPU machine: adds the GPU runs
    python bench/run_all.py --only spectral metrics

Each benchmark prints Markdown tables; they are collected verbatim under one heading each, with
the command that produced them, so a reader can rerun any single one.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import cpu_model
from pipeline.atomic import write_text

# name -> (what it measures and its target, arguments on CPU, extra arguments on a GPU)
BENCHMARKS: dict[str, tuple[str, list[str], list[str]]] = {
    "features": (
        "Feature stage (decode, resize, ViT forward, write) vs the bare forward pass and a naive loop. "
        "Target: stage/forward >= 0.9; on an H100 >= 1,000 images/s for ViT-S/16 at 224 px.",
        ["--images", "48"],
        ["--device", "cuda", "--images", "8192", "--batch-size", "256", "--size", "224x224", "--workers", "12"],
    ),
    "decode_cost": (
        "What one feature-stage DataLoader worker delivers per JPEG decoder (features.decode / predict.decode): "
        "how many CPU cores keep a GPU fed. A CPU measurement, the same on a GPU machine.",
        ["--images", "1024", "--size", "224x224"],
        [],
    ),
    "shard_memory": (
        "Peak memory of a feature job: the shard written batch by batch (the stage) vs held and written at the "
        "end (the stage before 2026-11-27); the same bytes either way. Target: the shard's size off the peak.",
        ["--images", "2048", "--threads", "2"],
        ["--device", "cuda", "--images", "8192", "--batch-size", "256", "--workers", "12", "--depth", "12"],
    ),
    "spectral": (
        "Batched dense Laplacian eigensolver vs one shift-invert eigsh per image (Deep Spectral Methods), "
        "same affinities. Target: >= 4x on CPU at VOC size, never a wrong subspace; "
        "GPU >= 1,000 images/s at 784 patches, 0 wrong on every set "
        "(the GPU run also times the float32 torch.linalg.eigh it replaced).",
        ["--voc-images", "64", "--demo-images", "24"],
        ["--device", "cuda", "--voc-images", "512", "--voc-grid", "28x28", "--batch-size", "96"],
    ),
    "segments": (
        "The spectral stage's per-image k-means (segment_patches): on one thread (the stage) vs scikit-learn's "
        "default thread pools (the reference), idle and with processes spinning beside it (other jobs).",
        ["--images", "24", "--busy", "0", "1", "2"],
        [],
    ),
    "metrics": (
        "Streaming confusion-matrix evaluation vs the public code's all-pixels evaluation, VOC-val-sized. "
        "Target: >= 100x faster, memory independent of the dataset size.",
        ["--reference-images", "40"],
        [],
    ),
    "crf": (
        "Dense CRF (pydensecrf2) images/s with 1 and 2 worker processes, 500x375, 21 classes. Target: >= 1.8x with 2.",
        ["--images", "12"],
        [],
    ),
    "scaling": (
        "Wall time of the whole demo pipeline (reduced training) with 1 and 2 cores and at two dataset sizes: "
        "how the cost grows with the data and the cores.",
        ["--sizes", "16", "48"],
        [],
    ),
    "train": (
        "PC2M training images/s at 384 px with a breakdown (data, forward, Sinkhorn, backward) and the memory peak. "
        "Paper: ~32 images/s on 2 RTX A6000; target on one H100 >= 300 images/s for ViT-B/16.",
        ["--batch-size", "2", "--iterations", "2"],
        ["--device", "cuda", "--batch-size", "32", "--iterations", "20"],
    ),
    "area_pass": (
        "PC2M's offline area pass (every training image predicted once an epoch): what one DataLoader worker "
        "delivers, uint8 items normalised where the model runs vs float32 items normalised in the worker.",
        ["--images", "256"],
        [],
    ),
    "lstm": (
        "ViT-PCM's HV-BiLSTM forward + backward (32 x 24 x 24 x 768 on a GPU), float32 as the stage runs it, "
        "bfloat16 for information: a third of a ViT-PCM step's GPU time on an H200.",
        ["--batch-size", "4", "--calls", "2"],
        ["--device", "cuda", "--batch-size", "32", "--calls", "10"],
    ),
    "startup": (
        "Per-job start-up (interpreter, imports, model build, first batch) per stage kind, and the job size "
        "that keeps it under 10% of the job.",
        ["--batches", "2"],
        ["--device", "cuda", "--batch-size", "64", "--batches", "5"],
    ),
}


def machine() -> str:
    cpu = cpu_model()
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB, {gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def run(name: str, args: list[str]) -> tuple[str, float]:
    cmd = [sys.executable, str(HERE / f"{name}.py"), *args]
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    shown = " ".join(["python", f"bench/{name}.py", *args])
    body = result.stdout.strip() if result.returncode == 0 else (
        f"**failed** (exit {result.returncode}):\n\n```\n{result.stderr.strip()[-3000:]}\n```")
    return f"`{shown}` ({seconds:.0f} s)\n\n{body}\n", seconds


def previous_sections(path: Path) -> dict[str, str]:
    """The ``## <name>`` sections of an earlier RESULTS.md, by name: the benchmarks' and the
    sections written by hand or by a long benchmark run apart (``## scale``: bench/scale.py)."""
    if not path.is_file():
        return {}
    sections: dict[str, str] = {}
    name = None
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if line.startswith("## "):
            name = line[3:].strip()
            sections[name] = ""
        if name is not None:
            sections[name] += line
    return sections


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run just these")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args(argv)

    names = args.only or list(BENCHMARKS)
    # The sections not run now (other benchmarks with --only; bench/scale.py's, which takes hours)
    # are kept as they are.
    sections = previous_sections(Path(args.out))
    for name in names:
        what, cpu_args, gpu_args = BENCHMARKS[name]
        print(f"running {name} ...", file=sys.stderr, flush=True)
        text, _ = run(name, cpu_args)
        sections[name] = f"## {name}\n\n{what}\n\n### CPU\n\n{text}"
        if args.device == "cuda" and gpu_args:
            text, _ = run(name, gpu_args)
            sections[name] += f"\n### GPU\n\n{text}"
    load = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    header = (
        "# Benchmark results\n\n"
        f"Regenerated by `python bench/run_all.py` on {datetime.date.today().isoformat()}.\n\n"
        f"Machine: {machine()}. Load average after the runs (1/5/15 min): {load}.\n\n"
        "Ratios compare methods measured in the same run on the same machine; absolute numbers move with "
        "the machine's load.\n"
    )
    ordered = [sections[name] for name in BENCHMARKS if name in sections]
    ordered += [text for name, text in sections.items() if name not in BENCHMARKS]
    write_text(args.out, header + "\n" + "\n".join(ordered))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
