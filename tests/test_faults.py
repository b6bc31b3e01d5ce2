"""Fault tolerance: the demo killed with SIGKILL (snakemake and every job, the whole process group)
at four points — during feature extraction, mid-PC2M-training, during the CRF, mid-DeepLab
training — and rerun each time the way a user does, ends byte-identical to an uninterrupted run.

After each kill every artifact that exists under its final name is complete (atomic writes: the
only half-written files are hidden ``.<name>.*.partial`` temporaries), and after the last rerun
no temporary is left anywhere.

What a user has to do after a SIGKILL (or power loss): Snakemake leaves its lock behind, so the
plain rerun stops with "Directory cannot be locked ... --unlock"; `snakemake --unlock` (same
flags) and then the same command as before finish the run. Incomplete outputs of the killed jobs
are redone without asking because the workflow profile sets `rerun-incomplete`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from workflow_runs import digests, reference_run, run_and_kill_when, snakemake, tiny_config, write_config

pytestmark = pytest.mark.slow

# One job at a time, as the kill points expect (a shard's job finishes while the next one runs).
CORES = 2


def _running(results: Path, stage: str, outputs: str) -> bool:
    """A job of ``stage`` has started (its log exists) and its output is not there yet."""
    for log in (results / "logs" / stage).glob("shard-*.log"):
        if not (results / outputs / f"{log.stem}.safetensors").exists():
            return True
    return False


def features_mid_run(results: Path) -> bool:
    return any((results / "features").glob("shard-*.safetensors")) and _running(
        results, "extract_features", "features")


def training_mid_run(results: Path) -> bool:
    return (results / "model" / "checkpoints" / "epoch-0001.pt").exists()


def crf_mid_run(results: Path) -> bool:
    return any((results / "crf" / "masks").glob("shard-*/*.png"))


def deeplab_mid_run(results: Path) -> bool:
    return (results / "deeplab" / "checkpoint.pt").exists()


def assert_every_artifact_complete(results: Path) -> None:
    """Every file under its final name decodes completely (a truncated one would not)."""
    checked = 0
    for path in sorted(results.rglob("*")):
        rel = path.relative_to(results)
        if not path.is_file() or rel.parts[0] in ("logs", "benchmarks"):
            continue
        if path.name.endswith(".partial"):
            assert path.name.startswith("."), f"temporary file not hidden: {rel}"
            continue
        suffix = path.suffix
        try:
            if suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as fh:
                    for key in fh.keys():
                        fh.get_tensor(key)
            elif suffix == ".png":
                with Image.open(path) as im:
                    im.load()
            elif suffix == ".csv":
                pd.read_csv(path)
            elif suffix == ".json" or path.name == ".done":
                json.loads(path.read_text())
            elif suffix == ".pt":
                torch.load(path, map_location="cpu", weights_only=True)
            else:
                continue
        except Exception as exc:  # noqa: BLE001
            raise AssertionError(f"{rel} exists under its final name but is not complete: {exc}") from None
        checked += 1
    assert checked > 0


def test_killed_runs_resume_to_the_uninterrupted_result(tmp_path_factory):
    reference = digests(reference_run(tmp_path_factory))

    work = tmp_path_factory.mktemp("killed")
    results = work / "results"
    config = write_config(work / "tiny.yaml", tiny_config(results))
    args = ("--configfile", str(config))

    kill_points = [("features", features_mid_run), ("training", training_mid_run), ("crf", crf_mid_run),
                   ("deeplab", deeplab_mid_run)]
    for number, (name, condition) in enumerate(kill_points):
        if number > 0:
            # What a user does after the kill: unlock, then the same command again.
            unlock = snakemake(*args, "--unlock", cwd=work, cores=CORES)
            assert unlock.returncode == 0, unlock.stdout[-3000:]
        killed, output = run_and_kill_when(functools.partial(condition, results), *args, cwd=work,
                                           cores=CORES)
        assert killed, f"the run finished before the {name} kill point:\n{output[-3000:]}"
        assert_every_artifact_complete(results)
        if number == 0:
            # The lock of the killed run stops a plain rerun, with a message saying what to do.
            locked = snakemake(*args, cwd=work, cores=CORES)
            assert locked.returncode != 0
            assert "cannot be locked" in locked.stdout and "--unlock" in locked.stdout, locked.stdout[-3000:]

    unlock = snakemake(*args, "--unlock", cwd=work, cores=CORES)
    assert unlock.returncode == 0, unlock.stdout[-3000:]
    final = snakemake(*args, cwd=work, cores=CORES)
    assert final.returncode == 0, final.stdout[-6000:]

    assert_every_artifact_complete(results)
    leftovers = [str(p.relative_to(results)) for p in results.rglob("*.partial")]
    assert leftovers == [], f"temporary files survived: {leftovers}"
    for stage in ("model", "crf", "deeplab"):
        assert list((results / stage / "masks").rglob("*.png")), stage
    got = digests(results)
    assert sorted(got) == sorted(reference)
    differing = sorted(k for k in reference if got[k] != reference[k])
    assert differing == [], f"differs from the uninterrupted run: {differing}"

    again = snakemake(*args, cwd=work, cores=CORES)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout, again.stdout[-3000:]
