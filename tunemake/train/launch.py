"""Starting the training processes: in this process, ``nproc`` processes with torchrun, or one
torchrun per node across a Slurm allocation; and, inside each process, its rank and device."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from tunemake.train.spec import EpochSpec, Settings, TrainError

log = logging.getLogger("tunemake.train")


@dataclass
class Dist:
    """This process's place among the training processes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    cpu_group: object = None  # a gloo group beside NCCL's, for agreeing without waiting for the GPU

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor, op=None) -> torch.Tensor:
        """Sum (by default) a small tensor over all processes, in place."""
        if self.world > 1:
            import torch.distributed as td

            on_device = tensor.to(self.device)  # NCCL reduces device tensors only
            td.all_reduce(on_device, op=op or td.ReduceOp.SUM)
            if on_device is not tensor:
                tensor.copy_(on_device)
        return tensor

    def any(self, flag: bool) -> bool:
        """Whether any process passes True; summed on the CPU, so no process waits for its GPU."""
        if self.world == 1:
            return flag
        import torch.distributed as td

        votes = torch.tensor([float(flag)])
        td.all_reduce(votes, group=self.cpu_group)
        return votes.item() > 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as td

            td.barrier()


def setup_processes(gpus: int) -> Dist:
    """Join the process group torchrun set up (if any) and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = gpus > 0 and torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    cpu_group = None
    if world > 1:
        import torch.distributed as td

        if not td.is_initialized():
            td.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
        if use_cuda:
            cpu_group = td.new_group(backend="gloo")
    return Dist(rank, world, local_rank, device, cpu_group)


def processes_per_node(train: Settings) -> int:
    """One process per GPU; on a machine without GPUs, ``nproc`` CPU processes (default 1)."""
    gpus = train.gpus
    visible = torch.cuda.device_count()
    if gpus is None:
        gpus = visible
        if not visible and os.environ.get("SLURM_JOB_ID"):
            log.warning("gpus: null and Slurm job %s has no GPU: training on the CPU (a cluster job gets GPUs "
                        "only when the experiment sets gpus: N)", os.environ["SLURM_JOB_ID"])
    if gpus > visible:
        raise TrainError(f"gpus: {gpus} requested but {visible} visible on this node")
    return gpus if gpus > 0 else max(1, int(train.nproc or 1))


def launch(spec: EpochSpec) -> int:
    """Run one epoch: in this process, in ``nproc`` processes started with torchrun, or across
    ``nodes`` nodes.

    Several nodes: inside a Slurm allocation (the train rule asks for one task per node with the
    plugin's ``mpi`` resource), ``srun`` starts one torchrun per task and they meet at a c10d
    rendezvous on the allocation's first node. Outside Slurm, run this on every node yourself
    with ``TUNEMAKE_RDZV_ENDPOINT=host:port`` (and the same ``TUNEMAKE_RDZV_ID``) set.

    Returns the exit status (0, or :data:`tunemake.train.loop.RESUME_EXIT_CODE` after an
    interruption).
    """
    from tunemake.train.loop import train_epoch

    spec = spec.resolved()
    spec.check()
    nproc, nodes = processes_per_node(spec.train), spec.train.nodes
    if nproc == 1 and nodes == 1:
        return train_epoch(spec)
    out_dir = Path(spec.out.pth).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=out_dir, prefix=".spec-", delete=False) as handle:
        json.dump(spec.to_json(), handle)
    try:
        return subprocess.call([*_torchrun(spec, nproc, nodes), "-m", "tunemake.train", handle.name])
    finally:
        os.unlink(handle.name)


def _torchrun(spec: EpochSpec, nproc: int, nodes: int) -> list[str]:
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--nproc-per-node={nproc}"]
    if nodes == 1:
        return [*torchrun, "--standalone"]
    if os.environ.get("TUNEMAKE_RDZV_ENDPOINT"):
        return [*torchrun, "--rdzv-backend=c10d", f"--rdzv-endpoint={os.environ['TUNEMAKE_RDZV_ENDPOINT']}",
                f"--rdzv-id={os.environ.get('TUNEMAKE_RDZV_ID', spec.experiment)}"]
    allocation = slurm_allocation()
    if allocation is None:
        raise TrainError(f"nodes: {nodes} needs a Slurm allocation (run the workflow with --profile "
                         "profiles/slurm) or TUNEMAKE_RDZV_ENDPOINT=host:port set on every node")
    endpoint = f"{allocation['hosts'][0]}:{rendezvous_port(allocation['job_id'])}"
    log.info("nodes %d: srun starts one torchrun per task; rendezvous at %s (Slurm job %s, nodes %s)",
             nodes, endpoint, allocation["job_id"], ",".join(allocation["hosts"]))
    gpus = spec.train.gpus or 0
    return ["srun", f"--nodes={len(allocation['hosts'])}", f"--ntasks={nodes}", "--kill-on-bad-exit=1",
            f"--cpus-per-task={max(1, int(spec.threads or 1))}", *([f"--gres=gpu:{gpus}"] if gpus else []),
            *torchrun, "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
            f"--rdzv-id=tunemake-{allocation['job_id']}"]


def slurm_allocation() -> dict | None:
    """The Slurm job this process runs in: ``{"job_id", "hosts"}``, or None outside Slurm.

    Read from ``scontrol``: Snakemake's jobstep executor strips the SLURM_* variables other than
    the job id before it runs a rule, so SLURM_JOB_NODELIST is not there to read.
    """
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return None
    nodelist = os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                             check=True).stdout
        fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
        nodelist = fields.get("NodeList")
        if not nodelist or nodelist == "(null)":
            raise TrainError(f"Slurm job {job_id} has no nodes (scontrol show job: {out.strip()[:200]})")
    hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                           check=True).stdout.split()
    return {"job_id": job_id, "hosts": hosts}


def rendezvous_port(job_id: str) -> int:
    """TUNEMAKE_RDZV_PORT, else a port from the job id: two jobs sharing a first node don't clash."""
    return int(os.environ.get("TUNEMAKE_RDZV_PORT") or 29400 + int(job_id) % 1000)
