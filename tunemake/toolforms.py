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
  Calculate(expression)`` lines of the system prompt, calls as ``<|Commands|>: Calculate("2+3")<eoc>``
  (arguments written as JSON values in order), results as ``<|Results|>:`` lines
  ``Calculate("2+3") => 5`` ending ``<eor>``. The call turn does not close: the model goes on
  after the results, as in XTuner's MOSS data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from tunemake.templates import Template, _jinja_literal


def _json(value) -> str:
    """JSON as transformers' ``tojson`` filter writes it: non-ASCII kept, default separators."""
    return json.dumps(value, ensure_ascii=False)


# Jinja: the call in an OpenAI tool_calls entry, and its arguments as JSON text
_CALL = "{%- set c = call.function if call.function is defined else call -%}"
_ARGS = "(c.arguments if c.arguments is string else (c.arguments | tojson))"


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
            text += '<tool_call>\n{"name": "' + call["name"] + '", "arguments": ' + _json(call["arguments"]) + "}\n</tool_call>"
        return text

    def results(self, results, calls):
        return "<|im_start|>user" + "".join(f"\n<tool_response>\n{r['content']}\n</tool_response>" for r in results) + "<|im_end|>\n"

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
            "{{ '\\n<tool_response>\\n' ~ message['content'] ~ '\\n</tool_response>' }}"
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
        return "{{ '<|im_start|>environment name=<|plugin|>\\n' ~ message['content'] ~ '<|im_end|>\\n' }}"


def moss_call(call: dict) -> str:
    """``Calculate("2+3")``: the name and each argument's value as JSON, in order."""
    return call["name"] + "(" + ", ".join(_json(value) for value in call["arguments"].values()) + ")"


def moss_tool_line(tool: dict) -> str:
    function = tool["function"]
    params = ", ".join((function.get("parameters") or {}).get("properties") or {})
    return f"- {function.get('description') or function['name']}: enabled. API: {function['name']}({params})"


class MossForm(ToolForm):
    def tools_system(self, template, system, tools):
        lines = "\n".join(moss_tool_line(tool) for tool in tools)
        return template.system.format(system=f"{system}\n{lines}" if system else lines)

    def calls(self, output, calls):
        return output + "<|Commands|>: " + ", ".join(moss_call(call) for call in calls) + "<eoc>\n"

    def results(self, results, calls):
        lines = ""
        for index, item in enumerate(results):
            call = calls[index] if index < len(calls) else None
            named = call is not None and call["name"] == item["name"]
            lines += (moss_call(call) + " => " if named else "") + item["content"] + "\n"
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
            "{%- set ns.lines = ns.lines ~ ('\\n' if not loop.first else '') ~ '- ' ~ (f.description or f.name) "
            "~ ': enabled. API: ' ~ f.name ~ '(' ~ ns.params ~ ')' -%}"
            "{%- endfor -%}"
            "{%- set ns.tsys = (ns.system ~ '\\n' ~ ns.lines) if ns.system else ns.lines -%}"
            "{{ " + _jinja_format(template.system, {"system": "ns.tsys"}) + " }}"
        )

    def jinja_calls(self):
        return (
            "{{ '<|Commands|>: ' }}"
            "{%- for call in message.tool_calls -%}" + _CALL +
            "{{ (', ' if not loop.first else '') ~ c.name ~ '(' ~ (c.arguments.values() | map('tojson') | join(', ')) ~ ')' }}"
            "{%- endfor -%}"
            "{{ '<eoc>\\n' }}"
            "{%- set ns.calls = message.tool_calls -%}"
        )

    def jinja_result(self):
        return (
            "{%- if loop.first or loop.previtem['role'] != 'tool' -%}{{ '<|Results|>:\\n' }}{%- set ns.result = 0 -%}{%- endif -%}"
            "{%- if ns.result < (ns.calls | length) -%}"
            "{%- set call = ns.calls[ns.result] -%}" + _CALL +
            "{%- if c.name == message['name'] -%}"
            "{{ c.name ~ '(' ~ (c.arguments.values() | map('tojson') | join(', ')) ~ ') => ' }}"
            "{%- endif -%}{%- endif -%}"
            "{{ message['content'] ~ '\\n' }}"
            "{%- set ns.result = ns.result + 1 -%}"
            "{%- if loop.last or loop.nextitem['role'] != 'tool' -%}{{ '<eor>\\n' }}{%- endif -%}"
        )


FORMS: dict[str, ToolForm] = {
    "qwen_chat": QwenForm("qwen_chat", ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"),
                          "<|im_start|>assistant\n"),
    "internlm2_chat": InternLM2Form("internlm2_chat", ("<|action_start|>", "<|action_end|>", "<|plugin|>"),
                                    "<|im_start|>assistant\n"),
    "moss_sft": MossForm("moss_sft", ("<|Commands|>", "<eoc>", "<|Results|>", "<eor>"), "", closes_call_turn=False),
}

#: The templates that can render tool data: the forms above and ``hf`` (the tokenizer's own).
TOOL_TEMPLATES = ("hf", *FORMS)
