"""The model a training process steps: the base model loaded on its device, with the method applied
(LoRA / QLoRA through PEFT, or every weight trainable), and its trainable weights in and out.

Under ZeRO-3 the base model is built partitioned (``deepspeed.zero.Init``) and its weights read
from the safetensors files one tensor at a time, so no process ever holds the whole model; the
trainable weights go in and out one gathered tensor at a time (:func:`gathered`).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import torch

from tunemake.config import DTYPE_BYTES, QLORA_ZERO3
from tunemake.hub import load_pretrained
from tunemake.train.spec import BaseModel, Method, TrainError

log = logging.getLogger("tunemake.train")


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


def build_model(method: Method, base: BaseModel, device: torch.device, precision: str = "fp32", partitioned=None):
    """The base model with the method applied; trainable parameters in fp32. ``precision``: the
    training's (QLoRA computes in its autocast dtype).

    ``partitioned``: ZeRO-3's ``deepspeed.zero.Init`` context (from
    :func:`tunemake.train.engine.partition_context`; torch.distributed set up): each parameter is
    split over the processes as its module is made, in the DeepSpeed config's precision, and the
    base weights are read tensor by tensor (:func:`load_weights`). Not supported with QLoRA.
    """
    base = base.resolved()
    if partitioned is not None:
        if method.type == "qlora":
            raise TrainError(f"deepspeed: {QLORA_ZERO3}")  # a JSON file changed since the config was read
        model = _from_config(base, None, partitioned)
        load_weights(model, Path(base.dir))
        _log_partition(model)
    else:
        model = _load(method, base, device, precision)
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
        # DeepSpeed keeps its own float32 copy of a partitioned parameter
        if param.requires_grad and param.dtype != torch.float32 and not is_partitioned(param):
            param.data = param.data.float()
    return model


def _log_partition(model) -> None:
    params = list(model.parameters())
    here = sum(p.ds_tensor.numel() for p in params if is_partitioned(p))
    total = sum(p.ds_numel if is_partitioned(p) else p.numel() for p in params)
    if _is_main():
        log.info("ZeRO-3: the model is partitioned over %d processes, %.2fM of its %.2fM parameters in this one",
                 torch.distributed.get_world_size(), here / 1e6, total / 1e6)


def _load(method: Method, base: BaseModel, device: torch.device, precision: str):
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch_dtype(base.dtype, device), "trust_remote_code": base.trust_remote_code}
    if method.type == "qlora":
        kwargs["quantization_config"] = _quantization(method, autocast_dtype(precision, device) or torch.float32)
    if device.type == "cuda" or method.type == "qlora":
        # each process loads the weights shard by shard straight onto its device: no whole copy of
        # the model in host memory per process
        kwargs["device_map"] = {"": device}
    model = load_pretrained(AutoModelForCausalLM, base.dir, base.path, **kwargs)
    return model if method.type == "qlora" else model.to(device)


def _from_config(base: BaseModel, dtype, partitioned):
    """The model of ``base``'s config, its weights not initialised, made inside ``partitioned``
    (ZeRO-3's context) or else on the meta device; with the base's generation config."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.initialization import no_init_weights

    config = load_pretrained(AutoConfig, base.dir, base.path, trust_remote_code=base.trust_remote_code)
    if partitioned is not None:
        _import_model_code(config)
    with partitioned or torch.device("meta"), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=base.trust_remote_code)
    model.tie_weights()  # skipped with the initialisation
    if (Path(base.dir) / "generation_config.json").is_file():  # as from_pretrained reads it
        model.generation_config = GenerationConfig.from_pretrained(base.dir)
    return model


def empty_model(method: Method, base: BaseModel, dtype: str = "float32"):
    """The model :func:`build_model` makes for ``method`` (unquantized), on the meta device, in
    ``dtype``: its config, names, shapes and adapter structure, and no weight read. What convert
    writes an artefact from, without the base model's memory."""
    model = _from_config(base.resolved(), getattr(torch, dtype), None)
    model.config.use_cache = False
    if method.adapter:
        from peft import get_peft_model

        with torch.device("meta"):
            model = get_peft_model(model, lora_config(method, model))
    return model


def _import_model_code(config) -> None:
    # ZeRO-3's zero.Init patches torch's tensor constructors, which breaks modules first imported
    # inside it (torch._dynamo's, imported by transformers' generation code): import them before
    import torch._dynamo  # noqa: F401
    import transformers.generation  # noqa: F401
    from transformers import AutoModelForCausalLM

    if type(config) in AutoModelForCausalLM._model_mapping:
        AutoModelForCausalLM._model_mapping[type(config)]  # imports the model's module


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


def is_partitioned(param) -> bool:
    """Whether ``param`` is split over the processes by ZeRO-3 (its local data is a placeholder)."""
    return hasattr(param, "ds_id")


def is_partitioned_model(model) -> bool:
    return any(is_partitioned(p) for p in unwrap(model).parameters())


def full_shape(param) -> tuple[int, ...]:
    return tuple(param.ds_shape if is_partitioned(param) else param.shape)


@contextmanager
def gathered(params, modify: bool = False):
    """Inside the block, ZeRO-3-partitioned ``params`` are whole on every process (every process
    must enter, in the same order); with ``modify``, what the main process writes into them is
    kept. Other parameters are left as they are."""
    params = [p for p in params if is_partitioned(p)]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
        yield


def _is_main() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def load_weights(model, directory: Path) -> None:
    """Copy the weights stored in ``directory``'s safetensors files into ``model``'s parameters
    and persistent buffers, matched by name, one tensor at a time (ZeRO-3: read by the main
    process, gathered, kept partitioned): no process holds more than one whole tensor. Every
    process must call.

    Supported: checkpoints whose tensor names are the model's own (``save_pretrained``'s); not
    models that transformers loads through key or weight conversions.

    Raises:
        TrainError: a weight the files lack (naming it), or one stored in another shape.
    """
    from tqdm import tqdm

    from tunemake.shards import model_tensors, read_tensor

    stored = model_tensors(directory, TrainError)
    targets = dict(model.named_parameters())
    targets.update((name, b) for name, b in model.named_buffers() if name in stored)
    missing = [name for name in targets if name not in stored]
    if missing:
        raise TrainError(
            f"{directory}: no stored tensor named {missing[0]}" + (f" (and {len(missing) - 1} more)" if missing[1:] else "")
            + "; ZeRO-3 reads weights by their names in the model, which this model's checkpoint does not use: "
            "use zero2, or re-save the model with save_pretrained")
    main = _is_main()
    for name, target in tqdm(targets.items(), desc="loading weights", unit="tensor", disable=not main):
        if tuple(stored[name].shape) != full_shape(target):
            raise TrainError(f"{directory}: {name} is stored as {list(stored[name].shape)}, "
                             f"the model's is {list(full_shape(target))}")
        with gathered([target], modify=True), torch.no_grad():
            if main or not is_partitioned(target):
                target.data.copy_(read_tensor(stored[name]))


def trainable_params(model) -> list[tuple[str, torch.nn.Parameter]]:
    """The trainable parameters of the model ``build_model`` made (for LoRA: only the adapter), by name."""
    return [(name, p) for name, p in unwrap(model).named_parameters() if p.requires_grad]


def trainable_state(model) -> dict[str, torch.Tensor]:
    """Trainable parameters by name, detached copies on the CPU (ZeRO-3: gathered one at a time;
    every process must call). For small states and tests: a checkpoint is written without holding
    them all (:func:`tunemake.train.checkpoint.save_with_trainable`)."""
    state = {}
    for name, param in trainable_params(model):
        with gathered([param]):
            state[name] = param.detach().to("cpu", copy=True)
    return state


def check_trainable(model, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise unless ``state`` holds each trainable weight of ``model``, in its shape, and no other.

    Raises:
        TrainError: naming ``source`` and a missing, unexpected or misshapen weight.
    """
    params = dict(unwrap(model).named_parameters())
    missing = [name for name, p in params.items() if p.requires_grad and name not in state]
    unexpected = [name for name in state if name not in params]
    misshapen = [f"{name} {list(t.shape)}, not {list(full_shape(params[name]))}" for name, t in state.items()
                 if name in params and tuple(t.shape) != full_shape(params[name])]
    if missing or unexpected or misshapen:
        raise TrainError(
            f"{source}: its weights do not fit this experiment's model "
            f"({len(missing)} missing, e.g. {missing[:1]}; {len(unexpected)} unexpected, e.g. {unexpected[:1]}"
            + (f"; {len(misshapen)} of another shape, e.g. {misshapen[0]}" if misshapen else "") + ")"
        )


def load_trainable(model, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` (e.g. a checkpoint loaded with ``mmap=True``) into the model's trainable
    weights one tensor at a time (ZeRO-3: through the main process; every process must call)."""
    check_trainable(model, state, source)
    params = dict(unwrap(model).named_parameters())
    for name, tensor in state.items():
        with gathered([params[name]], modify=True), torch.no_grad():
            params[name].data.copy_(tensor)
