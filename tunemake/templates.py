"""Prompt templates: XTuner's exact strings, custom templates from the config, and ``hf``.

A template turns a unified conversation into the text pieces the encoder tokenizes, and into a
Jinja ``chat_template`` that renders the same text, so training and chat never disagree.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field

from tunemake.errors import ConfigError, DataError

LLAMA2_DEFAULT_SYSTEM = (
    " You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, "
    "while being safe. Your answers should not include any harmful, unethical, racist, sexist, "
    "toxic, dangerous, or illegal content. Please ensure that your responses are socially "
    "unbiased and positive in nature.\n"
)
VICUNA_PREAMBLE = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions. "
)
DEEPSEEK_CODER_PREAMBLE = (
    "You are an AI programming assistant, utilizing the DeepSeek Coder model, developed by "
    "DeepSeekCompany, and you only answer questions related to computer science. For politically "
    "sensitive questions, security and privacy issues, and other non-computer science questions, "
    "you will refuse to answer. "
)
WIZARDCODER_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n"
)

# Marker tokens in XTuner's templates that real tokenizers hold as single tokens: <|im_end|>,
# DeepSeek's full-width <｜end▁of▁sentence｜>, InternLM / MOSS <eoh> <eoa> <eom> <eoc>, Baichuan's
# <reserved_106>, Gemma's <start_of_turn>, MiniCPM's <用户> and <AI>.
_SPECIAL_TOKEN = re.compile(
    r"<\|[^|<>\s]+\|>|<｜[^｜<>\s]+｜>|<eo[a-z]>|<reserved_\d+>|<(?:start|end)_of_turn>|<用户>|<AI>"
)


@dataclass(frozen=True)
class Template:
    """XTuner's six template fields. ``{system}``, ``{input}`` and ``{round}`` are substituted.

    ``system=None`` means the template has no system field at all (XTuner's ``minicpm``): a turn
    with a system prompt is an error there, as in XTuner, rather than a prompt silently dropped.
    """

    name: str
    system: str | None = ""
    instruction: str = "{input}"
    suffix: str = ""
    suffix_as_eos: bool = False
    sep: str = ""
    stop_words: tuple[str, ...] = field(default_factory=tuple)
    #: how the template writes tools, calls and results (``tunemake.toolforms``); None: it has none
    tool_form: str | None = None

    def render_input(self, text: str, system: str | None, round_: int) -> str:
        """The (system +) instruction text of one turn, exactly as XTuner's template_map_fn.

        Raises:
            DataError: the turn has a system prompt and the template no system field.
        """
        rendered = self.instruction.format(input=text, round=round_)
        if system:
            if self.system is None:
                raise DataError(
                    f"template {self.name!r} has no system field (XTuner's has none either), but a turn "
                    f"has the system prompt {system[:60]!r}; remove the system prompts or pick another template"
                )
            rendered = self.system.format(system=system) + rendered
        return rendered

    def render_output(self, text: str) -> str:
        """The assistant output followed by the suffix, when the template has one."""
        return text + self.suffix

    def special_tokens(self) -> list[str]:
        """Tokens a tokenizer trained for this template should treat as single special tokens."""
        found: list[str] = []
        for text in (self.system or "", self.instruction, self.suffix, *self.stop_words):
            for token in _SPECIAL_TOKEN.findall(text):
                if token not in found:
                    found.append(token)
        return found

    def chat_template(self) -> str:
        """A Jinja ``chat_template`` that renders exactly the text tunemake trains on.

        ``apply_chat_template(messages, add_generation_prompt=True)`` ends with the instruction
        of the last user turn, which already holds the assistant prefix, so the generation prompt
        adds nothing. bos opens the text and follows every eos, as in XTuner's encoder.
        """
        return _jinja_for(self)


# fmt: off
_BUILTIN = [
    Template("default", "<|System|>:{system}\n", "<|User|>:{input}\n<|Bot|>:", sep="\n"),
    Template("zephyr", "<|system|>\n{system}\n", "<|user|>\n{input}\n<|assistant|>\n", sep="\n"),
    Template("internlm_chat", "<|System|>:{system}\n", "<|User|>:{input}<eoh>\n<|Bot|>:",
             suffix="<eoa>", suffix_as_eos=True, sep="\n", stop_words=("<eoa>",)),
    Template("internlm2_chat", "<|im_start|>system\n{system}<|im_end|>\n",
             "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
             suffix="<|im_end|>", suffix_as_eos=True, sep="\n", stop_words=("<|im_end|>",),
             tool_form="internlm2_chat"),
    Template("qwen_chat", "<|im_start|>system\n{system}<|im_end|>\n",
             "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
             suffix="<|im_end|>", suffix_as_eos=True, sep="\n",
             stop_words=("<|im_end|>", "<|endoftext|>"), tool_form="qwen_chat"),
    Template("llama2_chat", "[INST] <<SYS>>\n" + LLAMA2_DEFAULT_SYSTEM + "{system}\n<</SYS>>\n [/INST] ",
             "[INST] {input} [/INST]", sep="\n"),
    Template("llama3_chat", "<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
             "<|start_header_id|>user<|end_header_id|>\n\n{input}<|eot_id|>"
             "<|start_header_id|>assistant<|end_header_id|>\n\n",
             suffix="<|eot_id|>", suffix_as_eos=True, stop_words=("<|eot_id|>",)),
    Template("chatglm3", "<|system|>\n{system}", "<|user|>\n{input}<|assistant|>\n", sep="\n"),
    Template("mistral", "[INST] {system} [/INST]\n", "[INST] {input} [/INST]", sep="\n"),
    Template("baichuan2_chat", "{system}\n", "<reserved_106>{input}<reserved_107>", sep="\n"),
    Template("vicuna", VICUNA_PREAMBLE + "{system}\n ", "USER: {input} ASSISTANT:", sep="\n"),
    Template("chatglm2", "{system}\n", "[Round {round}]\n\n问：{input}\n\n答：", sep="\n\n"),
    Template("baichuan_chat", "{system}\n", "<reserved_102>{input}<reserved_103>", sep="\n"),
    Template("code_llama_chat", "{system}\n", "[INST] {input} [/INST]"),
    Template("cohere_chat", "<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{system}<|END_OF_TURN_TOKEN|>",
             "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{input}<|END_OF_TURN_TOKEN|>"
             "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
             suffix="<|END_OF_TURN_TOKEN|>", suffix_as_eos=True, stop_words=("<|END_OF_TURN_TOKEN|>",)),
    Template("deepseek_coder", DEEPSEEK_CODER_PREAMBLE + "{system}\n",
             "### Instruction:\n{input}\n### Response:\n", sep="\n"),
    Template("deepseek_v2", "{system}\n\n", "User: {input}\n\nAssistant: ",
             suffix="<｜end▁of▁sentence｜>", suffix_as_eos=True, stop_words=("<｜end▁of▁sentence｜>",)),
    Template("gemma", "<start_of_turn>system\n{system}<end_of_turn>\n",
             "<start_of_turn>user\n{input}<end_of_turn>\n<start_of_turn>model\n",
             suffix="<end_of_turn>", suffix_as_eos=False, sep="\n", stop_words=("<end_of_turn>",)),
    Template("minicpm", None, "<用户> {input} <AI>", sep="\n"),
    Template("minicpm3", "<|im_start|>system\n{system}<|im_end|>\n",
             "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
             suffix="<|im_end|>", suffix_as_eos=True, sep="\n",
             stop_words=("<|im_end|>", "<|endoftext|>")),
    Template("moss_sft", "{system}\n", "<|Human|>: {input}<eoh>\n", sep="\n", stop_words=("<eoc>", "<eom>"),
             tool_form="moss_sft"),
    Template("phi3_chat", "<|system|>\n{system}<|end|>\n", "<|user|>\n{input}<|end|>\n<|assistant|>\n",
             suffix="<|end|>", suffix_as_eos=True, sep="\n", stop_words=("<|end|>",)),
    Template("wizardcoder", WIZARDCODER_PREAMBLE + "{system}\n ", "### Instruction:\n{input}\n\n### Response:",
             sep="\n\n"),
]
# fmt: on
_ALIASES = {"mixtral": "mistral", "deepseek_moe": "mistral", "wizardlm": "vicuna", "deepseekcoder": "deepseek_coder"}

TEMPLATES: dict[str, Template] = {t.name: t for t in _BUILTIN}
for _alias, _target in _ALIASES.items():
    TEMPLATES[_alias] = Template(**{**TEMPLATES[_target].__dict__, "name": _alias})

#: The template that uses the tokenizer's own ``chat_template`` instead of XTuner's strings.
HF = "hf"

_FIELDS = ("system", "instruction", "suffix", "suffix_as_eos", "sep", "stop_words")
_ALLOWED_PLACEHOLDERS = {"system": {"system"}, "instruction": {"input", "round"}}


def template_from_config(name: str, fields: dict, key: str) -> Template:
    """Build a custom template from the config's six fields, checking its placeholders.

    Raises:
        ConfigError: a field holds a placeholder other than ``{system}`` / ``{input}`` / ``{round}``.
    """
    for field_name, allowed in _ALLOWED_PLACEHOLDERS.items():
        text = fields.get(field_name, "")
        try:
            parsed = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(text) if f is not None]
        except ValueError as exc:
            raise ConfigError(f"{key}.{field_name}: {exc} (write a literal brace as {{{{ or }}}})")
        used = {f for f, _, _ in parsed}
        for f, spec, conv in parsed:
            if spec or conv:
                raise ConfigError(
                    f"{key}.{field_name}: {{{f}{'!' + conv if conv else ''}{':' + spec if spec else ''}}}: "
                    "format specs and conversions are not supported; write the plain placeholder"
                )
        if used - allowed:
            raise ConfigError(
                f"{key}.{field_name}: unknown placeholder {{{sorted(used - allowed)[0]}}}; "
                f"allowed: {', '.join('{' + a + '}' for a in sorted(allowed))}"
            )
    if "{input}" not in fields.get("instruction", "{input}"):
        raise ConfigError(f"{key}.instruction: must contain {{input}}")
    values = {k: fields[k] for k in _FIELDS if k in fields}
    if "stop_words" in values:
        values["stop_words"] = tuple(values["stop_words"])
    return Template(name=name, **values)


def get_template(name: str, custom: dict | None = None) -> Template | str:
    """Look up a template by name: a custom one from the config first, then the built-ins.

    Returns the string ``"hf"`` for the tokenizer's own chat template.

    Raises:
        ConfigError: the name is unknown.
    """
    custom = custom or {}
    if name in custom:
        return template_from_config(name, custom[name], f"templates.{name}")
    if name == HF:
        return HF
    if name in TEMPLATES:
        return TEMPLATES[name]
    known = sorted([*TEMPLATES, HF, *custom])
    raise ConfigError(f"unknown template {name!r}; known templates: {', '.join(known)}")


def template_to_dict(template: Template | str) -> dict:
    """The template as plain JSON data (what checkpoints and ``tunemake.json`` record)."""
    if template == HF:
        return {"name": HF}
    values = {k: getattr(template, k) for k in _FIELDS}
    tool_form = {"tool_form": template.tool_form} if template.tool_form else {}
    return {"name": template.name, **values, "stop_words": list(template.stop_words), **tool_form}


def template_from_dict(data: dict) -> Template | str:
    """Inverse of :func:`template_to_dict`: a recorded template, with every field as recorded."""
    if data.get("name") == HF:
        return HF
    values = {k: data[k] for k in (*_FIELDS, "tool_form") if k in data}
    values["stop_words"] = tuple(values.get("stop_words", ()))
    return Template(name=data.get("name", "custom"), **values)


def encoding_problem(template: Template | str, tokenizer) -> str | None:
    """Why ``tokenizer`` cannot serve ``template``, or None.

    A stop word must be one token, so a merged model's ``generation_config`` can stop at it; the
    template's fixed text must not encode to the unknown token. (A marker such as ``<|User|>``
    split into several tokens is allowed: XTuner trains such templates too.)
    """
    if template == HF:
        return None
    for word in template.stop_words:
        ids = tokenizer.encode(word, add_special_tokens=False)
        if len(ids) != 1:
            return f"template {template.name!r}: stop word {word!r} is {len(ids)} tokens, not one"
    unk = tokenizer.unk_token_id
    for field_name in ("system", "instruction", "suffix", "sep"):
        literal = "".join(text for text, *_ in string.Formatter().parse(getattr(template, field_name) or ""))
        if unk is not None and literal and unk in tokenizer.encode(literal, add_special_tokens=False):
            return (f"template {template.name!r}: its {field_name} {literal!r} encodes to the unknown token "
                    f"{tokenizer.unk_token!r}")
    return None


def check_encodable(template: Template | str, tokenizer, tokenizer_name, error: type[Exception]) -> None:
    """Raise ``error`` when ``tokenizer`` (named ``tokenizer_name`` in the message) cannot serve
    ``template`` (:func:`encoding_problem`): the data stage, training and the merge check it."""
    problem = encoding_problem(template, tokenizer)
    if problem:
        raise error(f"{problem}, in the tokenizer {tokenizer_name}: a template the tokenizer can't encode; "
                    "add the token to the tokenizer or pick another template")


def _jinja_literal(text: str) -> str:
    """Quote ``text`` as a Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r") + "'"


def _jinja_format(text: str, values: dict[str, str]) -> str:
    """Turn ``text`` with ``{name}`` placeholders into a Jinja expression concatenating pieces."""
    parts = []
    for literal, name, _, _ in string.Formatter().parse(text):
        if literal:
            parts.append(_jinja_literal(literal))
        if name is not None:
            parts.append(values[name])
    return " ~ ".join(parts) if parts else "''"


def _jinja_for(t: Template) -> str:
    from tunemake.toolforms import FORMS, TOOL_TEMPLATES

    form = FORMS.get(t.tool_form) if t.tool_form else None
    instruction = _jinja_format(t.instruction, {"input": "message['content']", "round": "(ns.round | string)"})
    if t.system is None:
        # the same refusal as render_input, so chat never renders a prompt training would not
        system = "raise_exception(" + _jinja_literal(f"template {t.name!r} has no system field") + ")"
    else:
        system = _jinja_format(t.system, {"system": "ns.system"})
    end_of_turn = _jinja_literal(t.suffix)
    if not t.suffix_as_eos:
        end_of_turn += " ~ (eos_token or '')"
    bos = "{%- if ns.bos and bos_token -%}{{ bos_token }}{%- endif -%}{%- set ns.bos = false -%}"
    pending_system = "{%- if ns.system -%}{{ " + system + " }}{%- set ns.system = '' -%}{%- endif -%}"
    closes = ("{{ " + end_of_turn + " ~ " + _jinja_literal(t.sep) + " }}"
              "{%- set ns.bos = " + ("false" if t.suffix_as_eos else "true") + " -%}")
    if form is None:
        no_tools = "raise_exception(" + _jinja_literal(
            f"template {t.name!r} has no tool form; these have: {', '.join(TOOL_TEMPLATES)}") + ")"
        first_system, calls, tool = pending_system, "", "{{ " + no_tools + " }}"
        head = "{%- if tools -%}{{ " + no_tools + " }}{%- endif -%}"
    else:
        head = ""
        first_system = ("{%- if tools and not ns.tools_done -%}" + form.jinja_tools_system(t) +
                        "{%- set ns.system = '' -%}{%- else -%}" + pending_system + "{%- endif -%}"
                        "{%- set ns.tools_done = true -%}")
        if not form.closes_call_turn:
            closes = "{%- if message.tool_calls -%}{%- set ns.bos = false -%}{%- else -%}" + closes + "{%- endif -%}"
        calls = "{%- if message.tool_calls -%}" + form.jinja_calls() + "{%- endif -%}"
        tool = ("{%- if loop.first or loop.previtem['role'] != 'tool' -%}" + bos + pending_system + "{%- endif -%}"
                + form.jinja_result() +
                "{%- if loop.last or loop.nextitem['role'] not in ('user', 'tool') -%}{{ " + _jinja_literal(form.assistant_prefix)
                + " }}{%- endif -%}")
    return (
        head +
        "{%- set ns = namespace(system='', round=0, bos=true, tools_done=false, calls=[], result=0, plugins=[], "
        "lines='', params='', tsys='', call='') -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}{%- set ns.system = message['content'] -%}"
        "{%- elif message['role'] == 'user' -%}"
        "{%- set ns.round = ns.round + 1 -%}" + bos + first_system +
        "{{ " + instruction + " }}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{{ message['content'] or '' }}" + calls + closes +
        "{%- elif message['role'] == 'tool' -%}" + tool +
        "{%- endif -%}"
        "{%- endfor -%}"
    )
