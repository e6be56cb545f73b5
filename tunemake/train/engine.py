"""The distributed engine: how a training process steps its model, behind one small interface.

:func:`route` decides, in one place, whether the step goes through the CUDA fast path
(``tunemake.train.fast``) or the model's own forward, and how batches reach the model.
:class:`TorchEngine` is torch's AdamW, inside DDP when there are several processes;
:class:`DeepSpeedEngine` is a DeepSpeed engine with ZeRO 1/2/3 (+ offload), by preset name or JSON
file, "auto" fields filled from the experiment (the torch AdamW is handed to DeepSpeed, so no
optimizer is compiled). Both take the fast path where :func:`route` does, and answer
:class:`Engine`: forward and backward of a micro-batch, an optimizer step, its state saved and
loaded.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple, Protocol

import torch

from tunemake.config import DEEPSPEED_PRESETS
from tunemake.train import documents
from tunemake.train.launch import Dist
from tunemake.train.spec import Method, Settings, TrainError

log = logging.getLogger("tunemake.train")


class Engine(Protocol):
    """What the epoch loop steps."""

    #: what forwards a batch: the model, inside DDP, a DeepSpeed engine or the fast path
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer

    #: the way the step goes and the layout batches take (:func:`route`)
    route: Route

    def forward_backward(self, batch: dict, micro_batches: int, boundary: bool) -> torch.Tensor:
        """Add one micro-batch's gradients (of ``micro_batches`` in this step; ``boundary``: the
        last); returns its mean loss, detached."""

    def step(self) -> torch.Tensor | float:
        """The optimizer step at the end of an accumulation; returns the gradient norm before clipping."""

    def save_state(self, directory: Path, rank: int) -> None: ...

    def load_state(self, directory: Path, rank: int) -> None: ...


def make_engine(model, method: Method, train: Settings, dist: Dist, amp_dtype, state_dir: Path | None = None) -> Engine:
    """The engine the experiment asks for around ``model`` (built by
    :func:`tunemake.train.model.build_model`, trainable weights loaded), with its optimizer state
    loaded from ``state_dir`` when given."""
    ds_config = deepspeed_config(train, dist.world)
    stage = ds_config.get("zero_optimization", {}).get("stage", 0) if ds_config else None
    way = route(model, dist.device, amp_dtype, stage)
    stepped = step_model(model, dist, amp_dtype, method.gradient_checkpointing, stage, way)
    if ds_config:
        engine = DeepSpeedEngine(stepped, train, dist, ds_config)
    else:
        engine = TorchEngine(stepped, train, dist, amp_dtype)
    engine.route = way
    if state_dir is not None:
        engine.load_state(state_dir, dist.rank)
    return engine


def partition_context(train: Settings, dist: Dist):
    """ZeRO-3's ``deepspeed.zero.Init``, in which :func:`tunemake.train.model.build_model` makes
    the model partitioned over the processes; None without ZeRO-3."""
    config = deepspeed_config(train, dist.world)
    if not config or config.get("zero_optimization", {}).get("stage") != 3:
        return None
    _init_deepspeed_comm(dist)
    import deepspeed

    return deepspeed.zero.Init(config_dict_or_path=config)


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class TorchEngine:
    """torch's AdamW (fused on CUDA), DDP across processes, the fast path where it serves."""

    def __init__(self, model, train: Settings, dist: Dist, amp_dtype):
        """``model``: what :func:`step_model` made (the fast path, DDP)."""
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, train, dist.device)
        self.model = model
        self.dist, self.amp_dtype, self.max_grad_norm = dist, amp_dtype, train.max_grad_norm
        self.scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    def forward_backward(self, batch: dict, micro_batches: int, boundary: bool) -> torch.Tensor:
        sync = boundary or self.dist.world == 1
        with nullcontext() if sync else self.model.no_sync():
            return micro_step(self.model, batch, self.amp_dtype, micro_batches, self.scaler)

    def step(self) -> torch.Tensor:
        return optimizer_step(self.optimizer, self.params, self.max_grad_norm, self.scaler)

    def save_state(self, directory: Path, rank: int) -> None:
        torch.save(self.optimizer.state_dict(), directory / f"optimizer.rank{rank}.pt")

    def load_state(self, directory: Path, rank: int) -> None:
        self.optimizer.load_state_dict(torch.load(directory / f"optimizer.rank{rank}.pt", map_location="cpu",
                                                  weights_only=True))


class DeepSpeedEngine:
    """A DeepSpeed engine; its checkpoints (one shard per rank) hold the trainable weights too."""

    TAG = "deepspeed"

    def __init__(self, model, train: Settings, dist: Dist, ds_config: dict):
        """``model``: what :func:`step_model` made (the fast path, or the model)."""
        _init_deepspeed_comm(dist)
        import deepspeed

        params = [p for p in model.parameters() if p.requires_grad]
        offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu"
        if offload:
            # ZeRO-Offload steps the optimizer on the CPU with DeepSpeed's own Adam (compiled on
            # first use, then cached in ~/.cache/torch_extensions); same AdamW maths
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(params, lr=train.lr, betas=train.betas, weight_decay=train.weight_decay,
                                         eps=1e-8, adamw_mode=True)
        else:
            optimizer = make_optimizer(params, train, dist.device)
        config = size_buckets(ds_config, sum(p.numel() for p in params))
        self.model, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)

    def forward_backward(self, batch: dict, micro_batches: int, boundary: bool) -> torch.Tensor:
        # tunemake, not DeepSpeed, decides where an accumulation ends (the last optimizer step of
        # an epoch may have fewer micro-batches)
        self.model.set_gradient_accumulation_boundary(boundary)
        loss = self.model(**batch, use_cache=False).loss
        self.model.backward(loss / micro_batches, scale_wrt_gas=False)
        self.model.step()  # steps the optimizer at the boundary only
        return loss.detach()

    def step(self) -> float:
        return self.model.get_global_grad_norm() or 0.0

    def save_state(self, directory: Path, rank: int) -> None:
        self.model.save_checkpoint(str(directory), tag=self.TAG, exclude_frozen_parameters=True)

    def load_state(self, directory: Path, rank: int) -> None:
        self.model.load_checkpoint(str(directory), tag=self.TAG, load_module_strict=False,
                                   load_optimizer_states=True, load_lr_scheduler_states=False)


def deepspeed_config(train: Settings, world: int) -> dict | None:
    """The experiment's DeepSpeed config with every "auto" field filled, or None without DeepSpeed."""
    name = train.deepspeed
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
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accumulation,
        "train_batch_size": train.batch_size * train.grad_accumulation * world,
        "gradient_clipping": train.max_grad_norm or 0.0,
    }
    for key, value in filled.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
    precision = train.precision
    for key, wanted in (("bf16", precision == "bf16"), ("fp16", precision == "fp16")):
        section = config.setdefault(key, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = wanted
    if precision == "bf16" and "check_grad_overflow" not in config["bf16"] and _has_overflow_switch():
        # bf16 has fp32's exponent range and no loss scale: DeepSpeed's check of every gradient
        # tensor for inf/nan before each step only costs CPU time (docs/gpu.md); the epoch loop
        # stops on a non-finite loss itself.
        config["bf16"]["check_grad_overflow"] = False
    config.setdefault("steps_per_print", 10**9)
    config.setdefault("wall_clock_breakdown", False)
    return config


# DeepSpeed's default for ZeRO-1/2's reduce and all-gather buckets, in elements
_BUCKET = 500_000_000


def size_buckets(config: dict, trainable: int) -> dict:
    """``config`` with ZeRO-1/2's bucket sizes no larger than the ``trainable`` elements, where the
    config leaves them unset or "auto".

    DeepSpeed allocates each bucket at its full size (twice with ``overlap_comm``) whatever the
    model: 4 GB for a LoRA of 100k parameters in fp32. Every gradient still fits one bucket, as
    with the default, so the reduction and the numbers are the same. ZeRO-3 keeps its own sizes.
    """
    zero = config.get("zero_optimization", {})
    if zero.get("stage") not in (1, 2):
        return config
    sized = {key: min(_BUCKET, trainable) for key in ("reduce_bucket_size", "allgather_bucket_size")
             if zero.get(key, "auto") == "auto"}
    return {**config, "zero_optimization": {**zero, **sized}}


def _has_overflow_switch() -> bool:
    """Whether this DeepSpeed's bf16 section takes ``check_grad_overflow`` (0.18 on)."""
    try:
        from deepspeed.runtime.precision_config import DeepSpeedBF16Config
    except ImportError:
        return False
    return "check_grad_overflow" in DeepSpeedBF16Config.model_fields


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


def make_optimizer(params, train: Settings, device: torch.device):
    """AdamW over the trainable parameters; torch's fused kernel on CUDA (one launch per step)."""
    return torch.optim.AdamW(params, lr=train.lr, betas=train.betas, weight_decay=train.weight_decay,
                             eps=1e-8, fused=device.type == "cuda" or None)


class Route(NamedTuple):
    """Which way a training step goes (:func:`route`)."""

    fast: bool  #: through :class:`tunemake.train.fast.FastCausalLM`
    layout: str  #: how batches reach the model (:mod:`tunemake.train.documents`)
    why: str  #: said in the log at the start of every epoch
    liger: dict | None = None  #: Liger-Kernel's arguments for the model's own forward (:mod:`tunemake.train.liger`)


def route(model, device: torch.device, amp_dtype, zero_stage: int | None = None) -> Route:
    """The way ``model`` (as ``build_model`` made it) trains on ``device``: the CUDA fast path where
    it supports the model and its weights are whole on every process (without DeepSpeed, ZeRO-1
    and ZeRO-2; ``zero_stage`` None: no DeepSpeed), else the model's own forward, its packed rows
    as documents, with Liger-Kernel where it applies (:mod:`tunemake.train.liger`).
    ``TUNEMAKE_FAST=0`` in the environment turns the fast path off."""
    from tunemake.train import fast, liger

    if device.type != "cuda":
        reason = "it runs on CUDA only"
    elif os.environ.get("TUNEMAKE_FAST", "1") == "0":
        reason = "TUNEMAKE_FAST=0"
    elif zero_stage == 3:
        reason = "ZeRO-3 partitions the weights it reads whole"
    else:
        reason = fast.unsupported(model, amp_dtype or torch.float32)  # no autocast: fp32
        if reason:
            reason = f"it does not support {reason}"
    if reason is None:
        return Route(True, documents.ROWS, "training through the fast path")
    layout = documents.layout_for(model, fast=False)
    if layout == documents.FLAT:
        how = f"documents in one flat row, attention {documents.attention_for(model, amp_dtype)}"
    else:
        how = "documents as a padded batch (its code does not use transformers' attention interface)"
    why = f"training through the model's own forward, {how}; not the fast path: {reason}"
    kernels = liger.plan(model, device, zero_stage)
    return Route(False, layout, f"{why}; {liger.describe(kernels)}" if kernels else why, kernels)


def step_model(model, dist: Dist, amp_dtype, checkpoint: bool = False, zero_stage: int | None = None,
               way: Route | None = None):
    """What the step calls: the fast path around ``model`` where :func:`route` (or ``way``, what it
    returned) takes it, else the model with Liger-Kernel applied where the route says; inside DDP
    when there are several processes and no DeepSpeed (``zero_stage`` None)."""
    way = way or route(model, dist.device, amp_dtype, zero_stage)
    if way.fast:
        from tunemake.train import fast

        model = fast.FastCausalLM(model, amp_dtype, checkpoint=checkpoint)
    elif way.liger:
        from tunemake.train import liger

        liger.apply(model, way.liger)
    if dist.world > 1 and zero_stage is None:
        from torch.nn.parallel import DistributedDataParallel

        # gradients as views into DDP's buckets: no copy into the buckets and no second copy of the
        # gradients (faster on 2x H200 in every run, docs/performance.md)
        model = DistributedDataParallel(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
                                        gradient_as_bucket_view=True)
    return model


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


def _grad_norm(params) -> torch.Tensor:
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.tensor(0.0)
