"""profiles/slurm against a real Slurm cluster: jobs go through sbatch and build the same bytes.

Needs a cluster that answers `sinfo` (`bash .ci/slurm.sh start` makes a one-node one on loopback,
with two fake GPUs). Without one these tests skip, except under CI=true, where they fail: CI must
not pass by skipping them.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from smk import REPO, artefact_digests, write_config

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

PROFILE = REPO / "profiles" / "slurm"
SMALL_CONFIG = REPO / "tests" / "configs" / "demo_small.yaml"
TIMEOUT_S = 600  # a guard against a hung cluster, not a speed check: the DeepSpeed job alone took 4 min in CI
# The profile keeps the plugin's 40 s before the first status check, kind to a busy slurmctld;
# on a private cluster 2 s makes a chain of seven short jobs minutes faster.
FAST_STATUS = ("--slurm-init-seconds-before-status-checks", "2")
# Everything the slurm profile submits for one experiment down to merged/ (the links are local).
EXPECTED_CLUSTER_RULES = {
    "demo_data", "demo_tokenizer", "demo_model", "templated_dataset", "train_epoch", "convert_epoch", "merge_epoch",
}


@functools.cache
def _why_no_slurm() -> str | None:
    if shutil.which("sinfo") is None:
        return "sinfo not found"
    try:
        proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 10 s"
    if proc.returncode != 0:
        return f"sinfo failed: {proc.stderr.strip()}"
    states = set(proc.stdout.split())
    if not states & {"idle", "mixed"}:
        return f"no idle or mixed node (sinfo says {sorted(states) or 'nothing'})"
    return None


@pytest.fixture(scope="module")
def slurm():
    reason = _why_no_slurm()
    if reason:
        message = f"no Slurm cluster: {reason} (start one with `bash .ci/slurm.sh start`)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and {message}")
        pytest.skip(message)


def start_snakemake(workdir: Path, *args: str, snakefile: Path = REPO / "Snakefile") -> subprocess.Popen:
    """Snakemake in ``workdir``, in the background, killed after TIMEOUT_S; its output in workdir/../."""
    cmd = [
        "timeout", "-k", "10", str(TIMEOUT_S),
        sys.executable, "-m", "snakemake", "-s", str(snakefile), "-d", str(workdir), *args,
    ]
    out = open(workdir.parent / f"{workdir.name}.snakemake.log", "w+", encoding="utf-8")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    proc.workdir, proc.out = workdir, out
    return proc


def finish(proc: subprocess.Popen) -> str:
    """Wait for ``proc``; its output, or an AssertionError with it and the Slurm jobs' logs."""
    returncode = proc.wait()
    proc.out.seek(0)
    output = proc.out.read()
    proc.out.close()
    if returncode != 0:
        logs = "".join(f"\n--- {p}\n{p.read_text()[-2000:]}"
                       for p in sorted(proc.workdir.glob(".snakemake/slurm_logs/**/*.log")))
        raise AssertionError(
            f"{' '.join(proc.args[4:])} exited {returncode}{' (timed out)' if returncode in (124, 137) else ''}:\n"
            f"{output[-8000:]}{logs}"
        )
    return output


def run_snakemake(workdir: Path, *args: str, snakefile: Path = REPO / "Snakefile") -> str:
    return finish(start_snakemake(workdir, *args, snakefile=snakefile))


def cluster_jobs(workdir: Path) -> dict[str, list[tuple[str, str]]]:
    """Rule -> [(Slurm job id, state)] of the jobs squeue remembers for ``workdir``.

    The plugin puts the rule in the job's comment (rule_<name>[_wildcards_<values>]) and submits
    with -D <workdir>;
    finished jobs stay visible for the cluster's MinJobAge.
    """
    out = subprocess.run(
        ["squeue", "-h", "-t", "all", "-o", "%i|%k|%T|%Z"], capture_output=True, text=True, timeout=10, check=True,
    ).stdout
    jobs: dict[str, list[tuple[str, str]]] = {}
    for line in out.splitlines():
        job_id, comment, state, job_dir = line.split("|", 3)
        if Path(job_dir).resolve() == workdir.resolve() and comment.startswith("rule_"):
            rule = comment.removeprefix("rule_").split("_wildcards_")[0]
            jobs.setdefault(rule, []).append((job_id, state))
    return jobs


def one_experiment_config() -> dict:
    """demo_small.yaml cut to its QLoRA experiment (one epoch, straight from the demo base model)."""
    config = yaml.safe_load(SMALL_CONFIG.read_text())
    config["experiments"] = [e for e in config["experiments"] if e["method"] == "qlora"]
    assert len(config["experiments"]) == 1 and config["experiments"][0]["epochs"] == 1
    return config


def test_demo_builds_through_slurm_as_it_builds_locally(slurm, tmp_path):
    config = one_experiment_config()
    local, cluster = tmp_path / "local", tmp_path / "cluster"
    for work in (local, cluster):
        work.mkdir()
        write_config(work, config)

    # The local build runs meanwhile: the cluster build spends most of its time waiting on the queue.
    # --cores 2 gives training the 2 threads its rule asks for on the cluster: torch's thread count
    # can change the bits.
    local_build = start_snakemake(local, "merged/", "--cores", "2", "--configfile", str(local / "config.yaml"))
    try:
        run_snakemake(cluster, "merged/", "--profile", str(PROFILE), "--configfile", str(cluster / "config.yaml"),
                      *FAST_STATUS)
    finally:
        local_build.wait()
    finish(local_build)
    jobs = cluster_jobs(cluster)
    assert set(jobs) == EXPECTED_CLUSTER_RULES, jobs
    assert all(state == "COMPLETED" for runs in jobs.values() for _, state in runs), jobs
    experiment = "tiny_qlora_tasks"
    assert (cluster / "merged" / experiment).is_symlink()

    built = artefact_digests(cluster)
    assert any(n.startswith("models/tiny/tokenizer") for n in built)
    assert f"adapters/{experiment}/epoch_1/adapter_model.safetensors" in built
    assert any(n.startswith(f"merges/{experiment}/epoch_1/") and n.endswith(".safetensors") for n in built)
    assert built == artefact_digests(local)


GPU_SNAKEFILE = r"""
# Two one-GPU jobs that wait for each other, so they hold their GPUs at the same time.
rule all:
    input:
        expand("gpu_{i}.txt", i=[0, 1]),

rule on_gpu:
    output:
        "gpu_{i}.txt",
    resources:
        gpu=1,
        mem_mb=200,
        runtime=5,
    shell:
        '''
        touch started_{wildcards.i}
        for _ in $(seq 600); do [ -e started_0 ] && [ -e started_1 ] && break; sleep 0.1; done
        echo "${{CUDA_VISIBLE_DEVICES-unset}} ${{SLURM_JOB_ID-unset}}" > {output}
        '''
"""


def test_gpu_jobs_get_their_own_fake_gpu(slurm, tmp_path):
    snakefile = tmp_path / "Snakefile"
    snakefile.write_text(GPU_SNAKEFILE)
    run_snakemake(tmp_path, "--profile", str(PROFILE), *FAST_STATUS, snakefile=snakefile)
    seen = [(tmp_path / f"gpu_{i}.txt").read_text().split() for i in (0, 1)]
    devices = sorted(device for device, _ in seen)
    job_ids = {job_id for _, job_id in seen}
    assert devices == ["0", "1"], seen  # one fake GPU each, never the same one
    assert "unset" not in job_ids and len(job_ids) == 2, seen
    assert {job_id for job_id, _ in cluster_jobs(tmp_path)["on_gpu"]} == job_ids


def test_group_epochs_makes_an_experiments_epochs_one_cluster_job(slurm, tmp_path):
    """group_epochs: true puts every epoch of the experiment in one Snakemake group (one sbatch
    job); left false, each epoch is its own job. Read from a dry run through the Slurm executor."""
    plans = {}
    for grouped in (True, False):
        work = tmp_path / f"grouped_{grouped}"
        work.mkdir()
        config = one_experiment_config()
        config["experiments"][0].update(epochs=3, group_epochs=grouped, name="g")
        (work / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        plans[grouped] = run_snakemake(work, "adapters", "--executor", "slurm", "--jobs", "10", "-n",
                                       "--slurm-status-command", "squeue")
    grouped = plans[True].split("Group job train_g", 1)
    assert len(grouped) == 2, plans[True][-3000:]
    assert all(f"checkpoints/g/epoch_{n}.pth" in grouped[1] for n in (1, 2, 3))
    assert "Group job" not in plans[False]


def _train_job(workdir: Path) -> str | None:
    runs = cluster_jobs(workdir).get("train_epoch", [])
    return runs[-1][0] if runs else None


def _show_job(job_id: str) -> str:
    return subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                          timeout=10).stdout


def _job_state(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                          timeout=10).stdout.strip()


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = TIMEOUT_S):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            finish(proc)  # raises with the logs when it failed
            pytest.fail(f"snakemake ended before {what}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def test_training_requeued_mid_epoch_finishes_with_the_uninterrupted_weights(slurm, tmp_path):
    """`scontrol requeue` of a running training job: Slurm stops it and starts it again; the new run
    continues from the last resume point and trains as a local uninterrupted run does: the same
    losses step by step and the same weights, up to the last bits (below)."""
    config = one_experiment_config()
    config["demo"]["tasks_per_family"] = 200
    config["experiments"][0].update(batch_size=1, grad_accumulation=1, save_steps=5, name="rq")
    target = "checkpoints/rq/epoch_1.pth"
    local, cluster = tmp_path / "local", tmp_path / "cluster"
    for work in (local, cluster):
        work.mkdir()
        write_config(work, config)
    local_build = start_snakemake(local, target, "--cores", "2")
    try:
        proc = start_snakemake(cluster, target, "--profile", str(PROFILE), *FAST_STATUS)
        resume_meta = cluster / "checkpoints" / "rq" / "epoch_1.resume" / "meta.json"
        _wait_for(lambda: resume_meta.exists() and json.loads(resume_meta.read_text())["epoch_step"] >= 5,
                  proc, "a resume point")
        job_id = _train_job(cluster)
        assert job_id, cluster_jobs(cluster)
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)
        # Slurm holds a requeued job back for about two minutes; let it start at once.
        _wait_for(lambda: _job_state(job_id) == "PENDING" or "Restarts=1" in _show_job(job_id)
                  and _job_state(job_id) in ("RUNNING", "COMPLETED"), proc, "the requeue")
        if _job_state(job_id) == "PENDING":
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], timeout=30)
        finish(proc)
    finally:
        local_build.wait()
    finish(local_build)

    show = _show_job(job_id)
    assert "Restarts=1" in show, show  # the same Slurm job ran twice
    log = (cluster / "logs" / "train" / "rq" / "epoch_1.log").read_text()
    assert re.search(r"resuming epoch 1 at step [1-9]\d*/", log), log[-3000:]
    assert not (cluster / "checkpoints" / "rq" / "epoch_1.resume").exists()
    resumed = torch.load(cluster / target, weights_only=True)
    expected = torch.load(local / target, weights_only=True)
    assert resumed["trainable"].keys() == expected["trainable"].keys()
    assert resumed["counters"] == expected["counters"]
    # Not bit for bit: the cluster's job and the local build run side by side on two cores, and
    # once in three CI runs their very first step's gradients differed in the last bit, before any
    # resume, and the weights by 4e-5 after the epoch. Same-process resumes are bit-identical
    # (tests/test_train.py). What a faulty resume changes (another batch, lost optimizer moments
    # or dropout seeds) moves the losses by 1e-3 and more from the resumed step on.
    for name, tensor in expected["trainable"].items():
        error = (resumed["trainable"][name].float() - tensor.float()).norm() / tensor.float().norm().clamp_min(1e-12)
        assert error <= 1e-3, (name, error)
    steps = [[json.loads(line) for line in (work / "logs" / "train" / "rq" / "epoch_1.metrics.jsonl").open()]
             for work in (cluster, local)]
    for ours, theirs in zip(*steps):
        if "step" in ours:
            assert ours["step"] == theirs["step"]
            assert abs(ours["loss"] - theirs["loss"]) <= 1e-4 * abs(theirs["loss"]), (ours, theirs)


def test_two_node_training_is_one_mpi_job_whose_tasks_join_one_rendezvous(slurm, tmp_path):
    """nodes: 2 makes the train job an `mpi` job with one task per node; srun starts a torchrun in
    each task and both join one c10d rendezvous (world size 2), with DDP and with DeepSpeed ZeRO-2.
    The CI cluster has one node, so `--set-resources train_epoch:nodes=1` puts both tasks on it:
    the same srun, the same rendezvous."""
    config = one_experiment_config()
    ddp = {**config["experiments"][0], "nodes": 2, "gpus": 0, "name": "mn"}
    config["experiments"] = [ddp, {**ddp, "deepspeed": "zero2", "name": "mn_ds"}]
    write_config(tmp_path, config)
    targets = ["checkpoints/mn/epoch_1.pth", "checkpoints/mn_ds/epoch_1.pth"]
    run_snakemake(tmp_path, *targets, "--profile", str(PROFILE), *FAST_STATUS,
                  "--set-resources", "train_epoch:nodes=1")
    jobs = cluster_jobs(tmp_path)["train_epoch"]
    assert len(jobs) == 2, jobs
    for job_id, _ in jobs:
        show = _show_job(job_id)
        assert "NumTasks=2" in show, show
    for name in ("mn", "mn_ds"):
        log = (tmp_path / "logs" / "train" / name / "epoch_1.log").read_text()
        job = re.search(r"rendezvous at \S+ \(Slurm job (\d+), nodes", log)
        assert job and job.group(1) in {j for j, _ in jobs}, log[-3000:]
        state = json.loads((tmp_path / "checkpoints" / name / "epoch_1.state" / "meta.json").read_text())
        assert state["world"] == 2, (name, state)  # two processes, one per task: both joined
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "mn_ds" / "epoch_1.state").rglob("*optim*"))
    ddp_ckpt, ds_ckpt = (torch.load(tmp_path / t, weights_only=True) for t in targets)
    assert ddp_ckpt["trainable"].keys() == ds_ckpt["trainable"].keys()
    rel = abs(ddp_ckpt["metrics"]["train_loss"] - ds_ckpt["metrics"]["train_loss"]) / ddp_ckpt["metrics"]["train_loss"]
    assert rel < 1e-3, (ddp_ckpt["metrics"], ds_ckpt["metrics"])
