"""Raw data in, XTuner's unified conversation out: source readers and format map functions.

Readers yield ``(location, record)`` so that every error names ``file:line`` (or the row of a
parquet file or hub dataset). Map functions follow XTuner's, edge cases included.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

from tunemake.config import read_revision
from tunemake.errors import DataError, at

#: What each format reads; shown by ``tunemake list-formats``.
FORMATS = {
    "conversation": 'XTuner\'s unified record: {"conversation": [{"system", "input", "output"}, ...]}; '
                    'a turn with "output_with_loss": false is not trained',
    "oasst1": '{"text": "### Human: ... ### Assistant: ..."}; a trailing human turn is dropped',
    "alpaca": '{"instruction", "input", "output"}; input = instruction + "\\n" + input; output "<nooutput>" drops the record',
    "openai": '{"messages": [{"role": system|user|assistant, "content"}]}; leading assistant messages skipped; '
              'an assistant message with "loss" other than true / "true" is not trained',
    "pretrain": '{"text"} (or a .txt file): one turn, empty input, the stripped text as output, no eos',
    "custom": "one turn from the columns named in the dataset's `fields:` (input, output, optional system, "
              "optional loss: a true/false column, false = not trained)",
}

SUFFIXES = (".json", ".jsonl", ".parquet", ".txt")


def read_file(path: str, text_unit: str = "line") -> Iterator[tuple[str, object]]:
    """Yield ``(location, record)`` from one local file.

    ``.jsonl``: one JSON value per line (blank lines skipped). ``.json``: a list of records, or an
    object with one list-valued key. ``.parquet``: one record per row. ``.txt``: ``{"text": ...}``
    per line, per blank-line-separated paragraph, or for the whole file (``text_unit``).

    Raises:
        DataError: missing or empty file (no record), unknown suffix, invalid UTF-8 or JSON; the
            message names file:line.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(at(path, "no such file" if not p.exists() else "not a regular file"))
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        yield from _read_parquet(path)
        return
    if suffix not in SUFFIXES:
        raise DataError(at(path, f"unsupported file type {suffix!r}; expected one of {', '.join(SUFFIXES)}"))
    text = _decode(path, p.read_bytes())
    if not text.strip():
        raise DataError(at(path, "the file is empty: no record to read"))
    lines = _lines(text)
    if suffix == ".jsonl":
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(at(f"{path}:{lineno}", f"invalid JSON: {exc.msg} (column {exc.colno})")) from None
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(at(f"{path}:{exc.lineno}", f"invalid JSON: {exc.msg} (column {exc.colno})")) from None
        if isinstance(data, dict):
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise DataError(at(path, "expected a JSON list of records (or an object holding one list)"))
            data = lists[0]
        if not isinstance(data, list):
            raise DataError(at(path, "expected a JSON list of records"))
        if not data:
            raise DataError(at(path, "the list of records is empty: no record to read"))
        for index, record in enumerate(data):
            yield f"{path}: record {index}", record
    else:  # .txt
        if text_unit == "file":
            yield f"{path}:1", {"text": text}
        elif text_unit == "paragraph":
            lineno, start, buffer = 0, 1, []
            for lineno, line in enumerate(lines, start=1):
                if line.strip():
                    if not buffer:
                        start = lineno
                    buffer.append(line)
                elif buffer:
                    yield f"{path}:{start}", {"text": "\n".join(buffer)}
                    buffer = []
            if buffer:
                yield f"{path}:{start}", {"text": "\n".join(buffer)}
        else:
            for lineno, line in enumerate(lines, start=1):
                if line.strip():
                    yield f"{path}:{lineno}", {"text": line}


def _lines(text: str) -> list[str]:
    """Split at newlines only: str.splitlines() also splits at U+2028, form feeds and others,
    which may sit inside a JSON string or a line of text, and would shift line numbers."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _decode(path: str, data: bytes) -> str:
    """Decode UTF-8 (a leading byte-order mark, as Windows tools write, is dropped)."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(at(f"{path}:{line}", f"not valid UTF-8 (byte 0x{data[exc.start]:02x})")) from None


def _read_parquet(path: str) -> Iterator[tuple[str, object]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DataError(at(path, f"cannot read parquet: {exc}")) from None
    if not table.num_rows:
        raise DataError(at(path, "the table has no rows: no record to read"))
    for index, record in enumerate(table.to_pylist()):
        yield f"{path}: row {index}", record


def read_hub(dataset_id: str, subset: str | None, split: str, revision: str | None) -> Iterator[tuple[str, object]]:
    """Yield ``(location, record)`` from a hub dataset: ``datasets.load_dataset`` on its snapshot
    in the local cache at ``revision`` (a local dataset directory is read as it is).

    Raises:
        HubError: the dataset is not in the cache.
        DataError: the split or subset cannot be loaded.
    """
    import datasets

    from tunemake.hub import dataset_dir

    directory = dataset_dir(dataset_id, revision)
    try:
        ds = datasets.load_dataset(str(directory), subset, split=split)
    except Exception as exc:
        raise DataError(at(f"hub:{dataset_id}", f"cannot load split {split!r}: {exc}")) from None
    for index, record in enumerate(ds):
        yield f"hub:{dataset_id}[{split}]: row {index}", record


# --- format map functions: record -> list of turns {"system", "input", "output"} ---------------


def _field(record, key: str, location: str, kind=str, optional: bool = False, default=""):
    if not isinstance(record, dict):
        raise DataError(at(location, f"expected a JSON object, got {type(record).__name__}"))
    if key not in record or record[key] is None:
        if optional:
            return default
        raise DataError(at(location, f"missing key {key!r}"))
    value = record[key]
    if not isinstance(value, kind):
        raise DataError(at(location, f"key {key!r} should be {kind.__name__}, got {type(value).__name__}"))
    return value


def _turn(system: str, input_: str, output: str, with_loss: bool = True) -> dict:
    turn = {"system": system, "input": input_, "output": output}
    if not with_loss:
        # set only when off, so a turn that is trained reads (and hashes, for the held-out split)
        # exactly as before per-turn loss existed
        turn["output_with_loss"] = False
    return turn


def _loss_flag(record, key: str, location: str) -> bool:
    """A boolean loss flag: true, false, or absent / null (true: parquet and hub datasets write
    null where a row lacks a key that others have)."""
    return _field(record, key, location, bool, optional=True, default=True)


def map_conversation(record, location: str, fields=None) -> list[dict]:
    turns = _field(record, "conversation", location, list)
    out = []
    for index, turn in enumerate(turns):
        where = f"{location}: conversation[{index}]"
        out.append(_turn(
            _field(turn, "system", where, optional=True),
            _field(turn, "input", where, optional=True),
            _field(turn, "output", where),
            _loss_flag(turn, "output_with_loss", where),
        ))
    return out


def map_oasst1(record, location: str, fields=None) -> list[dict]:
    text = _field(record, "text", location)
    data = []
    for sentence in text.strip().split("###"):
        sentence = sentence.strip()
        if sentence[:6] == "Human:":
            data.append(sentence[6:].strip())
        elif sentence[:10] == "Assistant:":
            data.append(sentence[10:].strip())
    if len(data) % 2:
        data.pop()  # a trailing human turn has no output to learn from
    return [{"system": "", "input": data[i], "output": data[i + 1]} for i in range(0, len(data), 2)]


def map_alpaca(record, location: str, fields=None) -> list[dict]:
    output = _field(record, "output", location)
    if output == "<nooutput>":
        return []
    instruction = _field(record, "instruction", location)
    extra = _field(record, "input", location, optional=True)
    return [{"system": "", "input": f"{instruction}\n{extra}", "output": output}]


def map_openai(record, location: str, fields=None) -> list[dict]:
    messages = _field(record, "messages", location, list)
    for index, message in enumerate(messages):
        where = f"{location}: messages[{index}]"
        _field(message, "role", where)
        _field(message, "content", where)
    while messages and messages[0]["role"] == "assistant":
        messages = messages[1:]
    system, user, conversation = "", "", []
    for index, message in enumerate(messages):
        role = message["role"]
        if role == "system":
            system = message["content"]
        elif role == "user":
            user += message["content"]
        elif role == "assistant":
            # XTuner's rule: anything but true / "true" (any case) leaves the turn untrained. A null
            # counts as absent, as Arrow-backed sources fill a key other messages have with null.
            loss = message.get("loss")
            with_loss = loss is None or str(loss).lower() == "true"
            conversation.append(_turn(system, user, message["content"], with_loss))
            system, user = "", ""
        else:
            raise DataError(at(location, f"messages: unknown role {role!r} (expected system, user or assistant)"))
    return conversation


def map_pretrain(record, location: str, fields=None) -> list[dict]:
    return [{"system": "", "input": "", "output": _field(record, "text", location).strip()}]


def map_custom(record, location: str, fields=None) -> list[dict]:
    fields = fields or {}
    system_key, loss_key = fields.get("system"), fields.get("loss")
    return [_turn(
        _field(record, system_key, location, optional=True) if system_key else "",
        _field(record, fields.get("input", "input"), location),
        _field(record, fields.get("output", "output"), location),
        _loss_flag(record, loss_key, location) if loss_key else True,
    )]


MAP_FUNCTIONS: dict[str, Callable[..., list[dict]]] = {
    "conversation": map_conversation,
    "oasst1": map_oasst1,
    "alpaca": map_alpaca,
    "openai": map_openai,
    "pretrain": map_pretrain,
    "custom": map_custom,
}


def read_dataset(dataset: dict, files: list[str] | None = None) -> Iterator[tuple[str, dict, list[dict]]]:
    """Yield ``(location, raw record, unified turns)`` for every record of a configured dataset.

    Args:
        dataset: one entry of the config's ``datasets:`` (defaults filled in).
        files: the local files to read (globs already expanded); None for a hub dataset.

    Raises:
        DataError: unreadable source or a record that does not fit the format.
    """
    fmt = dataset["format"]
    if fmt not in MAP_FUNCTIONS:
        raise DataError(f"unknown format {fmt!r}; known formats: {', '.join(MAP_FUNCTIONS)}")
    map_fn = MAP_FUNCTIONS[fmt]
    if files is None:
        records = read_hub(dataset["hub"], dataset.get("subset"), dataset.get("split", "train"), read_revision(dataset))
    else:
        records = (item for path in files for item in read_file(path, dataset.get("text_unit", "line")))
    for location, record in records:
        yield location, record, map_fn(record, location, dataset.get("fields"))
