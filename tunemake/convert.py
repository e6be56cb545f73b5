"""The convert stage: an epoch checkpoint (``.pth``) -> a Hugging Face artefact (XTuner's ``pth_to_hf``).

Entry point :func:`convert_checkpoint`, called by ``rules/convert.smk`` and ``tunemake convert``.
For LoRA / QLoRA it writes a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``)
that vanilla ``PeftModel.from_pretrained(base, dir)`` loads with no tunemake import; for a full
fine-tune, an HF model directory with the tokenizer. Either way ``tunemake.json`` beside it holds
the template, base, epoch, fingerprint and versions that later stages read for their defaults.
Supported: any ``.pth`` written by ``tunemake.train`` (with or without DeepSpeed). Not supported:
XTuner's own ``.pth`` files (their key names differ), and full fine-tunes of model classes that
rewrite their weights on saving (transformers' weight conversions, e.g. fused experts).

Memory: the checkpoint and a few tens of MB, never the base model. The model is built on the meta
device (config, names, shapes, no weights), which checks the checkpoint fits it; an adapter is
saved by PEFT from the checkpoint's tensors; a full fine-tune is streamed, a slice of rows at a
time, into the shards transformers' ``save_pretrained`` would write (``tunemake.shards``), with the
same bytes. The base's weights are read only for what the checkpoint lacks: persistent buffers of a
full model, the base embedding that LoRA on an embedding saves.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from pathlib import Path

import torch

from tunemake.atomic import atomic_dir, write_json
from tunemake.config import DTYPE_BYTES
from tunemake.hub import is_hub_id, load_pretrained, model_dir
from tunemake.errors import TunemakeError
from tunemake.shards import (
    DTYPE_NAMES,
    INDEX_FILE,
    Buffers,
    OutputTensor,
    PlannedTensor,
    ShardWriter,
    StoredTensor,
    model_tensors,
    read_tensor,
    safetensors_order,
    write_tensor,
)

log = logging.getLogger(__name__)

METADATA_FILE = "tunemake.json"
PEFT_PREFIX = "base_model.model."


class ConvertError(TunemakeError):
    """The checkpoint cannot be converted (unreadable, or not made for this base model)."""


def read_checkpoint(path: str | os.PathLike) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConvertError(f"{path}: no such checkpoint") from None
    except Exception as exc:  # torch's own message suggests unsafe loading: not advice to pass on
        raise ConvertError(f"{path}: not a readable tunemake checkpoint ({type(exc).__name__} from torch.load; "
                           "an epoch_N.pth of checkpoints/ is one)") from None
    if not isinstance(ckpt, dict) or not str(ckpt.get("format", "")).startswith("tunemake.epoch/"):
        raise ConvertError(f"{path}: not a tunemake epoch checkpoint (no 'format' field)")
    return ckpt


def _where(model: str) -> str:
    """A hub id as it is, a local directory as its real path (however it was written)."""
    return model if is_hub_id(model) else os.path.realpath(model)


def convert_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, base_model: str | None = None,
                       dtype: str | None = None, tokenizer_path: str | None = None,
                       revision: str | None = None, trust_remote_code: bool = False) -> Path:
    """Write the HF artefact of ``checkpoint`` into ``out_dir``, atomically.

    Args:
        checkpoint: an ``epoch_{n}.pth`` written by ``tunemake.train``.
        out_dir: the adapter (LoRA/QLoRA) or model (full) directory to create.
        base_model: the base model directory; default: the one recorded in the checkpoint.
        dtype: weights' dtype in the output. Default: float16 for an adapter (XTuner's
            pth_to_hf), the base model's stored dtype for a full fine-tune (a float32 or bfloat16
            model is not rounded to float16 on its way to the next stage).
        tokenizer_path: where the tokenizer is read from (default: the base model).
        revision: the hub revision, when the base is a hub id (read from the local cache).
        trust_remote_code: let transformers run the base's own model code.

    Raises:
        ConvertError: unreadable checkpoint, or weights that do not fit the base model.
    """
    from tunemake.train.model import check_trainable, empty_model
    from tunemake.train.spec import BaseModel, Method

    ckpt = read_checkpoint(checkpoint)
    named = base_model or ckpt["base_model"]
    if base_model and _where(base_model) != _where(ckpt["base_model"]):
        log.warning("%s was trained on %s, converted here against %s: the adapter is exact only on the "
                    "weights it was trained on", checkpoint, ckpt["base_model"], base_model)
    local = model_dir(named, revision)
    if not (local / "config.json").exists():
        raise ConvertError(f"{named}: not a model directory (no config.json)")
    base = str(local)
    method = Method.from_dict(ckpt["method"])
    if dtype is None:
        dtype = stored_dtype(base) if method.type == "full" else "float16"
    model = empty_model(method.for_export(), BaseModel(base, trust_remote_code=trust_remote_code, dir=base), dtype)
    try:
        check_trainable(model, ckpt["trainable"], str(checkpoint))
    except TunemakeError as exc:
        raise ConvertError(f"{exc} (is {base} the base model it was trained from?)") from None
    metadata = {
        "experiment": ckpt["experiment"], "epoch": ckpt["epoch"], "method": ckpt["method"],
        "base_model": named, **({"base_commit": local.name} if is_hub_id(named) else {}),
        "template": ckpt.get("template"), "fingerprint": ckpt["fingerprint"],
        "versions": ckpt["versions"], "dtype": dtype,
    }
    with atomic_dir(out_dir) as tmp:
        if method.type == "full":
            from transformers import AutoTokenizer

            _write_model(model, ckpt["trainable"], local, tmp)
            tokenizer_dir = model_dir(tokenizer_path, revision) if tokenizer_path else base
            load_pretrained(AutoTokenizer, tokenizer_dir, tokenizer_path or named,
                            trust_remote_code=trust_remote_code).save_pretrained(tmp)
        else:
            _write_adapter(model, ckpt["trainable"], local, dtype, tmp)
            # a hub id, not this machine's cache directory, so that PEFT finds the base anywhere
            _canonical_adapter_config(Path(tmp) / "adapter_config.json", base=named if is_hub_id(named) else None)
        write_json(Path(tmp) / METADATA_FILE, metadata)
    return Path(out_dir)


def _write_adapter(model, trainable: dict[str, torch.Tensor], base: Path, dtype: str, out: Path) -> None:
    """PEFT's ``save_pretrained`` of ``model`` (built on the meta device) with the checkpoint's
    tensors, cast to ``dtype``, as its weights: the files PEFT writes for the trained model.
    ``trainable`` is emptied, each float32 tensor let go once cast, so they are not held twice."""
    from peft import get_peft_model_state_dict

    state = model.state_dict()
    while trainable:
        name, tensor = trainable.popitem()
        state[name] = _cast(tensor, getattr(torch, dtype))
        del tensor
    # LoRA on an embedding also saves the base embedding (peft's save_embedding_layers), the one
    # base weight an adapter holds: read it from the base's file.
    key_of = {id(tensor): key for key, tensor in state.items()}
    keys = [key_of[id(t)] for t in get_peft_model_state_dict(model, state_dict=state).values() if t.is_meta]
    stored = _base_tensors(base, [key.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".") for key in keys])
    for key, tensor in zip(keys, stored.values()):
        state[key] = _cast(read_tensor(tensor), getattr(torch, dtype))
    model.save_pretrained(str(out), state_dict=state)


def _write_model(model, trainable: dict[str, torch.Tensor], base: Path, out: Path,
                 max_shard_size: int | str | None = None) -> None:
    """transformers' ``save_pretrained`` of ``model`` (built on the meta device, in the output
    dtype), its tensors streamed one at a time into transformers' shards from the checkpoint, or
    from the base's files for the few the checkpoint lacks (buffers): never a whole model in memory.
    ``max_shard_size``: default, transformers' default."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    if get_model_conversion_mapping(model, add_legacy=False):
        raise ConvertError(f"{base}: the model class rewrites its weights on saving (transformers' weight "
                           "conversion); exporting a full fine-tune of it is not supported")
    # as from_pretrained leaves a model whose weights needed no conversion (it then saves them in key order)
    model._weight_conversions = []
    # config.json, generation_config.json and the model's own code, as transformers writes them
    model.save_pretrained(str(out), state_dict={})
    # a checkpoint names each tensor as the model's parameter; a tied alias, by its first name
    first_name = {id(p): name for name, p in reversed(list(model.named_parameters(remove_duplicate=False)))}
    param_name = {name: first_name[id(p)] for name, p in model.named_parameters(remove_duplicate=False)}
    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    key_of = {id(tensor): key for key, tensor in state.items()}
    saved = revert_weight_conversion(model, state)
    if max_shard_size is None:
        max_shard_size = inspect.signature(type(model).save_pretrained).parameters["max_shard_size"].default
    split = split_torch_state_dict_into_shards(saved, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    values = {name: trainable.get(param_name.get(key_of[id(tensor)], "")) for name, tensor in saved.items()}
    stored = _base_tensors(base, [name for name, value in values.items() if value is None])
    buffers = Buffers()
    for filename, names in split.filename_to_tensors.items():
        outputs = {name: OutputTensor(name, tuple(saved[name].shape), stored=stored.get(name), value=values[name],
                                      dtype=DTYPE_NAMES[saved[name].dtype]) for name in names}
        planned = safetensors_order([PlannedTensor(o.name, o.dtype, o.shape) for o in outputs.values()])
        with ShardWriter(out / filename, planned) as writer:
            for tensor in planned:
                write_tensor(outputs[tensor.name], writer, buffers)
    if split.is_sharded:
        write_json(out / INDEX_FILE, {"metadata": {"total_parameters": model.num_parameters(), **split.metadata},
                                      "weight_map": split.tensor_to_filename})


def _base_tensors(base: Path, names: list[str]) -> dict[str, StoredTensor]:
    """The base's stored tensors ``names``, in that order (its files are not opened for none)."""
    if not names:
        return {}
    tensors = model_tensors(base, ConvertError)
    missing = [name for name in names if name not in tensors]
    if missing:
        raise ConvertError(f"{base}: no tensor {missing[0]} in its safetensors weights, and the checkpoint "
                           "does not hold it")
    return {name: tensors[name] for name in names}


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """As ``model.to(dtype)`` casts: floating-point tensors only."""
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def stored_dtype(model_dir: str | os.PathLike) -> str:
    """The dtype a model directory's config.json records (float16 when it records none we write)."""
    return config_dtype(json.loads(Path(model_dir, "config.json").read_text()))


def config_dtype(config: dict) -> str:
    """The dtype a model config records, as one of :data:`~tunemake.config.DTYPE_BYTES` (float16 when none of them)."""
    name = str(config.get("dtype") or config.get("torch_dtype") or "float16").replace("torch.", "")
    return name if name in DTYPE_BYTES else "float16"


def _canonical_adapter_config(path: Path, base: str | None = None) -> None:
    """PEFT writes module-name sets in hash order, which varies between runs: sort them, so the
    same training gives the same bytes. ``base`` replaces ``base_model_name_or_path``."""
    config = json.loads(path.read_text())
    if base:
        config["base_model_name_or_path"] = base
    for key, value in config.items():
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            config[key] = sorted(value)
    write_json(path, config)


def read_metadata(directory: str | os.PathLike) -> dict:
    """The ``tunemake.json`` of an adapter, model or merge directory ({} when absent)."""
    path = Path(directory) / METADATA_FILE
    return json.loads(path.read_text()) if path.exists() else {}
