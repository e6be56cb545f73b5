"""The convert stage: an epoch checkpoint (``.pth``) -> a Hugging Face artefact (XTuner's ``pth_to_hf``).

Entry point :func:`convert_checkpoint`, called by ``rules/convert.smk`` and ``tunemake convert``.
For LoRA / QLoRA it writes a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``)
that vanilla ``PeftModel.from_pretrained(base, dir)`` loads with no tunemake import; for a full
fine-tune, an HF model directory with the tokenizer. Either way ``tunemake.json`` beside it holds
the template, base, epoch, fingerprint and versions that later stages read for their defaults.
Supported: any ``.pth`` written by ``tunemake.train`` (with or without DeepSpeed). Not supported:
XTuner's own ``.pth`` files (their key names differ). The base model is loaded on the CPU to build
the adapter's structure, so conversion needs the base's size in host memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from tunemake.atomic import atomic_dir, write_json
from tunemake.config import DTYPE_BYTES
from tunemake.hub import is_hub_id, load_pretrained, model_dir
from tunemake.errors import TunemakeError

METADATA_FILE = "tunemake.json"


class ConvertError(TunemakeError):
    """The checkpoint cannot be converted (unreadable, or not made for this base model)."""


def read_checkpoint(path: str | os.PathLike) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConvertError(f"{path}: no such checkpoint") from None
    except Exception as exc:
        raise ConvertError(f"{path}: not a readable tunemake checkpoint ({exc})") from None
    if not isinstance(ckpt, dict) or not str(ckpt.get("format", "")).startswith("tunemake.epoch/"):
        raise ConvertError(f"{path}: not a tunemake epoch checkpoint (no 'format' field)")
    return ckpt


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
    from tunemake.train.model import build_model, load_trainable
    from tunemake.train.spec import BaseModel, Method

    ckpt = read_checkpoint(checkpoint)
    named = base_model or ckpt["base_model"]
    local = model_dir(named, revision)
    if not (local / "config.json").exists():
        raise ConvertError(f"{named}: not a model directory (no config.json)")
    base = str(local)
    method = Method.from_dict(ckpt["method"])
    if dtype is None:
        dtype = stored_dtype(base) if method.type == "full" else "float16"
    model = build_model(method.for_export(), BaseModel(base, dtype="float32", trust_remote_code=trust_remote_code,
                                                       dir=base), torch.device("cpu"))
    try:
        load_trainable(model, ckpt["trainable"], str(checkpoint))
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

            model.to(getattr(torch, dtype)).save_pretrained(tmp)
            tokenizer_dir = model_dir(tokenizer_path, revision) if tokenizer_path else base
            load_pretrained(AutoTokenizer, tokenizer_dir, tokenizer_path or named,
                            trust_remote_code=trust_remote_code).save_pretrained(tmp)
        else:
            model.to(getattr(torch, dtype)).save_pretrained(tmp)
            # a hub id, not this machine's cache directory, so that PEFT finds the base anywhere
            _canonical_adapter_config(Path(tmp) / "adapter_config.json", base=named if is_hub_id(named) else None)
        write_json(Path(tmp) / METADATA_FILE, metadata)
    return Path(out_dir)


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
