"""The train stage: one epoch of one experiment, started from the previous epoch's artefacts.

Entry point :func:`train_epoch` runs in every training process (one per GPU, or ``nproc`` on
CPU over gloo); :func:`launch` starts those processes with torchrun, or runs the epoch in-process
when there is one. Supported: full fine-tuning, LoRA and QLoRA (bitsandbytes 4-bit NF4 / 8-bit),
plain DDP, AdamW with the schedules in ``tunemake.schedule``, gradient accumulation and clipping,
packed rows with attention kept inside each document, mid-epoch resume points, and DeepSpeed ZeRO
1/2/3 (+ offload) by name or JSON file with "auto" fields filled from the experiment (the torch
AdamW is handed to DeepSpeed, so no optimizer is compiled). On CUDA, without DeepSpeed, the step
runs through ``tunemake.fast`` (varlen attention over packed documents, compiled layers, a loss
that never holds the full logits) when it supports the model, and AdamW is torch's fused kernel;
elsewhere the model's own forward with a dense block-diagonal mask. Not supported: pipeline or
tensor parallelism.

Outputs of epoch n:
- ``epoch_{n}.pth``: trainable weights (LoRA weights only for LoRA/QLoRA) gathered on rank 0,
  counters, the fingerprint of what it was trained with, library versions, the epoch's metrics;
  loads with ``torch.load(path, weights_only=True)``.
- ``epoch_{n}.state/``: what epoch n+1 resumes from: optimizer state and RNG states per rank.
- while running, ``epoch_{n}.resume/``: a resume point every ``save_steps`` optimizer steps and
  on SIGTERM / SIGUSR1; a rerun continues from it if its fingerprint matches, and gives the same
  tensors as an uninterrupted run on CPU. Removed when the epoch is done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tunemake.atomic import atomic_file, write_json
from tunemake.config import DEEPSPEED_PRESETS, DTYPE_BYTES
from tunemake.encode import IGNORE_INDEX
from tunemake.errors import TunemakeError
from tunemake.hub import is_hub_id, load_pretrained, model_dir
from tunemake.schedule import lr_factor
from tunemake.versions import TRAIN_CODE_VERSION

log = logging.getLogger("tunemake.train")

CHECKPOINT_FORMAT = "tunemake.epoch/1"
PRUNED_MARKER = "PRUNED"
RESUME_EXIT_CODE = 75  # EX_TEMPFAIL: interrupted with a resume point written; rerun to continue


class TrainError(TunemakeError):
    """Training cannot start or go on (bad configuration, non-finite loss, missing state)."""


# --- processes ---------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor, op=None) -> torch.Tensor:
        """Sum (by default) a small CPU tensor over all processes, in place."""
        if self.world > 1:
            import torch.distributed as td

            on_device = tensor.to(self.device)  # NCCL reduces device tensors only
            td.all_reduce(on_device, op=op or td.ReduceOp.SUM)
            tensor.copy_(on_device.cpu())
        return tensor

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
    if world > 1:
        import torch.distributed as td

        if not td.is_initialized():
            td.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return Dist(rank, world, local_rank, device)


def _init_deepspeed_comm(dist: Dist) -> None:
    # DeepSpeed looks for an MPI launcher unless the torchrun variables are set; one process
    # without torchrun gets them here.
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(29500 + os.getpid() % 1000))):
        os.environ.setdefault(key, value)
    if dist.device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if dist.device.type == "cuda" else "gloo")


def processes_per_node(train: dict) -> int:
    """One process per GPU; on a machine without GPUs, ``nproc`` CPU processes (default 1)."""
    gpus = train.get("gpus")
    visible = torch.cuda.device_count()
    if gpus is None:
        gpus = visible
        if not visible and os.environ.get("SLURM_JOB_ID"):
            log.warning("gpus: null and Slurm job %s has no GPU: training on the CPU (a cluster job gets GPUs "
                        "only when the experiment sets gpus: N)", os.environ["SLURM_JOB_ID"])
    if gpus > visible:
        raise TrainError(f"gpus: {gpus} requested but {visible} visible on this node")
    return gpus if gpus > 0 else max(1, int(train.get("nproc", 1)))


def launch(spec: dict) -> int:
    """Run one epoch: in this process, in ``nproc`` processes started with torchrun, or across
    ``nodes`` nodes.

    Several nodes: inside a Slurm allocation (the train rule asks for one task per node with the
    plugin's ``mpi`` resource), ``srun`` starts one torchrun per task and they meet at a c10d
    rendezvous on the allocation's first node. Outside Slurm, run this on every node yourself
    with ``TUNEMAKE_RDZV_ENDPOINT=host:port`` (and the same ``TUNEMAKE_RDZV_ID``) set.

    Returns the exit status (0, or :data:`RESUME_EXIT_CODE` after an interruption).
    """
    spec = with_model_dirs(spec)
    check_spec(spec)
    nproc = processes_per_node(spec["train"])
    nodes = spec["train"].get("nodes", 1)
    if nproc == 1 and nodes == 1:
        return train_epoch(spec)
    import subprocess
    import tempfile

    Path(spec["out"]["pth"]).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=Path(spec["out"]["pth"]).parent,
                                     prefix=".spec-", delete=False) as handle:
        json.dump(spec, handle)
    try:
        torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}",
                    f"--nproc-per-node={nproc}"]
        if nodes == 1:
            cmd = [*torchrun, "--standalone"]
        elif os.environ.get("TUNEMAKE_RDZV_ENDPOINT"):
            cmd = [*torchrun, "--rdzv-backend=c10d", f"--rdzv-endpoint={os.environ['TUNEMAKE_RDZV_ENDPOINT']}",
                   f"--rdzv-id={os.environ.get('TUNEMAKE_RDZV_ID', spec['experiment'])}"]
        else:
            allocation = slurm_allocation()
            if allocation is None:
                raise TrainError(f"nodes: {nodes} needs a Slurm allocation (run the workflow with --profile "
                                 "profiles/slurm) or TUNEMAKE_RDZV_ENDPOINT=host:port set on every node")
            endpoint = f"{allocation['hosts'][0]}:{rendezvous_port(allocation['job_id'])}"
            log.info("nodes %d: srun starts one torchrun per task; rendezvous at %s (Slurm job %s, nodes %s)",
                     nodes, endpoint, allocation["job_id"], ",".join(allocation["hosts"]))
            gpus = spec["train"].get("gpus") or 0
            cmd = ["srun", f"--nodes={len(allocation['hosts'])}", f"--ntasks={nodes}", "--kill-on-bad-exit=1",
                   f"--cpus-per-task={max(1, int(spec.get('threads') or 1))}",
                   *([f"--gres=gpu:{gpus}"] if gpus else []),
                   *torchrun, "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
                   f"--rdzv-id=tunemake-{allocation['job_id']}"]
        cmd += ["-m", "tunemake.train", handle.name]
        return subprocess.call(cmd)
    finally:
        os.unlink(handle.name)


def slurm_allocation() -> dict | None:
    """The Slurm job this process runs in: ``{"job_id", "hosts"}``, or None outside Slurm.

    Read from ``scontrol``: Snakemake's jobstep executor strips the SLURM_* variables other than
    the job id before it runs a rule, so SLURM_JOB_NODELIST is not there to read.
    """
    import subprocess

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


def with_model_dirs(spec: dict) -> dict:
    """``spec`` with the directories its base model and tokenizer are read from: ``base_model.dir``
    and ``tokenizer_dir`` (a hub id's cached snapshot at its revision; never downloads).

    Raises:
        HubError: a hub id that is not in the cache.
    """
    base = spec["base_model"]
    if "dir" in base:
        return spec
    tokenizer = spec.get("tokenizer_path") or base["path"]
    return {**spec, "base_model": {**base, "dir": str(model_dir(base["path"], base.get("revision")))},
            "tokenizer_dir": str(model_dir(tokenizer, spec.get("tokenizer_revision") if spec.get("tokenizer_path")
                                           else base.get("revision")))}


def check_spec(spec: dict) -> None:
    """Refuse what cannot work before any compute: clear errors, nothing written (``spec`` as
    :func:`with_model_dirs` returns it)."""
    method = spec["method"]
    if method["type"] not in ("full", "lora", "qlora"):
        raise TrainError(f"method: unknown type {method['type']!r}")
    if method["type"] != "full" and method["r"] <= 0:
        raise TrainError(f"method: LoRA rank r must be >= 1, got {method['r']}")
    if spec["train"]["epochs"] < 1 or not 1 <= spec["epoch"] <= spec["train"]["epochs"]:
        raise TrainError(f"epoch {spec['epoch']} is outside 1..{spec['train']['epochs']}")
    deepspeed_config(spec, world=1)  # a missing or malformed JSON file fails here
    base = spec["base_model"]["path"]
    config_file = Path(spec["base_model"]["dir"]) / "config.json"
    if not config_file.exists():
        raise TrainError(f"{base}: not a model directory (no config.json)")
    arch = json.loads(config_file.read_text()).get("architectures") or []
    if arch and not any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in arch):
        raise TrainError(f"{base}: not a causal language model (architectures: {', '.join(arch)})")
    _check_template_tokens(spec)


def _check_template_tokens(spec: dict) -> None:
    """A stop word the tokenizer splits would leave the merged model unable to stop: say so now."""
    from tunemake.templates import HF, check_encodable, template_from_dict

    template = template_from_dict(spec["template"])
    if template == HF or not template.stop_words:
        return
    root = spec.get("tokenizer_path") or spec["base_model"]["path"]
    check_encodable(template, load_tokenizer(spec), root, TrainError)


def load_tokenizer(spec: dict):
    """The experiment's tokenizer (its root model's), from ``spec['tokenizer_dir']``."""
    from transformers import AutoTokenizer

    return load_pretrained(AutoTokenizer, spec["tokenizer_dir"], spec.get("tokenizer_path"),
                           trust_remote_code=spec["base_model"].get("trust_remote_code", False))


# --- DeepSpeed ---------------------------------------------------------------------------------


def deepspeed_config(spec: dict, world: int) -> dict | None:
    """The experiment's DeepSpeed config with every "auto" field filled, or None without DeepSpeed."""
    train = spec["train"]
    name = train.get("deepspeed")
    if not name:
        return None
    if name in DEEPSPEED_PRESETS:
        config = json.loads(json.dumps(DEEPSPEED_PRESETS[name]))
    else:
        try:
            config = json.loads(Path(name).read_text())
        except FileNotFoundError:
            raise TrainError(f"deepspeed: {name}: no such file") from None
        except json.JSONDecodeError as exc:
            raise TrainError(f"deepspeed: {name}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    filled = {
        "train_micro_batch_size_per_gpu": train["batch_size"],
        "gradient_accumulation_steps": train["grad_accumulation"],
        "train_batch_size": train["batch_size"] * train["grad_accumulation"] * world,
        "gradient_clipping": train.get("max_grad_norm") or 0.0,
    }
    for key, value in filled.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
    precision = train.get("precision", "auto")
    for key, wanted in (("bf16", precision == "bf16"), ("fp16", precision == "fp16")):
        section = config.setdefault(key, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = wanted
    config.setdefault("steps_per_print", 10**9)
    config.setdefault("wall_clock_breakdown", False)
    return config


class DeepSpeedState:
    """Saves and loads optimizer state through a DeepSpeed engine (one shard per rank)."""

    TAG = "deepspeed"

    def __init__(self, engine):
        self.engine = engine

    def save(self, directory: Path, rank: int) -> None:
        self.engine.save_checkpoint(str(directory), tag=self.TAG, exclude_frozen_parameters=True)

    def load(self, directory: Path, rank: int) -> None:
        self.engine.load_checkpoint(str(directory), tag=self.TAG, load_module_strict=False,
                                    load_optimizer_states=True, load_lr_scheduler_states=False)


class TorchState:
    """Saves and loads a torch optimizer's state, one file per rank."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def save(self, directory: Path, rank: int) -> None:
        torch.save(self.optimizer.state_dict(), directory / f"optimizer.rank{rank}.pt")

    def load(self, directory: Path, rank: int) -> None:
        self.optimizer.load_state_dict(torch.load(directory / f"optimizer.rank{rank}.pt", map_location="cpu", weights_only=True))


# --- data --------------------------------------------------------------------------------------


class Rows:
    """Rows of a templated dataset split as flat arrays (no per-row Python objects)."""

    def __init__(self, data_dir: str, split: str):
        import datasets

        table = datasets.load_from_disk(data_dir)[split].data.table
        self.columns = {}
        for name in table.column_names:
            arr = table.column(name).combine_chunks()
            self.columns[name] = (arr.offsets.to_numpy().astype(np.int64), arr.values.to_numpy())
        self.num_rows = len(table)

    def row(self, name: str, index: int) -> np.ndarray:
        offsets, values = self.columns[name]
        return values[offsets[index]:offsets[index + 1]]


def make_batch(rows: Rows, indices, pad_id: int, dense_mask: bool = True) -> dict[str, torch.Tensor]:
    """Pad rows to the longest and build a block-diagonal causal mask from ``position_ids``.

    A document piece starts where ``position_ids`` is 0; tokens attend only within their piece,
    and the first token of a piece is not a target (nothing in its document precedes it).
    Padding forms its own piece, with no targets. Without ``dense_mask`` there is no
    ``attention_mask``: the fast path finds the pieces from ``position_ids`` itself.
    """
    length = max(len(rows.row("input_ids", i)) for i in indices)
    n = len(indices)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((n, length), dtype=torch.long)
    for b, i in enumerate(indices):
        ids = torch.from_numpy(rows.row("input_ids", i).astype(np.int64))
        k = len(ids)
        input_ids[b, :k] = ids
        labels[b, :k] = torch.from_numpy(rows.row("labels", i).astype(np.int64))
        if "position_ids" in rows.columns:
            position_ids[b, :k] = torch.from_numpy(rows.row("position_ids", i).astype(np.int64))
        else:
            position_ids[b, :k] = torch.arange(k)
        position_ids[b, k:] = torch.arange(length - k)
    labels[position_ids == 0] = IGNORE_INDEX
    if not dense_mask:
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    doc = torch.cumsum(position_ids == 0, dim=1)
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
    mask = (doc[:, :, None] == doc[:, None, :]) & causal
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "attention_mask": mask[:, None]}


def epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def layout(num_rows: int, batch_size: int, world: int, accumulation: int) -> tuple[int, int]:
    """(micro-batches per rank per epoch, optimizer steps per epoch); incomplete batches dropped."""
    micro = num_rows // (batch_size * world)
    if micro == 0:
        raise TrainError(
            f"the dataset has {num_rows} rows, fewer than one batch of batch_size {batch_size} "
            f"x {world} processes; lower batch_size or gpus, or add data"
        )
    return micro, math.ceil(micro / accumulation)


# --- model -------------------------------------------------------------------------------------


def torch_dtype(name: str, device: torch.device):
    if name in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPE_BYTES:
        raise TrainError(f"dtype: {name!r} is not one of auto, {', '.join(DTYPE_BYTES)}")
    return getattr(torch, name)


def autocast_dtype(precision: str, device: torch.device):
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise TrainError("precision: fp16 is not supported on the CPU; use bf16 or fp32")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def lora_targets(model) -> list[str]:
    """Every linear layer's name but the output head: XTuner's ``find_all_linear_names``."""
    linear_types = [torch.nn.Linear]
    try:  # quantized layers only where bitsandbytes imports (plain LoRA does without it)
        from bitsandbytes.nn import Linear4bit, Linear8bitLt

        linear_types += [Linear4bit, Linear8bitLt]
    except Exception:  # not installed, or a build that cannot load here (RuntimeError, OSError...)
        pass
    head = model.get_output_embeddings()
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, tuple(linear_types)) and module is not head:
            names.add(name.split(".")[-1])
    return sorted(names)


def build_model(spec: dict, device: torch.device):
    """The base model with the method applied; trainable parameters in fp32."""
    from transformers import AutoModelForCausalLM

    method, base = spec["method"], with_model_dirs(spec)["base_model"]
    kwargs = {"dtype": torch_dtype(base.get("dtype"), device),
              "trust_remote_code": base.get("trust_remote_code", False)}
    if method["type"] == "qlora":
        from transformers import BitsAndBytesConfig

        compute = autocast_dtype(spec["train"]["precision"], device) or torch.float32
        if method["bits"] == 4:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=method["quant_type"],
                bnb_4bit_use_double_quant=method["double_quant"], bnb_4bit_compute_dtype=compute,
                llm_int8_threshold=6.0,
            )
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
    if device.type == "cuda" or method["type"] == "qlora":
        # each process loads the weights shard by shard straight onto its device: no whole copy of
        # the model in host memory per process
        kwargs["device_map"] = {"": device}
    model = load_pretrained(AutoModelForCausalLM, base["dir"], base["path"], **kwargs)
    if method["type"] != "qlora":
        model.to(device)
    model.config.use_cache = False
    if method["type"] == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=method["gradient_checkpointing"],
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif method["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if method["type"] == "lora":
            model.enable_input_require_grads()
    if method["type"] in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        targets = method["target_modules"]
        config = LoraConfig(
            r=method["r"], lora_alpha=method["alpha"], lora_dropout=method["dropout"],
            bias=method["bias"], task_type="CAUSAL_LM",
            target_modules=lora_targets(model) if targets == "all-linear" else list(targets),
            modules_to_save=list(method.get("modules_to_save") or []) or None,
        )
        model = get_peft_model(model, config)
    if device.type == "cpu":
        _disable_bnb_cpu_repacking(model)
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def step_model(model, spec: dict, dist: Dist, amp_dtype):
    """What the training loop calls: on CUDA the fast path (``tunemake.fast``) where it supports
    the model, else the model's own forward; inside DDP when there are several processes.

    ``TUNEMAKE_FAST=0`` in the environment turns the fast path off.
    """
    if dist.device.type == "cuda" and os.environ.get("TUNEMAKE_FAST", "1") != "0":
        from tunemake import fast

        reason = fast.unsupported(model, amp_dtype)
        if reason is None:
            model = fast.FastCausalLM(model, amp_dtype, checkpoint=spec["method"]["gradient_checkpointing"])
            if dist.main:
                log.info("training through the fast path (attention: %s)", model.attention)
        elif dist.main:
            log.info("fast path not used: %s; training through the model's own forward", reason)
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # gradients as views into DDP's buckets: no copy into the buckets and no second copy of the
        # gradients (faster on 2x H200 in every run, docs/performance.md)
        model = DistributedDataParallel(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
                                        gradient_as_bucket_view=True)
    return model


def _layers(model):
    """The model and what it wraps, outermost first: DDP or a DeepSpeed engine, the fast path, the
    model ``build_model`` made."""
    yield model
    while type(model).__name__ in ("DistributedDataParallel", "DeepSpeedEngine", "FastCausalLM"):
        model = model.module
        yield model


def fast_path(model):
    """The :class:`tunemake.fast.FastCausalLM` the step runs through, or None."""
    return next((m for m in _layers(model) if type(m).__name__ == "FastCausalLM"), None)


def unwrap(model):
    """The model ``build_model`` made, from inside DDP, a DeepSpeed engine or the fast path."""
    *_, inner = _layers(model)
    return inner


def make_optimizer(params, train: dict, device: torch.device):
    """AdamW over the trainable parameters; torch's fused kernel on CUDA (one launch per step)."""
    return torch.optim.AdamW(params, lr=train["lr"], betas=tuple(train["betas"]), weight_decay=train["weight_decay"],
                             eps=1e-8, fused=device.type == "cuda" or None)


def _disable_bnb_cpu_repacking(model) -> None:
    # bitsandbytes repacks 4-bit weights for AVX512-BF16 CPUs after a no-grad forward, after
    # which LoRA gradients silently come out as zero: keep the portable kernel when training.
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def trainable_state(model) -> dict[str, torch.Tensor]:
    """Trainable parameters by name (for LoRA: only the adapter), detached, on the CPU.

    Under ZeRO-3 the parameters are partitioned: they are gathered first (every rank must call).
    """
    model = unwrap(model)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if any(hasattr(p, "ds_id") for _, p in named):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            return {name: p.detach().to("cpu", copy=True) for name, p in named}
    return {name: p.detach().to("cpu", copy=True) for name, p in named}


def load_trainable(model, state: dict[str, torch.Tensor], source: str) -> None:
    model = unwrap(model)
    params = dict(model.named_parameters())
    missing = [name for name, p in params.items() if p.requires_grad and name not in state]
    unexpected = [name for name in state if name not in params]
    if missing or unexpected:
        raise TrainError(
            f"{source}: its weights do not fit this experiment's model "
            f"({len(missing)} missing, e.g. {missing[:1]}; {len(unexpected)} unexpected, e.g. {unexpected[:1]})"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


# --- fingerprint -------------------------------------------------------------------------------


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the result (read from metadata: no slow imports)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("tunemake", "torch", "transformers", "peft", "bitsandbytes", "deepspeed", "datasets", "tokenizers"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    return versions


def model_identity(name: str, directory: Path) -> str:
    """A hub model's ``id@commit`` (its cached snapshot directory is named by the commit); for a
    local directory, a digest of its JSON files and of its weights' safetensors headers and sizes."""
    if is_hub_id(name):
        return f"{name}@{directory.name}"
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".bin")):
        digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        if path.suffix == ".json":
            digest.update(path.read_bytes())
        elif path.suffix == ".safetensors":
            with open(path, "rb") as handle:
                digest.update(handle.read(8 + int.from_bytes(handle.read(8), "little")))
    return digest.hexdigest()


def data_identity(data_dir: Path) -> str:
    """A templated dataset's recipe and statistics, which hold the digest of its tokens that the data
    stage recorded; a dataset built before it recorded one is hashed whole."""
    stats = data_dir / "stats.json"
    if stats.is_file() and "digest" in json.loads(stats.read_text()):
        return _hash_files([data_dir / "recipe.json", stats])
    return _hash_files([p for p in data_dir.rglob("*") if p.is_file()])


def _hash_files(paths) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(str(Path(path).name).encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def fingerprint(spec: dict, previous: str | None) -> dict:
    """What this epoch's result is a function of: config, data, base model, code, previous epoch.

    Cheap on every rank: no weight is read, and a templated dataset is named by the digest its
    data stage recorded (see :func:`model_identity`, :func:`data_identity`).
    """
    parts = {
        "config": hashlib.sha256(json.dumps(
            {k: spec[k] for k in ("experiment", "epoch", "method", "train")}, sort_keys=True).encode()).hexdigest(),
        "data": data_identity(Path(spec["data_dir"])),
        "base_model": model_identity(spec["base_model"]["path"], Path(spec["base_model"]["dir"])),
        "code": f"train/{TRAIN_CODE_VERSION}",
        "previous": previous or "",
    }
    parts["fingerprint"] = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]
    return parts


# --- the epoch ---------------------------------------------------------------------------------


class Interrupt:
    """SIGTERM / SIGUSR1 (Slurm's warnings before preemption) set a flag checked every step."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        log.warning("received %s: writing a resume point at the next step", signal.Signals(signum).name)
        self.requested = True


def step_seed(seed: int, epoch: int, micro_step: int) -> int:
    """A seed per micro-step, so dropout does not depend on where a run was resumed."""
    return (seed * 1_000_003 + epoch * 10_007 + micro_step) % (2**63)


def micro_step(model, batch: dict, amp_dtype, accumulated: int = 1, scaler=None) -> torch.Tensor:
    """Forward and backward of one micro-batch (gradients add up); returns its mean loss.

    The training step both paths share (the benchmark times this function).
    """
    with torch.autocast(batch["input_ids"].device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss = model(**batch, use_cache=False).loss
    scaled = loss / accumulated
    (scaler.scale(scaled) if scaler else scaled).backward()
    return loss.detach()


def optimizer_step(optimizer, params, max_grad_norm: float | None, scaler=None) -> torch.Tensor:
    """Clip (when ``max_grad_norm``), step and zero the gradients; returns the norm before clipping."""
    if scaler:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm) if max_grad_norm else _grad_norm(params)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def train_epoch(spec: dict) -> int:
    """Train epoch ``spec['epoch']`` of ``spec['experiment']`` and write its artefacts.

    Args:
        spec: built by ``tunemake.config.train_spec``: ``experiment``, ``epoch``, ``method``,
            ``train`` (optimisation settings, ``epochs``, ``gpus``, ``nodes``, ``nproc``...),
            ``base_model`` (path, dtype, trust_remote_code), ``data_dir``, ``template``,
            ``previous`` ({pth, state} of epoch n-1, or None), ``out`` ({pth, state, resume}),
            ``threads``, ``log_dir``.

    Returns:
        0 when the epoch is done, :data:`RESUME_EXIT_CODE` when interrupted (resume point written).

    Raises:
        TrainError: bad configuration, non-finite loss, pruned previous state.
    """
    spec = with_model_dirs(spec)
    check_spec(spec)
    train = spec["train"]
    dist = setup_processes(train.get("gpus") or 0)
    torch.set_num_threads(max(1, spec.get("threads", 1) // max(1, dist.world)))
    torch.use_deterministic_algorithms(dist.device.type == "cpu", warn_only=True)
    interrupt = Interrupt()
    started = time.perf_counter()

    previous = spec.get("previous")
    prev_ckpt = None
    if previous:
        state_dir = Path(previous["state"])
        if (state_dir / PRUNED_MARKER).exists():
            raise TrainError(
                f"{state_dir}: this resume state was pruned, so epoch {spec['epoch']} cannot start from it; "
                f"rebuild the previous epoch with snakemake --forcerun {previous['pth']}"
            )
        prev_ckpt = torch.load(previous["pth"], map_location="cpu", weights_only=True)
    fp = fingerprint(spec, prev_ckpt["fingerprint"] if prev_ckpt else None)

    rows = Rows(spec["data_dir"], "train")
    micro_per_epoch, steps_per_epoch = layout(rows.num_rows, train["batch_size"], dist.world, train["grad_accumulation"])
    epochs, epoch, accumulation = train["epochs"], spec["epoch"], train["grad_accumulation"]

    torch.manual_seed(train["seed"])
    model = build_model(spec, dist.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, train, dist.device)
    counters = {"global_step": 0, "tokens": 0, "trained_tokens": 0}
    if prev_ckpt:
        load_trainable(model, prev_ckpt["trainable"], previous["pth"])
        counters.update(prev_ckpt["counters"])
    engine = None
    ds_config = deepspeed_config(spec, dist.world)
    if ds_config:
        _init_deepspeed_comm(dist)
        import deepspeed

        offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu"
        if offload:
            # ZeRO-Offload steps the optimizer on the CPU with DeepSpeed's own Adam (compiled on
            # first use, then cached in ~/.cache/torch_extensions); same AdamW maths
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(params, lr=train["lr"], betas=tuple(train["betas"]),
                                         weight_decay=train["weight_decay"], eps=1e-8, adamw_mode=True)

        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        model, states = engine, DeepSpeedState(engine)
    else:
        states = TorchState(optimizer)
    if prev_ckpt:
        states.load(Path(previous["state"]), dist.rank)

    start_step, metrics_so_far = 0, {"loss_sum": 0.0, "loss_count": 0}
    resume_dir = Path(spec["out"]["resume"])
    if resume_dir.exists():
        meta_file = resume_dir / "meta.json"
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        if meta.get("fingerprint") == fp["fingerprint"] and meta.get("world") == dist.world:
            if engine is None:  # DeepSpeed restores the trainable weights with its own state
                load_trainable(model, torch.load(resume_dir / "trainable.pt", map_location="cpu", weights_only=True), str(resume_dir))
            states.load(resume_dir, dist.rank)
            start_step, counters, metrics_so_far = meta["epoch_step"], meta["counters"], meta["metrics"]
            if dist.main:
                log.info("resuming epoch %d at step %d/%d from %s", epoch, start_step, steps_per_epoch, resume_dir)
        elif dist.main:
            log.warning("%s: ignoring a resume point made with another config, data or code", resume_dir)

    amp_dtype = autocast_dtype(train["precision"], dist.device)
    if engine is None:
        model = step_model(model, spec, dist, amp_dtype)
    fast = fast_path(model) is not None
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    pad_id = _pad_id(spec)

    order = epoch_order(rows.num_rows, train["seed"], epoch)
    mine = order[dist.rank::dist.world][: micro_per_epoch * train["batch_size"]]
    metrics_file = Path(spec["log_dir"]) / f"epoch_{epoch}.metrics.jsonl"
    writer = _tensorboard(spec) if dist.main else None
    bar = _progress(steps_per_epoch, start_step, f"{spec['experiment']} epoch {epoch}", dist.main)
    model.train()
    step = start_step
    last_lr = 0.0
    with open(metrics_file, "a" if start_step else "w", encoding="utf-8") if dist.main else nullcontext() as metrics_out:
        while step < steps_per_epoch:
            t0 = time.perf_counter()
            global_step = (epoch - 1) * steps_per_epoch + step
            last_lr = train["lr"] * lr_factor(global_step, train["schedule"], steps_per_epoch, epochs)
            for group in optimizer.param_groups:
                group["lr"] = last_lr
            first, last = step * accumulation, min((step + 1) * accumulation, micro_per_epoch)
            step_loss, step_tokens, step_trained = torch.zeros(2), 0, 0
            for micro in range(first, last):
                torch.manual_seed(step_seed(train["seed"], epoch, micro * dist.world + dist.rank))
                indices = mine[micro * train["batch_size"]:(micro + 1) * train["batch_size"]]
                batch = {k: v.to(dist.device) for k, v in make_batch(rows, indices, pad_id, dense_mask=not fast).items()}
                if engine is not None:
                    # tunemake, not DeepSpeed, decides where an accumulation ends (the last
                    # optimizer step of an epoch may have fewer micro-batches)
                    engine.set_gradient_accumulation_boundary(micro == last - 1)
                    loss = engine(**batch, use_cache=False).loss
                    _check_finite(loss, epoch, step, global_step)
                    engine.backward(loss / (last - first), scale_wrt_gas=False)
                    engine.step()
                else:
                    sync = micro == last - 1 or dist.world == 1
                    with (nullcontext() if sync else model.no_sync()):
                        loss = micro_step(model, batch, amp_dtype, last - first, scaler)
                    _check_finite(loss, epoch, step, global_step)
                step_loss += torch.tensor([loss.item(), 1.0])
                step_tokens += int(batch["input_ids"].numel())
                step_trained += int((batch["labels"] != IGNORE_INDEX).sum())
            if engine is not None:
                grad_norm = engine.get_global_grad_norm() or 0.0
            else:
                grad_norm = optimizer_step(optimizer, params, train.get("max_grad_norm"), scaler)
            totals = dist.all_reduce(torch.tensor([step_loss[0].item(), step_loss[1].item(), step_tokens, step_trained, float(interrupt.requested)], dtype=torch.float64))
            loss_mean = totals[0].item() / max(1.0, totals[1].item())
            counters["global_step"] += 1
            counters["tokens"] += int(totals[2].item())
            counters["trained_tokens"] += int(totals[3].item())
            metrics_so_far["loss_sum"] += loss_mean
            metrics_so_far["loss_count"] += 1
            step += 1
            seconds = time.perf_counter() - t0
            if dist.main:
                record = {"epoch": epoch, "step": step, "global_step": counters["global_step"], "loss": loss_mean,
                          "lr": last_lr, "grad_norm": float(grad_norm), "tokens_per_s": totals[2].item() / seconds,
                          "memory_mb": _memory_mb(dist.device)}
                metrics_out.write(json.dumps(record) + "\n")
                metrics_out.flush()
                if writer:
                    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "memory_mb"):
                        writer.add_scalar(f"train/{key}", record[key], counters["global_step"])
                bar.set_postfix(loss=f"{loss_mean:.4f}", lr=f"{last_lr:.2e}")
                bar.update(1)
            stop = totals[4].item() > 0
            if step < steps_per_epoch and (stop or step % train["save_steps"] == 0):
                _save_resume_point(resume_dir, model, states, dist, fp, step, counters, metrics_so_far)
                if stop:
                    if dist.main:
                        log.warning("interrupted: resume point at step %d/%d in %s; rerun to continue", step, steps_per_epoch, resume_dir)
                    return RESUME_EXIT_CODE
    bar.close()

    heldout_loss = evaluate_heldout(model, spec, dist, pad_id, amp_dtype)
    samples = sample_generations(model, spec, dist) if dist.main else []
    epoch_metrics = {
        "train_loss": metrics_so_far["loss_sum"] / max(1, metrics_so_far["loss_count"]),
        "heldout_loss": heldout_loss,
        "lr_last": last_lr,
        "steps": steps_per_epoch,
        "seconds": time.perf_counter() - started,
        "samples": samples,
    }
    if dist.main:
        with open(metrics_file, "a", encoding="utf-8") as metrics_out:
            metrics_out.write(json.dumps({"epoch": epoch, "global_step": counters["global_step"], "end_of_epoch": True,
                                          **{k: v for k, v in epoch_metrics.items() if k != "seconds"}}) + "\n")
    state = trainable_state(model)
    _write_epoch(spec, dist, state, states, fp, counters, epoch_metrics, steps_per_epoch)
    if writer:
        if heldout_loss is not None:
            writer.add_scalar("heldout/loss", heldout_loss, counters["global_step"])
        for s in samples:
            writer.add_text(f"samples/{s['prompt'][:40]}", s["output"], counters["global_step"])
        writer.close()
    if dist.main:
        shutil.rmtree(resume_dir, ignore_errors=True)
        log.info("epoch %d done: train loss %.4f, held-out loss %s, %d steps in %.0f s", epoch,
                 epoch_metrics["train_loss"], f"{heldout_loss:.4f}" if heldout_loss is not None else "n/a",
                 steps_per_epoch, epoch_metrics["seconds"])
    dist.barrier()
    return 0


def _check_finite(loss: torch.Tensor, epoch: int, step: int, global_step: int) -> None:
    if not torch.isfinite(loss):
        raise TrainError(f"epoch {epoch}, step {step + 1} (global step {global_step + 1}): loss is {loss.item()}; "
                         "lower lr, check the data, or use fp32/bf16 instead of fp16")


def _pad_id(spec: dict) -> int:
    config = json.loads((Path(spec["base_model"]["dir"]) / "config.json").read_text())
    pad = config.get("pad_token_id")
    return pad if isinstance(pad, int) else 0


def _grad_norm(params) -> torch.Tensor:
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.tensor(0.0)


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except ImportError:
        return 0.0


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled, mininterval=1.0)


def _tensorboard(spec: dict):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard is not installed: metrics go to the JSONL file only")
        return None
    return SummaryWriter(str(Path(spec["log_dir"]) / "tensorboard"), filename_suffix=f".epoch_{spec['epoch']}")


def _save_resume_point(resume_dir: Path, model, states, dist: Dist, fp: dict, step: int, counters: dict, metrics: dict) -> None:
    """Every rank writes its optimizer shard into a shared temporary dir; rank 0 publishes it."""
    tmp = resume_dir.with_name(resume_dir.name + ".tmp")
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    states.save(tmp, dist.rank)
    dist.barrier()
    trainable = trainable_state(model)  # collective under ZeRO-3
    if dist.main:
        torch.save(trainable, tmp / "trainable.pt")
        write_json(tmp / "meta.json", {"fingerprint": fp["fingerprint"], "epoch_step": step, "world": dist.world,
                                       "counters": counters, "metrics": metrics})
        shutil.rmtree(resume_dir, ignore_errors=True)
        os.replace(tmp, resume_dir)
    dist.barrier()


def _write_epoch(spec, dist: Dist, state, states, fp, counters, metrics, steps_per_epoch) -> None:
    out_pth, out_state = Path(spec["out"]["pth"]), Path(spec["out"]["state"])
    tmp_state = out_state.with_name(out_state.name + ".tmp")
    if dist.main:
        shutil.rmtree(tmp_state, ignore_errors=True)
        tmp_state.mkdir(parents=True)
    dist.barrier()
    states.save(tmp_state, dist.rank)
    torch.save({"torch": torch.get_rng_state()}, tmp_state / f"rng.rank{dist.rank}.pt")
    dist.barrier()
    if not dist.main:
        return
    write_json(tmp_state / "meta.json", {"fingerprint": fp["fingerprint"], "world": dist.world, "epoch": spec["epoch"]})
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "experiment": spec["experiment"],
        "epoch": spec["epoch"],
        "method": spec["method"],
        "base_model": spec["base_model"]["path"],
        "template": spec.get("template"),
        "trainable": state,
        "counters": {**counters, "steps_per_epoch": steps_per_epoch},
        "fingerprint": fp["fingerprint"],
        "fingerprint_parts": fp,
        "versions": library_versions(),
        "metrics": metrics,
    }
    with atomic_file(out_pth, "wb") as handle:
        torch.save(checkpoint, handle)
    if out_state.exists():
        shutil.rmtree(out_state)
    os.replace(tmp_state, out_state)


@torch.no_grad()
def evaluate_heldout(model, spec: dict, dist: Dist, pad_id: int, amp_dtype) -> float | None:
    """Mean loss per labelled token over the held-out split (sharded over processes)."""
    import datasets

    if len(datasets.load_from_disk(spec["data_dir"])["heldout"]) == 0:
        return None
    rows = Rows(spec["data_dir"], "heldout")
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    batch_size = max(1, spec["train"]["batch_size"])
    mine = np.arange(rows.num_rows)[dist.rank::dist.world]
    forward = unwrap(model) if fast_path(model) else model  # the fast path returns no logits
    for start in range(0, len(mine), batch_size):
        batch = {k: v.to(dist.device) for k, v in make_batch(rows, mine[start:start + batch_size], pad_id).items()}
        with torch.autocast(dist.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = forward(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                           attention_mask=batch["attention_mask"], use_cache=False).logits.float()
        targets = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), targets.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum")
        totals += torch.tensor([losses.item(), float((targets != IGNORE_INDEX).sum())], dtype=torch.float64)
    dist.all_reduce(totals)
    model.train()
    return totals[0].item() / max(1.0, totals[1].item())


@torch.no_grad()
def sample_generations(model, spec: dict, dist: Dist, max_new_tokens: int = 48) -> list[dict]:
    """Greedy answers to the experiment's ``evaluation_inputs`` (XTuner's sample generations).

    Prompts and stops are evaluate's and chat's (:func:`tunemake.encode.prompt_ids`,
    :func:`tunemake.encode.generation_stops`): the answer ends at eos or a one-token stop word and
    is cut at a stop word of several tokens.
    """
    prompts = spec["train"].get("evaluation_inputs") or []
    if not prompts:
        return []
    from tunemake.encode import answer_text, generation_stops, prompt_ids
    from tunemake.templates import HF, Template

    tokenizer = load_tokenizer(spec)
    template = spec["template"]
    template = HF if template["name"] == HF else Template(**template)
    inner = unwrap(model)
    stops = generation_stops(tokenizer, template, getattr(inner.generation_config, "eos_token_id", None))
    inner.eval()
    samples = []
    for prompt in prompts:
        _, ids = prompt_ids([{"system": "", "input": prompt, "output": ""}], template, tokenizer)
        input_ids = torch.tensor([ids], device=dist.device)
        out = inner.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=stops.ids or None, pad_token_id=tokenizer.pad_token_id or 0)
        samples.append({"prompt": prompt, "output": answer_text(out[0, len(ids):].tolist(), tokenizer, stops)})
    inner.train()
    return samples


def prune_state(state_dir: str | os.PathLike) -> int:
    """Replace an epoch's resume state with a small stub; return the bytes freed.

    The directory and its timestamps stay, so Snakemake sees nothing to rebuild; only a later
    epoch that must re-run from this state stops, with an error saying to rebuild this epoch.
    """
    state_dir = Path(state_dir)
    if not state_dir.is_dir() or (state_dir / PRUNED_MARKER).exists():
        return 0
    stat = state_dir.stat()
    freed = 0
    for path in state_dir.iterdir():
        if path.name.startswith(".snakemake"):
            continue
        freed += path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    marker = state_dir / PRUNED_MARKER
    marker.write_text("optimizer state pruned by `tunemake prune-state`; rebuild this epoch to extend from it\n")
    os.utime(marker, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.utime(state_dir, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return freed


def main(argv: list[str] | None = None) -> int:
    """``python -m tunemake.train SPEC.json``: what torchrun runs in each process."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    with open(argv[0], encoding="utf-8") as handle:
        spec = json.load(handle)
    try:
        return train_epoch(spec)
    except TunemakeError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
