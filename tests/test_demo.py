"""Tests for tunemake.demo: the demo's data, tokenizer and tiny model."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunemake import demo
from tunemake.errors import ConfigError, DataError, TunemakeError
from tunemake.formats import map_conversation
from tunemake.templates import HF, TEMPLATES
from tunemake.toolbox import calculate

SMALL = {"corpus_docs": 300, "tasks_per_family": 60, "tool_tasks": 60}
TINY_MODEL = {"hidden_size": 64, "num_layers": 1, "num_heads": 2, "intermediate_size": 128}


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _records(data_dir) -> list[dict]:
    lines = (data_dir / "tasks.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    demo.generate_demo_data(out, seed=0, **SMALL)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("models") / "demo"
    demo.build_demo_tokenizer(data_dir / "corpus.txt", out, TEMPLATES["internlm2_chat"])
    demo.build_demo_model(out, out, **TINY_MODEL)
    return out


# --- data -------------------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        demo.generate_demo_data(tmp_path / name, seed=seed, **SMALL)
    for file in ("corpus.txt", "tasks.jsonl"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
        assert (tmp_path / "a" / file).read_bytes() != (tmp_path / "c" / file).read_bytes()


def test_the_tool_family_offers_the_built_in_calculate_plugin():
    """The schema chat offers with --with-plugins calculate; it shows no number that the model
    could copy into its calls in place of the question's."""
    from tunemake.toolbox import load_toolbox

    assert load_toolbox(["calculate"]).schemas == [demo.CALCULATE_TOOL]
    assert not re.search(r"\d", json.dumps(demo.CALCULATE_TOOL))


def test_the_other_families_do_not_depend_on_the_number_of_tool_tasks(tmp_path):
    for name, tools in (("a", 10), ("b", 40)):
        demo.generate_demo_data(tmp_path / name, corpus_docs=100, tasks_per_family=40, tool_tasks=tools)
    plain = [sorted(json.dumps(r, sort_keys=True) for r in _records(tmp_path / name) if r["task"] != "tool_arithmetic")
             for name in ("a", "b")]
    assert plain[0] == plain[1]


def test_tasks_do_not_depend_on_corpus_size(tmp_path):
    demo.generate_demo_data(tmp_path / "a", corpus_docs=100, tasks_per_family=40)
    demo.generate_demo_data(tmp_path / "b", corpus_docs=500, tasks_per_family=40)
    assert _digest(tmp_path / "a" / "tasks.jsonl") == _digest(tmp_path / "b" / "tasks.jsonl")


def test_summary_matches_files_and_leaves_no_temporary_files(tmp_path):
    summary = demo.generate_demo_data(tmp_path, seed=3, **SMALL)
    lines = (tmp_path / "corpus.txt").read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""  # newline-terminated
    assert len(lines) - 1 == summary["corpus_docs"] == SMALL["corpus_docs"]
    counts = {family: 0 for family in demo.TASK_FAMILIES}
    for record in _records(tmp_path):
        counts[record["task"]] += 1
    assert summary["tasks"] == counts
    assert counts == {family: SMALL["tool_tasks" if family == "tool_arithmetic" else "tasks_per_family"]
                      for family in demo.TASK_FAMILIES}
    assert sorted(p.name for p in tmp_path.iterdir()) == [demo.CORPUS_FILE, demo.TASKS_FILE]


def test_facts_family_is_capped_at_the_distinct_questions(tmp_path):
    summary = demo.generate_demo_data(tmp_path, corpus_docs=10, tasks_per_family=400)
    assert summary["tasks"]["facts"] == len(demo.FACTS) * 3 * 5
    assert summary["tasks"]["arithmetic"] == 400


def test_corpus_is_one_non_empty_document_per_line(data_dir):
    text = (data_dir / "corpus.txt").read_bytes().decode("utf-8")
    assert "\r" not in text
    assert all(line.strip() == line and line for line in text.splitlines())


def test_records_are_xtuner_conversations(data_dir):
    records = _records(data_dir)
    for record in records:
        assert set(record) == {"task", "conversation"}
        assert record["task"] in demo.TASK_FAMILIES
        turns = record["conversation"]
        assert turns and turns[0]["system"] == ""
        if record["task"] == "tool_arithmetic":
            assert map_conversation(record, "tasks.jsonl") == turns  # already the unified form
            continue
        for turn in turns:
            assert set(turn) - {"system"} == {"input", "output"}
            assert turn["input"].strip() and turn["output"].strip()
    lengths = {len(r["conversation"]) for r in records if r["task"] == "multi_turn"}
    assert lengths == {2, 3}
    assert {len(r["conversation"]) for r in records if r["task"] not in ("multi_turn", "tool_arithmetic")} == {1}
    assert {len(r["conversation"]) for r in records if r["task"] == "tool_arithmetic"} == {2}


def test_families_are_shuffled_together(data_dir):
    records = _records(data_dir)
    tenth = records[-len(records) // 10 :]
    assert {r["task"] for r in tenth} == set(demo.TASK_FAMILIES)


def test_answers_are_correct(data_dir):
    for record in _records(data_dir):
        first = record["conversation"][0]
        if record["task"] == "arithmetic":
            a, b = map(int, re.findall(r"\d+", first["input"]))
            assert first["output"] == str(a + b)
            assert 0 <= a <= demo.MAX_OPERAND and 0 <= b <= demo.MAX_OPERAND
        elif record["task"] == "reversal":
            words = first["input"].split(": ", 1)[1].split()
            assert first["output"].split() == words[::-1]
            assert 3 <= len(words) <= 5
        elif record["task"] == "tool_arithmetic":
            a, b = map(int, re.findall(r"\d+", first["input"]))
            (call,) = first["tool_calls"]
            assert call == {"name": "calculate", "arguments": {"expression": f"{a} + {b}"}}
            assert calculate(call["arguments"]["expression"]) == str(a + b)
            assert first["tools"] == [demo.CALCULATE_TOOL]
            assert record["conversation"][1]["tool_results"] == [{"name": "calculate", "content": str(a + b)}]
            assert record["conversation"][1]["output"] == str(a + b)
        elif record["task"] == "multi_turn":
            words = first["input"].split(": ", 1)[1].split()
            assert first["output"].split() == words
            for turn in record["conversation"][1:]:
                expected = {"first": words[0], "last": words[-1], "many": str(len(words))}
                key = next(k for k in expected if k in turn["input"])
                assert turn["output"] == expected[key]
        else:
            country = next(c for c, *_ in demo.FACTS if c in first["input"])
            assert first["output"] in dict((c, v) for c, *v in demo.FACTS)[country]


def test_prompts_are_unique_within_a_family(data_dir):
    seen = set()
    for record in _records(data_dir):
        key = (record["task"], tuple(turn["input"] for turn in record["conversation"]))
        assert key not in seen
        seen.add(key)


def test_corpus_states_every_fact(data_dir):
    lines = (data_dir / "corpus.txt").read_text(encoding="utf-8").splitlines()
    for country, *values in demo.FACTS:
        for value in values:
            stated = [ln for ln in lines if country in ln and re.search(rf"\b{value}\b", ln)]
            assert stated, (country, value)


def test_corpus_never_shows_a_task_sum_or_word_list(data_dir):
    corpus = (data_dir / "corpus.txt").read_text(encoding="utf-8")
    sums = []
    for pattern in (
        r"(?<!\d)(\d+) (?:\+|plus) (\d+)(?!\d)",
        r"[Aa]dd (\d+) and (\d+)",
        r"had (\d+) \w+ and found (\d+) more",
        r"(\d+) \w+ on the table and (\d+) in the box",
    ):
        found = re.findall(pattern, corpus)
        assert found, pattern  # each way the corpus writes a sum is covered
        sums += found
    stated = {(int(a), int(b)) for a, b in sums}
    for record in _records(data_dir):
        first = record["conversation"][0]
        if record["task"] == "arithmetic":
            assert tuple(map(int, re.findall(r"\d+", first["input"]))) not in stated
        elif record["task"] in ("reversal", "multi_turn"):
            # The whole list, not a part of a longer one.
            words = re.escape(first["input"].split(": ", 1)[1])
            assert not re.search(rf"(?<![a-z] ){words}(?! [a-z])", corpus), words


@pytest.mark.parametrize(
    "kwargs",
    [
        {"corpus_docs": 0},
        {"tasks_per_family": 0},
        {"tasks_per_family": (demo.MAX_OPERAND + 1) ** 2},
    ],
)
def test_bad_sizes_are_rejected_before_writing(tmp_path, kwargs):
    with pytest.raises(TunemakeError, match=next(iter(kwargs))):
        demo.generate_demo_data(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


# --- tokenizer --------------------------------------------------------------------------------


def test_model_directory_holds_exactly_the_declared_files(model_dir):
    expected = sorted(demo.TOKENIZER_FILES + demo.MODEL_FILES)
    assert sorted(p.name for p in model_dir.iterdir()) == expected
    assert not [p for p in model_dir.parent.iterdir() if p.name.startswith(".tmp-")]


def test_special_tokens_are_single_ids(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template = TEMPLATES["internlm2_chat"]
    tokens = ["<s>", "</s>", "<pad>", *template.special_tokens()]
    assert "<|im_end|>" in tokens
    ids = [tokenizer.encode(token, add_special_tokens=False) for token in tokens]
    assert all(len(i) == 1 for i in ids)
    assert len({i[0] for i in ids}) == len(tokens)
    assert ids[:3] == [[tokenizer.bos_token_id], [tokenizer.eos_token_id], [tokenizer.pad_token_id]]
    # Inside running text too, and never merged with a neighbour.
    ids = tokenizer.encode("x<|im_start|>user\nhi<|im_end|>\n", add_special_tokens=False)
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in ids
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ids


def test_tokenizer_adds_no_bos_or_eos_of_its_own(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer("cat dog")["input_ids"]
    assert tokenizer.bos_token_id not in ids and tokenizer.eos_token_id not in ids


@pytest.mark.parametrize(
    "text",
    [
        "Reverse: cat dog sun",
        "héllo wörld, naïve café",
        "世界 🙂 Ωμέγα",
        "  two  spaces\tand\ttabs\n\nlines ",
        "<s>x</s>",
    ],
)
def test_any_utf8_text_round_trips(model_dir, text):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_numbers_are_tokens_of_their_own(model_dir):
    """Digits never merge with the space or text around them, so a number is the same token in a
    question and in a call's JSON (what the tool family copies), and a number the corpus uses
    often is one token."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer.encode('What is 17 + 25? {"expression": "17 + 25"}', add_special_tokens=False)
    numbers = [p for p in tokenizer.convert_ids_to_tokens(ids) if any(c.isdigit() for c in p)]
    assert numbers == ["17", "25", "17", "25"]


def test_saved_config_names_the_tokens_and_length(model_dir):
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    tokens = (config["bos_token"], config["eos_token"], config["pad_token"])
    assert tokens == ("<s>", "</s>", "<pad>")
    assert config["model_max_length"] == 512


@pytest.mark.parametrize("name", ["internlm2_chat", "llama2_chat", "default"])
def test_chat_template_renders_the_template_text(tmp_path, data_dir, name):
    template = TEMPLATES[name]
    demo.build_demo_tokenizer(data_dir / "corpus.txt", tmp_path, template)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "Reverse: cat dog"},
    ]
    end_of_turn = template.suffix if template.suffix_as_eos else template.suffix + "</s>"
    second_bos = "" if template.suffix_as_eos else "<s>"
    expected = (
        "<s>"
        + template.render_input("What is 2 + 3?", "Be brief.", 1)
        + "5"
        + end_of_turn
        + template.sep
        + second_bos
        + template.render_input("Reverse: cat dog", None, 2)
    )
    assert tokenizer.apply_chat_template(messages, tokenize=False) == expected


def test_tokenizer_does_not_depend_on_the_thread_count(tmp_path, data_dir, model_dir):
    # Rayon sizes its pool once per process, so the single-threaded build needs its own.
    code = (
        "import sys; from tunemake import demo; from tunemake.templates import TEMPLATES; "
        "demo.build_demo_tokenizer(sys.argv[1], sys.argv[2], TEMPLATES['internlm2_chat'])"
    )
    repo = str(Path(demo.__file__).resolve().parents[1])
    env = {**os.environ, "RAYON_NUM_THREADS": "1", "PYTHONPATH": repo}
    args = [sys.executable, "-c", code, str(data_dir / "corpus.txt"), str(tmp_path)]
    subprocess.run(args, env=env, check=True)
    for name in demo.TOKENIZER_FILES:
        assert _digest(tmp_path / name) == _digest(model_dir / name), name


def test_hf_template_is_rejected(tmp_path, data_dir):
    with pytest.raises(ConfigError, match="template"):
        demo.build_demo_tokenizer(data_dir / "corpus.txt", tmp_path, HF)


def test_missing_or_empty_corpus_is_a_data_error(tmp_path):
    template = TEMPLATES["internlm2_chat"]
    with pytest.raises(DataError, match="no such file"):
        demo.build_demo_tokenizer(tmp_path / "nope.txt", tmp_path / "m", template)
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(DataError, match="no text"):
        demo.build_demo_tokenizer(tmp_path / "empty.txt", tmp_path / "m", template)
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())


# --- model ------------------------------------------------------------------------------------


def test_default_sizes_suit_bitsandbytes():
    parameters = inspect.signature(demo.build_demo_model).parameters
    defaults = {name: parameter.default for name, parameter in parameters.items()}
    assert defaults["hidden_size"] % 64 == 0 and defaults["intermediate_size"] % 64 == 0
    assert defaults["hidden_size"] % defaults["num_heads"] == 0


def test_model_without_a_tokenizer_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="tokenizer"):
        demo.build_demo_model(tmp_path, tmp_path / "model", **TINY_MODEL)


def test_model_loads_and_runs_a_forward_pass(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = model.config
    assert config.model_type == "llama"
    assert config.vocab_size == len(tokenizer)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert config.hidden_size == TINY_MODEL["hidden_size"] and config.num_hidden_layers == 1
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert embeddings.weight.data_ptr() != head.weight.data_ptr()
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tokenizer))
    assert torch.isfinite(logits).all()


def test_rebuild_is_byte_identical_and_keeps_the_other_rules_files(tmp_path, data_dir, model_dir):
    again = tmp_path / "demo"
    demo.build_demo_tokenizer(data_dir / "corpus.txt", again, TEMPLATES["internlm2_chat"])
    demo.build_demo_model(again, again, **TINY_MODEL)
    # The tokenizer rule reruns after the model exists: the weights must stay.
    written = demo.build_demo_tokenizer(data_dir / "corpus.txt", again, TEMPLATES["internlm2_chat"])
    assert written == list(demo.TOKENIZER_FILES)
    for name in demo.TOKENIZER_FILES + demo.MODEL_FILES:
        assert _digest(again / name) == _digest(model_dir / name), name


def test_model_seed_changes_the_weights(tmp_path, model_dir):
    for name in demo.TOKENIZER_FILES:
        (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    demo.build_demo_model(tmp_path, tmp_path, seed=1, **TINY_MODEL)
    assert _digest(tmp_path / "model.safetensors") != _digest(model_dir / "model.safetensors")


def test_model_leaves_the_global_torch_rng_alone(tmp_path, model_dir):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    demo.build_demo_model(model_dir, tmp_path, **TINY_MODEL)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"hidden_size": 100}, "hidden_size"),
        ({"intermediate_size": 96}, "intermediate_size"),
        ({"num_heads": 3}, "num_heads"),
    ],
)
def test_bad_model_sizes_are_config_errors(tmp_path, model_dir, kwargs, key):
    with pytest.raises(ConfigError, match=key):
        demo.build_demo_model(model_dir, tmp_path, **{**TINY_MODEL, **kwargs})
