"""Raw data in, XTuner's unified conversation out: source readers and format map functions.

Readers yield ``(location, record)`` so that every error names ``file:line`` (or the row of a
parquet file or hub dataset). Map functions follow XTuner's, edge cases included.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Callable, Iterator

from tunemake import tools
from tunemake.config import read_revision
from tunemake.errors import DataError, at

#: What each format reads; shown by ``tunemake list-formats``.
FORMATS = {
    "conversation": 'XTuner\'s unified record: {"conversation": [{"system", "input", "output"}, ...]}; '
                    'a turn with "output_with_loss": false is not trained; tools: "tools" on the record, '
                    '"tool_calls" [{"name", "arguments"}] and "tool_results" [{"name", "content"}] on turns',
    "oasst1": '{"text": "### Human: ... ### Assistant: ..."}; a trailing human turn is dropped',
    "alpaca": '{"instruction", "input", "output"}; input = instruction + "\\n" + input; output "<nooutput>" drops the record',
    "openai": '{"messages": [{"role": system|user|assistant|tool, "content"}], "tools": [...]}; leading assistant '
              'messages skipped; an assistant message with "loss" other than true / "true" is not trained; '
              'assistant "tool_calls" [{"type": "function", "function": {"name", "arguments"}}], tool messages '
              'with "tool_call_id" or "name"',
    "sharegpt": '{"conversations": [{"from": system|human|gpt|function_call|observation, "value"}], "tools": "<JSON>"} '
                "as LLaMA-Factory reads it; keys and role names from the dataset's `fields:` (messages, system, tools, "
                "role_tag, content_tag, user_tag, assistant_tag, observation_tag, function_tag, system_tag)",
    "moss_sft": 'moss-003-sft records {"meta_instruction", "num_turns", "chat": {"turn_1": {"Human", "Inner Thoughts", '
                '"Commands", "Tool Responses", "MOSS"}}}: the enabled APIs become tools, Commands calls, Tool Responses results',
    "msagent_react": 'MSAgent-Bench {"conversations": [{"from": system|user|assistant, "value"}]} as XTuner\'s '
                     "msagent_react_map_fn writes it: ReAct text, the tool's response untrained",
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
        yield f"{path}: row {index}", without_nulls(record)


def without_nulls(value):
    """A row read through Arrow (parquet, hub datasets) with the nulls of its objects left out.

    Arrow gives every row of a column the union of the keys its objects have, filling the
    missing ones with null: a tool's parameters or a call's arguments would gain keys that other
    rows hold. Every map function reads a null as absent, so dropping them changes nothing else
    (a null written on purpose inside a tool's JSON schema is lost too; write such a schema as a
    JSON string).
    """
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


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
        yield f"hub:{dataset_id}[{split}]: row {index}", without_nulls(record)


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
    out, offered = [], record.get("tools")
    for index, turn in enumerate(turns):
        where = f"{location}: conversation[{index}]"
        calls = _field(turn, "tool_calls", where, list, optional=True, default=[])
        out.append(_add_tools(_turn(
            _field(turn, "system", where, optional=True),
            _field(turn, "input", where, optional=True),
            _field(turn, "output", where, optional=bool(calls)),
            _loss_flag(turn, "output_with_loss", where),
        ), [tools.normalize_call(call, where) for call in calls],
            [_result(item, f"{where}: tool_results")
             for item in _field(turn, "tool_results", where, list, optional=True, default=[])]))
        if index == 0 and turn.get("tools"):
            offered = turn["tools"]  # how tunemake's own held-out file writes them
        elif turn.get("tools"):
            raise DataError(at(where, "tools can only be given for the whole conversation (the record or its first turn)"))
    return _with_tools(out, offered, location)


def _result(item, location: str) -> dict:
    if not isinstance(item, dict) or "content" not in item:
        raise DataError(at(location, 'a tool result should be {"name", "content"}'))
    return tools.result(item.get("name") or "", item["content"], location)


def _add_tools(turn: dict, calls: list[dict], results: list[dict]) -> dict:
    """Set a turn's tool keys, only where they have content (see tunemake.tools)."""
    if calls:
        turn["tool_calls"] = calls
    if results:
        turn["tool_results"] = results
    return turn


def _with_tools(turns: list[dict], spec, location: str) -> list[dict]:
    """Put the record's tools on its first turn and check the order of calls and results."""
    offered = tools.normalize_tools(spec, location)
    if offered and turns:
        turns[0] = {**turns[0], "tools": offered}
    tools.check_sequence(turns, location)
    return turns


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
        role = _field(message, "role", where)
        if role == "tool":
            _field(message, "content", where, object)  # a tool may return any JSON value
        elif not (role == "assistant" and message.get("tool_calls")):
            _field(message, "content", where)
    while messages and messages[0]["role"] == "assistant":
        messages = messages[1:]
    system, user, conversation = "", "", []
    results: list[dict] = []
    call_names: dict[str, str] = {}  # tool_call_id -> function name, for the tool messages
    for index, message in enumerate(messages):
        role, where = message["role"], f"{location}: messages[{index}]"
        if role == "system":
            system = message["content"]
        elif role == "user":
            user += message["content"]
        elif role == "assistant":
            # XTuner's rule: anything but true / "true" (any case) leaves the turn untrained. A null
            # counts as absent, as Arrow-backed sources fill a key other messages have with null.
            loss = message.get("loss")
            with_loss = loss is None or str(loss).lower() == "true"
            calls = message.get("tool_calls") or []
            if not isinstance(calls, list):
                raise DataError(at(where, "tool_calls should be a list"))
            turn = _turn(system, user, message.get("content") or "", with_loss)
            conversation.append(_add_tools(turn, [tools.normalize_call(c, where) for c in calls], results))
            call_names = {c.get("id"): tools.normalize_call(c, where)["name"] for c in calls if c.get("id")}
            system, user, results = "", "", []
        elif role == "tool":
            if not conversation or not conversation[-1].get("tool_calls"):
                raise DataError(at(where, "a tool result with no tool call before it"))
            name = message.get("name") or call_names.get(message.get("tool_call_id"))
            if not name:
                raise DataError(at(where, "a tool message needs a \"name\" or the \"tool_call_id\" of a call before it"))
            results.append(tools.result(name, message["content"], where))
        else:
            raise DataError(at(location, f"messages: unknown role {role!r} (expected system, user, assistant or tool)"))
    return _with_tools(conversation, record.get("tools"), location)


#: sharegpt's keys and role names, as LLaMA-Factory's dataset_info.json names them; a dataset's
#: ``fields:`` overrides any of them.
SHAREGPT_FIELDS = {
    "messages": "conversations", "system": "system", "tools": "tools", "role_tag": "from", "content_tag": "value",
    "user_tag": "human", "assistant_tag": "gpt", "observation_tag": "observation",
    "function_tag": "function_call", "system_tag": "system",
}


def map_sharegpt(record, location: str, fields=None) -> list[dict]:
    """LLaMA-Factory's sharegpt: a leading system message (or a ``system`` column), then
    human/observation and gpt/function_call messages in turn; a trailing human message is dropped."""
    f = {**SHAREGPT_FIELDS, **(fields or {})}
    messages = _field(record, f["messages"], location, list)
    system = _field(record, f["system"], location, optional=True)
    conversation: list[dict] = []
    prompt: dict = {}
    for index, message in enumerate(messages):
        where = f"{location}: {f['messages']}[{index}]"
        role, content = _field(message, f["role_tag"], where), _field(message, f["content_tag"], where, object)
        if role == f["system_tag"] and index == 0:
            system = _text(content, where)
        elif role in (f["user_tag"], f["observation_tag"]) and not prompt:
            prompt = {"role": role, "content": content, "where": where}
        elif role in (f["assistant_tag"], f["function_tag"]) and prompt:
            conversation.append(_sharegpt_turn(system, prompt, role, content, where, f, conversation))
            system, prompt = "", {}
        elif role in (f["user_tag"], f["observation_tag"], f["assistant_tag"], f["function_tag"]):
            expected = "a gpt or function_call message" if prompt else "a human or observation message"
            raise DataError(at(where, f"{role!r} where {expected} was expected (turns must alternate)"))
        elif role == f["system_tag"]:
            raise DataError(at(where, f"a {role!r} message is allowed only first"))
        else:
            known = [f[k] for k in ("system_tag", "user_tag", "assistant_tag", "function_tag", "observation_tag")]
            raise DataError(at(where, f"unknown role {role!r}; expected one of {', '.join(known)} "
                                      "(other role names: the dataset's fields:)"))
    return _with_tools(conversation, record.get(f["tools"]), location)


def _sharegpt_turn(system: str, prompt: dict, role: str, content, where: str, f: dict, before: list[dict]) -> dict:
    if prompt["role"] == f["observation_tag"]:
        if not before or not before[-1].get("tool_calls"):
            raise DataError(at(prompt["where"], "a tool result with no tool call before it"))
        calls = before[-1]["tool_calls"]
        results = [tools.result(calls[0]["name"] if len(calls) == 1 else "", prompt["content"], prompt["where"])]
        turn = _turn(system, "", "")
    else:
        results, turn = [], _turn(system, _text(prompt["content"], prompt["where"]), "")
    if role == f["function_tag"]:
        value = content
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise DataError(at(where, f"function_call: not valid JSON ({exc.msg}, column {exc.colno})")) from None
        calls = [tools.normalize_call(call, where) for call in (value if isinstance(value, list) else [value])]
    else:
        turn["output"], calls = _text(content, where), []
    return _add_tools(turn, calls, results)


def _text(value, location: str) -> str:
    if not isinstance(value, str):
        raise DataError(at(location, f"expected text, got {type(value).__name__}"))
    return value


_MOSS_TOOL_LINE = re.compile(r"^- (?P<desc>[^:\n]+): enabled\. API: (?P<name>\w+)\((?P<params>[^)]*)\)\n?", re.M)
# XTuner's plugin call pattern (xtuner/tools/plugins/api.py), for any function name
_MOSS_CALL = re.compile(r'(\w+)\("([^"]*)"\)')


def map_moss_sft(record, location: str, fields=None) -> list[dict]:
    """A moss-003-sft record (``meta_instruction``, ``num_turns``, ``chat.turn_N`` with Human,
    Inner Thoughts, Commands, Tool Responses and MOSS), as XTuner's MOSSSFTDataset reads it: the
    meta instruction is the system prompt, as it is, and its ``- X: enabled. API: F(arg)`` lines
    name the record's tools; a turn whose Commands call tools becomes a call turn (Inner Thoughts as its
    text) and a result turn (Tool Responses as results, MOSS as the answer). Other turns keep
    their Inner Thoughts, Commands, Tool Responses and MOSS text as the answer, markers and all."""
    meta = _field(record, "meta_instruction", location)
    chat = _field(record, "chat", location, dict)
    offered = [
        {"name": m["name"], "description": m["desc"], "parameters": {
            "type": "object", "properties": {p.strip(): {"type": "string"} for p in m["params"].split(",") if p.strip()}}}
        for m in _MOSS_TOOL_LINE.finditer(meta)
    ]
    params = {tool["name"]: list(tool["parameters"]["properties"]) for tool in offered}
    system = meta.removesuffix("\n")  # the template's "{system}\n" writes it back
    turns: list[dict] = []
    count = _field(record, "num_turns", location, object)
    if not str(count).isdigit():
        raise DataError(at(location, f"num_turns should be a whole number, got {count!r}"))
    count = int(count)
    for index in range(1, count + 1):
        where = f"{location}: chat.turn_{index}"
        turn = _field(chat, f"turn_{index}", where, dict)
        human = re.sub(r"^<\|Human\|>:\s?|<eoh>\n?$", "", _field(turn, "Human", where))
        parts = {key: _field(turn, key, where, optional=True) for key in ("Inner Thoughts", "Commands", "Tool Responses")}
        moss = _field(turn, "MOSS", where).removesuffix("\n")
        calls = [{"name": name, "arguments": {(params.get(name) or ["input"])[0]: arg}}
                 for name, arg in _MOSS_CALL.findall(parts["Commands"])]
        system_now, system = system, ""
        if not calls:
            turns.append(_turn(system_now, human, "".join(parts.values()) + moss))
            continue
        turns.append(_add_tools(_turn(system_now, human, parts["Inner Thoughts"]), calls, []))
        turns.append(_add_tools(_turn("", "", moss), [], _moss_results(parts["Tool Responses"], calls)))
    return _with_tools(turns, offered, location)


def _moss_results(text: str, calls: list[dict]) -> list[dict]:
    """``<|Results|>:\nCalculate("2+3") => 5\n<eor>\n`` as one result per call (a result that
    starts on the line after ``=>`` keeps that newline); a block that does not name each call in
    order is kept whole, as one unnamed result."""
    from tunemake.toolforms import moss_call

    inner = re.sub(r"^<\|Results\|>:\n?|\n?<eor>\n?$", "", text)
    starts = []
    for call in calls:
        start = inner.find(moss_call(call) + " =>", starts[-1] if starts else 0)
        if start < 0:
            return [tools.result("", inner, "")]
        starts.append(start)
    results = []
    for index, (call, start) in enumerate(zip(calls, starts)):
        end = starts[index + 1] if index + 1 < len(starts) else len(inner)
        body = inner[start + len(moss_call(call)) + 3:end].removesuffix("\n")
        results.append(tools.result(call["name"], body.removeprefix(" "), ""))
    return results


_THINK = re.compile(r"(.*?)(<\|startofthink\|\>)(.*?)(<\|endofthink\|\>)", re.DOTALL)
_EXEC = re.compile(r"(<\|startofexec\|\>)(.*?)(<\|endofexec\|\>)(.*?)$", re.DOTALL)


def _react_think(match) -> str:
    out = f"Thought:{match.group(1).strip()}\n" if match.group(1).strip() else ""
    think = json.loads(match.group(3).replace("```JSON", "").replace("```", "").replace("\n", ""))
    return out + f"Action:{think['api_name']}\nAction Input:{think['parameters']}\n"


def _react_exec(match) -> str:
    executed = json.loads(match.group(2).replace("```JSON", "").replace("```", "").replace("\n", ""))
    out = f"Response:{executed}\n"
    return out + (f"Final Answer:{match.group(4).strip()}\n" if match.group(4).strip() else "")


def _api_descriptions(text: str) -> dict[str, str]:
    """XTuner's extract_json_objects: every JSON object in the text with a name and description."""
    decoder, pos, found = json.JSONDecoder(), 0, {}
    while (start := text.find("{", pos)) != -1:
        try:
            obj, length = decoder.raw_decode(text[start:])
        except ValueError:
            pos = start + 1
            continue
        if isinstance(obj, dict) and "name" in obj and "description" in obj:
            found[obj["name"]] = obj["description"]
            try:
                params = {p["name"]: p["description"] for p in obj["paths"][0]["parameters"]}
                found[obj["name"]] += f"\n输入参数: {params}"
            except Exception:  # noqa: BLE001 - XTuner adds the parameters only where they parse
                pass
            pos = start + length
        else:
            pos = start + 1
    return found


def map_msagent_react(record, location: str, fields=None) -> list[dict]:
    """MSAgent-Bench as XTuner's msagent_react_map_fn maps it: ReAct text (Thought, Action,
    Action Input, Response, Final Answer) on plain turns; the tool's Response is the system text
    of the turn that gives the final answer, so it is never trained. As in XTuner, a record whose
    think or exec block does not parse is dropped (counted as empty)."""
    conversations = _field(record, "conversations", location, object)
    if isinstance(conversations, str):
        try:
            conversations = ast.literal_eval(conversations)
        except (ValueError, SyntaxError):
            raise DataError(at(location, "conversations: neither a list nor the text of one")) from None
    if not isinstance(conversations, list) or len(conversations) < 2:
        return []
    conversation, system, user = [], "", ""
    for index, message in enumerate(conversations):
        where = f"{location}: conversations[{index}]"
        role, value = _field(message, "from", where), _field(message, "value", where)
        if role == "system":
            apis = _api_descriptions(value)
            system += f"{_REACT_INTRO}{apis}\n" + _REACT_FORMAT.format(names=str(list(apis)))
        elif role == "user":
            user += f"{value}\n"
        elif role == "assistant":
            try:
                turns = _react_turns(value, system, user)
            except (ValueError, KeyError, TypeError):
                return []
            conversation += turns
            system, user = "", ""
    return conversation


_REACT_INTRO = "你是一个可以调用外部工具的助手，可以使用的工具包括：\n"
_REACT_FORMAT = (
    "如果使用工具请遵循以下格式回复：\n```\n"
    "Thought:思考你当前步骤需要解决什么问题，是否需要使用工具\n"
    "Action:工具名称，你的工具必须从 [{names}] 选择\n"
    "Action Input:工具输入参数\n```\n工具返回按照以下格式回复：\n```\n"
    "Response:调用工具后的结果\n```\n如果你已经知道了答案，或者你不需要工具，"
    "请遵循以下格式回复\n```\n"
    "Thought:给出最终答案的思考过程\n"
    "Final Answer:最终答案\n```\n开始!\n"
)


def _react_turns(value: str, system: str, user: str) -> list[dict]:
    output, response = value, None
    if "<|startofexec|>" in output:
        output, response = output.split("<|startofexec|>")
        response = "<|startofexec|>" + response
    output, thinks = _THINK.subn(_react_think, output)
    turns = [{"system": system, "input": user, "output": f"{output}\n" if thinks else f"Final Answer:{output}\n"}]
    if response is not None:
        try:  # XTuner keeps the first turn when the tool's part does not parse
            response = _EXEC.sub(_react_exec, response)
            if "Final Answer:" in response:
                response, answer = response.split("Final Answer:")
                turns.append({"system": response, "input": "", "output": "Final Answer:" + answer})
        except (ValueError, KeyError, TypeError):
            pass
    return turns


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
    "sharegpt": map_sharegpt,
    "moss_sft": map_moss_sft,
    "msagent_react": map_msagent_react,
}


#: How many records of each local file :func:`first_tool_record` reads, and the largest ``.json``
#: file it parses whole: the look runs every time the config loads, so it stays cheap.
PEEK_RECORDS = 100
PEEK_JSON_BYTES = 8 << 20


def first_tool_record(dataset: dict, files: list[str], limit: int = PEEK_RECORDS) -> str | None:
    """Where the first record that offers, calls or reads tools is, among the first ``limit``
    records of each local file; None when none of them does.

    The config looks here when it loads, so that a template without a tool form is refused
    before any job runs. It reads the head of a ``.jsonl`` file, the first rows of a parquet file,
    and a ``.json`` file of at most 8 MB. A file that does not exist yet (another rule builds it)
    or does not read is passed over, as is a record that does not fit the format: the data job
    reads every record, reports those, and refuses a tool record past the ones looked at.
    """
    map_fn = MAP_FUNCTIONS.get(dataset["format"])
    for path in files:
        try:
            for location, record in _head(path, limit):
                if tools.has_tools(map_fn(record, location, dataset.get("fields"))):
                    return location
        except (DataError, OSError, ValueError):
            continue
    return None


def _head(path: str, limit: int) -> Iterator[tuple[str, object]]:
    """The first ``limit`` records of a local file, numbered as :func:`read_file` numbers them."""
    suffix = Path(path).suffix.lower()
    if suffix == ".jsonl":
        with open(path, "rb") as file:  # lines end at b"\n" only, as read_file splits them
            count = 0
            for lineno, line in enumerate(file, start=1):
                if count == limit:
                    return
                text = line.decode("utf-8-sig" if lineno == 1 else "utf-8")
                if text.strip():
                    count += 1
                    yield f"{path}:{lineno}", json.loads(text)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        batch = next(pq.ParquetFile(path).iter_batches(batch_size=limit), None)
        for index, record in enumerate(batch.to_pylist() if batch is not None else ()):
            yield f"{path}: row {index}", without_nulls(record)
    elif suffix == ".json" and Path(path).stat().st_size <= PEEK_JSON_BYTES:
        for index, item in zip(range(limit), read_file(path)):
            yield item


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
