"""Throughput of the feature stage against its two reference points, in one run.

(a) the whole stage: ``extract_shard`` on synthetic JPEGs (decode, resize, forward, write);
(b) the backbone's bare forward on tensors already in memory (same batch size and size);
(c) a naive loop: batch 1, PIL decode in the main process, forward, ``torch.save`` per image;
(d) on a GPU (or with ``--decode device`` or ``workers``), the whole stage again with Pillow decoding in the
    workers (``features.decode: pil``): what decoding the JPEGs on the device buys;
(e) with (d), the whole stage again with libjpeg decoding in the workers and the pixels resized
    and normalised on the device (``features.decode: workers``): the GPU's JPEG decoder (which
    holds the main thread until each batch is decoded) against the workers' CPUs.

(a)/(b) says how much of the model's speed the stage keeps (decoding and writing overhead);
(a)/(c) says what batching, worker decoding and one file per shard buy over the obvious loop.

    python bench/features.py                      # defaults: ViT-S/16, random weights, CPU
    python bench/features.py --device cuda --images 512 --batch-size 32 --out bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from profiling import profiled

from machine import cpu_model, print_and_append
from pipeline.backbone import build_backbone, extract_features, normalisation, patch_size
from pipeline.features import extract_shard, image_geometry, jpeg_decoder, prepare_image, resolve_device

MANIFEST_COLUMNS = ["image_id", "image_path", "mask_path", "labels", "has_labels", "split",
                    "width", "height", "shard"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224.dino")
    parser.add_argument("--weights", default="random",
                        help="random, timm, a weights file, or random-file: random weights saved to a file that "
                        "the stage loads, as a real run loads DINO's (no random initialisation in the stage)")
    parser.add_argument("--size", default="496x368", help="image WIDTHxHEIGHT")
    parser.add_argument("--max-size", type=int, default=512, help="features.max_size")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers of the stage")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--decode", default="auto", choices=["auto", "pil", "device", "workers"],
                        help="features.decode")
    parser.add_argument("--naive-images", type=int, default=0,
                        help="time (c) on the first N images only, scaled to --images (0: all; it runs ~100 "
                        "images/s on a GPU)")
    parser.add_argument("--out", type=Path, help="append the table to this Markdown file")
    parser.add_argument("--profile", type=Path, help="append torch.profiler's tables of a rerun of (a) to this file "
                        "(bench/profiling.py)")
    return parser.parse_args(argv)


def write_jpeg(folder: Path, index: int, width: int, height: int) -> list:
    """One photo-like synthetic JPEG (a smooth gradient plus noise, drawn from ``index``) and its
    manifest row."""
    rng = np.random.default_rng(index)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=3)
    base = 127 + 100 * np.sin(xx[..., None] / 40 + yy[..., None] / 60 + phase)
    rgb = np.clip(base + rng.normal(0, 20, size=base.shape), 0, 255).astype(np.uint8)
    path = folder / f"img{index:05d}.jpg"
    Image.fromarray(rgb).save(path, quality=90)
    return [f"img{index:05d}", str(path), "", "", False, "train", width, height, 0]


def write_jpegs(folder: Path, count: int, width: int, height: int) -> Path:
    """``count`` synthetic JPEGs, written in parallel (a lent GPU machine's minutes went to
    writing them one by one), and a one-shard manifest."""
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        rows = list(pool.map(write_jpeg, itertools.repeat(folder), range(count), itertools.repeat(width),
                             itertools.repeat(height), chunksize=64))
    manifest = folder / "manifest.csv"
    pd.DataFrame(rows, columns=MANIFEST_COLUMNS).to_csv(manifest, index=False)
    return manifest


def with_weights_file(args: argparse.Namespace, folder: Path) -> argparse.Namespace:
    """``args``, with ``--weights random-file`` replaced by the path of the model's random weights
    (seed 0) saved in ``folder`` (written once: every run and checkout loads the same file)."""
    if args.weights != "random-file":
        return args
    path = folder / f"random-{args.model}.pth"
    if not path.exists():
        torch.manual_seed(0)
        partial = path.with_suffix(".partial")
        torch.save(build_backbone(args.model, "random").state_dict(), partial)
        partial.rename(path)
    return argparse.Namespace(**{**vars(args), "weights": str(path)})


def stage_params(args: argparse.Namespace) -> dict:
    return {
        "backbone": {"name": args.model, "weights": args.weights, "checkpoint_key": "teacher",
                     "model_kwargs": {}},
        "features": {"max_size": args.max_size, "fit": "crop", "keep": ["keys", "cls"],
                     "batch_size": args.batch_size, "num_workers": args.workers,
                     "device": args.device, "decode": args.decode},
        "seed": 0,
    }


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_stage(args: argparse.Namespace, manifest: Path, folder: Path) -> tuple[float, dict[str, float]]:
    """The whole stage's seconds and its phases' (``extract_shard``'s model / features / write:
    the batches are written to the shard as they come back; ``write`` is closing it)."""
    shard = folder / "shard.safetensors"
    shard.unlink(missing_ok=True)  # as Snakemake does before a job: replacing a big file is slow
    start = time.perf_counter()
    phases = extract_shard(manifest, 0, shard, stage_params(args), threads=args.threads)
    return time.perf_counter() - start, phases


def device_decodes(args: argparse.Namespace, device: torch.device) -> bool:
    return jpeg_decoder(args.decode, device) != "pil"


def time_bare_forward(model, device: torch.device, args: argparse.Namespace, final: tuple[int, int]) -> float:
    batch = torch.randn(args.batch_size, 3, *final).to(device)
    batches = -(-args.images // args.batch_size)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        extract_features(model, batch, keys=True, cls=True)  # warm-up, not timed
        synchronise(device)
        start = time.perf_counter()
        for _ in range(batches):
            out = extract_features(model, batch, keys=True, cls=True)
            out.keys.to("cpu", torch.float16), out.cls.to("cpu", torch.float16)
        synchronise(device)
    return (time.perf_counter() - start) * args.images / (batches * args.batch_size)


def time_naive_loop(
    model, device: torch.device, args: argparse.Namespace, manifest: Path, folder: Path
) -> float:
    mean, std = normalisation(model)
    rows = pd.read_csv(manifest, dtype={"image_id": str}, keep_default_na=False)
    out_dir = folder / "naive"
    out_dir.mkdir()
    start = time.perf_counter()
    if args.naive_images:
        rows = rows.head(args.naive_images)
    columns = (rows["image_id"], rows["image_path"], rows["width"], rows["height"])
    for image_id, path, width, height in zip(*columns):
        rgb = np.asarray(Image.open(path).convert("RGB"))
        geometry = image_geometry(int(height), int(width), args.max_size, patch_size(model), "crop")
        image = prepare_image(rgb, geometry, mean, std)[None].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = extract_features(model, image, keys=True, cls=True)
        torch.save({"keys": out.keys[0].to("cpu", torch.float16), "cls": out.cls[0].to("cpu", torch.float16)},
                   out_dir / f"{image_id}.pt")
    return (time.perf_counter() - start) * args.images / len(rows)  # scaled to all the images


def machine(device: torch.device, load_before: float) -> str:
    # Other processes on the machine skew CPU timings: the load average says whether they ran.
    text = (
        f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, device {device}; "
        f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    )
    if device.type == "cuda":
        text += f" ({torch.cuda.get_device_name(device)})"
    return text


def table(
    args: argparse.Namespace, device: torch.device, seconds: dict[str, float], phases: dict[str, dict[str, float]],
    load_before: float, weights: str,
) -> str:
    rate = {name: args.images / value for name, value in seconds.items()}
    lines = [
        f"Feature extraction, {args.model} ({weights} weights), {args.images} images of "
        f"{args.size}, batch {args.batch_size}, {args.workers} worker(s), {args.threads} torch threads.",
        f"Machine: {machine(device, load_before)}.",
        "",
        "| measurement | seconds | images/s | (a) / this |",
        "|---|---:|---:|---:|",
    ]
    labels = {
        "stage": "(a) whole stage: extract_shard (decode, resize, forward, write)",
        "forward": "(b) bare forward on in-memory tensors",
        "naive": "(c) naive loop: batch 1, PIL in main process, torch.save per image",
        "stage_pil": "(d) whole stage with Pillow decoding in the workers (decode: pil)",
        "stage_workers": "(e) whole stage with libjpeg in the workers, resize on the device (decode: workers)",
    }
    if "stage_pil" in seconds:
        labels["stage"] = (f"(a) whole stage: extract_shard (decode: {jpeg_decoder(args.decode, device)}, resize, "
                           "forward, write)")
    for name, label in ((n, t) for n, t in labels.items() if n in seconds):
        lines.append(
            f"| {label} | {seconds[name]:.2f} | {rate[name]:.2f} | {rate['stage'] / rate[name]:.2f} |"
        )
    lines += ["", "Phases of the whole stage (extract_shard's own clock; the rest of (a) is the process's):", "",
              "| run | model s (manifest, build) | batches s (workers start, model to device, batches written as "
              "they come) | batches images/s | closing the shard s |",
              "|---|---:|---:|---:|---:|"]
    for name, phase in phases.items():
        lines.append(f"| {name} | {phase['model']:.2f} | {phase['features']:.2f} | "
                     f"{args.images / phase['features']:.0f} | {phase['write']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-features-") as tmp:
        folder = Path(tmp)
        manifest = write_jpegs(folder, args.images, width, height)
        weights = args.weights
        args = with_weights_file(args, folder)
        seconds, phases = {}, {}
        seconds["stage"], phases["(a)"] = time_stage(args, manifest, folder)
        if args.profile:
            with profiled(args.profile, f"features, whole stage, {args.model}, {args.images} images of {args.size}, "
                          f"batch {args.batch_size}, {args.workers} workers, {device}"):
                time_stage(args, manifest, folder)
        if device_decodes(args, device):
            for decoder, row in (("pil", "(d)"), ("workers", "(e)")):
                if decoder == jpeg_decoder(args.decode, device):
                    continue  # that is (a)
                other = argparse.Namespace(**{**vars(args), "decode": decoder})
                seconds[f"stage_{decoder}"], phases[row] = time_stage(other, manifest, folder)
        torch.manual_seed(0)
        model = build_backbone(args.model, args.weights).to(device)
        final = image_geometry(height, width, args.max_size, patch_size(model), "crop").final
        seconds["forward"] = time_bare_forward(model, device, args, final)
        seconds["naive"] = time_naive_loop(model, device, args, manifest, folder)
    print_and_append(table(args, device, seconds, phases, load_before, weights), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
