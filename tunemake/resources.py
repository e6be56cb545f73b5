"""What each of an experiment's cluster jobs asks for: threads, host memory, runtime, GPU memory.

Entry point :func:`estimate_resources`, called by ``rules/common.smk`` for every rule's
``threads`` / ``resources`` (and usable from a shell to size a cluster job before submitting it).

Estimated, from the model's shape and the experiment:

- The model's shape comes from its ``config.json`` (a local directory, or a hub id's snapshot in
  the local Hugging Face cache), from ``demo:`` for a model the workflow builds, from safetensors
  headers when there is no ``config.json``, and last from a size in the hub id (``...-7b``, ``8B``).
  Nothing is downloaded and torch is never imported: this runs while Snakemake builds the DAG.
- Per-GPU training memory, as tunemake's training loop holds it: a full fine-tune keeps float32
  weights, gradients and two Adam moments (16 bytes a parameter, 16 with DeepSpeed's bf16/fp16
  mixed precision too); LoRA keeps the base in its dtype, QLoRA in 4 or 8 bits (embeddings, head
  and norms upcast to float32); trainable parameters cost 16 bytes each; ZeRO stages 1/2/3 shard
  optimizer states / gradients / weights over every GPU of the job (ZeRO-3 adds the parameters it
  gathers, up to the presets' ``stage3_max_live_parameters``), ``*_offload`` moves them to host
  memory; activations from ``batch_size * max_length`` tokens (layer inputs only with gradient
  checkpointing), float32 logits, and a fixed CUDA overhead.
- Host memory per node: each training process loads the model shard by shard straight onto its
  GPU (about one safetensors shard in host memory), under ZeRO-3 tensor by tensor keeping its
  partition, plus offloaded ZeRO states; training on the CPU (no GPU asked for) holds its training
  state there (under ZeRO-3 its partition). Convert holds the checkpoint (float32
  trainable weights: the adapter, or every weight of a full fine-tune) and never the base model;
  merge streams, so it holds about the adapter; evaluate loads the model once.
- Evaluation's GPUs: the fewest of the experiment's GPUs on one node (none when it trains on the
  CPU) that each hold their share of the bf16 weights, a whole batch's KV cache and logits, and
  the CUDA overhead, within :data:`LARGEST_COMMON_GPU_MB`; ``tunemake.evaluate`` spreads the
  weights layer by layer over them the same way.
- Training runtime per epoch (one job per epoch) from the templated dataset's token count
  (``stats.json`` once built, else its local sources' size at about 4 bytes a token) and
  6 (full) or 4 (LoRA, +2 with gradient checkpointing) FLOPs per parameter per token, at a
  deliberately low effective rate (:data:`GPU_FLOPS`, :data:`CPU_FLOPS_PER_THREAD`), doubled;
  :data:`DEFAULT_TRAIN_RUNTIME` when the tokens are not known yet (a hub dataset, data not built).

Not estimated: the memory of custom model code (``trust_remote_code``), mixture-of-experts routing,
vision towers, the attention matrix of eager attention (SDPA is assumed), and what a given GPU
actually holds: every GPU is taken to hold :data:`LARGEST_COMMON_GPU_MB` (an experiment on smaller
cards sets ``resources.evaluate.gpus``), ``gpu_mem_mb`` is reported, and a warning names
experiments that need more, but nothing is refused. Every estimate is rounded up; an experiment's
``resources:`` keys replace them (see the config schema for precedence against profiles).
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from tunemake.config import DEEPSPEED_PRESETS, DTYPE_BYTES, ZERO3_LIVE_PARAMETERS
from tunemake.errors import ConfigError
from tunemake.hub import HubError, model_dir

MB = 2**20

#: Training runtime (minutes) when the number of tokens is not known at DAG time.
DEFAULT_TRAIN_RUNTIME = 24 * 60
#: Effective training throughput of one GPU (FLOP/s): about a third of an A100's bf16 peak.
GPU_FLOPS = 100e12
#: Effective training throughput of one CPU thread (FLOP/s).
CPU_FLOPS_PER_THREAD = 20e9
#: Reading weights from a shared filesystem (bytes/s).
READ_BYTES_PER_S = 300 * MB
#: The memory of one GPU as the estimates take it (80 GB: an A100's or H100's). Training warns above
#: it; evaluation asks for as many GPUs as it takes to stay under it.
LARGEST_COMMON_GPU_MB = 80 * 1000**3 // MB
#: What a Python process with torch (and the CUDA libraries) holds before any model, in MB.
PROCESS_MB = 3000
#: What a write streamed a slice at a time holds beyond its inputs (``tunemake.shards``' buffers), in MB.
STREAM_MB = 100
#: CUDA context and allocator reserve per GPU, in MB.
CUDA_MB = 1500
#: Host estimates are raised by this much: Slurm kills a job that crosses its --mem.
HOST_MARGIN = 1.2
#: CPU threads a training job asks for per GPU (data loading, the optimizer step of an offload).
THREADS_PER_GPU = 4

#: Per layer (input, output) width of the linear modules LoRA targets, by module name, as
#: functions of the shape. Unknown names count as hidden -> hidden.
_LINEAR_SHAPES = {
    "q_proj": lambda s: (s.hidden, s.q_dim), "k_proj": lambda s: (s.hidden, s.kv_dim),
    "v_proj": lambda s: (s.hidden, s.kv_dim), "o_proj": lambda s: (s.q_dim, s.hidden),
    "gate_proj": lambda s: (s.hidden, s.intermediate), "up_proj": lambda s: (s.hidden, s.intermediate),
    "down_proj": lambda s: (s.intermediate, s.hidden),
    # InternLM2
    "wqkv": lambda s: (s.hidden, s.q_dim + 2 * s.kv_dim), "wo": lambda s: (s.q_dim, s.hidden),
    "w1": lambda s: (s.hidden, s.intermediate), "w3": lambda s: (s.hidden, s.intermediate),
    "w2": lambda s: (s.intermediate, s.hidden),
}
_LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shape:
    """A decoder-only transformer's size, as far as memory and FLOPs go."""

    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    source: str  # where the numbers came from, for messages
    stored: int | None = None  # the parameter count, where it was read rather than derived

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def linear_parameters(self) -> int:
        """Parameters of the decoder layers' linear modules (what QLoRA quantizes)."""
        attention = 2 * self.hidden * self.q_dim + 2 * self.hidden * self.kv_dim
        return self.layers * (attention + 3 * self.hidden * self.intermediate)

    @property
    def embedding_parameters(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def largest_module_parameters(self) -> int:
        """Parameters of the largest piece a device map keeps whole: a decoder layer, or the embeddings."""
        return max(self.linear_parameters // self.layers, self.vocab * self.hidden)

    @property
    def parameters(self) -> int:
        if self.stored is not None:
            return self.stored
        norms = (2 * self.layers + 1) * self.hidden
        return self.linear_parameters + self.embedding_parameters + norms


def estimate_resources(exp: dict, config: dict) -> dict[str, dict]:
    """Resource requests for each of an experiment's jobs, with its ``resources:`` overrides applied.

    Args:
        exp: a resolved experiment (an entry of ``load_config(...)["experiments"]``).
        config: the resolved config it belongs to (for its models and the evaluation settings).

    Returns:
        ``{"model": {...}, "data": {...}, "train": {...}, "convert": {...}, "merge": {...},
        "evaluate": {...}}``. Each stage has ``threads``, ``mem_mb`` (host, per node) and
        ``runtime`` (minutes), plus whatever the experiment's ``resources.<stage>`` sets
        (``slurm_partition``...). ``train`` adds ``gpu_mem_mb`` (per GPU, None on the CPU), ``gpus``
        (per node) and ``tokens`` (per epoch, None when unknown); ``evaluate`` adds ``gpus`` (the
        evaluation job's, on one node: 0 when the experiment trains on the CPU; every training GPU
        of a node when the model's size is unknown) and ``gpu_mem_mb`` (per GPU, None without
        GPUs); ``model`` has ``parameters`` and ``source``.

    Raises:
        ConfigError: the model's size cannot be told (no ``config.json`` locally or in the
            Hugging Face cache, no weights, no size in its name) and some stage's ``mem_mb`` is not
            set in the experiment's ``resources:``.
    """
    overrides = exp.get("resources") or {}
    try:
        shape = model_shape(config["models"][exp["root_model"]])
    except ConfigError:
        needed = [s for s in ("train", "convert", "merge", "evaluate") if "mem_mb" not in overrides.get(s, {})]
        if needed:
            raise
        shape = None
    estimates = _estimates(exp, config, shape) if shape else _unsized(exp)
    for stage, values in overrides.items():
        estimates[stage].update({key: value for key, value in values.items() if value is not None})
    return estimates


def model_shape(model: dict) -> Shape:
    """The shape of a config model (see the module docstring for where it is read from).

    Raises:
        ConfigError: none of the sources has it.
    """
    if "demo" in model:
        demo = model["demo"]
        return Shape(hidden=demo["hidden_size"], layers=demo["num_layers"], intermediate=demo["intermediate_size"],
                     vocab=demo["vocab_size"], heads=demo["num_heads"], kv_heads=demo["num_heads"],
                     head_dim=demo["hidden_size"] // demo["num_heads"], tied=False, source="demo")
    try:
        directory = model_dir(model["path"], model.get("revision"))
    except HubError:
        directory = None
    if directory is not None:
        config_file = directory / "config.json"
        if config_file.is_file():
            return shape_from_config(json.loads(config_file.read_text(encoding="utf-8")), str(config_file))
        parameters = weight_parameters(directory)
        if parameters:
            return shape_from_parameters(parameters, f"weights in {directory}")
    match = re.search(r"(?<![\w.])(\d+(?:\.\d+)?)[bB](?![A-Za-z0-9])", re.sub(r"[-_]", " ", str(model["path"])))
    if match:
        return shape_from_parameters(int(float(match.group(1)) * 1e9), f"the size in its name {model['path']!r}")
    raise ConfigError(
        f"{model['path']}: cannot estimate the model's memory: no config.json there or in the Hugging Face "
        f"cache, and no size like 7b in its name. Download its config first "
        f"(`hf download {model['path']} config.json`), or set the experiment's "
        "resources.{train,convert,merge,evaluate}.mem_mb"
    )


def shape_from_config(cfg: dict, source: str) -> Shape:
    """A Shape from a transformers ``config.json`` (Llama names, with GPT-2 and nested text_config)."""
    cfg = {**cfg, **cfg.get("text_config", {})}

    def first(*names, default=None):
        for name in names:
            if cfg.get(name) is not None:
                return cfg[name]
        if default is None:
            raise ConfigError(f"{source}: none of {', '.join(names)}: cannot estimate the model's memory")
        return default

    hidden = first("hidden_size", "n_embd", "d_model")
    heads = first("num_attention_heads", "n_head")
    return Shape(
        hidden=hidden, layers=first("num_hidden_layers", "n_layer", "num_layers"),
        intermediate=first("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
        vocab=first("vocab_size"), heads=heads, kv_heads=first("num_key_value_heads", default=heads),
        head_dim=first("head_dim", default=hidden // heads), tied=bool(cfg.get("tie_word_embeddings", False)),
        source=source,
    )


def shape_from_parameters(parameters: int, source: str) -> Shape:
    """A Llama-like Shape of ``parameters`` parameters (layers ~ hidden / 128, MLP 8/3 wide), for the
    activations; its own parameter count is only near ``parameters`` for billions of them."""
    hidden = max(128, round((parameters * 128 / 12) ** (1 / 3) / 128) * 128)
    layers = max(1, round(parameters / (12 * hidden * hidden)))
    heads = max(1, hidden // 128)
    return Shape(hidden=hidden, layers=layers, intermediate=round(8 * hidden / 3 / 64) * 64, vocab=32000,
                 heads=heads, kv_heads=heads, head_dim=hidden // heads, tied=False, source=source,
                 stored=parameters)


def weight_parameters(directory: str | os.PathLike) -> int:
    """Parameters stored in a directory's safetensors files, read from their headers (0: none)."""
    total = 0
    for path in glob.glob(os.path.join(directory, "*.safetensors")):
        try:
            with open(path, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(length))
        except (OSError, ValueError, struct.error):
            continue
        total += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    return total


def _zero(exp: dict) -> tuple[int, bool, bool]:
    """(ZeRO stage, optimizer offloaded, parameters offloaded) of the experiment's DeepSpeed."""
    name = exp.get("deepspeed")
    if not name:
        return 0, False, False
    if name in DEEPSPEED_PRESETS:
        zero = DEEPSPEED_PRESETS[name]["zero_optimization"]
    else:
        try:
            zero = json.loads(Path(name).read_text()).get("zero_optimization", {})
        except (OSError, ValueError):
            return 2, False, False  # read when training starts, which reports a bad file
    offloaded = [(zero.get(key) or {}).get("device") in ("cpu", "nvme")
                 for key in ("offload_optimizer", "offload_param")]
    return int(zero.get("stage", 0)), *offloaded


def lora_parameters(shape: Shape, method: dict) -> int:
    """Parameters of a LoRA adapter on ``shape`` (rank ``r`` on each targeted linear module)."""
    targets = method["target_modules"]
    names = _LLAMA_LINEARS if targets == "all-linear" else targets
    per_layer = sum(sum(_LINEAR_SHAPES.get(name, lambda s: (s.hidden, s.hidden))(shape)) for name in names)
    return method["r"] * per_layer * shape.layers


def concat_lora_columns(shape: Shape, method: dict) -> int:
    """Elements the CUDA fast path adds beside the frozen weights for its concatenated LoRA products
    (``tunemake.train.fast.lora.ConcatLora``), where the whole group (q/k/v, gate/up) is adapted and LoRA has
    no dropout (with dropout they are not used): the group's stacked weight [O, I] gets one column
    per rank of each projection, zero outside each projection's B block, so [O, r x projections]
    more, in the model's dtype."""
    if method.get("dropout", 0.1) > 0:
        return 0
    targets = method["target_modules"]
    names = set(_LLAMA_LINEARS if targets == "all-linear" else targets)
    extra = 0
    for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
        if names.issuperset(group):
            extra += sum(_LINEAR_SHAPES[name](shape)[1] for name in group) * method["r"] * len(group)
    return extra * shape.layers


def _saved_parameters(shape: Shape, method: dict) -> int:
    """Parameters of ``modules_to_save`` (trained in full beside the adapter)."""
    sizes = {"embed_tokens": shape.vocab * shape.hidden, "lm_head": shape.vocab * shape.hidden}
    return sum(sizes.get(name, shape.hidden * shape.hidden) for name in method.get("modules_to_save") or [])


def _estimates(exp: dict, config: dict, shape: Shape) -> dict[str, dict]:
    method = exp["method_config"]
    n = shape.parameters
    gpus = exp["gpus"] or 0  # null asks the scheduler for none: the job trains on what it finds, CPU on a cluster
    on_gpu = gpus > 0
    processes = gpus if on_gpu else exp["nproc"]
    world = processes * exp["nodes"]
    model_dtype = config["models"][exp["root_model"]]["dtype"]
    weight_bytes = DTYPE_BYTES.get(model_dtype, 2 if on_gpu else 4)
    precision = exp["precision"]
    mixed = precision in ("bf16", "fp16") or (precision == "auto" and on_gpu)
    stage, offload_optimizer, offload_params = _zero(exp)

    # Training state per process, split into what ZeRO can shard and offload.
    if method["type"] == "full":
        trainable, frozen_bytes = n, 0.0
        ds_mixed = stage and precision in ("bf16", "fp16")  # DeepSpeed's own mixed precision
        param_b, grad_b, optim_b = (2, 2, 12) if ds_mixed else (4, 4, 8)
    else:
        trainable = lora_parameters(shape, method) + _saved_parameters(shape, method)
        param_b, grad_b, optim_b = 4, 4, 8
        if method["type"] == "qlora":
            bits = method["bits"] * (1.03 if method["double_quant"] else 1.125) if method["bits"] == 4 else 8.1
            linear = min(shape.linear_parameters, n)
            frozen_bytes = linear * bits / 8 + (n - linear) * 4
        else:
            frozen_bytes = n * weight_bytes
            if on_gpu and mixed and not exp.get("deepspeed"):  # where the fast path can run
                frozen_bytes += concat_lora_columns(shape, method) * weight_bytes
    # ZeRO stage 1 shards optimizer states over every GPU of the job, 2 also gradients, 3 also weights.
    params = (trainable * param_b + frozen_bytes) / (world if stage >= 3 else 1)
    grads = trainable * grad_b / (world if stage >= 2 else 1)
    optimizer = trainable * optim_b / (world if stage >= 1 else 1)
    device_state = params * (not offload_params) + grads + optimizer * (not offload_optimizer)
    if stage >= 3:  # the parameters gathered for the layers being computed, up to the presets' cap
        device_state += min(n, ZERO3_LIVE_PARAMETERS) * (2 if mixed else 4)
    offloaded = params * offload_params + optimizer * offload_optimizer

    tokens = exp["batch_size"] * exp["max_length"]
    act_b = 2 if mixed else 4
    layer = 34 * tokens * shape.hidden * act_b / 2  # one layer's activations (Korthikanti et al.)
    checkpointing = method["gradient_checkpointing"]
    activations = (shape.layers * tokens * shape.hidden * act_b + layer) if checkpointing else shape.layers * layer
    activations += 2 * tokens * shape.vocab * 4  # float32 logits and their gradient
    device_need = (device_state + activations) * 1.1

    if stage >= 3:
        # built partitioned, read tensor by tensor: its partition and the largest tensor (embeddings)
        loaded = n * weight_bytes / world + shape.vocab * shape.hidden * weight_bytes
    else:
        # on a GPU from_pretrained loads shard by shard onto the device (build_model's device_map)
        loaded = min(n * weight_bytes, 5000 * MB) if on_gpu else n * weight_bytes
    if on_gpu:
        host = processes * (PROCESS_MB * MB + loaded) + offloaded * processes
        gpu_mem = device_need + CUDA_MB * MB
    else:
        host = processes * (PROCESS_MB * MB + max(loaded, device_need + offloaded))
        gpu_mem = None

    epoch_tokens = epoch_token_count(exp)
    flops_per_token = (6 if method["type"] == "full" else 4 + 2 * bool(checkpointing)) * n
    load_s = n * weight_bytes / READ_BYTES_PER_S
    if epoch_tokens is None:
        train_runtime = DEFAULT_TRAIN_RUNTIME
    else:
        rate = world * GPU_FLOPS if on_gpu else world * CPU_FLOPS_PER_THREAD * 2
        train_runtime = _minutes(2 * (epoch_tokens * flops_per_token / rate + load_s) + 600, floor=30)

    trainable_mb = trainable * 4 / MB if method["type"] != "full" else 0
    settings = config.get("evaluation", {})
    eval_tokens = settings.get("batch_size", 16) * (exp["max_length"] + settings.get("max_new_tokens", 64))
    eval_batch = evaluation_batch_bytes(shape, eval_tokens)
    eval_largest = shape.largest_module_parameters * 2
    eval_gpus = _eval_gpus(exp, n * 2, eval_largest, eval_batch)
    eval_weights = n * (2 if eval_gpus else 4)
    data_mb = _source_mb(exp)
    return {
        "model": {"parameters": n, "source": shape.source},
        "data": {"threads": 8, "mem_mb": _mb(2000 * MB + 10 * data_mb * MB, floor=4000),
                 "runtime": _minutes(3600 + 1800 * data_mb / 1000, floor=60)},
        "train": {"threads": THREADS_PER_GPU * gpus if on_gpu else 2, "mem_mb": _mb(host, floor=4000),
                  "runtime": train_runtime, "gpu_mem_mb": _mb(gpu_mem, floor=0, margin=1) if on_gpu else None,
                  "gpus": gpus, "tokens": epoch_tokens},
        # The checkpoint; an adapter's cast copy and serialized bytes beside it, a full model streamed.
        "convert": {"threads": 1, "mem_mb": _mb(PROCESS_MB * MB + 4 * trainable * (2 if method["type"] != "full" else 1)
                                                + STREAM_MB * MB, floor=4000),
                    "runtime": _minutes(600 + 3 * n * 4 / READ_BYTES_PER_S, floor=60)},
        # Streams the base tensor by tensor: the adapter (float32) and a few chunks.
        "merge": {"threads": 1, "mem_mb": _mb(2000 * MB + trainable_mb * MB, floor=2000),
                  "runtime": _minutes(600 + 2 * n * weight_bytes / READ_BYTES_PER_S, floor=60)},
        "evaluate": {"threads": 2, "mem_mb": _mb(PROCESS_MB * MB + eval_weights + (0 if eval_gpus else eval_batch),
                                                 floor=4000),
                     "runtime": _minutes(1800 + 2 * eval_weights / READ_BYTES_PER_S, floor=60),
                     "gpu_mem_mb": _eval_gpu_mb(eval_weights, eval_largest, eval_batch, eval_gpus)
                     if eval_gpus else None,
                     "gpus": eval_gpus},
    }


def evaluation_batch_bytes(shape: Shape, tokens: int) -> int:
    """What evaluation holds beside the weights for one batch of ``tokens`` tokens (rows x (prompt +
    answer)): the KV cache in 16 bits and float32 logits. ``tunemake.evaluate`` reserves it on every
    GPU it spreads a model over, and the estimate counts it the same way."""
    return 2 * shape.layers * tokens * shape.kv_dim * 2 + tokens * shape.vocab * 4


def spread_bytes(weights: float, largest_module: float, gpus: int) -> float:
    """GPU memory, all GPUs together, that weights take spread layer by layer over ``gpus`` GPUs
    (transformers' ``device_map="sequential"``): on several, room for one more of their largest
    module per GPU, and one more, since each GPU takes whole modules and the loader keeps one
    module's room free on the first."""
    return weights if gpus <= 1 else weights + (gpus + 1) * largest_module


def _eval_gpus(exp: dict, weights: float, largest_module: float, batch: float) -> int:
    """GPUs the evaluate job asks for: the experiment's ``resources.evaluate.gpus``, else the fewest
    of its GPUs on one node whose memory holds the bf16 weights, spread over them, and a whole
    batch on each (all of them when none is enough, 0 when it trains on the CPU)."""
    requested = ((exp.get("resources") or {}).get("evaluate") or {}).get("gpus")
    if requested is not None:
        return requested
    gpus = exp["gpus"] or 0
    fits = (count for count in range(1, gpus + 1)
            if _eval_gpu_mb(weights, largest_module, batch, count) <= LARGEST_COMMON_GPU_MB)
    return next(fits, gpus)


def _eval_gpu_mb(weights: float, largest_module: float, batch: float, gpus: int) -> int:
    """Per-GPU memory of an evaluation spread over ``gpus`` GPUs: a share of the weights, a whole batch."""
    return _mb(spread_bytes(weights, largest_module, gpus) / gpus + batch + CUDA_MB * MB, floor=0, margin=1.1)


def _unsized(exp: dict) -> dict[str, dict]:
    """Every stage's mem_mb is set by the experiment; the rest keeps safe defaults."""
    return {
        "model": {"parameters": None, "source": "unknown"},
        "data": {"threads": 8, "mem_mb": 4000, "runtime": 60},
        "train": {"threads": THREADS_PER_GPU * exp["gpus"] if exp["gpus"] else 2, "runtime": DEFAULT_TRAIN_RUNTIME,
                  "gpu_mem_mb": None, "gpus": exp["gpus"] or 0, "tokens": None},
        "convert": {"threads": 1, "runtime": 60},
        "merge": {"threads": 1, "runtime": 60},
        # Without the model's size, evaluation asks for every GPU training has on a node.
        "evaluate": {"threads": 2, "runtime": 60, "gpu_mem_mb": None, "gpus": exp["gpus"] or 0},
    }


def epoch_token_count(exp: dict) -> int | None:
    """Tokens of one epoch: the built dataset's ``stats.json``, else local sources at 4 bytes a token."""
    from tunemake import paths

    stats = Path(paths.templated_dataset(exp["data_key"])) / "stats.json"
    try:
        return int(json.loads(stats.read_text())["tokens"])
    except (OSError, ValueError, KeyError):
        pass
    sources = _source_bytes(exp)
    return None if sources is None else sources // 4


def _source_bytes(exp: dict) -> int | None:
    """Bytes of the experiment's local data files; None when one is a hub dataset or not there yet."""
    total = 0
    for dataset in exp["data_recipe"]["datasets"]:
        if "path" not in dataset:
            return None
        for pattern in dataset["path"]:
            files = glob.glob(pattern, recursive=True)
            if not files:
                return None
            total += sum(os.path.getsize(f) for f in files if os.path.isfile(f))
    return total


def _source_mb(exp: dict) -> float:
    return (_source_bytes(exp) or 0) / MB


def _mb(nbytes: float, floor: int, margin: float = HOST_MARGIN) -> int:
    """Megabytes, with the margin, rounded up to a whole 100 MB, at least ``floor``."""
    return max(floor, math.ceil(nbytes * margin / MB / 100) * 100)


def _minutes(seconds: float, floor: int) -> int:
    return max(floor, math.ceil(seconds / 60))
