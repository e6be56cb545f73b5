"""How the templates that have a tool form write tools, calls and results (see ``tunemake.tools``).

Each form gives the text training encodes and the Jinja that a merged model's ``chat_template``
renders from OpenAI-style messages (``tools=``, assistant ``tool_calls``, ``tool`` messages): the
two are kept side by side here and tested to agree.

- ``qwen_chat``: Qwen2.5 / Qwen3's ``<tools>`` system block, ``<tool_call>`` JSON and
  ``<tool_response>`` results in a user turn. Unlike Qwen2.5's own template, no default system
  prompt is added when there is none (as Qwen3's and XTuner's ``qwen_chat``).
- ``internlm2_chat``: InternLM2's plugin system message (``system name=<|plugin|>``), actions as
  ``<|action_start|><|plugin|>`` ``{"name", "parameters"}`` ``<|action_end|>`` and results as
  ``environment name=<|plugin|>`` messages (InternLM's chat_format.md).
- ``moss_sft``: XTuner's MOSS markers: tools listed as ``- Calculator: enabled. API:
  Calculate(expression)`` lines of the system prompt (unless it already holds them, as a
  moss-003-sft meta instruction does), calls as ``<|Commands|>: Calculate("2+3")<eoc>`` (arguments
  in order; strings between quotes as they are, other values as JSON), results as ``<|Results|>:``
  lines ``Calculate("2+3") => 5`` ending ``<eor>``. The call turn does not close: the model goes on
  after the results, as in XTuner's MOSS data. Arguments given as a JSON string (not an object)
  are refused by its chat_template.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from tunemake.templates import Template, _jinja_literal


def _json(value) -> str:
    """JSON as transformers' ``tojson`` filter writes it: non-ASCII kept, default separators."""
    return json.dumps(value, ensure_ascii=False)


# Jinja: the call in an OpenAI tool_calls entry, and its arguments as JSON text
_CALL = "{%- set c = call.function if call.function is defined else call -%}"
_ARGS = "(c.arguments if c.arguments is string else (c.arguments | tojson))"
# Jinja: a tool message's content; a JSON value as training stores it (tunemake.tools.result)
_CONTENT = "(message['content'] if message['content'] is string else (message['content'] | tojson))"


@dataclass(frozen=True)
class ToolForm:
    """A template's way of writing tools. ``markers`` are the strings a tokenizer for it should
    hold as special tokens; ``closes_call_turn`` says whether a turn that calls tools ends with
    the template's suffix (or eos) and separator, as any other answer does."""

    name: str
    markers: tuple[str, ...]
    assistant_prefix: str
    closes_call_turn: bool = True

    def tools_system(self, template: Template, system: str, tools: list[dict]) -> str:
        raise NotImplementedError

    def calls(self, output: str, calls: list[dict]) -> str:
        raise NotImplementedError

    def results(self, results: list[dict], calls: list[dict]) -> str:
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str, list[dict]]:
        """A generated answer's text and calls: the inverse of :meth:`calls`. A call that cannot
        be read is ``{"name", "arguments": None, "error"}``, for the model to hear why."""
        raise NotImplementedError

    # Jinja pieces: statements rendering the tools system block (from ``ns.system`` and
    # ``tools``), the calls of ``message``, and one ``tool`` message inside a run of them.
    def jinja_tools_system(self, template: Template) -> str:
        raise NotImplementedError

    def jinja_calls(self) -> str:
        raise NotImplementedError

    def jinja_result(self) -> str:
        raise NotImplementedError


QWEN_TOOLS_INTRO = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
QWEN_TOOLS_OUTRO = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call>"
)


class QwenForm(ToolForm):
    def tools_system(self, template, system, tools):
        listed = "".join("\n" + _json(tool) for tool in tools)
        head = system + "\n\n" if system else ""
        return "<|im_start|>system\n" + head + QWEN_TOOLS_INTRO + listed + QWEN_TOOLS_OUTRO + "<|im_end|>\n"

    def calls(self, output, calls):
        text = output
        for index, call in enumerate(calls):
            text += "\n" if (output or index) else ""
            text += f'<tool_call>\n{{"name": "{call["name"]}", "arguments": {_json(call["arguments"])}}}\n</tool_call>'
        return text

    def results(self, results, calls):
        responses = "".join(f"\n<tool_response>\n{r['content']}\n</tool_response>" for r in results)
        return f"<|im_start|>user{responses}<|im_end|>\n"

    def parse(self, text):
        start = text.find("<tool_call>")
        if start < 0:
            return text, []
        bodies = re.findall(r"<tool_call>(.*?)(?:</tool_call>|$)", text[start:], re.DOTALL)
        return text[:start].removesuffix("\n"), [_json_call(body, "arguments") for body in bodies]

    def jinja_tools_system(self, template):
        return (
            "{{ '<|im_start|>system\\n' }}{%- if ns.system -%}{{ ns.system ~ '\\n\\n' }}{%- endif -%}"
            "{{ " + _jinja_literal(QWEN_TOOLS_INTRO) + " }}"
            "{%- for tool in tools -%}"
            "{%- set t = tool if tool.function is defined else {'type': 'function', 'function': tool} -%}"
            "{{ '\\n' ~ (t | tojson) }}{%- endfor -%}"
            "{{ " + _jinja_literal(QWEN_TOOLS_OUTRO + "<|im_end|>\n") + " }}"
        )

    def jinja_calls(self):
        return (
            "{%- for call in message.tool_calls -%}" + _CALL +
            "{%- if message['content'] or not loop.first -%}{{ '\\n' }}{%- endif -%}"
            "{{ '<tool_call>\\n{\"name\": \"' ~ c.name ~ '\", \"arguments\": ' ~ " + _ARGS + " ~ '}\\n</tool_call>' }}"
            "{%- endfor -%}"
        )

    def jinja_result(self):
        return (
            "{%- if loop.first or loop.previtem['role'] != 'tool' -%}{{ '<|im_start|>user' }}{%- endif -%}"
            "{{ '\\n<tool_response>\\n' ~ " + _CONTENT + " ~ '\\n</tool_response>' }}"
            "{%- if loop.last or loop.nextitem['role'] != 'tool' -%}{{ '<|im_end|>\\n' }}{%- endif -%}"
        )


class InternLM2Form(ToolForm):
    def tools_system(self, template, system, tools):
        plugins = json.dumps([tool["function"] for tool in tools], ensure_ascii=False, indent=4)
        head = template.system.format(system=system) if system else ""
        return head + "<|im_start|>system name=<|plugin|>\n" + plugins + "<|im_end|>\n"

    def calls(self, output, calls):
        return output + "".join(
            '<|action_start|><|plugin|>\n{"name": ' + _json(call["name"]) + ', "parameters": '
            + _json(call["arguments"]) + "}<|action_end|>"
            for call in calls
        )

    def results(self, results, calls):
        return "".join(f"<|im_start|>environment name=<|plugin|>\n{r['content']}<|im_end|>\n" for r in results)

    def parse(self, text):
        start = text.find("<|action_start|>")
        if start < 0:
            return text, []
        bodies = re.findall(r"<\|action_start\|><\|plugin\|>(.*?)(?:<\|action_end\|>|$)", text[start:], re.DOTALL)
        return text[:start], [_json_call(body, "parameters") for body in bodies]

    def jinja_tools_system(self, template):
        from tunemake.templates import _jinja_format

        return (
            "{%- if ns.system -%}{{ " + _jinja_format(template.system, {"system": "ns.system"}) + " }}{%- endif -%}"
            "{%- set ns.plugins = [] -%}"
            "{%- for tool in tools -%}"
            "{%- set ns.plugins = ns.plugins + [tool.function if tool.function is defined else tool] -%}"
            "{%- endfor -%}"
            "{{ '<|im_start|>system name=<|plugin|>\\n' ~ (ns.plugins | tojson(indent=4)) ~ '<|im_end|>\\n' }}"
        )

    def jinja_calls(self):
        return (
            "{%- for call in message.tool_calls -%}" + _CALL +
            "{{ '<|action_start|><|plugin|>\\n{\"name\": ' ~ (c.name | tojson) ~ ', \"parameters\": ' ~ "
            + _ARGS + " ~ '}<|action_end|>' }}"
            "{%- endfor -%}"
        )

    def jinja_result(self):
        return "{{ '<|im_start|>environment name=<|plugin|>\\n' ~ " + _CONTENT + " ~ '<|im_end|>\\n' }}"


def moss_value(value) -> str:
    """An argument as MOSS writes it: a string between double quotes as it is (XTuner's parser
    reads ``"([^"]*)"``), any other value as JSON."""
    return f'"{value}"' if isinstance(value, str) else _json(value)


def moss_call(call: dict) -> str:
    """``Calculate("2+3")``: the name and each argument's value, in order."""
    return call["name"] + "(" + ", ".join(moss_value(value) for value in call["arguments"].values()) + ")"


def moss_tool_line(tool: dict) -> str:
    function = tool["function"]
    params = ", ".join((function.get("parameters") or {}).get("properties") or {})
    return f"- {function.get('description') or function['name']}: enabled. API: {function['name']}({params})"


def moss_result(call_text: str, content: str) -> str:
    """``Calculate("2+3") => 5``; a result that starts on a new line follows ``=>`` directly
    (``Solve("x^2=4") =>\nx = -2; x = 2``, as XTuner's plugins write it)."""
    return call_text + " =>" + ("" if content.startswith("\n") else " ") + content


# Jinja: a MOSS call's text from ``c``, as moss_call writes it
_MOSS_CALL_JINJA = (
    "{%- if c.arguments is string -%}{{ raise_exception('moss_sft: give tool call arguments as an object, "
    "not a JSON string') }}{%- endif -%}"
    "{%- set ns.call = c.name ~ '(' -%}"
    "{%- for v in c.arguments.values() -%}"
    "{%- set ns.call = ns.call ~ (', ' if not loop.first else '') ~ (('\"' ~ v ~ '\"') if v is string else (v | tojson)) -%}"
    "{%- endfor -%}"
    "{%- set ns.call = ns.call ~ ')' -%}"
)


class MossForm(ToolForm):
    def tools_system(self, template, system, tools):
        # lines the system text already holds (a moss-003-sft meta instruction) stay where they are
        lines = "\n".join(line for line in map(moss_tool_line, tools) if line not in system)
        return template.system.format(system="\n".join(text for text in (system, lines) if text))

    def calls(self, output, calls):
        return output + "<|Commands|>: " + ", ".join(moss_call(call) for call in calls) + "<eoc>\n"

    def parse(self, text):
        start = text.find("<|Commands|>:")
        if start < 0:
            return text, []
        commands = re.split(r"<eoc>", text[start + len("<|Commands|>:"):], maxsplit=1)[0].strip()
        return text[:start], [] if commands in ("", "None") else _moss_calls(commands)

    def results(self, results, calls):
        lines = ""
        for index, item in enumerate(results):
            call = calls[index] if index < len(calls) else None
            named = call is not None and call["name"] == item["name"]
            lines += (moss_result(moss_call(call), item["content"]) if named else item["content"]) + "\n"
        return "<|Results|>:\n" + lines + "<eor>\n"

    def jinja_tools_system(self, template):
        from tunemake.templates import _jinja_format

        return (
            "{%- set ns.lines = '' -%}"
            "{%- for tool in tools -%}"
            "{%- set f = tool.function if tool.function is defined else tool -%}"
            "{%- set ns.params = '' -%}"
            "{%- for p in ((f.parameters or {}).properties or {}) -%}"
            "{%- set ns.params = ns.params ~ (', ' if not loop.first else '') ~ p -%}{%- endfor -%}"
            "{%- set line = '- ' ~ (f.description or f.name) ~ ': enabled. API: ' ~ f.name ~ '(' ~ ns.params ~ ')' -%}"
            "{%- if line not in ns.system -%}"
            "{%- set ns.lines = ns.lines ~ ('\\n' if ns.lines else '') ~ line -%}"
            "{%- endif -%}"
            "{%- endfor -%}"
            "{%- set ns.tsys = (ns.system ~ '\\n' ~ ns.lines) if (ns.system and ns.lines) else (ns.system ~ ns.lines) -%}"
            "{{ " + _jinja_format(template.system, {"system": "ns.tsys"}) + " }}"
        )

    def jinja_calls(self):
        return (
            "{{ '<|Commands|>: ' }}"
            "{%- for call in message.tool_calls -%}" + _CALL + _MOSS_CALL_JINJA +
            "{{ (', ' if not loop.first else '') ~ ns.call }}"
            "{%- endfor -%}"
            "{{ '<eoc>\\n' }}"
            "{%- set ns.calls = message.tool_calls -%}"
        )

    def jinja_result(self):
        return (
            "{%- if loop.first or loop.previtem['role'] != 'tool' -%}{{ '<|Results|>:\\n' }}{%- set ns.result = 0 -%}{%- endif -%}"
            "{%- set content = " + _CONTENT + " -%}"
            "{%- if ns.result < (ns.calls | length) -%}"
            "{%- set call = ns.calls[ns.result] -%}" + _CALL +
            "{%- if c.name == message['name'] -%}" + _MOSS_CALL_JINJA +
            "{{ ns.call ~ ' =>' ~ ('' if content.startswith('\\n') else ' ') }}"
            "{%- endif -%}{%- endif -%}"
            "{{ content ~ '\\n' }}"
            "{%- set ns.result = ns.result + 1 -%}"
            "{%- if loop.last or loop.nextitem['role'] != 'tool' -%}{{ '<eor>\\n' }}{%- endif -%}"
        )


def _json_call(body: str, arguments_key: str) -> dict:
    """``{"name": ..., "<arguments_key>": {...}}`` as a call (arguments may also be a JSON string)."""
    text = body.strip()
    try:
        value = json.loads(text)
    except ValueError as exc:
        return unreadable("", f"cannot read the call {text[:200]!r}: {exc}")
    name = value.get("name") if isinstance(value, dict) else None
    if not isinstance(name, str):
        return unreadable("", f'cannot read the call {text[:200]!r}: expected {{"name": ..., "{arguments_key}": {{...}}}}')
    arguments = value.get(arguments_key, value.get("arguments", value.get("parameters", {})))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError as exc:
            return unreadable(name, f"{name}: the arguments are not valid JSON ({exc})")
    if not isinstance(arguments, dict):
        return unreadable(name, f"{name}: the arguments should be a JSON object")
    return {"name": name, "arguments": arguments}


def unreadable(name: str, error: str) -> dict:
    """A call the model wrote that cannot be run: running it answers ``error: ...``."""
    return {"name": name, "arguments": None, "error": error}


def _moss_calls(commands: str) -> list[dict]:
    """``Calculate("2+3"), Search("x")``: each call's arguments as a list of values, in order
    (:func:`bind_arguments` names them from the tool's schema); a quoted string is read as
    XTuner reads it (up to the next quote), anything else as JSON."""
    decoder, calls, pos = json.JSONDecoder(), [], 0
    while pos < len(commands):
        match = re.compile(r"\s*,?\s*(\w+)\(\s*").match(commands, pos)
        if not match:
            return [*calls, unreadable("", f"cannot read the command {commands[pos:][:200]!r}")]
        name, pos, values = match.group(1), match.end(), []
        while pos < len(commands) and commands[pos] != ")":
            if commands[pos] == '"' and '"' in commands[pos + 1:]:
                end = commands.index('"', pos + 1)
                value, pos = commands[pos + 1:end], end + 1
            else:
                try:
                    value, pos = decoder.raw_decode(commands, pos)
                except ValueError:
                    return [*calls, unreadable(name, f"{name}: cannot read the arguments {commands[pos:][:200]!r}")]
            values.append(value)
            pos = re.compile(r"\s*,?\s*").match(commands, pos).end()
        calls.append({"name": name, "arguments": values})
        pos += 1
    return calls


def bind_arguments(call: dict, tools: list[dict]) -> dict:
    """A call whose arguments are a list of values (``moss_sft``), named after the parameters of
    the tool it calls, in order; other calls as they are."""
    if not isinstance(call.get("arguments"), list):
        return call
    spec = next((t["function"] for t in tools if t["function"]["name"].lower() == call["name"].lower()), None)
    names = list(((spec or {}).get("parameters") or {}).get("properties") or {})
    if len(call["arguments"]) > len(names):
        return unreadable(call["name"], f"{call['name']}: {len(call['arguments'])} arguments, the tool takes {len(names)}")
    return {**call, "arguments": dict(zip(names, call["arguments"]))}


FORMS: dict[str, ToolForm] = {
    "qwen_chat": QwenForm("qwen_chat", ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"),
                          "<|im_start|>assistant\n"),
    "internlm2_chat": InternLM2Form("internlm2_chat", ("<|action_start|>", "<|action_end|>", "<|plugin|>"),
                                    "<|im_start|>assistant\n"),
    "moss_sft": MossForm("moss_sft", ("<|Commands|>", "<eoc>", "<|Results|>", "<eor>"), "", closes_call_turn=False),
}

#: The templates that can render tool data: the forms above and ``hf`` (the tokenizer's own).
TOOL_TEMPLATES = ("hf", *FORMS)


def without_form(name: str) -> str:
    """What to tell a user whose template ``name`` has no tool form."""
    return f"template {name!r} cannot write tool calls; the templates with a tool form are {', '.join(TOOL_TEMPLATES)}"
