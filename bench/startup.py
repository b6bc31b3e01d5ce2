"""Start-up cost of a pipeline job: what every Snakemake job pays before its first useful batch.

Each stage kind runs in a fresh Python process (as Snakemake starts one per job), which reports
the time to import its pipeline module (torch, timm, ...), to build its model and move it to the
device (CUDA context included), to run its first batch (lazy initialisation: cuBLAS, kernels,
workspaces) and then ``--batches`` more batches (the steady rate), and then ends as a job does
(``pipeline.cli.end_job``). The parent times the interpreter's own start (``python -c pass``) and
the process's whole life; what is left is the exit. From these:

    start-up = interpreter + imports + model build + (first batch - one steady batch) + exit
    images per job for start-up < 10% of the job = 9 x start-up x steady images/s

which says how big a shard (or a training run) must be for the per-job cost not to dominate.

    python bench/startup.py                      # CPU
    python bench/startup.py --device cuda
    python bench/startup.py --plain-exit         # + each stage ended by a plain SystemExit
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import cpu_model

REPO = Path(__file__).resolve().parents[1]

# stage -> (module the job imports, model build, one batch); the snippets see `device`, `batch`.
STAGES: dict[str, tuple[str, str, str]] = {
    "features (ViT-S/16, 224 px)": (
        "pipeline.features",
        (
            "from pipeline.backbone import build_backbone, extract_features\n"
            "torch.manual_seed(0)\n"
            "model = build_backbone('vit_small_patch16_224.dino', 'random').to(device).eval()\n"
            "images = torch.randn(batch, 3, 224, 224, device=device)"
        ),
        (
            "with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == 'cuda'):\n"
            "    out = extract_features(model, images, keys=True, cls=True)\n"
            "out.keys.float().cpu()"
        ),
    ),
    "spectral (713 patches, K = 20)": (
        "pipeline.segments",
        (
            "from pipeline.spectral import key_affinity, smallest_eigenpairs\n"
            "torch.manual_seed(0)\n"
            "w = key_affinity(torch.randn(batch, 713, 384)).to(device)"
        ),
        "smallest_eigenpairs(w, 20)[0].cpu()",
    ),
    "train (PC2M, ViT-S/16, 224 px, forward + backward)": (
        "pipeline.training.trainer",
        (
            "from pipeline.backbone import build_backbone\n"
            "from pipeline.devices import mixed_precision\n"
            "from pipeline.methods.pc2m.model import Architecture, build_network, set_trainable\n"
            "torch.manual_seed(0)\n"
            "model = build_network(build_backbone('vit_small_patch16_224.dino', 'random'), "
            "Architecture('pc2m', 21, 0))\n"
            "model.to(device).train()\n"
            "optimizer = torch.optim.Adam(set_trainable(model, 5), lr=1e-4, fused=device.type == 'cuda' or None)\n"
            "images = torch.randn(batch, 3, 224, 224, device=device)"
        ),
        (
            "with mixed_precision(device):\n"
            "    loss = model(images).probs.float().mean()\n"
            "optimizer.zero_grad(set_to_none=True)\n"
            "loss.backward()\n"
            "optimizer.step()\n"
            "loss.item()"
        ),
    ),
}


def child_code(module: str, build: str, step: str, device: str, batch: int, batches: int, threads: int,
               plain_exit: bool) -> str:
    ending = "raise SystemExit(0)" if plain_exit else "from pipeline.cli import end_job\nend_job(0)"
    return textwrap.dedent("""\
        import json, time
        began = time.perf_counter()
        import torch
        import {module}
        imported = time.perf_counter()
        torch.set_num_threads({threads})
        device = torch.device({device!r})
        batch = {batch}
        {build}
        if device.type == "cuda":
            torch.cuda.synchronize()
        built = time.perf_counter()
        {step}
        first = time.perf_counter()
        for _ in range({batches}):
            {step_indented}
        done = time.perf_counter()
        print(json.dumps({{"imports": imported - began, "build": built - imported, "first": first - built,
                          "steady": (done - first) / {batches}}}), flush=True)
        {ending}
        """).format(module=module, threads=threads, device=device, batch=batch, batches=batches,
                    build=build, step=step, ending=ending,
                    step_indented=step.replace("\n", "\n    "))


def run_child(code: str, what: str) -> tuple[float, str]:
    """(wall seconds, stdout) of ``python -c code`` from the repository, as a job runs."""
    # The repository first, then what the caller's PYTHONPATH holds (wheels carried to a GPU machine).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    began = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                            check=False)
    wall = time.perf_counter() - began
    if result.returncode != 0:
        raise SystemExit(f"{what}: the child failed:\n{result.stderr[-3000:]}")
    return wall, result.stdout


def measure(stage: str, args: argparse.Namespace, interpreter: float, plain_exit: bool) -> dict[str, float]:
    module, build, step = STAGES[stage]
    wall, stdout = run_child(child_code(module, build, step, args.device, args.batch_size, args.batches,
                                        args.threads, plain_exit), stage)
    times = json.loads(stdout.strip().splitlines()[-1])
    timed = times["imports"] + times["build"] + times["first"] + times["steady"] * args.batches
    times["interpreter"] = interpreter
    times["exit"] = max(0.0, wall - interpreter - timed)
    times["startup"] = (interpreter + times["imports"] + times["build"]
                        + max(0.0, times["first"] - times["steady"]) + times["exit"])
    times["rate"] = args.batch_size / times["steady"]
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=3, help="steady batches after the first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="+", type=int, help="stage numbers (0-based) to run")
    parser.add_argument("--plain-exit", action="store_true",
                        help="also run each stage ended by a plain SystemExit (the exit before end_job)")
    args = parser.parse_args(argv)
    stages = [name for i, name in enumerate(STAGES) if args.only is None or i in args.only]
    load_before = os.getloadavg()[0]
    interpreter = min(run_child("pass", "the interpreter")[0] for _ in range(3))
    endings = [("", False)] + ([(" — plain exit", True)] if args.plain_exit else [])
    rows = [(stage + label, measure(stage, args, interpreter, plain)) for stage in stages for label, plain in endings]
    print(f"Job start-up, fresh process per stage, device {args.device}, batch {args.batch_size}, "
          f"{args.threads} torch threads. Machine: {cpu_model()}, {os.cpu_count()} cores; 1-min load "
          f"average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after.\n")
    print("| stage | interpreter s | imports s | model build s | first batch s | steady batch s | exit s "
          "| start-up s | steady images/s | images per job for start-up < 10% |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for stage, t in rows:
        print(f"| {stage} | {t['interpreter']:.2f} | {t['imports']:.2f} | {t['build']:.2f} | {t['first']:.2f} "
              f"| {t['steady']:.3f} | {t['exit']:.2f} | {t['startup']:.2f} | {t['rate']:.1f} "
              f"| {9 * t['startup'] * t['rate']:,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
