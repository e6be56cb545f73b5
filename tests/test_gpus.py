"""tunemake.gpus: concurrent local GPU jobs get disjoint devices; Slurm's choice is left alone.

No GPU needed: the devices are the names in CUDA_VISIBLE_DEVICES (or a fake nvidia-smi's list), and
a claim is a lock file; each claimer is its own process, as each Snakemake job is.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tunemake.gpus import GPUError, claimed_gpus

REPO = Path(__file__).resolve().parents[1]

# Claims `count` GPUs, writes CUDA_VISIBLE_DEVICES to <name>.gpus, holds them until <name>.release exists.
CLAIMER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from tunemake.gpus import claimed_gpus

    name, count, wait_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    with claimed_gpus(count, job=name, wait_s=wait_s):
        Path(name + ".tmp").write_text(os.environ["CUDA_VISIBLE_DEVICES"])
        os.replace(name + ".tmp", name + ".gpus")
        while not Path(name + ".release").exists():
            time.sleep(0.05)
""")


@pytest.fixture
def gpu_env(tmp_path, monkeypatch):
    """Two fake GPUs, a private lock directory, and no Slurm job."""
    env = {"CUDA_VISIBLE_DEVICES": "0,1", "TUNEMAKE_GPU_LOCK_DIR": str(tmp_path / "locks")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    return tmp_path


def start_claimer(work: Path, name: str, count: int = 1, wait_s: float = 60) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CLAIMER, name, str(count), str(wait_s)], cwd=work,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def claimed(work: Path, name: str, proc: subprocess.Popen, timeout_s: float = 30) -> str:
    """The devices ``name`` claimed, once it has them."""
    path = work / f"{name}.gpus"
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"{name} exited {proc.returncode} without claiming:\n{proc.stderr.read()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} claimed nothing in {timeout_s} s")
        time.sleep(0.05)
    return path.read_text()


def release(work: Path, name: str, proc: subprocess.Popen) -> None:
    (work / f"{name}.release").touch()
    assert proc.wait(timeout=30) == 0, proc.stderr.read()


def test_concurrent_claims_get_disjoint_devices_and_a_third_waits(gpu_env):
    first, second = start_claimer(gpu_env, "first"), start_claimer(gpu_env, "second")
    third = None
    try:
        got = {claimed(gpu_env, "first", first), claimed(gpu_env, "second", second)}
        assert got == {"0", "1"}
        third = start_claimer(gpu_env, "third")
        time.sleep(2)
        assert not (gpu_env / "third.gpus").exists() and third.poll() is None  # waiting, not sharing
        freed = (gpu_env / "second.gpus").read_text()
        release(gpu_env, "second", second)
        assert claimed(gpu_env, "third", third) == freed
        release(gpu_env, "third", third)
        release(gpu_env, "first", first)
    finally:
        for proc in (first, second, third):
            if proc and proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_killed_holder_releases_its_device(gpu_env):
    holder = start_claimer(gpu_env, "holder", count=2)
    try:
        assert claimed(gpu_env, "holder", holder) == "0,1"
        with pytest.raises(GPUError, match=r"asks for 1 GPU, but 2 of 2 stayed busy for 0 s \(0: pid \d+ on .*: holder"):
            with claimed_gpus(1, wait_s=0.5):
                pass
    finally:
        holder.kill()
        holder.wait()
    with claimed_gpus(2, wait_s=0) as visible:
        assert visible == "0,1" == os.environ["CUDA_VISIBLE_DEVICES"]


def test_asking_for_more_gpus_than_exist_fails_at_once(gpu_env):
    start = time.monotonic()
    with pytest.raises(GPUError, match=r"asks for 3 GPUs but there are only 2 \(CUDA_VISIBLE_DEVICES=0,1\)"):
        with claimed_gpus(3, wait_s=60):
            pass
    assert time.monotonic() - start < 5


def test_a_subset_of_inherited_uuids_passes_through_as_given(gpu_env, monkeypatch):
    uuids = ["MIG-4f4e-aa", "MIG-GPU-9c/1/0", "GPU-77ab"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(uuids))
    holder = start_claimer(gpu_env, "holder", count=2)
    try:
        assert claimed(gpu_env, "holder", holder) == ",".join(uuids[:2])
        with claimed_gpus(1, wait_s=0) as visible:
            assert visible == uuids[2] == os.environ["CUDA_VISIBLE_DEVICES"]
        assert os.environ["CUDA_VISIBLE_DEVICES"] == ",".join(uuids)  # the job's own choice ends with it
    finally:
        holder.kill()
        holder.wait()


def test_under_slurm_its_devices_are_left_alone(gpu_env, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with claimed_gpus(1, wait_s=0) as visible:
        assert visible is None and os.environ["CUDA_VISIBLE_DEVICES"] == "3"
        with claimed_gpus(1, wait_s=0):  # no lock taken, so a second job is not refused
            assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    assert not (gpu_env / "locks").exists()


def test_without_cuda_visible_devices_the_machines_gpus_are_listed(gpu_env, monkeypatch):
    """Slurm without GPU scheduling sets no CUDA_VISIBLE_DEVICES: then claims are made as locally."""
    bin_dir = gpu_env / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-aa)'\necho 'GPU 1: NVIDIA H200 (UUID: GPU-bb)'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    holder = start_claimer(gpu_env, "holder")
    try:
        assert claimed(gpu_env, "holder", holder) == "0"
        with claimed_gpus(1, wait_s=0) as visible:
            assert visible == "1"
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(GPUError, match=r"asks for 3 GPUs but there are only 2 \(found on this machine\)"):
        with claimed_gpus(3):
            pass


GPU_SNAKEFILE = """
# Two one-GPU jobs that wait for each other, so they hold their GPUs at the same time.
rule all:
    input:
        expand("gpu_{i}.txt", i=[0, 1]),

rule on_gpu:
    output:
        "gpu_{i}.txt",
    resources:
        gpu=1,
    log:
        "logs/gpu_{i}.log",
    script:
        "record_gpu.py"
"""

RECORD_GPU = """
import os
import time
from pathlib import Path

from tunemake.rule_entry import run


def record(i, out):
    Path(f"started_{i}").touch()
    for _ in range(600):
        if Path("started_0").exists() and Path("started_1").exists():
            break
        time.sleep(0.1)
    Path(out).write_text(os.environ["CUDA_VISIBLE_DEVICES"])


run(snakemake, record, i=snakemake.wildcards.i, out=snakemake.output[0])
"""


def test_concurrent_snakemake_gpu_jobs_get_their_own_gpu(gpu_env):
    work = gpu_env / "work"
    work.mkdir()
    (work / "Snakefile").write_text(GPU_SNAKEFILE)
    (work / "record_gpu.py").write_text(RECORD_GPU)
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(work / "Snakefile"), "-d", str(work), "--cores", "2",
         "--resources", "gpu=2"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    seen = sorted((work / f"gpu_{i}.txt").read_text() for i in (0, 1))
    assert seen == ["0", "1"], seen  # both started before either finished, each with its own device
    for i in (0, 1):
        log = (work / f"logs/gpu_{i}.log").read_text()
        assert "GPUs: CUDA_VISIBLE_DEVICES=" in log and "claimed of CUDA_VISIBLE_DEVICES=0,1" in log, log
