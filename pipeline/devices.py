"""Which GPU a process uses, and how a training stage is launched on several GPUs.

Locally, Snakemake counts GPUs as the ``gpu`` resource (workflow/rules/common.smk) so that no
more GPU jobs run at once than there are GPUs, but it never tells a job *which* GPU to use
(it sets no ``CUDA_VISIBLE_DEVICES``). Every process asking for ``device: auto`` therefore
claims a GPU itself: it takes an exclusive ``fcntl.flock`` on one lock file per GPU in a shared
temporary folder (``$PIPELINE_GPU_LOCK_DIR``, default ``<tmp>/pipeline-gpu-locks-<uid>``) and
keeps it for its lifetime; the kernel drops the lock when the process ends, even when it is
killed, so a crashed job never leaves a GPU "taken". Two jobs on a 2-GPU machine take different
GPUs; the ranks of a ``torchrun`` job each take one. When every GPU is taken (more GPU jobs than
GPUs, e.g. ``--resources gpu=`` set higher than the count), the process shares one, chosen from
its pid, with a warning, instead of waiting.

On SLURM, ``CUDA_VISIBLE_DEVICES`` holds the job's allocation; the lock files are named after
those entries (physical ids or UUIDs), so ids are only ever picked inside the visible set and two
jobs sharing a node agree on what a lock means. Lock names also carry the host name, so a lock
folder on a shared file system stays per node.

Nothing here imports torch at import time: ``python -m pipeline.devices launch`` starts in milliseconds.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import logging
import os
import re
import socket
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

LOCK_DIR_ENV = "PIPELINE_GPU_LOCK_DIR"


def visible_gpu_names(count: int, env: Mapping[str, str] | None = None) -> list[str]:
    """Names of the ``count`` CUDA devices a process sees, in CUDA's order (index i = ``cuda:i``).

    Without ``CUDA_VISIBLE_DEVICES`` they are the physical ids 0..count-1; with it, its entries
    (ids, ``GPU-<uuid>`` or ``MIG-<uuid>``), of which CUDA exposes the first ``count``.
    """
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [str(i) for i in range(count)]
    names = [name.strip() for name in visible.split(",") if name.strip()]
    if len(names) < count:  # cannot happen with a real driver; keep the indices usable
        names += [f"index{i}" for i in range(len(names), count)]
    return names[:count]


def lock_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    folder = env.get(LOCK_DIR_ENV)
    if folder:
        return Path(folder)
    return Path(tempfile.gettempdir()) / f"pipeline-gpu-locks-{os.getuid()}"


def _lock_path(directory: Path, name: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{socket.gethostname()}-gpu-{name}")
    return directory / f"{safe}.lock"


@dataclass
class GpuClaim:
    """A claimed GPU: ``index`` into the visible devices; ``fd`` holds the lock (None = shared)."""

    index: int
    name: str
    fd: int | None

    @property
    def exclusive(self) -> bool:
        return self.fd is not None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = None


def claim_gpu(count: int, *, env: Mapping[str, str] | None = None, directory: Path | None = None) -> GpuClaim:
    """Claim a GPU no other process holds; share one (``fd`` None) when all are held.

    The search starts at ``LOCAL_RANK`` (torchrun) so that the ranks of one job usually take
    consecutive GPUs without contending for the same lock.
    """
    if count < 1:
        raise ValueError(f"claim_gpu: no GPU to claim (count {count})")
    env = os.environ if env is None else env
    names = visible_gpu_names(count, env)
    directory = lock_dir(env) if directory is None else Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        start = int(env.get("LOCAL_RANK", "0")) % count
    except ValueError:
        start = 0
    for step in range(count):
        index = (start + step) % count
        path = _lock_path(directory, names[index])
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                continue
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return GpuClaim(index, names[index], fd)
    index = os.getpid() % count
    log.warning("all %d visible GPU(s) are claimed by other processes (locks in %s): sharing cuda:%d (%s)",
                count, directory, index, names[index])
    return GpuClaim(index, names[index], None)


_PROCESS_CLAIM: GpuClaim | None = None


def process_gpu(count: int) -> int:
    """The GPU index of this process: claimed on the first call, the same on every later call.

    The lock lives as long as the process (forked DataLoader workers share it, which is fine).
    """
    global _PROCESS_CLAIM
    if _PROCESS_CLAIM is None or _PROCESS_CLAIM.index >= count:
        _PROCESS_CLAIM = claim_gpu(count)
        log.info("using cuda:%d (GPU %s%s)", _PROCESS_CLAIM.index, _PROCESS_CLAIM.name,
                 "" if _PROCESS_CLAIM.exclusive else ", shared")
    return _PROCESS_CLAIM.index


def resolve_device(name: str) -> torch.device:
    """``auto`` is a GPU that no other process has claimed (see the module's docstring) when CUDA
    is available, else the CPU; an explicit CUDA request must be met.

    Here rather than next to the feature stage so that stages without a model (spectral) can
    resolve their device without importing timm (seconds of every such job's start-up,
    bench/startup.py); torch is imported only when called."""
    import torch

    from pipeline.errors import ConfigError

    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        index = process_gpu(torch.cuda.device_count())
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"features.device: {name!r} is not auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"features.device: {name!r} requested but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"features.device: {name!r} but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif device.type != "cpu":
        raise ConfigError(f"features.device: {name!r} is not auto, cpu, cuda or cuda:N")
    return device


# ---------------------------------------------------------------------------------------------
# Launching a stage on N GPUs


def launch_command(gpus: int, stage_args: Sequence[str], python: str | None = None) -> list[str]:
    """``python -m pipeline <stage args>`` for 0-1 GPU; ``torchrun --standalone`` with one process
    per GPU for more (torch's own ``torch.distributed.run`` module, i.e. ``torchrun``, taken from
    the same interpreter so that a conda env's python and torch are used)."""
    python = python or sys.executable
    if gpus > 1:
        return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
                "-m", "pipeline", *stage_args]
    return [python, "-m", "pipeline", *stage_args]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.devices",
        description="launch a pipeline stage with one process per GPU (torchrun) or plainly",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("launch", help="run `python -m pipeline ARGS`, through torchrun when --gpus > 1")
    p.add_argument("--gpus", type=int, required=True, help="GPUs of the job (the rule's gpu resource)")
    p.add_argument("stage_args", nargs=argparse.REMAINDER, help="-- then the stage and its options")
    args = parser.parse_args(argv)
    stage_args = args.stage_args[1:] if args.stage_args[:1] == ["--"] else args.stage_args
    if not stage_args:
        parser.error("launch: give the stage and its options after --")
    command = launch_command(args.gpus, stage_args)
    sys.stdout.flush()
    os.execv(command[0], command)


if __name__ == "__main__":
    main()


def mixed_precision(device: torch.device) -> torch.autocast:
    """bf16 autocast of the forward passes on CUDA; full precision on the CPU."""
    import torch  # not at module level: the launcher imports this module without torch

    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
