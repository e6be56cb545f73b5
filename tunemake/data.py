"""The data stage: raw sources -> one templated, tokenized, label-masked, packed dataset.

Entry point :func:`build_templated_dataset`, called by ``rules/data.smk``, ``tunemake build-data``
and the tests. Its output directory (named by the recipe's hash, see ``tunemake.config``) holds a
``datasets.save_to_disk`` DatasetDict (``train`` packed, ``heldout`` unpacked), ``heldout.jsonl``,
``stats.json`` and ``recipe.json``. Supported: local .json/.jsonl/.parquet/.txt and hub datasets,
the formats in ``tunemake.formats``, every template in ``tunemake.templates``. Not supported:
streaming datasets larger than memory (records are held in memory while encoding).
"""

from __future__ import annotations

import hashlib
import json
from itertools import chain
import logging
import os
import time

from tunemake.atomic import atomic_dir, write_json
from tunemake.config import expand_sources, read_revision
from tunemake.encode import IGNORE_INDEX, Encoded, check_tools, encode_record, encode_records, pack
from tunemake.errors import DataError, at
from tunemake.formats import read_dataset
from tunemake.templates import HF, Template, check_encodable
from tunemake.tools import count_calls, has_tools, unknown_calls

log = logging.getLogger("tunemake.data")

ENCODE_CHUNK = 4096  # records per encode_batch call: big enough to keep the threads busy


def template_from_recipe(recipe_template: dict) -> Template | str:
    """The template a recipe names (its fields are part of the recipe, so it is self-contained)."""
    if recipe_template["name"] == HF:
        return HF
    return Template(**recipe_template)


def load_tokenizer(tokenizer: dict):
    """Load the tokenizer a recipe names (a local model directory, or a hub id in the local cache).

    Raises:
        HubError: a hub id that is not in the cache; the model's own tokenizer code fails.
        DataError: no tokenizer there.
    """
    from transformers import AutoTokenizer

    from tunemake.hub import HubError, load_pretrained, model_dir

    path = tokenizer["path"]
    directory = model_dir(path, read_revision(tokenizer))
    try:
        return load_pretrained(AutoTokenizer, directory, path, trust_remote_code=tokenizer.get("trust_remote_code", False))
    except HubError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: cannot load a tokenizer from this model: {exc}") from None


def split_heldout(turns: list[dict], fraction: float, seed: int) -> bool:
    """Whether a record is held out: decided by a hash of its content, not its position.

    Adding or reordering records never moves an existing record between train and held-out.
    """
    if fraction <= 0:
        return False
    digest = hashlib.sha256(f"{seed}\0{json.dumps(turns, sort_keys=True, ensure_ascii=False)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="rec", mininterval=1.0, dynamic_ncols=True)


def build_templated_dataset(
    recipe: dict, out_dir: str | os.PathLike, files: dict[str, list[str]] | None = None, threads: int = 1
) -> dict:
    """Build the templated dataset a recipe describes into ``out_dir``, atomically.

    Args:
        recipe: ``tunemake.config.data_recipe`` of an experiment (tokenizer, template, datasets,
            max_length, packing, data_seed).
        out_dir: where the dataset goes; replaced only once everything is written.
        files: per dataset name, the local files to read (globs expanded); default: expand the
            recipe's paths now.
        threads: tokenizer threads (the rule's ``threads``).

    Returns:
        The statistics written to ``stats.json``.

    Raises:
        DataError: unreadable or malformed data (naming file and line), or a dataset with no
            trainable record left; nothing is written to ``out_dir`` then.
    """
    os.environ["RAYON_NUM_THREADS"] = str(max(1, threads))
    if threads > 1:
        # datasets.map(num_proc>1) earlier in this process sets "false", which would keep every
        # later encode_batch on one thread
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
    started = time.perf_counter()
    tokenizer = load_tokenizer(recipe["tokenizer"])
    template = template_from_recipe(recipe["template"])
    # found here, before training, rather than by the merge after it
    check_encodable(template, tokenizer, recipe["tokenizer"]["path"], DataError)
    max_length = recipe["max_length"]

    train: list[Encoded] = []
    heldout: list[Encoded] = []
    heldout_records: list[dict] = []
    stats: dict = {"datasets": {}}
    for dataset in recipe["datasets"]:
        name = dataset["name"]
        paths = None if "hub" in dataset else (files or {}).get(name) or expand_sources(dataset, name)
        ds_stats, ds_train, ds_heldout, ds_records = _encode_dataset(dataset, paths, tokenizer, template, max_length)
        stats["datasets"][name] = ds_stats
        train += ds_train
        heldout += ds_heldout
        heldout_records += ds_records

    if any(s["tool_records"] for s in stats["datasets"].values()):
        _check_tool_markers(template, tokenizer)
    packed = pack(train, max_length, seed=recipe["data_seed"], packing=recipe["packing"])
    tokens = int(len(packed.input_ids))
    stats.update({
        "digest": _digest(packed, heldout),
        "records_in": sum(s["records_in"] for s in stats["datasets"].values()),
        "records_out": {"train": len(train), "heldout": len(heldout)},
        "dropped": _sum_dicts(s["dropped"] for s in stats["datasets"].values()),
        "truncated": sum(s["truncated"] for s in stats["datasets"].values()),
        "tool_records": sum(s["tool_records"] for s in stats["datasets"].values()),
        "tool_calls": sum(s["tool_calls"] for s in stats["datasets"].values()),
        "tokens": tokens,
        "trained_tokens": int((packed.labels != IGNORE_INDEX).sum()),
        "heldout_tokens": sum(len(e.input_ids) for e in heldout),
        "rows": packed.num_rows,
        "max_length": max_length,
        "packing": recipe["packing"],
        "packing_efficiency": round(tokens / (packed.num_rows * max_length), 6) if packed.num_rows else 0.0,
    })

    with atomic_dir(out_dir) as tmp:
        recipe_hash = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
        dataset_dict = _dataset_dict(packed, heldout, fingerprint=recipe_hash)
        # An empty split must still get one (empty) shard, or load_from_disk cannot read it back.
        dataset_dict.save_to_disk(str(tmp), num_shards={k: 1 for k, v in dataset_dict.items() if len(v) == 0})
        with open(tmp / "heldout.jsonl", "w", encoding="utf-8") as handle:
            for record in heldout_records:
                handle.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
        write_json(tmp / "stats.json", stats)
        write_json(tmp / "recipe.json", recipe)
    seconds = time.perf_counter() - started
    log.info(
        "%s: %d records in, %d train / %d held out, %d tokens in %d rows (packing efficiency %.1f%%), "
        "%.1f s (%.0f tokens/s)",
        out_dir, stats["records_in"], len(train), len(heldout), tokens, packed.num_rows,
        100 * stats["packing_efficiency"], seconds, tokens / max(seconds, 1e-9),
    )
    return stats


def _encode_dataset(dataset: dict, paths, tokenizer, template, max_length: int):
    """Read, map, split and encode one configured dataset."""
    name = dataset["name"]
    pretrain = dataset["format"] == "pretrain"
    dropped = {"empty_conversation": 0, "no_labels": 0, "unknown_tool": 0}
    tool_stats = {"tool_records": 0, "tool_calls": 0}
    records: list[tuple[list[dict], dict]] = []  # turns, fields kept for the held-out file
    for location, raw, turns in read_dataset(dataset, paths):
        if not turns or (pretrain and not turns[0]["output"]):
            dropped["empty_conversation"] += 1
            continue
        if has_tools(turns):
            if not tool_stats["tool_records"] and not dropped["unknown_tool"]:
                _tools_writable(turns, template, tokenizer, location)  # the same for every record
            unknown = unknown_calls(turns)
            if unknown:  # real datasets have a few: dropped and counted
                if not dropped["unknown_tool"]:
                    log.warning("%s: calls %r, which the record's tools do not offer: dropped (dataset %r "
                                "counts such records in stats.json)", location, unknown[0], name)
                dropped["unknown_tool"] += 1
                continue
            tool_stats["tool_records"] += 1
            tool_stats["tool_calls"] += count_calls(turns)
        extra = {k: v for k, v in raw.items() if k == "task"} if isinstance(raw, dict) else {}
        records.append((turns, extra))
    records_in = len(records) + dropped["empty_conversation"] + dropped["unknown_tool"]

    fraction, seed = dataset.get("heldout_fraction", 0.0), dataset.get("split_seed", 0)
    flags = [split_heldout(turns, fraction, seed) for turns, _ in records]
    if fraction > 0 and not any(flags):
        log.warning("dataset %r: no record of %d fell into the held-out %.1f%%", name, len(records), 100 * fraction)

    encoded: list[Encoded] = []
    with _progress(len(records), f"encode {name}") as bar:
        for start in range(0, len(records), ENCODE_CHUNK):
            chunk = records[start:start + ENCODE_CHUNK]
            encoded += encode_records(((turns, pretrain) for turns, _ in chunk), tokenizer, template, max_length)
            bar.update(len(chunk))

    train, heldout, heldout_records = [], [], []
    truncated = 0
    for (turns, extra), is_heldout, enc in zip(records, flags, encoded):
        if all(label == IGNORE_INDEX for label in enc.labels):
            dropped["no_labels"] += 1
            continue
        truncated += enc.truncated
        if is_heldout:
            heldout.append(enc)
            heldout_records.append({"dataset": name, "conversation": turns, **extra})
        else:
            train.append(enc)
    if not train:
        source = dataset.get("hub") or ", ".join(paths or [])
        raise DataError(
            f"{source}: dataset {name!r} has no trainable record left "
            f"({records_in} read, {dropped['empty_conversation']} empty, "
            f"{dropped['unknown_tool']} calling a function the record does not offer, "
            f"{dropped['no_labels']} without a labelled token after truncation to {max_length}, "
            f"{len(heldout)} held out)"
        )
    ds_stats = {
        "records_in": records_in, "train": len(train), "heldout": len(heldout),
        "dropped": dropped, "truncated": truncated, **tool_stats,
    }
    return ds_stats, train, heldout, heldout_records


def _tools_writable(turns: list[dict], template, tokenizer, location: str) -> None:
    """Raise, naming the record, when the template cannot write its tools."""
    try:
        check_tools(turns, template, tokenizer)
    except DataError as exc:
        raise DataError(at(location, f"this record has tools, and {exc}")) from None


def _check_tool_markers(template, tokenizer) -> None:
    """Say once, in the data job's log, which of the tool form's markers the tokenizer splits."""
    from tunemake.toolforms import FORMS

    if template == HF:
        return
    split = [m for m in FORMS[template.tool_form].markers if len(tokenizer.encode(m, add_special_tokens=False)) != 1]
    if split:
        log.warning("template %r: the tokenizer has no single token for %s; tool calls still train, as text",
                    template.name, ", ".join(split))


def _digest(packed, heldout: list[Encoded]) -> str:
    """sha256 of every token, label and position the dataset holds: what training reads, named once
    here so that each epoch's fingerprint need not hash the dataset again."""
    import numpy as np

    digest = hashlib.sha256()
    for array in (packed.input_ids, packed.labels, packed.position_ids, packed.offsets):
        digest.update(array.astype("int64").tobytes())
    for enc in heldout:
        for values in (enc.input_ids, enc.labels):
            digest.update(np.asarray(values, dtype=np.int64).tobytes() + b"|")
    return digest.hexdigest()


def _sum_dicts(dicts) -> dict:
    total: dict = {}
    for d in dicts:
        for key, value in d.items():
            total[key] = total.get(key, 0) + value
    return total


def _dataset_dict(packed, heldout: list[Encoded], fingerprint: str):
    """A DatasetDict built straight from flat arrays (no per-row Python objects for train).

    ``fingerprint`` (the recipe's hash) names the splits for datasets' cache, which would
    otherwise hash every table to make one.
    """
    import datasets
    import numpy as np
    import pyarrow as pa
    from datasets.table import InMemoryTable

    def lists(values: np.ndarray, offsets: np.ndarray) -> pa.Array:
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, type=pa.int32()))

    train = pa.table({
        "input_ids": lists(packed.input_ids, packed.offsets),
        "labels": lists(packed.labels, packed.offsets),
        "position_ids": lists(packed.position_ids, packed.offsets),
    })
    lengths = np.array([len(e.input_ids) for e in heldout], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]) if len(lengths) else np.zeros(1, dtype=np.int64)
    flat = lambda attr: np.fromiter(chain.from_iterable(getattr(e, attr) for e in heldout), dtype=np.int32)  # noqa: E731
    heldout_table = pa.table({
        "input_ids": lists(flat("input_ids"), offsets),
        "labels": lists(flat("labels"), offsets),
    })
    return datasets.DatasetDict({
        "train": datasets.Dataset(InMemoryTable(train), fingerprint=f"{fingerprint}-train"),
        "heldout": datasets.Dataset(InMemoryTable(heldout_table), fingerprint=f"{fingerprint}-heldout"),
    })


def check_dataset(dataset: dict, paths, tokenizer, template, max_length: int, count: int = 3,
                  color: bool = False) -> str:
    """Render the first ``count`` records as the model sees them, trained tokens marked.

    Trained (labelled) spans are wrapped in ``[[`` ``]]``, or shown in green with ``color``.
    Like ``xtuner check-custom-dataset``: for eyeballing a format, a field mapping or a template.
    """
    pretrain = dataset["format"] == "pretrain"
    blocks = []
    for location, _raw, turns in read_dataset(dataset, paths):
        if len(blocks) == count:
            break
        if not turns:
            blocks.append(f"--- {location} (dropped: empty conversation)")
            continue
        if has_tools(turns):
            _tools_writable(turns, template, tokenizer, location)
        enc = encode_record(turns, tokenizer, template, max_length, pretrain)
        trained = sum(label != IGNORE_INDEX for label in enc.labels)
        header = f"--- {location}: {len(enc.input_ids)} tokens, {trained} trained"
        calls = count_calls(turns)
        header += f", {calls} tool call{'s' if calls != 1 else ''}" if has_tools(turns) else ""
        header += " (truncated)" if enc.truncated else ""
        header += " (dropped: no labelled token)" if not trained else ""
        unknown = unknown_calls(turns)
        header += f" (dropped: calls {unknown[0]!r}, which its tools do not offer)" if unknown else ""
        blocks.append(header + "\n" + _mark_labels(tokenizer, enc, color))
    return "\n".join(blocks)


def _mark_labels(tokenizer, enc: Encoded, color: bool) -> str:
    open_, close = ("\x1b[32m", "\x1b[0m") if color else ("[[", "]]")
    out, start = [], 0
    ids, labelled = enc.input_ids, [label != IGNORE_INDEX for label in enc.labels]
    for i in range(1, len(ids) + 1):
        if i == len(ids) or labelled[i] != labelled[start]:
            text = tokenizer.decode(ids[start:i])
            out.append(f"{open_}{text}{close}" if labelled[start] else text)
            start = i
    return "".join(out)
