"""What one feature-stage worker delivers per second for each ``features.decode``, in one run:
a real DataLoader with one worker process (read the file, check it, decode if asked, pack the
batch, hand it to the main process, which does nothing else), so how many CPU cores keep a GPU
fed at a given rate. The bench's synthetic JPEGs (``bench/features.py``'s); each decoder timed
``--rounds`` times alternating, best round kept.

    python bench/decode_cost.py --images 1024 --size 224x224
    python bench/decode_cost.py --images 256 --size 500x375 --max-size 960 --upscale   # predict at paper 001's size
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from features import write_jpegs

from machine import cpu_model, print_and_append
from pipeline.features import ShardImages, batches_by_size, image_geometry, make_loader
from pipeline.predict import prediction_geometry

DECODERS = {
    "device": "JPEG bytes only (nvjpeg decodes them on the GPU, in the main process)",
    "workers": "libjpeg decode to uint8 pixels (resized and normalised on the device)",
    "pil": "Pillow decode, resize, normalise to float32 (all on the CPU)",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--size", default="224x224", help="image WIDTHxHEIGHT")
    parser.add_argument("--max-size", type=int, default=512, help="features.max_size (predict.max_size)")
    parser.add_argument("--upscale", action="store_true",
                        help="the prediction stage's geometry: images smaller than --max-size scaled up to it")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="append the table to this Markdown file")
    return parser.parse_args(argv)


def worker_seconds(dataset: ShardImages, batch_size: int) -> float:
    """Seconds for one worker to deliver every batch of ``dataset`` to this process."""
    batches = batches_by_size([g.final for g in dataset.geometries], batch_size)
    start = time.perf_counter()
    for _ in make_loader(dataset, batches, num_workers=1, pin_memory=False):
        pass
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    width, height = (int(v) for v in args.size.lower().split("x"))
    geometry = (prediction_geometry(height, width, argparse.Namespace(upscale=True, max_size=args.max_size, fit="pad"),
                                    16) if args.upscale else image_geometry(height, width, args.max_size, 16, "crop"))
    best = {name: float("inf") for name in DECODERS}
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        manifest = write_jpegs(Path(tmp), args.images, width, height)
        paths = [line.split(",")[1] for line in manifest.read_text().splitlines()[1:]]
        for _ in range(args.rounds):
            for name in DECODERS:
                dataset = ShardImages(paths, [(height, width)] * len(paths), [geometry] * len(paths),
                                      (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), jpeg_decoder=name)
                best[name] = min(best[name], worker_seconds(dataset, args.batch_size))
    lines = [
        f"One DataLoader worker, {args.images} synthetic JPEGs of {args.size} prepared at {geometry.final[1]}x"
        f"{geometry.final[0]}, batches of {args.batch_size}, best of {args.rounds} rounds. Machine: {cpu_model()}.",
        "",
        "| decode (features., predict.) | a worker does | µs per image | images/s a worker delivers |",
        "|---|---|---:|---:|",
    ]
    for name, what in DECODERS.items():
        per_image = best[name] / args.images
        lines.append(f"| {name} | {what} | {per_image * 1e6:.0f} | {1 / per_image:.0f} |")
    print_and_append("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
