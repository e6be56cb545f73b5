"""``tunemake chat`` on tiny models: what is sent, where it stops, seeds, adapters, modes, errors.

A tiny random Llama (with the internlm2_chat demo tokenizer and a ``tunemake.json``) is built once
per module; a "chain" copy of it has its weights set so that greedy decoding walks a fixed chain
of tokens through the template's end-of-turn token.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from chain_model import make_chain
from tunemake.atomic import write_json
from tunemake.chat import ChatError, ChatSession, load_chat_model, resolve_template
from tunemake.cli import main
from tunemake.demo import build_demo_model, build_demo_tokenizer
from tunemake.templates import TEMPLATES, template_to_dict

REPO = Path(__file__).resolve().parents[1]
MODEL = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128, "max_position_embeddings": 256}
TEMPLATE = TEMPLATES["internlm2_chat"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, corpus_path) -> Path:
    """A tiny random model whose tunemake.json records internlm2_chat."""
    out = tmp_path_factory.mktemp("chat") / "tiny"
    build_demo_tokenizer(corpus_path, out, TEMPLATE, vocab_size=400)
    build_demo_model(out, out, **MODEL)
    write_json(out / "tunemake.json", {"template": template_to_dict(TEMPLATE)})
    return out


@pytest.fixture(scope="module")
def bare(tiny) -> Path:
    """The same model with no tunemake.json (like a base model from the hub)."""
    out = tiny.parent / "bare"
    shutil.copytree(tiny, out, ignore=shutil.ignore_patterns("tunemake.json"))
    return out


@pytest.fixture(scope="module")
def loaded(tiny):
    return load_chat_model(tiny)


def batch_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def run_cli(argv, monkeypatch, capsys, stdin: str = "") -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(["chat", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- what is sent ------------------------------------------------------------------------------


def messages_of(history: list[dict], prompt: str, system: str) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    for turn in history:
        messages += [{"role": "user", "content": turn["input"]}, {"role": "assistant", "content": turn["output"]}]
    return messages + [{"role": "user", "content": prompt}]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_render_equals_apply_chat_template_for_every_template(name, tokenizer_for):
    tokenizer = tokenizer_for(name)
    system = "" if TEMPLATES[name].system is None else "Be brief."  # minicpm has no system field
    session = ChatSession(None, tokenizer, TEMPLATES[name], system=system)
    for history in ([], [{"system": system, "input": "Hi", "output": "Hello!"},
                         {"system": "", "input": "What is 2+2?", "output": "4"}]):
        session.history = history
        text, ids = session.render("And 3+3?")
        expected = tokenizer.apply_chat_template(messages_of(history, "And 3+3?", system),
                                                 tokenize=False, add_generation_prompt=True)
        assert text == expected
        assert tokenizer.decode(ids) == expected
    session.reset()
    text, _ = session.render("Hi", system="")  # a conversation's own system text overrides the session's
    assert text == tokenizer.apply_chat_template(messages_of([], "Hi", ""), tokenize=False, add_generation_prompt=True)


def test_history_keeps_previous_answers(loaded):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, TEMPLATE, system="Be brief.", temperature=0, max_new_tokens=6)
    first, second = session.ask("Hello"), session.ask("Again")
    assert [t["output"] for t in session.history] == [first, second]
    text, _ = session.render("Third")
    expected = messages_of([{"input": "Hello", "output": first}, {"input": "Again", "output": second}], "Third", "Be brief.")
    assert text == tokenizer.apply_chat_template(expected, tokenize=False, add_generation_prompt=True)
    with pytest.raises(ChatError, match="first prompt"):
        session.ask("x", system="late")


# --- where it stops ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chain(tiny):
    """A copy of ``tiny`` whose greedy answer to any prompt is `` the capital of France<|im_end|> you``
    (:func:`chain_model.make_chain`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    words = [tokenizer.encode(w, add_special_tokens=False) for w in (" the", " capital", " of", " France", " you")]
    assert all(len(w) == 1 for w in words)
    the, capital, of, france, you = (w[0] for w in words)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    last_prompt_token = ChatSession(None, tokenizer, TEMPLATE).render("anything")[1][-1]
    model = AutoModelForCausalLM.from_pretrained(tiny)
    make_chain(model, [last_prompt_token, the, capital, of, france, im_end, you])
    out = tiny.parent / "chain"
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "tunemake.json"):
        shutil.copy(tiny / name, out / name)
    return out, [the, capital, of, france, im_end, you]


def generated_tokens(session: ChatSession) -> list[list[int]]:
    """Record the new tokens of every generate call of ``session``."""
    calls, generate = [], session.model.generate

    def spy(*args, **kwargs):
        out = generate(*args, **kwargs)
        calls.append(out[0, kwargs["input_ids"].shape[1]:].tolist())
        return out

    session.model.generate = spy
    return calls


def test_stops_at_the_templates_end_of_turn(chain):
    path, chain_ids = chain
    model, tokenizer = load_chat_model(path)
    session = ChatSession(model, tokenizer, resolve_template(path), temperature=0, max_new_tokens=20)
    calls = generated_tokens(session)
    stream = io.StringIO()
    answer = session.ask("Tell me", stream=stream)
    assert answer == " the capital of France"
    assert calls == [chain_ids[:5]]  # generation ended on <|im_end|>, and it is not in the answer
    assert stream.getvalue() == answer + "\n"

    plain = ChatSession(model, tokenizer, replace(TEMPLATE, stop_words=()), temperature=0, max_new_tokens=7)
    assert plain.ask("Tell me").startswith(" the capital of France you")  # a template without that stop word goes on past it


def test_a_multi_token_stop_word_stops_generation(chain, monkeypatch, capsys):
    path, chain_ids = chain
    model, tokenizer = load_chat_model(path)
    assert len(tokenizer.encode(" capital of", add_special_tokens=False)) == 2
    session = ChatSession(model, tokenizer, TEMPLATE, temperature=0, max_new_tokens=20, stop_words=[" capital of"])
    calls = generated_tokens(session)
    stream = io.StringIO()
    assert session.ask("Tell me", stream=stream) == " the"
    assert calls == [chain_ids[:3]]
    assert stream.getvalue() == " the\n"  # the streamer held the stop word back

    code, out, _ = run_cli([path, "--batch", "-", "--temperature", "0", "--stop-words", "nothing", " capital of"],
                           monkeypatch, capsys, stdin="Tell me\n")
    assert code == 0 and batch_lines(out)[0]["answer"] == " the"


# --- seeds -------------------------------------------------------------------------------------


def test_same_seed_same_answers_in_separate_processes(tiny, loaded):
    prompts = ["Hello", "Tell me more"]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "tunemake.cli", "chat", str(tiny), "--batch", "-", "--max-new-tokens", "12"],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)]

    def answers(seed):  # the default temperature (0.1) samples
        session = ChatSession(*loaded, TEMPLATE, max_new_tokens=12, seed=seed)
        return [session.ask(p) for p in prompts]

    in_process = {seed: answers(seed) for seed in (0, 1)}
    runs = []
    for proc in procs:
        out, err = proc.communicate("\n".join(prompts) + "\n", timeout=120)
        assert proc.returncode == 0, err
        assert "kernels-community" not in err  # bitsandbytes' warning a user cannot act on
        runs.append([o["answer"] for o in batch_lines(out)])
    assert runs[0] == runs[1] == in_process[0]
    assert in_process[1] != in_process[0]


# --- adapters ----------------------------------------------------------------------------------


def test_adapter_answers_like_the_merged_model(bare, tiny, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(bare), LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    write_json(adapter / "tunemake.json", {"template": template_to_dict(TEMPLATE)})
    merged = peft_model.merge_and_unload().eval()

    model, tokenizer = load_chat_model(bare, adapter)
    template = resolve_template(bare, adapter)  # recorded with the adapter, not the base
    assert template == TEMPLATE

    def answers(model):
        session = ChatSession(model, tokenizer, template, temperature=0, max_new_tokens=12)
        return [session.ask("Hello"), session.ask("Again")]

    with_adapter = answers(model)
    assert with_adapter == answers(merged)
    assert with_adapter != answers(load_chat_model(bare)[0])  # the adapter changes something


def test_four_bit_loads_nf4_with_double_quantization(tiny):
    from bitsandbytes.nn import Linear4bit

    model, tokenizer = load_chat_model(tiny, bits=4)
    layer = next(m for m in model.modules() if isinstance(m, Linear4bit))
    assert layer.weight.quant_type == "nf4" and layer.weight.quant_state.nested  # nested: double quant
    assert isinstance(ChatSession(model, tokenizer, TEMPLATE, max_new_tokens=3).ask("Hello"), str)


# --- the command: interactive and batch --------------------------------------------------------


def test_interactive_multi_line_reset_and_exit(tiny, loaded, monkeypatch, capsys):
    asked = []
    ask = ChatSession.ask

    def spy(self, prompt, *args, **kwargs):
        asked.append((prompt, len(self.history)))
        return ask(self, prompt, *args, **kwargs)

    monkeypatch.setattr(ChatSession, "ask", spy)
    stdin = "\nHello\nthere\n\nmore\n\nRESET\n\nHello\nthere\n\nEXIT\n\nnever asked\n\n"
    code, out, err = run_cli([tiny, "--temperature", "0", "--max-new-tokens", "6"], monkeypatch, capsys, stdin)
    assert code == 0
    assert asked == [("Hello\nthere", 0), ("more", 1), ("Hello\nthere", 0)]
    session = ChatSession(*loaded, TEMPLATE, temperature=0, max_new_tokens=6)
    first, second = session.ask("Hello\nthere"), session.ask("more")
    assert out == f"{first}\n{second}\n{first}\n"
    assert "EXIT" in err and "template internlm2_chat" in err  # the banner is on stderr

    code, whole, _ = run_cli([tiny, "--temperature", "0", "--max-new-tokens", "6", "--no-streamer"], monkeypatch,
                             capsys, "Hello\nthere\n\nmore\n")  # end of input ends the last prompt too
    assert code == 0 and whole == f"{first}\n{second}\n"


def test_batch_from_a_file_and_from_stdin(tiny, loaded, tmp_path, monkeypatch, capsys):
    lines = ["Hello", json.dumps({"prompt": "{not json, a prompt}"}), "",
             json.dumps({"prompt": "New", "system": "Be brief.", "reset": True}), "Again"]
    batch = tmp_path / "prompts.jsonl"
    batch.write_text("\n".join(lines) + "\n")
    code, from_file, _ = run_cli([tiny, "--batch", batch, "--max-new-tokens", "8"], monkeypatch, capsys)
    assert code == 0
    got = batch_lines(from_file)
    assert [(o["line"], o["turn"], o["prompt"]) for o in got] == [
        (1, 1, "Hello"), (2, 2, "{not json, a prompt}"), (4, 1, "New"), (5, 2, "Again")]

    session = ChatSession(*loaded, TEMPLATE, max_new_tokens=8)  # the same seed (0) and sampling
    expected = [session.ask("Hello"), session.ask("{not json, a prompt}")]
    session.reset()
    expected += [session.ask("New", system="Be brief."), session.ask("Again")]
    assert [o["answer"] for o in got] == expected

    code, from_stdin, _ = run_cli([tiny, "--batch", "-", "--max-new-tokens", "8"], monkeypatch, capsys,
                                  stdin="\n".join(lines) + "\n")
    assert code == 0 and from_stdin == from_file


def test_a_different_template_than_recorded_warns(tiny, monkeypatch, capsys, caplog):
    code, out, _ = run_cli([tiny, "--batch", "-", "--max-new-tokens", "2", "--prompt-template", "qwen_chat"],
                           monkeypatch, capsys, stdin="Hi\n")
    assert code == 0 and len(batch_lines(out)) == 1
    assert "differs from the template the model was trained with (internlm2_chat" in caplog.text


# --- errors ------------------------------------------------------------------------------------


def test_errors_a_user_can_act_on(tiny, bare, tmp_path, monkeypatch, capsys):
    def error(*argv, stdin=""):
        code, out, err = run_cli(argv, monkeypatch, capsys, stdin)
        assert code == 1 and out == ""
        return err.strip().splitlines()[-1]

    assert error(tmp_path / "nope") == f"error: {tmp_path / 'nope'}: no such model directory"
    assert "no such adapter directory" in error(tiny, "--adapter", tmp_path / "nope")
    assert "unknown template 'nope'; known templates:" in error(tiny, "--prompt-template", "nope")
    assert "pass --prompt-template" in error(bare)

    batch = tmp_path / "bad.jsonl"
    batch.write_text('Hello\n{"prompt": "ok"}\n{"prompt": oops}\n')
    assert error(tiny, "--batch", batch).startswith(f"error: {batch}:3: not valid JSON")
    batch.write_text('{"promt": "typo"}\n')
    assert error(tiny, "--batch", batch) == f"error: {batch}:1: unknown key 'promt'; keys: prompt, system, reset"
    batch.write_text('Hello\n{"prompt": "x", "system": "late"}\n')
    assert f"{batch}:2: \"system\" is allowed only on the first prompt" in error(tiny, "--batch", batch)

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if bitsandbytes could not be imported
    assert "--bits 4 needs bitsandbytes, which cannot run here" in error(tiny, "--bits", "4", "--batch", "-")


def test_a_conversation_longer_than_the_model_is_refused(loaded):
    session = ChatSession(*loaded, TEMPLATE, temperature=0, max_new_tokens=4)
    with pytest.raises(ChatError, match="the model's limit is 256: reset it"):
        session.ask("fox " * 300)
    assert session.history == []
