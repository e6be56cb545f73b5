"""The model a training process steps: the base model loaded on its device, with the method applied
(LoRA / QLoRA through PEFT, or every weight trainable), and its trainable weights in and out."""

from __future__ import annotations

from pathlib import Path

import torch

from tunemake.config import DTYPE_BYTES
from tunemake.hub import load_pretrained
from tunemake.train.spec import BaseModel, Method, TrainError


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


def build_model(method: Method, base: BaseModel, device: torch.device, precision: str = "fp32"):
    """The base model with the method applied; trainable parameters in fp32. ``precision``: the
    training's (QLoRA computes in its autocast dtype)."""
    from transformers import AutoModelForCausalLM

    base = base.resolved()
    kwargs = {"dtype": torch_dtype(base.dtype, device), "trust_remote_code": base.trust_remote_code}
    if method.type == "qlora":
        kwargs["quantization_config"] = _quantization(method, autocast_dtype(precision, device) or torch.float32)
    if device.type == "cuda" or method.type == "qlora":
        # each process loads the weights shard by shard straight onto its device: no whole copy of
        # the model in host memory per process
        kwargs["device_map"] = {"": device}
    model = load_pretrained(AutoModelForCausalLM, base.dir, base.path, **kwargs)
    if method.type != "qlora":
        model.to(device)
    model.config.use_cache = False
    if method.type == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=method.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif method.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if method.type == "lora":
            model.enable_input_require_grads()
    if method.adapter:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(method, model))
    if device.type == "cpu":
        _disable_bnb_cpu_repacking(model)
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model

def empty_model(method: Method, base: BaseModel, dtype: str = "float32"):
    """The model :func:`build_model` makes for ``method`` (unquantized), on the meta device, in
    ``dtype``: its config, names, shapes and adapter structure, and no weight read. What convert
    writes an artefact from, without the base model's memory."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    base = base.resolved()
    config = load_pretrained(AutoConfig, base.dir, base.path, trust_remote_code=base.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype),
                                                 trust_remote_code=base.trust_remote_code)
    if (Path(base.dir) / "generation_config.json").is_file():  # as from_pretrained reads it
        model.generation_config = GenerationConfig.from_pretrained(base.dir)
    model.config.use_cache = False
    if method.adapter:
        from peft import get_peft_model

        with torch.device("meta"):
            model = get_peft_model(model, lora_config(method, model))
    return model


def _quantization(method: Method, compute_dtype):
    from transformers import BitsAndBytesConfig

    if method.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=method.quant_type,
                              bnb_4bit_use_double_quant=method.double_quant, bnb_4bit_compute_dtype=compute_dtype,
                              llm_int8_threshold=6.0)


def lora_config(method: Method, model):
    """PEFT's ``LoraConfig`` for ``method`` on ``model`` (whose linear layers ``all-linear`` names)."""
    from peft import LoraConfig

    targets = method.target_modules
    return LoraConfig(r=method.r, lora_alpha=method.alpha, lora_dropout=method.dropout, bias=method.bias,
                      task_type="CAUSAL_LM",
                      target_modules=lora_targets(model) if targets == "all-linear" else list(targets),
                      modules_to_save=list(method.modules_to_save) or None)


def _layers(model):
    """The model and what it wraps, outermost first: DDP or a DeepSpeed engine, the fast path, the
    model ``build_model`` made."""
    yield model
    while type(model).__name__ in ("DistributedDataParallel", "DeepSpeedEngine", "FastCausalLM"):
        model = model.module
        yield model


def fast_path(model):
    """The :class:`tunemake.train.fast.FastCausalLM` the step runs through, or None."""
    return next((m for m in _layers(model) if type(m).__name__ == "FastCausalLM"), None)


def unwrap(model):
    """The model ``build_model`` made, from inside DDP, a DeepSpeed engine or the fast path."""
    *_, inner = _layers(model)
    return inner


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


def check_trainable(model, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise unless ``state`` holds each trainable weight of ``model``, in its shape, and no other.

    Raises:
        TrainError: naming ``source`` and a missing, unexpected or misshapen weight.
    """
    params = dict(unwrap(model).named_parameters())
    missing = [name for name, p in params.items() if p.requires_grad and name not in state]
    unexpected = [name for name in state if name not in params]
    misshapen = [f"{name} {list(t.shape)}, not {list(params[name].shape)}" for name, t in state.items()
                 if name in params and t.shape != params[name].shape]
    if missing or unexpected or misshapen:
        raise TrainError(
            f"{source}: its weights do not fit this experiment's model "
            f"({len(missing)} missing, e.g. {missing[:1]}; {len(unexpected)} unexpected, e.g. {unexpected[:1]}"
            + (f"; {len(misshapen)} of another shape, e.g. {misshapen[0]}" if misshapen else "") + ")"
        )


def load_trainable(model, state: dict[str, torch.Tensor], source: str) -> None:
    check_trainable(model, state, source)
    params = dict(unwrap(model).named_parameters())
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)
