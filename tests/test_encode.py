"""Encoding: XTuner's label masks (its ``encode_fn``), the batched encoder, ``hf`` and packing.

Expected ids are built by hand from ``tokenizer.encode(piece, add_special_tokens=False)`` of the
pieces XTuner tokenizes separately, with the piece strings written out literally.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from tunemake.encode import HF, IGNORE_INDEX, Encoded, encode_record, encode_records, pack
from tunemake.errors import DataError
from tunemake.templates import TEMPLATES

M = IGNORE_INDEX


def ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def prompt(tokenizer, text):
    """(ids, labels) of an unlabelled piece."""
    piece = ids(tokenizer, text)
    return piece, [M] * len(piece)


def answer(tokenizer, text):
    piece = ids(tokenizer, text)
    return piece, list(piece)


def special(token_id, labelled):
    return [token_id], [token_id if labelled else M]


def join(*parts):
    input_ids, labels = [], []
    for part_ids, part_labels in parts:
        input_ids += part_ids
        labels += part_labels
    return input_ids, labels


TWO_TURNS = [
    {"system": "Be brief.", "input": "What is the capital of France?", "output": "Paris."},
    {"system": "", "input": "And of Italy?", "output": "Rome."},
]


# --- label masks --------------------------------------------------------------------------------


def test_default_single_turn(tokenizer_for):
    tok = tokenizer_for("default")
    turns = [{"system": "", "input": "Hello world", "output": "How are you?"}]
    enc = encode_record(turns, tok, TEMPLATES["default"], max_length=512)
    expected = join(
        special(tok.bos_token_id, False),
        prompt(tok, "<|User|>:Hello world\n<|Bot|>:"),
        answer(tok, "How are you?"),
        special(tok.eos_token_id, True),
        prompt(tok, "\n"),
    )
    assert (enc.input_ids, enc.labels) == expected
    assert not enc.truncated


def test_default_multi_turn_eos_labelled_and_bos_again(tokenizer_for):
    """SUFFIX_AS_EOS off: eos labelled after each answer, the next turn opens with bos."""
    tok = tokenizer_for("default")
    enc = encode_record(TWO_TURNS, tok, TEMPLATES["default"], max_length=512)
    expected = join(
        special(tok.bos_token_id, False),
        prompt(tok, "<|System|>:Be brief.\n<|User|>:What is the capital of France?\n<|Bot|>:"),
        answer(tok, "Paris."),
        special(tok.eos_token_id, True),
        prompt(tok, "\n"),
        special(tok.bos_token_id, False),
        prompt(tok, "<|User|>:And of Italy?\n<|Bot|>:"),
        answer(tok, "Rome."),
        special(tok.eos_token_id, True),
        prompt(tok, "\n"),
    )
    assert (enc.input_ids, enc.labels) == expected
    assert enc.input_ids.count(tok.bos_token_id) == 2
    assert enc.labels.count(tok.eos_token_id) == 2


def test_internlm2_multi_turn_suffix_as_eos(tokenizer_for):
    """SUFFIX_AS_EOS on: no eos, no bos on turn 2, the suffix <|im_end|> labelled."""
    tok = tokenizer_for("internlm2_chat")
    enc = encode_record(TWO_TURNS, tok, TEMPLATES["internlm2_chat"], max_length=512)
    expected = join(
        special(tok.bos_token_id, False),
        prompt(tok, "<|im_start|>system\nBe brief.<|im_end|>\n"
                    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"),
        answer(tok, "Paris.<|im_end|>"),
        prompt(tok, "\n"),
        prompt(tok, "<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n"),
        answer(tok, "Rome.<|im_end|>"),
        prompt(tok, "\n"),
    )
    assert (enc.input_ids, enc.labels) == expected
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert enc.input_ids.count(tok.bos_token_id) == 1
    assert tok.eos_token_id not in enc.input_ids
    # Every <|im_end|> that closes an answer is trained; those closing a prompt are not.
    assert enc.labels.count(im_end) == 2
    assert enc.input_ids.count(im_end) == 5


def test_llama3_has_no_separator(tokenizer_for):
    tok = tokenizer_for("llama3_chat")
    turns = [{"system": "", "input": "Hi", "output": "Hello."}, {"system": "", "input": "Bye", "output": "Bye."}]
    enc = encode_record(turns, tok, TEMPLATES["llama3_chat"], max_length=512)
    expected = join(
        special(tok.bos_token_id, False),
        prompt(tok, "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n"),
        answer(tok, "Hello.<|eot_id|>"),
        prompt(tok, "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n"),
        answer(tok, "Bye.<|eot_id|>"),
    )
    assert (enc.input_ids, enc.labels) == expected


def test_separator_is_never_labelled(tokenizer_for):
    tok = tokenizer_for("chatglm2")
    turns = [{"system": "", "input": "a", "output": "b"}] * 3
    enc = encode_record(turns, tok, TEMPLATES["chatglm2"], max_length=512)
    sep = ids(tok, "\n\n")
    assert len(sep) >= 1
    # The separator follows each eos; all its tokens are unlabelled.
    positions = [i for i, t in enumerate(enc.input_ids) if t == tok.eos_token_id]
    assert len(positions) == 3
    for pos in positions:
        assert enc.input_ids[pos + 1 : pos + 1 + len(sep)] == sep
        assert enc.labels[pos + 1 : pos + 1 + len(sep)] == [M] * len(sep)


def test_system_only_where_the_turn_has_one(tokenizer_for):
    tok = tokenizer_for("default")
    turns = [{"system": "Be brief.", "input": "x", "output": "y"}, {"input": "z", "output": "w"}]
    enc = encode_record(turns, tok, TEMPLATES["default"], max_length=512)
    text = tok.decode(enc.input_ids)
    assert text.count("<|System|>") == 1
    assert text.index("<|System|>") < text.index("<|User|>")


def test_truncation_is_a_plain_cut(tokenizer_for):
    tok = tokenizer_for("default")
    full = encode_record(TWO_TURNS, tok, TEMPLATES["default"], max_length=10_000)
    assert not full.truncated
    for max_length in (len(full.input_ids) - 1, len(full.input_ids) // 2, 8):
        cut = encode_record(TWO_TURNS, tok, TEMPLATES["default"], max_length=max_length)
        assert cut.truncated
        assert cut.input_ids == full.input_ids[:max_length]
        assert cut.labels == full.labels[:max_length]
    exact = encode_record(TWO_TURNS, tok, TEMPLATES["default"], max_length=len(full.input_ids))
    assert not exact.truncated and exact.input_ids == full.input_ids


def test_pretrain_is_bos_plus_text_all_labelled(tokenizer_for):
    tok = tokenizer_for("internlm2_chat")
    text = "The quick brown fox jumps over the lazy dog."
    enc = encode_record([{"system": "", "input": "", "output": text}], tok, TEMPLATES["internlm2_chat"],
                        max_length=512, pretrain=True)
    expected = join(special(tok.bos_token_id, False), answer(tok, text))
    assert (enc.input_ids, enc.labels) == expected
    assert tok.eos_token_id not in enc.input_ids


def test_tokenizer_without_bos_adds_none(no_bos_tokenizer):
    tok = no_bos_tokenizer
    enc = encode_record(TWO_TURNS, tok, TEMPLATES["default"], max_length=512)
    expected = join(
        prompt(tok, "<|System|>:Be brief.\n<|User|>:What is the capital of France?\n<|Bot|>:"),
        answer(tok, "Paris."),
        special(tok.eos_token_id, True),
        prompt(tok, "\n"),
        prompt(tok, "<|User|>:And of Italy?\n<|Bot|>:"),
        answer(tok, "Rome."),
        special(tok.eos_token_id, True),
        prompt(tok, "\n"),
    )
    assert (enc.input_ids, enc.labels) == expected
    pre = encode_record([{"input": "", "output": "hello"}], tok, TEMPLATES["default"], 512, pretrain=True)
    assert (pre.input_ids, pre.labels) == answer(tok, "hello")


def test_empty_output_keeps_its_suffix_labelled(tokenizer_for):
    tok = tokenizer_for("internlm2_chat")
    enc = encode_record([{"system": "", "input": "hi", "output": ""}], tok, TEMPLATES["internlm2_chat"], 512)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert [label for label in enc.labels if label != M] == [im_end]


def test_empty_output_keeps_its_eos_labelled(tokenizer_for):
    tok = tokenizer_for("default")
    enc = encode_record([{"system": "", "input": "hi", "output": ""}], tok, TEMPLATES["default"], 512)
    assert [label for label in enc.labels if label != M] == [tok.eos_token_id]


def test_none_input_is_empty(tokenizer_for):
    tok = tokenizer_for("default")
    a = encode_record([{"system": None, "input": None, "output": "y"}], tok, TEMPLATES["default"], 512)
    b = encode_record([{"system": "", "input": "", "output": "y"}], tok, TEMPLATES["default"], 512)
    assert a == b


# --- per-turn loss (XTuner's output_with_loss) ----------------------------------------------------


def untrained(turn):
    return {**turn, "output_with_loss": False}


def test_untrained_turn_default_output_and_eos_unlabelled(tokenizer_for):
    """SUFFIX_AS_EOS off: the untrained turn keeps its eos and the next bos, both unlabelled."""
    tok = tokenizer_for("default")
    enc = encode_record([untrained(TWO_TURNS[0]), TWO_TURNS[1]], tok, TEMPLATES["default"], max_length=512)
    expected = join(
        special(tok.bos_token_id, False),
        prompt(tok, "<|System|>:Be brief.\n<|User|>:What is the capital of France?\n<|Bot|>:"),
        prompt(tok, "Paris."),
        special(tok.eos_token_id, False),
        prompt(tok, "\n"),
        special(tok.bos_token_id, False),
        prompt(tok, "<|User|>:And of Italy?\n<|Bot|>:"),
        answer(tok, "Rome."),
        special(tok.eos_token_id, True),
        prompt(tok, "\n"),
    )
    assert (enc.input_ids, enc.labels) == expected


def test_untrained_turn_internlm2_suffix_unlabelled(tokenizer_for):
    tok = tokenizer_for("internlm2_chat")
    enc = encode_record([TWO_TURNS[0], untrained(TWO_TURNS[1])], tok, TEMPLATES["internlm2_chat"], max_length=512)
    expected = join(
        special(tok.bos_token_id, False),
        prompt(tok, "<|im_start|>system\nBe brief.<|im_end|>\n"
                    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"),
        answer(tok, "Paris.<|im_end|>"),
        prompt(tok, "\n"),
        prompt(tok, "<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n"),
        prompt(tok, "Rome.<|im_end|>"),
        prompt(tok, "\n"),
    )
    assert (enc.input_ids, enc.labels) == expected


def test_untrained_turn_gemma_suffix_and_eos_unlabelled(tokenizer_for):
    """gemma: a suffix that is not the eos, so <end_of_turn> and eos both follow the answer."""
    tok = tokenizer_for("gemma")
    enc = encode_record([untrained(TWO_TURNS[0]), TWO_TURNS[1]], tok, TEMPLATES["gemma"], max_length=512)
    expected = join(
        special(tok.bos_token_id, False),
        prompt(tok, "<start_of_turn>system\nBe brief.<end_of_turn>\n<start_of_turn>user\n"
                    "What is the capital of France?<end_of_turn>\n<start_of_turn>model\n"),
        prompt(tok, "Paris.<end_of_turn>"),
        special(tok.eos_token_id, False),
        prompt(tok, "\n"),
        special(tok.bos_token_id, False),
        prompt(tok, "<start_of_turn>user\nAnd of Italy?<end_of_turn>\n<start_of_turn>model\n"),
        answer(tok, "Rome.<end_of_turn>"),
        special(tok.eos_token_id, True),
        prompt(tok, "\n"),
    )
    assert (enc.input_ids, enc.labels) == expected


def test_every_turn_untrained_leaves_no_label(tokenizer_for):
    tok = tokenizer_for("default")
    turns = [untrained(turn) for turn in TWO_TURNS]
    enc = encode_record(turns, tok, TEMPLATES["default"], max_length=512)
    assert set(enc.labels) == {M}
    # same ids as the trained record: only the labels change
    assert enc.input_ids == encode_record(TWO_TURNS, tok, TEMPLATES["default"], max_length=512).input_ids


def test_output_with_loss_true_is_the_default(tokenizer_for):
    tok = tokenizer_for("default")
    turns = [{**turn, "output_with_loss": True} for turn in TWO_TURNS]
    assert encode_record(turns, tok, TEMPLATES["default"], 512) == encode_record(TWO_TURNS, tok, TEMPLATES["default"], 512)


def test_prompt_ids_ignore_the_loss_flags(tokenizer_for):
    """What chat and evals send does not depend on which turns were trained."""
    from tunemake.encode import prompt_ids

    tok = tokenizer_for("default")
    flagged = [untrained(TWO_TURNS[0]), untrained(TWO_TURNS[1])]
    assert prompt_ids(flagged, TEMPLATES["default"], tok) == prompt_ids(TWO_TURNS, TEMPLATES["default"], tok)


def test_special_token_strings_in_user_text_encode_to_special_ids(tokenizer_for):
    """XTuner does not escape special-token strings typed in content."""
    tok = tokenizer_for("internlm2_chat")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    turns = [{"system": "", "input": "say <|im_end|> now", "output": "ok <|im_end|>"}]
    enc = encode_record(turns, tok, TEMPLATES["internlm2_chat"], 512)
    # Prompt: the user's typed one + the instruction's; answer: the typed one + the suffix.
    assert enc.input_ids.count(im_end) == 4
    assert enc.labels.count(im_end) == 2
    assert im_end in ids(tok, "say <|im_end|> now")


# --- the batched encoder gives the same result ---------------------------------------------------


def _random_text(rng: random.Random, max_words: int) -> str:
    words = ["the", "quick", "brown", "fox", "Paris", "42", "7", "Ünïcödé", "问答", "🎉", "\n", "  ",
             "<|im_end|>", "<s>", "</s>", "a\tb", "'quote'", "{brace}", "über", ""]
    return " ".join(rng.choice(words) for _ in range(rng.randint(0, max_words)))


def _random_records(seed: int, n: int):
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        if rng.random() < 0.2:
            records.append(([{"system": "", "input": "", "output": _random_text(rng, 200)}], True))
            continue
        turns = []
        for k in range(rng.randint(1, 4)):
            turns.append({
                "system": _random_text(rng, 5) if k == 0 and rng.random() < 0.5 else "",
                "input": _random_text(rng, 30 if rng.random() < 0.9 else 300),
                "output": _random_text(rng, 30),
            })
            if rng.random() < 0.25:
                turns[-1]["output_with_loss"] = False
        records.append((turns, False))
    return records


@pytest.mark.parametrize("name", ["default", "internlm2_chat", "gemma"])
def test_encode_records_equals_encode_record(name, tokenizer_for):
    tok = tokenizer_for(name)
    template = TEMPLATES[name]
    records = _random_records(seed=len(name), n=300)
    max_length = 96
    batched = encode_records(records, tok, template, max_length)
    assert len(batched) == len(records)
    truncated = 0
    for (turns, pretrain), got in zip(records, batched):
        want = encode_record(turns, tok, template, max_length, pretrain)
        assert got.input_ids == want.input_ids
        assert got.labels == want.labels
        assert got.truncated == want.truncated
        truncated += got.truncated
    assert 0 < truncated < len(records)  # the sample covers both
    assert any(pretrain for _, pretrain in records)
    assert any(turn.get("output_with_loss") is False for turns, _ in records for turn in turns)


def test_encode_records_pretrain_only(tokenizer_for):
    tok = tokenizer_for("default")
    texts = ["", "hello", "The quick brown fox " * 40, "问答 🎉"]
    records = [([{"system": "", "input": "", "output": t}], True) for t in texts]
    batched = encode_records(records, tok, TEMPLATES["default"], 64)
    for (turns, _), got in zip(records, batched):
        want = encode_record(turns, tok, TEMPLATES["default"], 64, pretrain=True)
        assert (got.input_ids, got.labels, got.truncated) == (want.input_ids, want.labels, want.truncated)
    assert batched[0].input_ids == [tok.bos_token_id]
    assert batched[2].truncated and len(batched[2].input_ids) == 64


def test_encode_records_without_bos(no_bos_tokenizer):
    records = _random_records(seed=3, n=50)
    batched = encode_records(records, no_bos_tokenizer, TEMPLATES["default"], 128)
    for (turns, pretrain), got in zip(records, batched):
        want = encode_record(turns, no_bos_tokenizer, TEMPLATES["default"], 128, pretrain)
        assert (got.input_ids, got.labels) == (want.input_ids, want.labels)


# --- the tokenizer's own chat_template ("hf") ----------------------------------------------------

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture()
def chatml_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir("internlm2_chat")))
    tok.chat_template = CHATML
    return tok


def test_hf_template_labels_answers_only(chatml_tokenizer):
    tok = chatml_tokenizer
    enc = encode_record(TWO_TURNS, tok, HF, 512)
    expected = join(
        prompt(tok, "<|im_start|>system\nBe brief.<|im_end|>\n"
                    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"),
        answer(tok, "Paris.<|im_end|>\n"),
        prompt(tok, "<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n"),
        answer(tok, "Rome.<|im_end|>\n"),
    )
    assert (enc.input_ids, enc.labels) == expected
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]
    assert tok.decode(enc.input_ids) == tok.apply_chat_template(messages, tokenize=False)


def test_hf_template_untrained_turn_unlabelled(chatml_tokenizer):
    tok = chatml_tokenizer
    enc = encode_record([untrained(TWO_TURNS[0]), TWO_TURNS[1]], tok, HF, 512)
    expected = join(
        prompt(tok, "<|im_start|>system\nBe brief.<|im_end|>\n"
                    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"),
        prompt(tok, "Paris.<|im_end|>\n"),
        prompt(tok, "<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n"),
        answer(tok, "Rome.<|im_end|>\n"),
    )
    assert (enc.input_ids, enc.labels) == expected


def test_hf_template_batched_equals_single(chatml_tokenizer):
    records = [(TWO_TURNS, False), ([{"system": "", "input": "x", "output": ""}], False),
               ([untrained(TWO_TURNS[0]), TWO_TURNS[1]], False)]
    for (turns, _), got in zip(records, encode_records(records, chatml_tokenizer, HF, 512)):
        want = encode_record(turns, chatml_tokenizer, HF, 512)
        assert (got.input_ids, got.labels) == (want.input_ids, want.labels)


def test_hf_template_without_chat_template_is_a_data_error(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir("default")))
    tok.chat_template = None
    with pytest.raises(DataError, match="chat_template"):
        encode_record(TWO_TURNS, tok, HF, 512)
    with pytest.raises(DataError, match="chat_template"):
        encode_records([(TWO_TURNS, False)], tok, HF, 512)


def test_hf_template_that_is_not_prefix_stable_is_a_data_error(chatml_tokenizer):
    # Renders only the last message: turn 2's rendering does not extend turn 1's.
    chatml_tokenizer.chat_template = "{{ messages[-1]['content'] }}"
    with pytest.raises(DataError, match="prefix"):
        encode_record(TWO_TURNS, chatml_tokenizer, HF, 512)


# --- packing ------------------------------------------------------------------------------------


def _samples(n: int, seed: int = 0, max_len: int = 50) -> list[Encoded]:
    """Samples whose tokens are unique: sample i holds i*1000 + j, labels -(i*1000 + j) - 1."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(1, max_len)
        tokens = [i * 1000 + j for j in range(length)]
        out.append(Encoded(tokens, [-t - 1 for t in tokens]))
    return out


def _rows(packed, attr):
    values = getattr(packed, attr)
    return [values[packed.offsets[i] : packed.offsets[i + 1]].tolist() for i in range(packed.num_rows)]


def _order(flat_ids) -> list[int]:
    """The sample order of a concatenation of unique-token samples."""
    order = []
    for t in flat_ids:
        if not order or order[-1] != t // 1000:
            order.append(t // 1000)
    return order


@pytest.mark.parametrize("max_length", [1, 7, 32, 64, 10_000])
def test_pack_loses_and_duplicates_no_token(max_length):
    samples = _samples(40)
    packed = pack(samples, max_length, seed=1)
    flat = [t for row in _rows(packed, "input_ids") for t in row]
    order = _order(flat)
    assert sorted(order) == list(range(len(samples)))  # each sample once, contiguous
    assert flat == [t for i in order for t in samples[i].input_ids]
    assert [t for row in _rows(packed, "labels") for t in row] == [-t - 1 for t in flat]


@pytest.mark.parametrize("max_length", [7, 32, 64])
def test_pack_rows_are_full_but_the_last(max_length):
    samples = _samples(40)
    total = sum(len(s.input_ids) for s in samples)
    packed = pack(samples, max_length, seed=0)
    lengths = [len(row) for row in _rows(packed, "input_ids")]
    assert all(length == max_length for length in lengths[:-1])
    assert 0 < lengths[-1] <= max_length
    assert packed.num_rows == -(-total // max_length)
    efficiency = total / (packed.num_rows * max_length)
    assert efficiency == sum(lengths) / (len(lengths) * max_length)
    assert efficiency > 1 - 1 / packed.num_rows


@pytest.mark.parametrize("max_length", [7, 32, 64])
def test_pack_position_ids_restart_per_document_and_row(max_length):
    samples = _samples(40)
    packed = pack(samples, max_length, seed=2)
    for row_ids, row_pos in zip(_rows(packed, "input_ids"), _rows(packed, "position_ids")):
        assert row_pos[0] == 0
        for k in range(1, len(row_ids)):
            doc_start = row_ids[k] // 1000 != row_ids[k - 1] // 1000
            assert row_pos[k] == (0 if doc_start else row_pos[k - 1] + 1)


def test_pack_shuffle_is_seeded():
    samples = _samples(60)
    a = pack(samples, 32, seed=5)
    b = pack(samples, 32, seed=5)
    c = pack(samples, 32, seed=6)
    assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.offsets, b.offsets)
    assert _order(a.input_ids.tolist()) != _order(c.input_ids.tolist())
    assert _order(a.input_ids.tolist()) != list(range(60))


def test_pack_without_packing_one_row_per_sample():
    samples = _samples(30)
    packed = pack(samples, 64, seed=3, packing=False)
    assert packed.num_rows == len(samples)
    rows = _rows(packed, "input_ids")
    order = [row[0] // 1000 for row in rows]
    assert sorted(order) == list(range(30))
    assert order == _order(pack(samples, 64, seed=3).input_ids.tolist())  # same shuffle
    for i, row, pos, labels in zip(order, rows, _rows(packed, "position_ids"), _rows(packed, "labels")):
        assert row == samples[i].input_ids
        assert labels == samples[i].labels
        assert pos == list(range(len(row)))


@pytest.mark.parametrize("max_length", [7, 32, 64])
def test_whole_packing_splits_no_sample_and_keeps_the_shuffle(max_length):
    samples = _samples(60, max_len=max_length)  # no longer than a row, as encode cuts them
    packed = pack(samples, max_length, seed=4, packing="whole")
    rows = _rows(packed, "input_ids")
    assert all(0 < len(row) <= max_length for row in rows)
    for row, positions in zip(rows, _rows(packed, "position_ids")):
        docs = _order(row)
        assert [t for i in docs for t in samples[i].input_ids] == row  # whole samples only
        assert positions == [p for i in docs for p in range(len(samples[i].input_ids))]
    assert _order(packed.input_ids.tolist()) == _order(pack(samples, max_length, seed=4).input_ids.tolist())
    # a row ends only where the next sample would not fit
    for row, following in zip(rows, rows[1:]):
        assert len(row) + len(samples[_order(following)[0]].input_ids) > max_length


def test_pack_empty():
    packed = pack([], 16, seed=0)
    assert packed.num_rows == 0 and len(packed.input_ids) == 0


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_prompt_ids_render_the_chat_template_and_the_training_ids(name, tokenizer_for):
    """What chat and evals send is what training encoded and what apply_chat_template renders."""
    from tunemake.encode import prompt_ids

    tokenizer = tokenizer_for(name)
    template = TEMPLATES[name]
    system = "Be brief." if template.system is not None else ""  # minicpm has no system field
    turns = [{"system": system, "input": "Add 12 and 30.", "output": "42"},
             {"system": "", "input": "And reverse: apple cup.", "output": "cup apple"}]
    text, ids = prompt_ids(turns, template, tokenizer)
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": "Add 12 and 30."},
                 {"role": "assistant", "content": "42"}, {"role": "user", "content": "And reverse: apple cup."}]
    assert text == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    trained = encode_record(turns, tokenizer, template, max_length=10_000).input_ids
    answer = tokenizer.encode(template.render_output("cup apple"), add_special_tokens=False)
    assert trained[:len(ids)] == ids
    assert trained[len(ids):len(ids) + len(answer)] == answer
