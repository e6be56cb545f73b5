"""Tool use in the unified record: the tools a conversation offers, the calls a turn makes and
the results the next turn reads.

XTuner's unified turn ``{"system", "input", "output"}`` gains three keys, each present only when
it has content (so a record without tools reads and hashes as before):

- ``tools`` on the first turn: the functions the conversation offers, as
  ``apply_chat_template(tools=...)`` takes them: ``{"type": "function", "function": {"name",
  "description", "parameters"}}``. Like ``system``, it is part of the first prompt.
- ``tool_calls`` on a turn: ``[{"name", "arguments"}]``, ``arguments`` a JSON object. The model
  writes them after the turn's ``output`` text (which may be empty); they are trained.
- ``tool_results`` on the turn after a call: ``[{"name", "content"}]``, what the tools returned,
  shown to the model before that turn's ``input`` (often empty); never trained.
"""

from __future__ import annotations

import json

from tunemake.errors import DataError, at


def normalize_tools(value, location: str) -> list[dict]:
    """The ``tools`` of a record in the OpenAI form, from a list (or a JSON string of one) of
    ``{"type": "function", "function": {...}}`` or bare ``{"name", ...}`` function specs.

    Raises:
        DataError: not a list of objects each with a string ``name``; a string that is not JSON.
    """
    if value is None or value == "" or value == []:
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise DataError(at(location, f"tools: not valid JSON ({exc.msg}, column {exc.colno})")) from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise DataError(at(location, f"tools: expected a list of function specs, got {type(value).__name__}"))
    tools = []
    for index, tool in enumerate(value):
        spec = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else tool
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
            raise DataError(at(location, f"tools[{index}]: expected a function spec with a \"name\""))
        tools.append({"type": "function", "function": spec})
    return tools


def normalize_call(value, location: str) -> dict:
    """One call as ``{"name", "arguments"}``, from the OpenAI form
    (``{"type": "function", "function": {"name", "arguments"}}``) or a bare ``{"name", "arguments"}``;
    ``arguments`` a JSON object or a string holding one.

    Raises:
        DataError: no name, or arguments that are not a JSON object.
    """
    call = value.get("function", value) if isinstance(value, dict) else value
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        raise DataError(at(location, "a tool call needs a \"name\""))
    arguments = call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise DataError(at(location, f"tool call {call['name']!r}: arguments are not valid JSON "
                                         f"({exc.msg}, column {exc.colno}): {arguments[:80]!r}")) from None
    if not isinstance(arguments, dict):
        raise DataError(at(location, f"tool call {call['name']!r}: arguments should be a JSON object, "
                                     f"got {type(arguments).__name__}"))
    return {"name": call["name"], "arguments": arguments}


def result(name: str, content, location: str) -> dict:
    """One tool result; a non-string content (a JSON value) is kept as its JSON text."""
    if content is None:
        content = ""
    if not isinstance(content, str):
        content = json.dumps(content, ensure_ascii=False)
    return {"name": name, "content": content}


def check_sequence(turns: list[dict], location: str) -> None:
    """Results only after calls.

    Raises:
        DataError: a turn (counted from 1) reads tool results with no call in the turn before it.
    """
    for index, turn in enumerate(turns):
        if turn.get("tool_results") and (index == 0 or not turns[index - 1].get("tool_calls")):
            raise DataError(at(location, f"turn {index + 1}: a tool result with no tool call before it"))


def has_tools(turns: list[dict]) -> bool:
    """Whether a conversation offers, calls or reads tools."""
    return any(turn.get("tools") or turn.get("tool_calls") or turn.get("tool_results") for turn in turns)


def unknown_calls(turns: list[dict]) -> list[str]:
    """The names of called functions that the conversation's ``tools`` do not offer."""
    offered = {tool["function"]["name"] for tool in (turns[0].get("tools") or [])} if turns else set()
    return [call["name"] for turn in turns for call in turn.get("tool_calls", ()) if call["name"] not in offered]


def count_calls(turns: list[dict]) -> int:
    return sum(len(turn.get("tool_calls", ())) for turn in turns)


def as_messages(turns: list[dict]) -> list[dict]:
    """The conversation as chat messages, in the form ``apply_chat_template`` reads: system, user,
    assistant (with ``tool_calls`` in the OpenAI form) and ``tool`` messages."""
    messages: list[dict] = []
    for turn in turns:
        if turn.get("system"):
            messages.append({"role": "system", "content": turn["system"]})
        for item in turn.get("tool_results", ()):
            messages.append({"role": "tool", "name": item["name"], "content": item["content"]})
        if turn.get("input") or not turn.get("tool_results"):
            messages.append({"role": "user", "content": turn.get("input") or ""})
        message = {"role": "assistant", "content": turn["output"]}
        if turn.get("tool_calls"):
            message["tool_calls"] = [{"type": "function", "function": dict(call)} for call in turn["tool_calls"]]
        messages.append(message)
    return messages
