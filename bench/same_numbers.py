"""Same seed, same numbers: train PC2M and ViT-PCM (weak) on a tiny demo through the CLI, predict
shard 0, and print digests of the history, the weights and the probabilities. Run it before and
after a change that should only move code (a refactor) and compare the two outputs.

    python bench/same_numbers.py /tmp/before > before.json    # on the old commit
    python bench/same_numbers.py /tmp/after > after.json      # on the new one; then diff
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from test_pc2m import BACKBONE, make_demo, predict_settings, train_settings  # noqa: E402


def digest(tensors: dict[str, torch.Tensor]) -> str:
    return hashlib.sha256(b"".join(v.numpy().tobytes() for _, v in sorted(tensors.items()))).hexdigest()[:16]


def main(out: Path, methods: list[str]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    index = out / "index" if (out / "index" / "manifest.csv").is_file() else make_demo(out, 12, 4, 64, 48)
    results = {}
    for method in methods:
        extra = {"vitpcm": dict(lstm_hidden=16, crop_size=16, crop_probability=0.5)} if method == "vitpcm" else {}
        params = {"backbone": BACKBONE, "train": train_settings(method=method, epochs=2, **extra), "mode": "weak",
                  "seed": 0, "predict": predict_settings()}
        params_file = out / f"{method}.json"
        params_file.write_text(json.dumps(params))
        run = out / method
        common = ["--params", str(params_file), "--threads", "2"]
        subprocess.run([sys.executable, "-m", "pipeline", "train", "--manifest", str(index / "manifest.csv"),
                        "--classes", str(index / "classes.json"), "--out-dir", str(run), *common], check=True)
        subprocess.run([sys.executable, "-m", "pipeline", "predict", "--manifest", str(index / "manifest.csv"),
                        "--shard", "0", "--model", str(run / "model.pt"), "--out-probs", str(run / "probs.safetensors"),
                        "--out-masks", str(run / "masks"), *common], check=True)
        history = [",".join(c for i, c in enumerate(line.split(",")) if i != header_seconds(run)) for line in
                   (run / "history.csv").read_text().splitlines()]
        results[method] = {"history": history,
                           "weights": digest(torch.load(run / "model.pt", weights_only=True)["model"]),
                           "probs": digest(load_file(run / "probs.safetensors"))}
    return results


def header_seconds(run: Path) -> int:
    """Column index of `seconds` (wall time: differs between runs)."""
    return (run / "history.csv").read_text().splitlines()[0].split(",").index("seconds")


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), sys.argv[2:] or ["pc2m", "vitpcm"]), indent=1))
