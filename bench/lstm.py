"""ViT-PCM's HV-BiLSTM alone, forward + backward in training mode (ms per call): as the stage runs it
(float32, see ``HVBiLSTM.forward``) and, for information only, in bfloat16 — what a reduced-precision
option would buy. On an H200 the LSTM was a third of a ViT-PCM step; running the row and column
scans at once on two CUDA streams was measured there too and gained nothing (16.12 vs 16.14 ms a
call, bench/RESULTS.md), so the stage keeps them in turn.

    python bench/lstm.py --device cuda            # ViT-B/16 at 384: 32 x 24 x 24 x 768
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.methods.pc2m.model import HVBiLSTM


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--grid", type=int, default=24, help="patches per side (384 px / 16)")
    parser.add_argument("--features", type=int, default=768, help="ViT-B/16's embedding")
    parser.add_argument("--hidden", type=int, default=192, help="train.vitpcm.lstm_hidden")
    parser.add_argument("--calls", type=int, default=10)
    return parser.parse_args(argv)


def time_calls(forward, grid: torch.Tensor, calls: int, device: torch.device) -> float:
    """ms per forward + backward, after two untimed calls."""
    def call() -> None:
        forward(grid).float().square().mean().backward()

    for _ in range(2):
        call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    began = time.perf_counter()
    for _ in range(calls):
        call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - began) / calls * 1000


def bfloat16_scans(lstm: HVBiLSTM):
    """Both scans in turn in bfloat16 (``HVBiLSTM.forward`` makes its input float32)."""
    def forward(grid: torch.Tensor) -> torch.Tensor:
        b, gh, gw, e = grid.shape
        rows = lstm._scan(lstm.rows, grid.reshape(b * gh, gw, e))
        columns = lstm._scan(lstm.columns, grid.transpose(1, 2).reshape(b * gw, gh, e))
        return torch.cat([rows.reshape(b, gh, gw, -1), columns.reshape(b, gw, gh, -1).transpose(1, 2)], dim=-1)

    return forward


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    lstm = HVBiLSTM(args.features, args.hidden, dropout=0.2).to(device).train()
    grid = torch.randn(args.batch_size, args.grid, args.grid, args.features, device=device, requires_grad=True)
    rows = []
    ms = time_calls(lstm, grid, args.calls, device)
    rows.append(f"| float32 (the stage) | {ms:.2f} | {args.batch_size / ms * 1000:.0f} |")
    label = "bfloat16, scans in turn (information: not the stage's precision)"
    try:
        ms = time_calls(bfloat16_scans(lstm.to(torch.bfloat16)), grid.detach().bfloat16().requires_grad_(),
                        args.calls, device)
        rows.append(f"| {label} | {ms:.2f} | {args.batch_size / ms * 1000:.0f} |")
    except RuntimeError as exc:  # a backend without a bfloat16 LSTM
        rows.append(f"| {label} | failed: {str(exc)[:80]} | |")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"HV-BiLSTM ({args.features} -> 2 x 2 x {args.hidden}) on a {args.batch_size} x {args.grid} x {args.grid} "
          f"grid, forward + backward in training mode, {args.calls} calls, {name}, torch {torch.__version__}\n")
    print("| variant | ms per call | grids/s |\n|---|---:|---:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
