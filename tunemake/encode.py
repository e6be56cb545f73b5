"""Tokenize conversations with labels masked as XTuner does, fast, and pack them to max_length.

The rules (XTuner's ``encode_fn``, xtuner/dataset/utils.py): per turn, bos (unlabelled) when the
previous turn ended with eos or at the start; (system +) instruction unlabelled; output (+ suffix) labelled; the tokenizer's eos,
labelled, when the template's suffix is not the eos; the separator unlabelled. Tool calls are
part of the output, tools and tool results part of the prompt (``tunemake.toolforms``). A turn whose
``output_with_loss`` is false (XTuner's per-turn loss) has its output, suffix and eos unlabelled
too. Each of those strings is tokenized on its own, so token boundaries fall at the seams. Then a
plain cut to max_length. Pretrain records are ``bos + text``, every text token labelled, no eos.

:func:`encode_record` is that rule written plainly for one record (the specification, and what
``tunemake check-dataset`` uses). :func:`encode_records` gives identical ids and labels for many
records at once: it tokenizes each distinct string once, in batches, on the Rust tokenizer's
threads, which is where the data stage's speed comes from.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Iterable, Sequence

import numpy as np

from tunemake.errors import DataError
from tunemake.templates import HF, Template
from tunemake.tools import as_messages, has_tools

IGNORE_INDEX = -100

# Pieces of a planned record: a string to tokenize (labelled or not), or the bos / eos id. The
# eos closing a turn trained without loss is unlabelled: UNLABELLED_EOS.
BOS, EOS, UNLABELLED_EOS = object(), object(), object()


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def special_ids(tokenizer) -> tuple[list[int], list[int]]:
    """The bos and eos ids XTuner adds: none for a tokenizer that has no such token."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return bos, eos


def plan(turns: Sequence[dict], template: Template | str, pretrain: bool, tokenizer=None) -> list:
    """The sequence of pieces one record encodes to: ``(text, labelled)`` tuples, BOS, EOS and
    UNLABELLED_EOS.

    Args:
        turns: the unified conversation, ``[{"system", "input", "output"}, ...]``; a turn with
            ``"output_with_loss": False`` is encoded without a label. Tools, calls and results
            (``tunemake.tools``) are written by the template's tool form: the tools and results
            into the prompt (unlabelled), the calls after the output (labelled).
        template: a :class:`Template`, or ``"hf"`` to render with the tokenizer's chat_template.
        pretrain: the record is raw text (``bos + text``, no template, no eos).
        tokenizer: needed for the ``hf`` template only.
    """
    if pretrain:
        return [BOS, (turns[0]["output"], True)]
    if template == HF:
        return _plan_hf(turns, tokenizer)
    form = tool_form(template, turns)
    pieces: list = []
    needs_bos = True
    calls: list[dict] = []  # the previous turn's, which its results answer
    for round_, turn in enumerate(turns, start=1):
        if needs_bos:
            pieces.append(BOS)
        with_loss = turn.get("output_with_loss", True)
        pieces.append((_prompt(template, form, turn, round_, calls), False))
        calls = turn.get("tool_calls") or []
        closes = not calls or form.closes_call_turn
        answer = form.calls(turn["output"], calls) if calls else turn["output"]
        pieces.append((answer + template.suffix if closes else answer, with_loss))
        needs_bos = closes and not template.suffix_as_eos
        if needs_bos:
            pieces.append(EOS if with_loss else UNLABELLED_EOS)
        if closes and template.sep:
            pieces.append((template.sep, False))
    return pieces


def tool_form(template: Template, turns: Sequence[dict]):
    """The template's tool form, or None for a conversation without tools.

    Raises:
        DataError: the conversation has tools and the template no tool form.
    """
    from tunemake.toolforms import FORMS, without_form

    if not has_tools(turns):
        return None
    if not template.tool_form:
        raise DataError(without_form(template.name))
    return FORMS[template.tool_form]


def check_tools(turns: Sequence[dict], template: Template | str, tokenizer) -> None:
    """Raise when ``template`` cannot write this conversation's tools: a named template without a
    tool form, or an ``hf`` chat_template that renders the same text with and without them.

    Raises:
        DataError: naming the template (not the record: the caller knows where it is).
    """
    if template != HF:
        tool_form(template, turns)
        return
    tools = turns[0].get("tools")
    if not tools:
        return
    *asked, _ = as_messages(turns[:1])
    render = lambda with_tools: tokenizer.apply_chat_template(  # noqa: E731
        asked, tools=with_tools, tokenize=False, add_generation_prompt=True)
    if render(tools) == render(None):
        raise DataError("template 'hf': the tokenizer's chat_template ignores tools (it renders the same "
                        "text with and without them); pick qwen_chat, internlm2_chat or moss_sft")


def _prompt(template: Template, form, turn: dict, round_: int, calls: list[dict]) -> str:
    """A turn's prompt: the system prompt (with the tools, on the first turn), the results of the
    previous turn's calls, then the instruction, or only the assistant's prefix after results."""
    system, text = turn.get("system"), ""
    if turn.get("tools"):
        text, system = form.tools_system(template, system or "", turn["tools"]), None
    if not turn.get("tool_results"):
        return text + template.render_input(turn["input"] or "", system, round_)
    if system:  # every template with a tool form has a system field
        text += template.system.format(system=system)
    text += form.results(turn["tool_results"], calls)
    return text + (template.render_input(turn["input"], None, round_) if turn.get("input") else form.assistant_prefix)


def _plan_hf(turns: Sequence[dict], tokenizer) -> list:
    """Split the tokenizer's own chat_template rendering into prompt and answer pieces.

    The prompt of turn k is what ``add_generation_prompt=True`` adds after turn k-1; the answer is
    what the assistant message adds after that. bos / eos are whatever the template writes.
    Tools go to ``apply_chat_template(tools=...)``, calls and results as OpenAI messages
    (:func:`check_tools` says whether the template writes them).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("template 'hf': the tokenizer has no chat_template; pick a named template")
    tools = turns[0].get("tools") or None

    def render(messages, generation_prompt=False):
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=generation_prompt)

    messages: list[dict] = []
    rendered, pieces = "", []
    for turn in turns:
        *asked, answer = as_messages([turn])
        messages += asked
        prompt = render(messages, True)
        messages.append(answer)
        full = render(messages)
        if not (prompt.startswith(rendered) and full.startswith(prompt)):
            raise DataError(
                "template 'hf': the tokenizer's chat_template does not render a conversation as a "
                "prefix of its continuation, so prompt and answer cannot be told apart; pick a named template"
            )
        pieces += [(prompt[len(rendered):], False), (full[len(prompt):], turn.get("output_with_loss", True))]
        rendered = full
    return pieces


def prompt_ids(turns: Sequence[dict], template: Template | str, tokenizer) -> tuple[str, list[int]]:
    """The text and ids a model is given to write the last turn's answer, as training encodes them.

    ``turns`` is a conversation whose last turn's ``output`` is ignored (earlier outputs are the
    history). Every piece is tokenized on its own, as :func:`encode_record` does, so the ids are
    the ones the model saw in training (tokenizing the whole text at once can give others). The
    text is the pieces joined; for a named template it equals the saved tokenizer's
    ``apply_chat_template(messages, add_generation_prompt=True)``.
    """
    if not turns:
        raise DataError("a prompt needs at least one turn")
    # the last turn's (empty) answer must be labelled: its piece marks where the prompt ends
    last = {k: v for k, v in turns[-1].items() if k != "tool_calls"}
    turns = [*turns[:-1], {**last, "output": "", "output_with_loss": True}]
    pieces = plan(turns, template, False, tokenizer)
    last_answer = max(i for i, piece in enumerate(pieces) if isinstance(piece, tuple) and piece[1])
    bos, eos = special_ids(tokenizer)
    text, ids = "", []
    for piece in pieces[:last_answer]:
        if piece is BOS:
            text, ids = text + (tokenizer.bos_token or ""), ids + bos
        elif piece is EOS or piece is UNLABELLED_EOS:
            text, ids = text + (tokenizer.eos_token or ""), ids + eos
        elif piece[0]:
            text += piece[0]
            ids += tokenizer.encode(piece[0], add_special_tokens=False)
    return text, ids


@dataclass
class Stops:
    """Where the generation of an answer stops.

    ``ids`` end it: the tokenizer's eos, the model's, and each stop word that is one token.
    ``strings`` are the stop words of several tokens, which no id can end at (``generate``'s
    ``stop_strings``); ``words`` is every stop word, in order, to cut the answer's text at.
    """

    ids: list[int]
    strings: list[str]
    words: list[str]


def generation_stops(tokenizer, template: Template | str, model_eos: int | list[int] | None = None,
                     extra_words: Iterable[str] = ()) -> Stops:
    """Where generation stops for ``template`` (its stop words and ``extra_words``) and ``tokenizer``.

    The one rule for the training samples, evaluate, chat and a merged model's
    ``generation_config.json``. A stop word is encoded as text (``convert_tokens_to_ids`` would
    give the unknown id for a word that is not spelled as a vocabulary entry).

    Args:
        tokenizer: the model's tokenizer.
        template: a :class:`Template`, or ``"hf"`` (no stop words of its own).
        model_eos: the model's ``generation_config.eos_token_id`` (an id or a list), if any.
        extra_words: stop words besides the template's. Default none.
    """
    ids: list[int] = []
    model_eos = model_eos if isinstance(model_eos, list) else [model_eos]
    for eos in [tokenizer.eos_token_id, *model_eos]:
        if eos is not None and eos not in ids:
            ids.append(eos)
    strings: list[str] = []
    words: list[str] = []
    for word in [*(() if template == HF else template.stop_words), *extra_words]:
        encoded = tokenizer.encode(word, add_special_tokens=False) if word else []
        if not encoded or word in words:
            continue
        words.append(word)
        if len(encoded) > 1:
            strings.append(word)
        elif encoded[0] not in ids:
            ids.append(encoded[0])
    return Stops(ids, strings, words)


def answer_text(new_ids: Sequence[int], tokenizer, stops: Stops) -> str:
    """The text of generated ids: up to the first stop id, special tokens skipped, cut at the first
    stop word (one of several tokens is not among the ids)."""
    end = next((k for k, token in enumerate(new_ids) if token in stops.ids), len(new_ids))
    text = tokenizer.decode(new_ids[:end], skip_special_tokens=True)
    for word in stops.words:
        text = text.split(word, 1)[0]
    return text


def raw_text(new_ids: Sequence[int], tokenizer, stops: Stops) -> str:
    """The text of generated ids up to the stop, special tokens kept (the markers a tool call is
    written with), the stop ids (eos among them) left out, cut at the first stop word."""
    end = next((k for k, token in enumerate(new_ids) if token in stops.ids), len(new_ids))
    text = tokenizer.decode(new_ids[:end], skip_special_tokens=False)
    cuts = [text.find(word) for word in stops.words if word in text]
    return text[:min(cuts)] if cuts else text


def encode_record(turns, tokenizer, template, max_length: int, pretrain: bool = False) -> Encoded:
    """Encode one record, piece by piece, exactly as XTuner's ``encode_fn``."""
    bos, eos = special_ids(tokenizer)
    input_ids: list[int] = []
    labels: list[int] = []
    for piece in plan(turns, template, pretrain, tokenizer):
        if piece is BOS:
            input_ids += bos
            labels += [IGNORE_INDEX] * len(bos)
        elif piece is EOS:
            input_ids += eos
            labels += eos
        elif piece is UNLABELLED_EOS:
            input_ids += eos
            labels += [IGNORE_INDEX] * len(eos)
        else:
            text, labelled = piece
            ids = tokenizer.encode(text, add_special_tokens=False) if text else []
            input_ids += ids
            labels += ids if labelled else [IGNORE_INDEX] * len(ids)
    truncated = len(input_ids) > max_length
    return Encoded(input_ids[:max_length], labels[:max_length], truncated)


def encode_records(
    records: Iterable[tuple[Sequence[dict], bool]], tokenizer, template, max_length: int
) -> list[Encoded]:
    """Encode many ``(turns, pretrain)`` records; same result as :func:`encode_record` on each.

    Distinct strings are tokenized once per call with the backend tokenizer's ``encode_batch``
    (parallel over ``RAYON_NUM_THREADS``), so a separator or a repeated system prompt costs one
    tokenization. Slow (Python) tokenizers fall back to encoding piece by piece.
    """
    bos, eos = special_ids(tokenizer)
    plans = [plan(turns, template, pretrain, tokenizer) for turns, pretrain in records]
    texts = {piece[0] for p in plans for piece in p if isinstance(piece, tuple)}
    texts.discard("")
    texts = list(texts)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        encodings = backend.encode_batch(texts, add_special_tokens=False)
        ids_of = {text: enc.ids for text, enc in zip(texts, encodings)}
    else:
        ids_of = {text: tokenizer.encode(text, add_special_tokens=False) for text in texts}
    ids_of[""] = []
    ignored_bos = [IGNORE_INDEX] * len(bos)
    ignored_eos = [IGNORE_INDEX] * len(eos)
    out = []
    for p in plans:
        input_ids: list[int] = []
        labels: list[int] = []
        for piece in p:
            if piece is BOS:
                input_ids += bos
                labels += ignored_bos
            elif piece is EOS:
                input_ids += eos
                labels += eos
            elif piece is UNLABELLED_EOS:
                input_ids += eos
                labels += ignored_eos
            else:
                ids = ids_of[piece[0]]
                input_ids += ids
                labels += ids if piece[1] else [IGNORE_INDEX] * len(ids)
        truncated = len(input_ids) > max_length
        out.append(Encoded(input_ids[:max_length], labels[:max_length], truncated))
    return out


@dataclass
class Packed:
    """Rows as flat arrays plus row offsets (row i is ``[offsets[i], offsets[i+1])``)."""

    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    offsets: np.ndarray

    @property
    def num_rows(self) -> int:
        return len(self.offsets) - 1


#: ``packing: whole``: rows hold whole samples, none split across two.
WHOLE = "whole"


def pack(samples: Sequence[Encoded], max_length: int, seed: int, packing: bool | str = True) -> Packed:
    """Shuffle samples with ``seed`` and concatenate them into rows of ``max_length`` tokens.

    ``packing=True`` (XTuner's ``pack_to_max_length``): every row is full but the last; a sample
    may be split across two rows, its second part then trained without its first. Unlike XTuner's
    packer, no token is dropped: the last row is shorter instead. ``packing="whole"``: a row takes
    the shuffled samples in turn until the next does not fit, so no sample is split (every sample
    fits a row: it was cut to ``max_length``); rows are shorter, ``stats.json``'s packing
    efficiency says by how much. ``position_ids`` restart at 0 at every document piece (a sample,
    or the part of a sample that opens a row), so attention and positions can stay inside a
    document. With ``packing=False`` each (shuffled) sample is its own row.
    """
    order = np.random.default_rng(seed).permutation(len(samples))
    shuffled = [samples[i] for i in order]
    lengths = np.fromiter((len(s.input_ids) for s in shuffled), dtype=np.int64, count=len(shuffled))
    total = int(lengths.sum())
    # chain.from_iterable flattens in C: no Python frame per token
    input_ids = np.fromiter(chain.from_iterable(s.input_ids for s in shuffled), dtype=np.int32, count=total)
    labels = np.fromiter(chain.from_iterable(s.labels for s in shuffled), dtype=np.int32, count=total)
    doc_starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=doc_starts[1:])
    index = np.arange(total, dtype=np.int64)
    doc_start_of = np.repeat(doc_starts, lengths)
    if packing == WHOLE:
        offsets = np.append(doc_starts[_whole_rows(lengths, max_length)], total)
        position_ids = index - doc_start_of
    elif packing:
        offsets = np.append(np.arange(0, total, max_length, dtype=np.int64), total)
        row_start_of = (index // max_length) * max_length
        position_ids = index - np.maximum(doc_start_of, row_start_of)
    else:
        offsets = np.append(doc_starts, total)
        position_ids = index - doc_start_of
    return Packed(input_ids, labels, position_ids.astype(np.int32), offsets.astype(np.int64))


def _whole_rows(lengths: np.ndarray, max_length: int) -> list[int]:
    """The samples that open a row when each row takes samples in turn until the next does not fit."""
    starts, used = [], max_length
    for index, length in enumerate(lengths.tolist()):
        if used + length > max_length:
            starts.append(index)
            used = 0
        used += length
    return starts
