"""Shared helpers for the tests that run the whole workflow (faults, determinism, security).

Not a conftest: test modules import it (``from workflow_runs import ...``; pytest puts ``tests/``
on ``sys.path`` in its default rootdir-based import mode). The uninterrupted reference run of a
seed is made once per session and shared by every module that asks for it (:func:`reference_run`),
and so is a second, independent run of the same configuration in another working folder
(``reference_run(..., replica=1)``: determinism compares the two, test_workflow reruns in it).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

# What a user runs: `snakemake --cores N` from a working folder, the workflow's default profile
# (workflow/profiles/default: --rerun-incomplete, printshellcmds, ...) picked up automatically.
# Four cores on the 2-core test machines: every rule asks for 2 threads, so `--cores 2` ran one job
# at a time, and a tiny job is ~75% single-threaded imports (torch, timm) that left a core idle.
# Each job still gets its 2 threads (same numbers as with `--cores 2`); a tiny DAG runs in ~0.7 of
# the time (73 s -> 52 s for tiny_config). The fault test keeps 2: its kill points wait for one
# shard's job to finish while the next one runs.
CORES = 4


def snakemake_command(cores: int = CORES) -> list[str]:
    return [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--cores", str(cores)]


SNAKEMAKE = snakemake_command()

# Artifacts compared byte for byte between runs.
COMPARED_GLOBS = (
    "pseudo_labels/*.csv",
    "pseudo_labels/maps.safetensors",
    "model/masks/**/*.png",
    "crf/masks/**/*.png",
    "deeplab/masks/**/*.png",
    "eval/*.json",
    "eval/*.csv",
    "reports/summary.csv",
)


def tiny_config(results: Path, seed: int = 0, **overrides) -> dict:
    """The demo at toy size: 8 train + 4 val images of 64 x 64 in 2 shards, a 2-block ViT,
    2 PC2M epochs, 10 DeepLab iterations. Runs end to end in ~1-2 minutes on 2 cores."""
    config = {
        "results": str(results),
        "seed": seed,
        "dataset": {"images_per_shard": 6, "demo": {"n_train": 8, "n_val": 4, "width": 64, "height": 64}},
        "backbone": {"model_kwargs": {"depth": 2, "embed_dim": 48, "num_heads": 3}},
        "features": {"batch_size": 4, "num_workers": 0},
        "segment_features": {"crop_size": 32},
        "train": {"epochs": 2, "global_size": 64, "local_size": 32, "batch_size": 4, "num_workers": 0,
                  "keep_checkpoints": 2},
        "predict": {"max_size": 64, "num_workers": 0},
        "deeplab": {"iterations": 10, "batch_size": 2, "crop_size": 32, "checkpoint_every": 5,
                    "log_every": 5, "num_workers": 0},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def with_values(config: dict, **dotted) -> dict:
    """``config`` with dotted keys (``train__global_size=50``) set in place; returns it."""
    for key, value in dotted.items():
        *parents, leaf = key.split("__")
        section = config
        for parent in parents:
            section = section[parent]
        section[leaf] = value
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    return path


def snakemake(*args: str, cwd: Path, timeout: float = 600, cores: int = CORES) -> subprocess.CompletedProcess:
    """Run snakemake to completion (its own process group, killed whole on timeout)."""
    proc = subprocess.Popen([*snakemake_command(cores), *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, env=_env())
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, _ = proc.communicate()
        raise AssertionError(f"snakemake {' '.join(args)} hung for {timeout}s:\n{out[-4000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONHASHSEED"] = "0"
    return env


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL snakemake and every job it started (they share its session / process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def run_and_kill_when(condition: Callable[[], bool], *args: str, cwd: Path, timeout: float = 600,
                      poll: float = 0.05, cores: int = CORES) -> tuple[bool, str]:
    """Start snakemake, SIGKILL its whole process group as soon as ``condition()`` holds.

    Returns (killed, output). ``killed`` is False when the run ended before the condition held."""
    log_path = cwd / f"snakemake-{time.monotonic_ns()}.out"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*snakemake_command(cores), *args], cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=_env())
        deadline = time.monotonic() + timeout
        killed = False
        while proc.poll() is None:
            if condition():
                kill_group(proc)
                killed = True
                break
            if time.monotonic() > deadline:
                kill_group(proc)
                raise AssertionError(f"snakemake {' '.join(args)} did not reach the kill point in {timeout}s")
            time.sleep(poll)
    return killed, log_path.read_text()


def digests(results: Path) -> dict[str, str]:
    """sha256 of every compared artifact, keyed by its path relative to ``results``."""
    out = {}
    for pattern in COMPARED_GLOBS:
        for path in sorted(results.glob(pattern)):
            if path.is_file():
                out[str(path.relative_to(results))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


_REFERENCE: dict[tuple[int, int], Path] = {}


def reference_run(tmp_path_factory, seed: int = 0, replica: int = 0) -> Path:
    """The results folder of one uninterrupted tiny run with ``seed`` (made once per session).

    ``replica`` 1, 2, ...: another run of the same configuration from scratch in its own working
    folder (``<work>/tiny.yaml`` beside its results), also made once per session."""
    key = (seed, replica)
    if key not in _REFERENCE:
        work = tmp_path_factory.mktemp(f"reference-seed{seed}" + (f"-replica{replica}" if replica else ""))
        config = write_config(work / "tiny.yaml", tiny_config(work / "results", seed=seed))
        result = snakemake("--configfile", str(config), cwd=work)
        assert result.returncode == 0, result.stdout[-6000:]
        _REFERENCE[key] = work / "results"
    return _REFERENCE[key]


def reference_copy(tmp_path_factory, name: str, seed: int = 0) -> Path:
    """A copy of the reference run's results folder (files, mtimes and rerun state) in a new working
    folder: a test that runs another configuration there reruns only what its changes touch, as a
    user's results folder would (copied from the run of ``seed``; returns the new results path)."""
    work = tmp_path_factory.mktemp(name)
    shutil.copytree(reference_run(tmp_path_factory, seed), work / "results", symlinks=True)
    return work / "results"


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a Snakemake run as {rule: count} (without the total); {} when the
    run planned no job."""
    if "Job stats:" not in output:
        return {}
    counts = {}
    for line in output.split("Job stats:")[1].splitlines()[3:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        if parts[0] != "total":
            counts[parts[0]] = int(parts[1])
    return counts


def assert_one_line_error(result: subprocess.CompletedProcess, *names: str | Path) -> str:
    """Exit 2, last stderr line 'error: ...' naming every one of ``names``, no traceback."""
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr[-3000:]
    for name in names:
        assert str(name) in last, f"{name!r} not named in: {last}"
    return last
