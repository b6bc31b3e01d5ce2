"""GPU choice per process (pipeline/devices.py) with fake GPU counts: no GPU needed. Concurrent
jobs take different GPUs, a finished job frees its GPU, SLURM's CUDA_VISIBLE_DEVICES is respected,
and training launches through torchrun only with more than one GPU."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from pipeline import devices


def test_two_claims_take_different_gpus_and_a_third_shares(tmp_path):
    first = devices.claim_gpu(2, env={}, directory=tmp_path)
    second = devices.claim_gpu(2, env={}, directory=tmp_path)
    assert {first.index, second.index} == {0, 1}
    assert first.exclusive and second.exclusive
    third = devices.claim_gpu(2, env={}, directory=tmp_path)
    assert not third.exclusive and third.index in (0, 1)
    first.release()
    again = devices.claim_gpu(2, env={}, directory=tmp_path)
    assert again.exclusive and again.index == first.index
    for claim in (second, third, again):
        claim.release()


def test_local_rank_spreads_the_first_try(tmp_path):
    claim = devices.claim_gpu(4, env={"LOCAL_RANK": "2"}, directory=tmp_path)
    assert claim.index == 2
    claim.release()


def test_slurm_visible_devices_name_the_locks(tmp_path):
    """SLURM gave this job physical GPUs 5 and 7: indices stay 0..1, locks are named 5 and 7, and a
    job with GPUs 7 and 2 on the same node cannot take 7 while the first job holds it."""
    a = devices.claim_gpu(2, env={"CUDA_VISIBLE_DEVICES": "5,7"}, directory=tmp_path)
    b = devices.claim_gpu(2, env={"CUDA_VISIBLE_DEVICES": "5,7"}, directory=tmp_path)
    assert {a.index, b.index} == {0, 1} and {a.name, b.name} == {"5", "7"}
    assert sorted(p.name.rsplit("-", 1)[-1] for p in tmp_path.iterdir()) == ["5.lock", "7.lock"]
    other = devices.claim_gpu(2, env={"CUDA_VISIBLE_DEVICES": "7,2"}, directory=tmp_path)
    assert other.exclusive and other.name == "2" and other.index == 1
    for claim in (a, b, other):
        claim.release()


def test_visible_gpu_names():
    assert devices.visible_gpu_names(2, {}) == ["0", "1"]
    assert devices.visible_gpu_names(1, {"CUDA_VISIBLE_DEVICES": "GPU-abc,GPU-def"}) == ["GPU-abc"]


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pipeline import devices
    claim = devices.claim_gpu(int(sys.argv[1]), env={{}}, directory=sys.argv[2])
    print(claim.index, claim.exclusive, flush=True)
    time.sleep(float(sys.argv[3]))
    """
)


def _holder(count: int, directory, seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLDER.format(), str(count), str(directory), str(seconds)],
                            stdout=subprocess.PIPE, text=True)


def test_concurrent_processes_take_different_gpus_and_a_dead_one_frees_its_gpu(tmp_path):
    first = _holder(2, tmp_path, 30)
    try:
        assert first.stdout.readline().split() == ["0", "True"]
        second = _holder(2, tmp_path, 0)
        assert second.communicate(timeout=60)[0].split() == ["1", "True"]
    finally:
        first.kill()
        first.wait()
    # the kernel dropped the killed process' lock: GPU 0 is free again
    third = _holder(2, tmp_path, 0)
    assert third.communicate(timeout=60)[0].split() == ["0", "True"]


def test_process_gpu_is_claimed_once(tmp_path, monkeypatch):
    monkeypatch.setenv(devices.LOCK_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(devices, "_PROCESS_CLAIM", None)
    index = devices.process_gpu(3)
    assert devices.process_gpu(3) == index
    devices._PROCESS_CLAIM.release()


@pytest.mark.parametrize("gpus", [0, 1])
def test_launch_is_plain_python_for_one_gpu(gpus):
    assert devices.launch_command(gpus, ["train", "--x", "1"], python="py") == [
        "py", "-m", "pipeline", "train", "--x", "1",
    ]


def test_launch_is_torchrun_for_more_gpus():
    assert devices.launch_command(2, ["train", "--x", "1"], python="py") == [
        "py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "pipeline", "train", "--x", "1",
    ]


def test_launch_runs_the_stage(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pipeline.devices", "launch", "--gpus", "1", "--", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "python -m pipeline" in result.stdout


def test_resolve_auto_is_the_cpu_without_cuda():
    import torch

    from pipeline.devices import resolve_device

    if torch.cuda.is_available():
        pytest.skip("CUDA present: covered by the GPU check")
    assert resolve_device("auto").type == "cpu"


def test_claims_are_fast(tmp_path):
    start = time.perf_counter()
    claims = [devices.claim_gpu(8, env={}, directory=tmp_path) for _ in range(8)]
    assert sorted(c.index for c in claims) == list(range(8))
    assert time.perf_counter() - start < 1.0
    for claim in claims:
        claim.release()


def test_launch_with_two_gpus_starts_two_torchrun_processes(tmp_path):
    """The path train_model takes with gpu=2: torchrun runs `-m pipeline` once per rank (here
    `--help`, so no GPU is needed; tests/test_pc2m.py shows 2-process training equals 1-process)."""
    result = subprocess.run([sys.executable, "-m", "pipeline.devices", "launch", "--gpus", "2", "--", "--help"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("usage: python -m pipeline") == 2


def _dry_run_train_command(repo, tmp_path, *args: str) -> str:
    (tmp_path / "gpu.yaml").write_text("compute: {train_gpus: 4, gpus_per_job: 1}\n")
    result = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "--cores", "2", "-n",
                             "-p", "--configfile", str(repo / "config.yaml"), str(tmp_path / "gpu.yaml"), *args],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**{k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"},
                                 "PATH": f"{tmp_path}:{os.environ['PATH']}"})
    assert result.returncode == 0, result.stderr[-3000:]
    return next(line for line in result.stdout.splitlines() if "pipeline.devices launch" in line)


def test_workflow_offers_the_machines_gpus_and_never_more(repo, tmp_path):
    """A fake `nvidia-smi -L` listing 3 GPUs: training asks for 4, gets the 3 the machine has;
    `--resources gpu=2` caps it at 2; with no nvidia-smi at all and `--resources gpu=0`, 0 (CPU)."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nfor i in 0 1 2; do echo \"GPU $i: Fake (UUID: GPU-$i)\"; done\n")
    fake.chmod(0o755)
    assert "launch --gpus 3 -- train" in _dry_run_train_command(repo, tmp_path)
    assert "launch --gpus 2 -- train" in _dry_run_train_command(repo, tmp_path, "--resources", "gpu=2")
    fake.unlink()
    if shutil.which("nvidia-smi") is None:
        # No GPU: explicit counts are refused before any job (tests/test_inputs_cases.py) unless the
        # user states the GPUs, as here (0).
        assert "launch --gpus 0 -- train" in _dry_run_train_command(repo, tmp_path, "--resources", "gpu=0")
