"""Chat with a fine-tuned model from the terminal or a batch file (XTuner's ``chat``).

Entry point :func:`run_chat`, called by ``tunemake chat``; :func:`load_chat_model`,
:func:`resolve_template` and :class:`ChatSession` are the same steps for use from Python.

MODEL is a Hugging Face model directory (a ``tunemake merge`` output, a base model or a full
fine-tune), optionally with a PEFT adapter on top (``--adapter``). The prompt template defaults
to the one the model was trained with, read from ``tunemake.json`` of the adapter, else of MODEL;
``--prompt-template`` overrides it (with a warning when it differs from the recorded one). Every
prompt is the whole conversation so far rendered exactly as training encoded it
(:func:`tunemake.encode.prompt_ids`): the same text as the saved tokenizer's
``apply_chat_template(..., add_generation_prompt=True)``, tokenized piece by piece as in training.

Generation stops at the tokenizer's eos, the model's generation-config eos, the template's stop
words and ``--stop-words``; the answer excludes the stop word and special tokens. Sampling only
when temperature > 0 (else greedy). The seed is set once when the session starts, so the same
inputs in the same order give the same answers; answers depend on everything asked before them
in the session (one random stream), a ``RESET`` included.

Modes:
    interactive (default): stdin is read line by line; a prompt ends on an empty line (or at end
        of input); ``EXIT`` quits, ``RESET`` starts a new conversation. Answers stream to stdout
        (``--no-streamer``: each printed whole); the banner and prompt markers go to stderr.
    batch (``--batch FILE``, ``-`` for stdin): see :data:`BATCH_FORMAT`. Nothing but the JSON
        lines goes to stdout. A file is checked whole before the model loads; stdin line by line.

Supported: CUDA (fp16, as XTuner) or CPU (float32); ``--bits 4`` (NF4 + double quantization) and
``--bits 8`` through bitsandbytes; named templates, custom templates recorded in ``tunemake.json``,
and ``hf`` (the tokenizer's own chat_template). Tools (``--tools FILE``, ``--with-plugins
calculate solve``; :mod:`tunemake.toolbox`): the template's tool form shows them to the model, reads
the calls it writes (``hf``: the tokenizer's ``response_template`` through transformers'
``parse_response``; a tokenizer without one is refused), runs them and feeds the results back,
up to ``--max-tool-rounds`` times per prompt. Not supported:
images, XTuner's ``--lagent`` and ``--system-template`` options, batched generation (one prompt
at a time), editing or truncating history. History grows without truncation: a conversation
whose prompt reaches the model's ``max_position_embeddings`` is refused with an error asking for
a reset (interactive mode prints it and keeps the conversation as it was), and an answer is cut
at the model's length limit even before ``--max-new-tokens``.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, TextIO

from tunemake.errors import TunemakeError, at
from tunemake.hub import is_hub_id, load_pretrained, model_dir as hub_model_dir
from tunemake.templates import HF, Template, get_template, template_from_dict, template_to_dict

log = logging.getLogger(__name__)

BATCH_FORMAT = """\
--batch FILE (- for stdin): one prompt per line, answered in order, one conversation that keeps
its history until a reset. A line is either plain text (the prompt; to send a prompt starting
with "{", write it as JSON) or a JSON object:
    {"prompt": "...", "system": "...", "reset": true}
"prompt" (string) is required; "system" (string, optional) is the system text of the
conversation this prompt starts, so it is allowed only on the first prompt after the start or
a reset (it overrides --system); "reset" (bool, optional) starts a new conversation before this
prompt. Empty lines are skipped. Each answer is written to stdout as one JSON line:
    {"line": 3, "turn": 1, "prompt": "...", "answer": "...", "tool_calls": [...]}
"line" is the input line number, "turn" the 1-based turn within the current conversation;
"tool_calls" (with --tools or --with-plugins) lists the calls made on the way to the answer, in
order, as {"name", "arguments", "result"}."""

EXIT, RESET = "EXIT", "RESET"


class ChatError(TunemakeError):
    """The model, adapter, template or a batch line cannot be used to chat."""


# ---------------------------------------------------------------------------------------------
# Loading


def check_model_dirs(model_dir: str | os.PathLike, adapter: str | os.PathLike | None = None,
                     revision: str | None = None) -> tuple[Path, Path | None]:
    """Check that ``model_dir`` is a model directory (or a hub id in the local cache, at
    ``revision``) and ``adapter`` (if any) a PEFT adapter's.

    Raises:
        ChatError: either is missing, or not what it should be (naming which, and why).
        HubError: a hub id that is not in the cache.
    """
    model_dir = hub_model_dir(model_dir, revision) if is_hub_id(model_dir) else Path(model_dir)
    if not model_dir.is_dir():
        raise ChatError(f"{model_dir}: no such model directory")
    if not (model_dir / "config.json").is_file():
        hint = ("it is a PEFT adapter: pass its base model as MODEL and this directory as --adapter"
                if (model_dir / "adapter_config.json").is_file() else "not a Hugging Face model directory")
        raise ChatError(f"{model_dir}: no config.json ({hint})")
    if adapter is not None:
        adapter = Path(adapter)
        if not adapter.is_dir():
            raise ChatError(f"{adapter}: no such adapter directory")
        if not (adapter / "adapter_config.json").is_file():
            raise ChatError(f"{adapter}: no adapter_config.json (not a PEFT adapter directory)")
    return model_dir, adapter


def load_chat_model(model_dir: str | os.PathLike, adapter: str | os.PathLike | None = None,
                    bits: int | None = None, device: str | None = None, trust_remote_code: bool = False,
                    revision: str | None = None):
    """Load the model (with its adapter) and tokenizer for generation.

    Args:
        model_dir: a Hugging Face model directory (``config.json`` + weights), or a hub id in the
            local cache.
        adapter: a PEFT adapter directory loaded on top of ``model_dir``. Default: none.
        bits: 4 (NF4, double quantization, as XTuner) or 8 (LLM.int8) through bitsandbytes;
            None loads unquantized. Default None.
        device: ``"cuda"`` or ``"cpu"``; default CUDA when available. CUDA loads fp16 (as XTuner),
            the CPU float32.
        trust_remote_code: let transformers run the model's own code (``--trust-remote-code``).
        revision: the hub revision when ``model_dir`` is a hub id (``--revision``).

    Returns:
        ``(model, tokenizer)``; the model in eval mode. The tokenizer comes from the adapter
        directory when it holds one, else from ``model_dir``.

    Raises:
        ChatError: ``model_dir`` or ``adapter`` is missing or unreadable, or bitsandbytes cannot
            run here.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, adapter = check_model_dirs(model_dir, adapter, revision)
    if bits not in (None, 4, 8):
        raise ChatError(f"--bits: 4 or 8, got {bits}")

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device == "cuda" else torch.float32
    kwargs: dict = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if bits:
        try:
            importlib.import_module("bitsandbytes")  # its import is the check
            from transformers import BitsAndBytesConfig
        except Exception as exc:  # an import of bitsandbytes fails in many ways (no CUDA, no lib)
            raise ChatError(f"--bits {bits} needs bitsandbytes, which cannot run here ({exc}); "
                            "install it, or chat without --bits") from None
        if bits == 4:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype, llm_int8_threshold=6.0)
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
            # bitsandbytes warns on every 8-bit matmul of float32 inputs (each token): once is enough
            logging.getLogger("bitsandbytes.autograd._functions").addFilter(_once_per_message)
        kwargs["device_map"] = {"": device}

    tokenizer_dir = adapter if adapter is not None and (adapter / "tokenizer_config.json").is_file() else model_dir
    try:
        tokenizer = load_pretrained(AutoTokenizer, tokenizer_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ChatError(f"{tokenizer_dir}: cannot load the tokenizer ({exc})") from None
    log.info("loading %s%s", model_dir, f" + adapter {adapter}" if adapter else "")
    try:
        model = load_pretrained(AutoModelForCausalLM, model_dir, **kwargs)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as exc:
        what = f" with --bits {bits} (bitsandbytes may not run on this machine)" if bits else ""
        raise ChatError(f"{model_dir}: cannot load the model{what}: {exc}") from None
    if not bits:
        model.to(device)
    if adapter is not None:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, str(adapter))
        except (OSError, ValueError, TypeError, KeyError, RuntimeError) as exc:
            raise ChatError(f"{adapter}: cannot load the adapter onto {model_dir} "
                            f"(is it the base model it was trained from?): {exc}") from None
    return model.eval(), tokenizer


_LOGGED: set[tuple[str, str]] = set()


def _once_per_message(record: logging.LogRecord) -> bool:
    key = (record.name, str(record.msg))
    if key in _LOGGED:
        return False
    _LOGGED.add(key)
    return True


def recorded_template(model_dir: str | os.PathLike, adapter: str | os.PathLike | None = None) -> tuple[dict | None, str | None]:
    """The template recorded in ``tunemake.json`` of the adapter, else of the model, and where."""
    from tunemake.convert import METADATA_FILE, read_metadata

    for directory in ([adapter] if adapter is not None else []) + [model_dir]:
        try:
            template = read_metadata(directory).get("template")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
            raise ChatError(f"{Path(directory) / METADATA_FILE}: not a valid tunemake.json ({exc})") from None
        if template:
            return template, str(Path(directory) / METADATA_FILE)
    return None, None


def resolve_template(model_dir: str | os.PathLike, adapter: str | os.PathLike | None = None,
                     name: str | None = None) -> Template | str:
    """The template to chat with: ``name`` if given, else the one the model was trained with.

    Logs a warning when ``name`` differs from the recorded template: a model answers best in the
    template it was trained with.

    Raises:
        ChatError: no ``name`` and no template recorded (ask for ``--prompt-template``).
        ConfigError: ``name`` is not a known template.
    """
    recorded, source = recorded_template(model_dir, adapter)
    if name is None:
        if recorded is None:
            where = f"{adapter} or {model_dir}" if adapter is not None else str(model_dir)
            raise ChatError(f"{where}: no tunemake.json records the template the model was trained with; "
                            "pass --prompt-template NAME (tunemake list-templates shows them)")
        return template_from_dict(recorded)
    template = get_template(name)
    if recorded is not None and template_to_dict(template) != template_to_dict(template_from_dict(recorded)):
        log.warning("--prompt-template %s differs from the template the model was trained with (%s, "
                    "recorded in %s); answers may be poor", name, recorded.get("name", "custom"), source)
    return template


# ---------------------------------------------------------------------------------------------
# The conversation


class ChatSession:
    """One conversation with a loaded model: :meth:`ask` answers and remembers, :meth:`reset` forgets.

    ``history`` is the conversation so far in XTuner's unified form, ``[{"system", "input",
    "output"}, ...]``; the system text sits on the first turn only, as XTuner's map functions put it.

    Args:
        model: a causal LM (``None`` is enough for :meth:`render`).
        tokenizer: its tokenizer.
        template: a :class:`~tunemake.templates.Template`, or ``"hf"``.
        system: the system text of every conversation ("" for none). Default "".
        temperature: sampling temperature; 0 means greedy. Default 0.1 (XTuner's).
        top_k: default 40. top_p: default 0.75. repetition_penalty: default 1.0.
        max_new_tokens: the longest answer, in tokens. Default 2048.
        stop_words: stop words besides eos and the template's. Default none.
        seed: seeds Python, numpy and torch (``transformers.set_seed``) now. Default 0.
    """

    def __init__(self, model, tokenizer, template: Template | str, *, system: str = "",
                 temperature: float = 0.1, top_k: int = 40, top_p: float = 0.75,
                 repetition_penalty: float = 1.0, max_new_tokens: int = 2048,
                 stop_words: Iterable[str] = (), seed: int = 0, toolbox=None, max_tool_rounds: int = 5):
        from transformers import set_seed

        from tunemake.encode import generation_stops

        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.toolbox, self.max_tool_rounds = toolbox, max_tool_rounds
        if toolbox is not None:
            check_tool_template(template, tokenizer)
        self.tool_calls: list[dict] = []  # the calls made for the last answer
        self.system = system or ""
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.repetition_penalty, self.max_new_tokens = repetition_penalty, max_new_tokens
        model_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.stops = generation_stops(tokenizer, template, model_eos, stop_words)
        self.history: list[dict] = []
        set_seed(seed)

    def reset(self) -> None:
        """Forget the conversation (the random stream goes on)."""
        self.history = []

    @property
    def turns(self) -> int:
        """The prompts answered in this conversation (the turns that read tool results are part
        of the answer they lead to)."""
        return sum(1 for turn in self.history if not turn.get("tool_results"))

    def _turn(self, prompt: str, system: str | None) -> dict:
        if system is not None and self.history:
            raise ChatError("a system text is allowed only on the first prompt of a conversation; reset first")
        first = not self.history
        turn = {"system": (self.system if system is None else system) if first else "", "input": prompt, "output": ""}
        if first and self.toolbox is not None:
            turn["tools"] = self.toolbox.schemas
        return turn

    def render(self, prompt: str, system: str | None = None) -> tuple[str, list[int]]:
        """The text and ids the model is given to answer ``prompt`` after the history.

        ``system`` overrides the session's system text; only on the first turn.
        """
        from tunemake.encode import prompt_ids

        return prompt_ids([*self.history, self._turn(prompt, system)], self.template, self.tokenizer)

    def ask(self, prompt: str, stream: TextIO | None = None, system: str | None = None) -> str:
        """Answer ``prompt`` in the conversation so far and add the turn to the history.

        With tools, each call the model writes is run and its result fed back, up to
        ``max_tool_rounds`` times; :attr:`tool_calls` then lists them, and ``stream`` shows each
        call and result on a line of its own.

        Args:
            prompt: the user's text.
            stream: a text file to write the answer to as it is generated (then a newline);
                None: no streaming. Default None.
            system: the system text for this conversation, overriding the session's; allowed
                only on its first turn. Default None.

        Returns:
            The answer, without the stop word and special tokens.

        Raises:
            ChatError: the conversation has reached the model's length limit (reset it), or a
                system text on a later turn.
        """
        from tunemake.encode import prompt_ids

        turn, done = self._turn(prompt, system), []
        self.tool_calls = []
        if stream is not None:
            opener_text, opener_ids = self._call_opener()
            stream = _streamer_class()(self.tokenizer, self._visible_stops() + opener_text, stream, opener_ids)
        for round_ in range(self.max_tool_rounds + 1):
            ids = prompt_ids([*self.history, *done, turn], self.template, self.tokenizer)[1]
            new_ids = self._generate(ids, stream)
            calls = self._calls(new_ids, ids) if self.toolbox is not None and round_ < self.max_tool_rounds else None
            if not calls:
                answer = self._answer(new_ids)
                if stream is not None:
                    stream.finish(answer)
                done.append({**turn, "output": answer})
                break
            content, calls = calls
            results = [self.toolbox.run(call) for call in calls]
            self.tool_calls += [{"name": c["name"], "arguments": c.get("arguments"), "result": r}
                                for c, r in zip(calls, results)]
            if stream is not None:
                stream.show_calls(content, self.tool_calls[-len(calls):])
            done.append(_call_turn(turn, content, calls, self._raw(new_ids)))
            turn = {"system": "", "input": "", "output": "",
                    "tool_results": [{"name": c["name"], "content": r} for c, r in zip(calls, results)]}
        self.history += done
        return done[-1]["output"]

    def _generate(self, ids: list[int], stream) -> list[int]:
        """The ids the model writes after ``ids``."""
        import torch
        from transformers import GenerationConfig

        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        max_new = self.max_new_tokens
        if limit:
            if len(ids) >= limit:
                raise ChatError(f"the conversation is {len(ids)} tokens, the model's limit is {limit}: "
                                "reset it to go on")
            max_new = min(max_new, limit - len(ids))
        sample = self.temperature > 0
        config = GenerationConfig(
            max_new_tokens=max_new, do_sample=sample, repetition_penalty=self.repetition_penalty,
            eos_token_id=self.stops.ids or None,
            pad_token_id=next((i for i in (self.tokenizer.pad_token_id, *self.stops.ids) if i is not None), 0),
            stop_strings=self.stops.strings or None,
            **({"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p} if sample else {}),
        )
        if stream is not None:
            stream.start()
        input_ids = torch.tensor([ids], device=self.model.device)
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      generation_config=config, streamer=stream, tokenizer=self.tokenizer)
        return out[0, len(ids):].tolist()

    def _raw(self, new_ids: list[int]) -> str:
        from tunemake.encode import raw_text

        return raw_text(new_ids, self.tokenizer, self.stops)

    def _calls(self, new_ids: list[int], prompt: list[int]) -> tuple[str, list[dict]] | None:
        """The answer's text before its calls, and the calls; None when it makes none."""
        from tunemake.toolforms import FORMS, bind_arguments
        from tunemake.tools import normalize_call

        if self.template == HF:
            parsed = self.tokenizer.parse_response(new_ids, prefix=prompt, tools=self.toolbox.schemas)
            calls = [normalize_call(call, "the model's answer") for call in parsed.get("tool_calls") or []]
            return (parsed.get("content") or "", calls) if calls else None
        content, calls = FORMS[self.template.tool_form].parse(self._raw(new_ids))
        return (content, [bind_arguments(call, self.toolbox.schemas) for call in calls]) if calls else None

    def _call_opener(self) -> tuple[list[str], set[int]]:
        """What starts a tool call, for the streamer to hold back: the opener's visible text, or
        its token id where it is a special token (invisible in the stream). Nothing without tools,
        or for ``hf``, whose tokenizer parses calls its own way (its calls stream as text)."""
        if self.toolbox is None or self.template == HF:
            return [], set()
        from tunemake.toolforms import FORMS

        opener = FORMS[self.template.tool_form].markers[0]
        ids = self.tokenizer.encode(opener, add_special_tokens=False)
        visible = self.tokenizer.decode(ids, skip_special_tokens=True)
        return ([visible] if visible else []), (set(ids) if not visible and len(ids) == 1 else set())

    def _visible_stops(self) -> list[str]:
        """The stop words' text without special tokens: what a streamer sees."""
        encode, decode = self.tokenizer.encode, self.tokenizer.decode
        visible = [decode(encode(word, add_special_tokens=False), skip_special_tokens=True) for word in self.stops.words]
        return [text for text in visible if text]

    def _answer(self, new_ids: list[int]) -> str:
        """The generated text up to the first stop word, without special tokens (eos among them)."""
        decode = self.tokenizer.decode
        raw = decode(new_ids, skip_special_tokens=False)
        cuts = [raw.find(w) for w in self.stops.words if w in raw]
        if not cuts:
            return decode(new_ids, skip_special_tokens=True)
        cut = min(cuts)
        # The longest run of whole tokens that ends at or before the cut, plus the part of the
        # token the stop word starts inside (plain text: a special token is never split).
        for k in range(len(new_ids), -1, -1):
            before = decode(new_ids[:k], skip_special_tokens=False)
            if len(before) <= cut and raw.startswith(before):
                return decode(new_ids[:k], skip_special_tokens=True) + raw[len(before):cut]
        return raw[:cut]  # not reached: k = 0 always qualifies


def check_tool_template(template: Template | str, tokenizer) -> None:
    """Raise :class:`ChatError` when chat cannot read the calls ``template`` makes the model write."""
    from tunemake.toolforms import TOOL_TEMPLATES, without_form

    if template == HF:
        if not getattr(tokenizer, "response_template", None):
            raise ChatError("template 'hf': the tokenizer has no response_template, so the tool calls a model "
                            "writes cannot be parsed (transformers' parse_response); chat with --prompt-template "
                            f"naming one of {', '.join(t for t in TOOL_TEMPLATES if t != HF)}")
    elif not template.tool_form:
        raise ChatError(without_form(template.name))


def call_line(call: dict) -> str:
    """How interactive chat shows a call and its result: ``[calculate({"expression": "2+3"}) -> 5]``."""
    arguments = json.dumps(call["arguments"], ensure_ascii=False) if call["arguments"] is not None else "?"
    return f"[{call['name']}({arguments}) -> {call['result']}]\n"


def _call_turn(turn: dict, content: str, calls: list[dict], raw: str) -> dict:
    """The history's record of an answer that called tools. A call that could not be read has no
    unified form: that answer is kept as the text the model wrote."""
    if any(call.get("error") for call in calls):
        return {**turn, "output": raw}
    return {**turn, "output": content, "tool_calls": [{"name": c["name"], "arguments": c["arguments"]} for c in calls]}


@functools.cache
def _streamer_class():
    # Built on first use, so importing this module (for --help) does not import transformers.
    from transformers import TextStreamer

    class StopAwareStreamer(TextStreamer):
        """A TextStreamer into ``stream`` that never prints a stop word, nor what may start one."""

        def __init__(self, tokenizer, visible_stops: list[str], stream: TextIO, hold_ids: set[int] = frozenset()):
            """``hold_ids``: tokens after which nothing more is printed (a tool call's special
            opener: the calls are shown by :meth:`show_calls` once run)."""
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.visible_stops, self.stream, self.hold_ids = visible_stops, stream, hold_ids
            self.start()

        def start(self) -> None:
            """A new generation (after tool results): what it prints starts afresh."""
            self.token_cache, self.print_len, self.next_tokens_are_prompt = [], 0, True
            self.text, self.printed, self.held = "", 0, False

        def put(self, value) -> None:
            if not self.next_tokens_are_prompt and self.hold_ids:
                self.held = self.held or any(token in self.hold_ids for token in value.flatten().tolist())
            super().put(value)

        def show_calls(self, content: str, calls: list[dict]) -> None:
            """End the text before the calls, then one line per call and its result."""
            if content or self.printed:
                self.finish(content)
            for call in calls:
                self.stream.write(call_line(call))
            self.stream.flush()

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            self.text += text
            if stream_end or self.held:
                return  # finish() prints the rest, from the final answer
            limit = len(self.text)
            for stop in self.visible_stops:
                found = self.text.find(stop)
                if found >= 0:
                    limit = min(limit, found)
                    continue
                for n in range(min(len(stop) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(stop[:n]):
                        limit = min(limit, len(self.text) - n)
                        break
            if limit > self.printed:
                self.stream.write(self.text[self.printed:limit])
                self.stream.flush()
                self.printed = limit

        def finish(self, answer: str) -> None:
            """Print what of ``answer`` is not shown yet, then end the line (once: the text before
            a call may have ended it already)."""
            shown = self.text[:self.printed]
            rest = answer[len(shown):] if answer.startswith(shown) else ""
            self.stream.write(rest + ("" if (shown + rest).endswith("\n") else "\n"))
            self.stream.flush()

    return StopAwareStreamer


# ---------------------------------------------------------------------------------------------
# Modes


@dataclass
class BatchItem:
    line: int
    prompt: str
    system: str | None = None
    reset: bool = False


def parse_batch_line(text: str, line: int, source: str) -> BatchItem | None:
    """One ``--batch`` line -> a :class:`BatchItem` (None for an empty line).

    Raises:
        ChatError: ``source:line: ...`` for a JSON line that is not valid or not of the format.
    """
    text = text.rstrip("\r\n")
    if not text.strip():
        return None
    if not text.lstrip().startswith("{"):
        return BatchItem(line, text)
    where = f"{source}:{line}"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ChatError(at(where, f"not valid JSON ({exc.msg} at column {exc.colno}); a prompt "
                                  'starting with "{" must be written as {"prompt": "..."}')) from None
    if not isinstance(obj, dict):
        raise ChatError(at(where, "expected a JSON object"))
    unknown = sorted(set(obj) - {"prompt", "system", "reset"})
    if unknown:
        raise ChatError(at(where, f"unknown key {unknown[0]!r}; keys: prompt, system, reset"))
    if not isinstance(obj.get("prompt"), str):
        raise ChatError(at(where, 'missing "prompt" (a string)'))
    if "system" in obj and not isinstance(obj["system"], str):
        raise ChatError(at(where, '"system" must be a string'))
    if "reset" in obj and not isinstance(obj["reset"], bool):
        raise ChatError(at(where, '"reset" must be true or false'))
    return BatchItem(line, obj["prompt"], obj.get("system"), obj.get("reset", False))


def read_batch(lines: Iterable[str], source: str) -> Iterator[BatchItem]:
    """Parse ``--batch`` lines lazily (stdin is answered as it comes).

    Raises:
        ChatError: ``source:line: ...`` for a bad line, or a system text inside a conversation.
    """
    started = False
    for number, text in enumerate(lines, start=1):
        item = parse_batch_line(text, number, source)
        if item is None:
            continue
        if item.system is not None and started and not item.reset:
            raise ChatError(at(f"{source}:{number}", '"system" is allowed only on the first prompt of a '
                                                      'conversation; add "reset": true'))
        started = True
        yield item


def run_batch(session: ChatSession, items: Iterable[BatchItem], out: TextIO, source: str) -> int:
    """Answer every item, writing one JSON line each to ``out``; return the number answered."""
    count = 0
    for item in items:
        if item.reset:
            session.reset()
        try:
            answer = session.ask(item.prompt, system=item.system)
        except ChatError as exc:
            raise ChatError(at(f"{source}:{item.line}", str(exc))) from None
        line = {"line": item.line, "turn": session.turns, "prompt": item.prompt, "answer": answer}
        if session.toolbox is not None:
            line["tool_calls"] = session.tool_calls
        out.write(json.dumps(line, ensure_ascii=False) + "\n")
        out.flush()
        count += 1
    return count


def read_prompt(stdin: TextIO, stderr: TextIO) -> str | None:
    """Lines up to an empty line, joined with newlines (XTuner's input); None at end of input."""
    stderr.write("\n>>> ")
    stderr.flush()
    lines = []
    while True:
        line = stdin.readline()
        if not line:  # end of input
            return "\n".join(lines) if lines else None
        line = line.rstrip("\r\n")
        if not line:
            if lines:
                return "\n".join(lines)
            continue  # an empty line before any text is no prompt
        lines.append(line)


def run_interactive(session: ChatSession, stdin: TextIO, stdout: TextIO, stderr: TextIO, streamer: bool = True) -> None:
    """XTuner's loop: a prompt ends on an empty line; ``EXIT`` quits, ``RESET`` clears the history."""
    while True:
        prompt = read_prompt(stdin, stderr)
        if prompt is None or prompt.strip() == EXIT:
            return
        if prompt.strip() == RESET:
            session.reset()
            stderr.write("(history cleared)\n")
            continue
        try:
            answer = session.ask(prompt, stream=stdout if streamer else None)
        except ChatError as exc:
            stderr.write(f"error: {exc}\n")
            continue
        if not streamer:
            for call in session.tool_calls:
                stdout.write(call_line(call))
            stdout.write(answer + "\n")
            stdout.flush()


def run_chat(args) -> None:
    """``tunemake chat``: load, then chat interactively or answer ``--batch``.

    Raises:
        ChatError, ConfigError: see :func:`load_chat_model`, :func:`resolve_template`, the batch format.
    """
    from tunemake.toolbox import load_toolbox

    model_dir, adapter = check_model_dirs(args.model, args.adapter, getattr(args, "revision", None))
    template = resolve_template(model_dir, adapter, args.prompt_template)
    plugins, module = getattr(args, "with_plugins", None) or (), getattr(args, "tools", None)
    toolbox = load_toolbox(plugins, module) if plugins or module else None
    if toolbox is not None and template != HF:
        check_tool_template(template, None)  # before the model loads
    items: Iterable[BatchItem] | None = None
    if args.batch is not None:
        if args.batch == "-":
            source, items = "<stdin>", read_batch(sys.stdin, "<stdin>")
        else:
            source = args.batch
            try:
                with open(args.batch, encoding="utf-8") as handle:
                    items = list(read_batch(handle, source))  # a bad line fails before the model loads
            except OSError as exc:
                raise ChatError(f"{args.batch}: cannot read the batch file ({exc.strerror})") from None
            except UnicodeDecodeError as exc:
                raise ChatError(f"{args.batch}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    model, tokenizer = load_chat_model(model_dir, adapter, args.bits,
                                       trust_remote_code=getattr(args, "trust_remote_code", False))
    session = ChatSession(
        model, tokenizer, template, system=args.system or "", temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
        max_new_tokens=args.max_new_tokens, stop_words=args.stop_words or (), seed=args.seed,
        toolbox=toolbox, max_tool_rounds=getattr(args, "max_tool_rounds", 5))
    if items is not None:
        run_batch(session, items, sys.stdout, source)
        return
    name = template if template == HF else template.name
    sys.stderr.write(f"tunemake chat: {args.model}{' + ' + str(args.adapter) if args.adapter else ''}, "
                     f"template {name}, {'sampling' if args.temperature > 0 else 'greedy'}, seed {args.seed}\n"
                     f"End a prompt with an empty line. {EXIT} quits, {RESET} starts a new conversation.\n")
    try:
        run_interactive(session, sys.stdin, sys.stdout, sys.stderr, streamer=not args.no_streamer)
    except KeyboardInterrupt:
        sys.stderr.write("\n")
