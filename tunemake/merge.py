"""The merge stage: an adapter and its base -> one HF model directory (XTuner's ``convert merge``).

Entry point :func:`merge_model`, called by ``rules/merge.smk`` and ``tunemake merge``. The output
loads with vanilla ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained(dir)``: weights in
transformers' shard layout, the tokenizer with the ``chat_template`` of the template trained on,
and a ``generation_config.json`` that stops where tunemake's chat stops (the tokenizer's eos and
every stop word). A full fine-tune is resharded the same way, with nothing to merge.

Memory: never the whole model. Base tensors are read a slice of rows at a time with plain file
reads, each slice merged as ``W + scaling * (B @ A)`` in float32 and cast, and appended to an
output shard whose header was planned up front (``tunemake.shards``). Peak memory is the adapter
plus a few tens of MB, whatever the model's size.

Supported: PEFT LoRA on linear and embedding layers (rank/alpha patterns, rsLoRA, fan_in_fan_out,
``lora_bias``), ``modules_to_save`` and trained biases (they replace the base tensor), tied input
and output embeddings (untied in the output when the adapter makes them differ). Not supported,
with an error rather than a wrong model: DoRA and the other LoRA variants, adapters that need a
modified base (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA initialisation), non-LoRA PEFT methods, LoRA
on convolutions, resized vocabularies, quantized base checkpoints, ``.bin`` base weights.

QLoRA adapters merge into the unquantized base, as XTuner's merge does. Merging into the 4-bit
weights would mean re-quantizing ``W + BA``: the update is small next to NF4's rounding steps, so
most of what the adapter learned would round away. The adapter was trained against NF4 weights
dequantized on the fly, so the merged float16 model differs from the trained one by the
quantization error of the base (it is usually as good or better, but not bit-equal), and it is
full size: quantize it again for deployment if needed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from tunemake.atomic import atomic_dir, write_json
from tunemake.convert import METADATA_FILE, PEFT_PREFIX, config_dtype, read_metadata
from tunemake.errors import TunemakeError
from tunemake.config import DTYPE_BYTES, parse_size
from tunemake.encode import generation_stops
from tunemake.hub import is_hub_id, load_pretrained, model_dir, own_code_failed, remote_code_error
from tunemake.shards import (
    DTYPE_NAMES,
    DTYPES as STORED_DTYPES,
    Buffers,
    OutputTensor,
    PlannedTensor,
    ShardWriter,
    StoredTensor,
    model_tensors,
    plan_shards,
    read_header,
    read_tensor,
    shard_names,
    write_index,
    write_tensor,
)
from tunemake.templates import HF, Template, check_encodable, get_template, template_from_dict, template_to_dict

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")

# LoRA variants whose weights are not W + scaling * B @ A: a set field means "cannot merge".
_UNSUPPORTED_CONFIG = {
    "use_dora": "DoRA (use_dora)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "velora_config": "VeLoRA (velora_config)",
    "layer_replication": "layer replication (layer_replication)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "megatron_config": "Megatron layers (megatron_config)",
}
# Initialisations that leave the base unchanged; the others (pissa, olora, corda, loftq, lora_ga)
# subtract from the base, so the adapter only fits that modified base.
_PLAIN_INITS = {True, False, "gaussian", "eva", "orthogonal"}


class MergeError(TunemakeError):
    """The adapter cannot be merged: missing directories, an adapter that does not fit its base,
    an unsupported adapter kind, or a template the tokenizer cannot encode."""


def merge_model(source: str | os.PathLike, out_dir: str | os.PathLike, *, base_model: str | None = None,
                max_shard_size: int | str = "2GB", dtype: str | None = None,
                template: str | Template | None = None, tokenizer_path: str | None = None,
                revision: str | None = None, trust_remote_code: bool = False) -> Path:
    """Write the merged (or resharded) model of ``source`` into ``out_dir``, atomically.

    Args:
        source: what ``tunemake.convert`` writes: a PEFT LoRA/QLoRA adapter directory, or the HF
            model directory of a full fine-tune (resharded, nothing to merge). An adapter made
            elsewhere (no ``tunemake.json``) needs ``template``.
        out_dir: the model directory to create; replaced if it exists.
        base_model: the base model directory; default: the one in ``tunemake.json``, else the
            adapter's ``base_model_name_or_path`` (a hub id works if it is in the local HF cache).
            Unused for a full fine-tune.
        max_shard_size: the largest shard file, as transformers reads it: bytes, or ``"2GB"``
            (2*10^9), ``"500MB"``, ``"1GiB"`` (2^30)... Default ``"2GB"``, as XTuner's merge. A
            single tensor larger than that gets a shard of its own.
        dtype: ``float16``, ``bfloat16`` or ``float32`` for floating-point weights; default: the
            base's ``dtype`` in its config.json, else float16.
        template: the prompt template (a name, or a :class:`Template`); default: the one recorded
            in ``tunemake.json``. ``"hf"`` keeps the tokenizer's own chat_template.
        tokenizer_path: where the tokenizer is read from; default: ``source`` if it holds one,
            else the base.
        revision: the hub revision of a base (or tokenizer) given as a hub id.
        trust_remote_code: let transformers run the base's own model and tokenizer code; its
            ``*.py`` files are copied into the merge, so the merge loads like the base.

    Returns:
        ``Path(out_dir)``.

    Raises:
        MergeError: a missing directory, an adapter that does not fit the base, an unsupported
            adapter, a quantized base, or a template whose stop words or special tokens the
            tokenizer cannot encode as single tokens.
        TunemakeError: an unparsable ``max_shard_size``, an unknown template name.
    """
    max_bytes = parse_size(max_shard_size)
    source = Path(source)
    if not source.is_dir():
        raise MergeError(f"{source}: no such adapter or model directory")
    metadata = read_metadata(source)
    is_adapter = (source / ADAPTER_CONFIG).is_file()
    if is_adapter:
        adapter_config = _read_json(source / ADAPTER_CONFIG)
        base_name = base_model or metadata.get("base_model") or adapter_config.get("base_model_name_or_path")
        base = _model_dir(base_name, "base model", source, revision)
    elif (source / "config.json").is_file():
        adapter_config, base, base_name = None, source, metadata.get("base_model", str(source))
    else:
        raise MergeError(f"{source}: neither a PEFT adapter ({ADAPTER_CONFIG}) nor a model directory (config.json)")
    if Path(out_dir).resolve() in (source.resolve(), base.resolve()):
        raise MergeError(f"{out_dir}: the output would replace its own {'source' if is_adapter else 'model'}; "
                         "write it somewhere else")
    template = _resolve_template(template, metadata, source)

    base_config = _read_json(base / "config.json")
    if "quantization_config" in base_config:
        method = base_config["quantization_config"].get("quant_method", "quantized")
        raise MergeError(f"{base}: a {method} checkpoint; merging needs the unquantized base model "
                         "the adapter was trained from (QLoRA adapters merge into the float weights)")
    dtype = dtype or config_dtype(base_config)
    if dtype not in DTYPE_BYTES:
        raise MergeError(f"dtype: {dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
    out_dtype = DTYPE_NAMES[getattr(torch, dtype)]

    base_tensors = model_tensors(base, MergeError)
    if adapter_config is not None:
        outputs, untie = _plan_merge(source, adapter_config, base, base_config, base_tensors, trust_remote_code)
    else:
        outputs, untie = [OutputTensor(name, t.shape, stored=t) for name, t in base_tensors.items()], False
    for out in outputs:
        source_dtype = STORED_DTYPES[out.stored.dtype] if out.value is None else out.value.dtype
        out.dtype = out_dtype if source_dtype.is_floating_point else DTYPE_NAMES[source_dtype]
    shards = plan_shards([PlannedTensor(o.name, o.dtype, o.shape) for o in outputs], max_bytes)

    if tokenizer_path:
        tokenizer_dir = model_dir(tokenizer_path, revision)
    else:
        tokenizer_dir = source if _has_tokenizer(source) else base
    tokenizer = _load_tokenizer(tokenizer_dir, template, trust_remote_code)
    config = {**base_config, "dtype": dtype}
    if "torch_dtype" in base_config:
        config["torch_dtype"] = dtype
    if untie:
        config["tie_word_embeddings"] = False
    generation = _generation_config(base, base_config, tokenizer, template, tokenizer_dir)
    merge_metadata = {
        **metadata, "kind": "merge", "source": str(source), "dtype": dtype, "max_shard_size": max_shard_size,
        "base_model": base_name, **({"base_commit": base.name} if is_adapter and is_hub_id(base_name) else {}),
        "template": template_to_dict(template),
    }
    if "dtype" in metadata:
        merge_metadata["source_dtype"] = metadata["dtype"]

    what = f"merging {source} into {base}" if is_adapter else f"resharding {source}"
    log.info("%s: %d tensors in %d shard(s) of at most %s, %s", what, len(outputs), len(shards),
             max_shard_size, dtype)
    by_name, buffers = {o.name: o for o in outputs}, Buffers()
    with atomic_dir(out_dir) as tmp:
        from tqdm import tqdm

        with tqdm(total=len(outputs), unit="tensor", desc="merge", disable=None) as bar:
            for name, shard in zip(shard_names(len(shards)), shards):
                with ShardWriter(tmp / name, shard) as writer:
                    for planned in shard:
                        write_tensor(by_name[planned.name], writer, buffers)
                        bar.update()
        if len(shards) > 1:
            write_index(tmp, shards)
        write_json(tmp / "config.json", config)
        write_json(tmp / "generation_config.json", generation)
        tokenizer.save_pretrained(str(tmp))
        write_json(tmp / METADATA_FILE, merge_metadata)
        if trust_remote_code:
            for code in sorted({*base.glob("*.py"), *tokenizer_dir.glob("*.py")}):
                shutil.copy2(code, tmp / code.name)
    return Path(out_dir)


# --- inputs ------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise MergeError(f"{path}: not valid JSON ({exc})") from None


def _model_dir(path: str | None, what: str, source: Path, revision: str | None = None) -> Path:
    """A local model directory, or a hub id's snapshot in the local HF cache."""
    if not path:
        raise MergeError(f"{source}: records no base model; pass base_model (--base)")
    directory = model_dir(path, revision)
    if not (directory / "config.json").is_file():
        raise MergeError(f"{directory}: {what} directory has no config.json")
    return directory


def _resolve_template(template, metadata: dict, source: Path) -> Template | str:
    if template is None:
        if metadata.get("template"):
            return template_from_dict(metadata["template"])
        raise MergeError(f"{source}: no {METADATA_FILE} records the template it was trained with; "
                         "pass template (--template NAME)")
    return get_template(template) if isinstance(template, str) else template


def _has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer_config.json").is_file() or (directory / "tokenizer.json").is_file()


# --- the merge plan ----------------------------------------------------------------------------


@dataclass
class _LoraDelta:
    """``scaling * B @ A`` (its transpose for fan_in_fan_out and embeddings), as peft's
    ``get_delta_weight``, added a range of rows at a time."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    transposed: bool

    def add_to(self, rows: torch.Tensor, start: int, stop: int) -> None:
        a, b = self.a.float(), self.b.float()
        if self.transposed:
            rows.addmm_(a[:, start:stop].T, b.T, alpha=self.scaling)
        else:
            rows.addmm_(b[start:stop], a, alpha=self.scaling)


@dataclass
class _BiasDelta:
    """``scaling * lora_B.bias`` (peft's ``lora_bias``) added to the base bias."""

    bias: torch.Tensor
    scaling: float

    def add_to(self, rows: torch.Tensor, start: int, stop: int) -> None:
        rows.add_(self.bias[start:stop].float(), alpha=self.scaling)


def _pattern_value(patterns: dict, module: str, default):
    """peft's ``get_pattern_key``: the first pattern matching the end of the module's path."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_adapter(adapter: Path) -> dict[str, torch.Tensor]:
    path = next((adapter / name for name in ADAPTER_WEIGHTS if (adapter / name).is_file()), None)
    if path is None:
        raise MergeError(f"{adapter}: no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
    if path.suffix == ".bin":
        return torch.load(path, map_location="cpu", weights_only=True)
    return {name: read_tensor(tensor) for name, tensor in read_header(path).items()}


def _check_adapter_config(adapter: Path, config: dict) -> None:
    if config.get("peft_type") != "LORA":
        raise MergeError(f"{adapter}: a {config.get('peft_type')} adapter; merge supports LoRA adapters only")
    for key, what in _UNSUPPORTED_CONFIG.items():
        if config.get(key):
            raise MergeError(f"{adapter}: {what} is not supported by merge")
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise MergeError(f"{adapter}: init_lora_weights={init!r} changes the base weights at initialisation, so "
                         "the adapter does not fit the original base; convert it to a plain LoRA adapter first "
                         "(peft's path_initial_model_for_weight_conversion)")


def _plan_merge(adapter: Path, config: dict, base: Path, base_config: dict, base_tensors: dict[str, StoredTensor],
                trust_remote_code: bool = False) -> tuple[list[OutputTensor], bool]:
    """The output tensors of base + adapter, and whether tied embeddings must be untied."""
    _check_adapter_config(adapter, config)

    def mismatch(detail: str) -> MergeError:
        return MergeError(f"adapter {adapter} does not fit base model {base}: {detail}")

    ties = _tied_weights(base, base_config, trust_remote_code)
    # A tied weight the base does not store (lm_head) reads, as in the loaded model, its source.
    known = {**base_tensors, **{t: base_tensors[s] for t, s in ties.items() if s in base_tensors}}

    loras: dict[str, dict[str, torch.Tensor]] = {}
    replaced: dict[str, torch.Tensor] = {}
    for key, tensor in _read_adapter(adapter).items():
        if not key.startswith(PEFT_PREFIX):
            raise MergeError(f"{adapter}: {key} is not a PEFT weight name (no {PEFT_PREFIX!r} prefix)")
        name = key[len(PEFT_PREFIX):]
        match = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_[AB])", name)
        if match:
            loras.setdefault(match[1], {})[match[2]] = tensor
        elif "lora_" in name:
            raise MergeError(f"{adapter}: {key}: this kind of LoRA weight is not supported by merge")
        else:
            replaced[name.replace(".base_layer.", ".")] = tensor.contiguous()

    deltas: dict[str, list] = {}
    for module, parts in loras.items():
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a = parts.get("lora_embedding_A" if embedding else "lora_A.weight")
        b = parts.get("lora_embedding_B" if embedding else "lora_B.weight")
        if a is None or b is None:
            raise MergeError(f"{adapter}: {module} has only one of LoRA's A and B matrices")
        if a.ndim != 2:
            raise MergeError(f"{adapter}: {module}: LoRA on {a.ndim - 2}-d convolutions is not supported by merge")
        r = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        if a.shape[0] != r or b.shape[1] != r:
            raise MergeError(f"{adapter}: {module}: rank {r} in {ADAPTER_CONFIG} but A is {list(a.shape)}, "
                             f"B {list(b.shape)}")
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        transposed = embedding or bool(config.get("fan_in_fan_out"))
        target = f"{module}.weight"
        expected = (a.shape[1], b.shape[0]) if transposed else (b.shape[0], a.shape[1])
        if target not in known:
            raise mismatch(f"the adapter changes {module}, which has no weight {target} in the base")
        if known[target].shape != expected:
            raise mismatch(f"LoRA of {module} makes a {list(expected)} update, the base's {target} is "
                           f"{list(known[target].shape)}")
        deltas.setdefault(target, []).append(_LoraDelta(a, b, scaling, transposed))
        if "lora_B.bias" in parts:
            bias = f"{module}.bias"
            if bias not in known or known[bias].shape != tuple(parts["lora_B.bias"].shape):
                raise mismatch(f"lora_bias of {module} needs a {list(parts['lora_B.bias'].shape)} {bias} in the base")
            deltas.setdefault(bias, []).append(_BiasDelta(parts["lora_B.bias"], scaling))
    for name, tensor in replaced.items():
        if name not in known:
            raise mismatch(f"the adapter holds {name}, which the base does not have")
        if known[name].shape != tuple(tensor.shape):
            raise mismatch(f"{name} is {list(tensor.shape)} in the adapter, {list(known[name].shape)} in the base"
                           " (a resized vocabulary is not supported)")

    # PeftModel keeps a tied pair tied only when the adapter leaves both alone, or replaces both
    # with the same tensor (ensure_weight_tying); otherwise each side is what PeftModel computes.
    changed = set(deltas) | set(replaced)
    untie = False
    for target, source in ties.items():
        if target not in changed and source not in changed:
            continue
        same = (not deltas.get(target) and not deltas.get(source) and target in replaced and source in replaced
                and torch.equal(replaced[target], replaced[source]))
        if same:
            if target not in base_tensors:
                replaced.pop(target)
        else:
            untie = True
    outputs = []
    untied = [t for t, s in ties.items() if t not in base_tensors and s in base_tensors] if untie else []
    for name in [*base_tensors, *untied]:
        # Untied, a tied weight starts from its source's value, as in the loaded base.
        stored = base_tensors[ties[name]] if untie and ties.get(name) in base_tensors else base_tensors[name]
        outputs.append(OutputTensor(name, stored.shape, stored=None if name in replaced else stored,
                                    value=replaced.get(name), deltas=deltas.get(name, [])))
    log.info("%s: %d LoRA layers, %d tensors replaced%s", adapter, len(loras), len(replaced),
             ", tied embeddings untied" if untie else "")
    return outputs, untie


def _tied_weights(base: Path, base_config: dict, trust_remote_code: bool = False) -> dict[str, str]:
    """``{tied name: source name}`` of the base, e.g. ``{"lm_head.weight": "model.embed_tokens.weight"}``.

    Known only to the model class, so one is built on the meta device (no memory, no weights).
    """
    if base_config.get("tie_word_embeddings") is False:
        return {}
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(base), trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as exc:
        if remote_code_error(exc):
            raise own_code_failed(str(base), exc) from None
        raise MergeError(f"{base}: cannot tell which of its weights are tied ({exc}); "
                         "set tie_word_embeddings in its config.json if it ties none") from None
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return {str(t): str(s) for t, s in dict(tied).items()}


# --- tokenizer and generation config -----------------------------------------------------------


def _load_tokenizer(path: Path, template: Template | str, trust_remote_code: bool = False):
    """The tokenizer with the template's chat_template, checked to encode every stop word and
    special-looking token of the template as one token."""
    from transformers import AutoTokenizer

    if not _has_tokenizer(path):
        raise MergeError(f"{path}: no tokenizer (tokenizer_config.json or tokenizer.json)")
    tokenizer = load_pretrained(AutoTokenizer, path, trust_remote_code=trust_remote_code)
    if template == HF:
        return tokenizer
    tokenizer.chat_template = template.chat_template()
    check_encodable(template, tokenizer, path, MergeError)
    for token in template.special_tokens():
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            # XTuner trains such templates with the marker split into pieces; so can we, but a
            # tokenizer made for the template would have it as one token
            log.warning("template %r: %r is %d tokens, not one special token, in the tokenizer %s",
                        template.name, token, len(ids), path)
    return tokenizer


def _generation_config(base: Path, base_config: dict, tokenizer, template: Template | str,
                       tokenizer_dir: Path) -> dict:
    """The base's generation settings, stopping at the tokenizer's eos and every stop word."""
    path = base / "generation_config.json"
    if path.is_file():
        generation = _read_json(path)
    else:
        generation = {k: base_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                      if base_config.get(k) is not None}
    # Edited here, so no longer "from the model config" (transformers may otherwise rebuild it).
    generation.pop("_from_model_config", None)
    base_eos = generation.get("eos_token_id")
    base_eos = [] if base_eos is None else base_eos if isinstance(base_eos, list) else [base_eos]
    eos = list(dict.fromkeys([*generation_stops(tokenizer, template).ids, *base_eos]))
    if not eos:
        raise MergeError(f"{tokenizer_dir}: the tokenizer has no eos token and the template no stop words; "
                         "generation would never stop")
    generation["eos_token_id"] = eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else generation.get("pad_token_id")
    generation["pad_token_id"] = pad if pad is not None else eos[0]
    return generation


def link_merges(links: dict[str, str], out_dir: str | os.PathLike) -> Path:
    """Make ``out_dir`` (``merged/``) hold one relative link per experiment to its final merge.

    The directory is rebuilt whole and renamed into place, so a reader never sees a half-made set.
    """
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        for name, target in sorted(links.items()):
            if not Path(target, "config.json").is_file():
                raise MergeError(f"{target}: no merged model here for experiment {name!r}")
            os.symlink(os.path.relpath(Path(target).resolve(), out_dir.resolve()), tmp / name)
    return out_dir
