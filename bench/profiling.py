"""``--profile FILE`` of the benches: torch.profiler's operator tables of the profiled span.

Where a GPU step's time goes is what decides the next optimisation (kernel time, launch gaps,
host synchronisations), and a lent GPU machine gives minutes, so a bench run writes the tables
beside its timings: the operators by device time, by host time, and the calls that make the
host wait for the device. The profiled span runs with the profiler's overhead: take speeds
from the bench's own table, proportions from these.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

# Host calls that wait for the device (or copy through pageable memory, which waits too).
SYNCHRONISING = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
                 "cudaMemcpyAsync", "aten::item", "aten::_local_scalar_dense", "aten::nonzero")


def operator_tables(prof: profile, rows: int) -> str:
    """The profile's operators sorted by self device time (when a GPU ran) and by self host time,
    and the counts of the synchronising calls."""
    averages = prof.key_averages()
    parts = []
    has_device = any(getattr(e, "self_device_time_total", 0) for e in averages)
    if has_device:
        parts += ["## by self device time", averages.table(sort_by="self_device_time_total", row_limit=rows)]
    parts += ["## by self host time", averages.table(sort_by="self_cpu_time_total", row_limit=rows)]
    waits = [f"| {e.key} | {e.count} | {e.cpu_time_total / 1000:.1f} |" for e in averages if e.key in SYNCHRONISING]
    parts += ["## host calls that wait for the device",
              "\n".join(["| call | count | host ms (total) |", "|---|---:|---:|", *waits])]
    return "\n\n".join(parts) + "\n"


@contextlib.contextmanager
def profiled(path: Path | None, title: str, rows: int = 30) -> Iterator[None]:
    """Profile the block into ``path`` (Markdown-ish text under ``title``); nothing when None."""
    if path is None:
        yield
        return
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(f"# {title}\n\n{operator_tables(prof, rows)}\n")
