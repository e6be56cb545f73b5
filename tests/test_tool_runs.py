"""Tools that run: the built-in plugins, a user's tool module, chat's loop that reads a model's
calls, runs them and feeds the results back as training wrote them, and the evaluations of tool
use (call accuracy, final answers with the tools run).

The loops are driven by scripted models (their answers given in advance), so each test knows what
the model "writes"; the prompts it receives are checked against the template's own rendering.
"""

from __future__ import annotations

import io
import json
import textwrap

import pytest
import torch

from tunemake.chat import ChatError, ChatSession, read_batch, run_batch
from tunemake.templates import HF, TEMPLATES
from tunemake.toolbox import ToolError, Toolbox, calculate, load_toolbox, solve
from tunemake.toolforms import FORMS


class ScriptedModel:
    """A causal LM stand-in whose answers are given in advance; it records every prompt."""

    def __init__(self, tokenizer, answers: list[str]):
        self.tokenizer, self.answers, self.prompts = tokenizer, list(answers), []
        self.device = torch.device("cpu")

    def generate(self, input_ids, streamer=None, **kwargs):
        self.prompts.append(input_ids[0].tolist())
        ids = self.tokenizer.encode(self.answers.pop(0), add_special_tokens=False) + [self.tokenizer.eos_token_id]
        if streamer is not None:
            streamer.put(input_ids[0])
            for token in ids:
                streamer.put(torch.tensor([token]))
            streamer.end()
        return torch.cat([input_ids, torch.tensor([ids])], dim=1)


def qwen_call(name: str, arguments) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(arguments)}}}\n</tool_call>'


def session(tool_tokenizer, answers, template="qwen_chat", toolbox=None, **kwargs):
    tokenizer = tool_tokenizer(template)
    model = ScriptedModel(tokenizer, answers)
    toolbox = toolbox if toolbox is not None else load_toolbox(["calculate"])
    return ChatSession(model, tokenizer, TEMPLATES[template], temperature=0, toolbox=toolbox, **kwargs), model


# --- the built-in plugins -----------------------------------------------------------------------


@pytest.mark.parametrize("expression, result", [
    ("17 + 25", "42"), ("6 * 7.0", "42"), ("7 / 2", "3.5"), ("0.1 + 0.2", "0.3"), ("2^10", "1024"),
    ("2 ** -1", "0.5"), ("10 // 3", "3"), ("-(3 - 5) * 2", "4"), ("sqrt(16)", "4"), ("1 / 3", "0.3333333333333333"),
    ("factorial(5)", "120"), ("floor(7 / 2)", "3"),
])
def test_calculate_is_exact(expression, result):
    assert calculate(expression) == result


@pytest.mark.parametrize("expression", [
    "__import__('os').system('true')", "(1).__class__", "open('x')", "x + 1", "[1, 2]", "9 ** 9 ** 9", "1 / 0",
])
def test_calculate_refuses_anything_but_arithmetic(expression):
    with pytest.raises((ValueError, ZeroDivisionError)):
        calculate(expression)


def test_solve():
    assert solve("x^2 - 4 = 0") == "x = -2; x = 2"
    assert solve("x + y = 3; x - y = 1") == "x = 2, y = 1"
    assert solve("2*x = 1") == "x = 1/2"
    with pytest.raises(ValueError):
        solve("__import__('os') = 1")


def test_toolbox_runs_calls_and_turns_every_failure_into_an_error_result():
    toolbox = load_toolbox(["calculate", "solve"])
    assert [s["function"]["name"] for s in toolbox.schemas] == ["calculate", "solve"]
    assert toolbox.run({"name": "calculate", "arguments": {"expression": "2+3"}}) == "5"
    assert toolbox.run({"name": "Calculator", "arguments": {"expression": "2+3"}}) == "5"  # XTuner's name
    assert toolbox.run({"name": "Calculate", "arguments": ["2+3"]}) == "5"  # moss_sft: positional
    assert toolbox.run({"name": "search", "arguments": {}}) == \
        "error: unknown tool 'search'; the tools are calculate, solve"
    assert toolbox.run({"name": "calculate", "arguments": {"expr": "1"}}).startswith(
        "error: calculate: unknown argument 'expr'")
    assert toolbox.run({"name": "calculate", "arguments": {}}) == "error: calculate: missing argument 'expression'"
    assert toolbox.run({"name": "calculate", "arguments": {"expression": 5}}) == \
        "error: calculate: argument 'expression' should be string, got int"
    assert toolbox.run({"name": "calculate", "arguments": {"expression": "1/0"}}) == \
        "error: calculate: division by zero"


def test_a_tool_module_gives_its_documented_functions(tmp_path):
    module = tmp_path / "my_tools.py"
    module.write_text(textwrap.dedent('''
        def weather(city: str, days: int = 1) -> dict:
            """The forecast for a city.

            Args:
                city: the city
                days: how many days ahead
            """
            return {"city": city, "sky": "sunny", "days": days}

        def _helper():
            pass
    '''))
    toolbox = load_toolbox(["calculate"], str(module))
    assert [s["function"]["name"] for s in toolbox.schemas] == ["calculate", "weather"]
    assert toolbox.schemas[1]["function"]["parameters"]["required"] == ["city"]
    assert json.loads(toolbox.run({"name": "weather", "arguments": {"city": "Paris"}})) == \
        {"city": "Paris", "sky": "sunny", "days": 1}


@pytest.mark.parametrize("source, message", [
    ("def f(x):\n    return x\n", "f: cannot describe it as a tool"),
    ("import nothing_here\n", r"cannot import the tool module \(ModuleNotFoundError"),
    ("X = 1\n", "defines no public function"),
])
def test_a_tool_module_that_cannot_serve_is_one_error(tmp_path, source, message):
    module = tmp_path / "bad_tools.py"
    module.write_text(source)
    with pytest.raises(ToolError, match=message) as info:
        load_toolbox((), str(module))
    assert str(info.value).startswith(str(module))


def test_search_is_not_built_in():
    with pytest.raises(ToolError, match="unknown plugin 'search'.*search needs a network"):
        load_toolbox(["search"])


# --- chat runs the calls ----------------------------------------------------------------------


def test_chat_runs_a_call_and_answers_from_its_result_as_training_wrote_it(tool_tokenizer):
    chat, model = session(tool_tokenizer, [qwen_call("calculate", {"expression": "17 + 25"}), "It is 42."])
    assert chat.ask("What is 17 + 25?") == "It is 42."
    assert chat.tool_calls == [{"name": "calculate", "arguments": {"expression": "17 + 25"}, "result": "42"}]
    tokenizer = chat.tokenizer
    messages = [
        {"role": "user", "content": "What is 17 + 25?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "calculate", "arguments": {"expression": "17 + 25"}}}]},
        {"role": "tool", "name": "calculate", "content": "42"},
    ]
    second = tokenizer.apply_chat_template(messages, tools=chat.toolbox.schemas, tokenize=False,
                                           add_generation_prompt=True)
    assert tokenizer.decode(model.prompts[1]) == second
    assert second.endswith("<tool_response>\n42\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    # the conversation goes on from the answer, tools and all
    model.answers.append("You are welcome.")
    assert chat.ask("Thanks") == "You are welcome." and chat.tool_calls == [] and chat.turns == 2


def test_a_bad_call_goes_back_to_the_model_as_an_error(tool_tokenizer):
    chat, model = session(tool_tokenizer, [
        qwen_call("search", {"q": "x"}),
        '<tool_call>\n{"name": "calculate", "arguments": {bad json}}\n</tool_call>',
        "Sorry.",
    ])
    assert chat.ask("What is 2+2?") == "Sorry."
    first, second = (c["result"] for c in chat.tool_calls)
    assert first.startswith("error: unknown tool 'search'")
    assert second.startswith("error: cannot read the call '{\"name\": \"calculate\", \"arguments\": {bad json}}'")
    assert "<tool_response>\nerror: unknown tool 'search'" in chat.tokenizer.decode(model.prompts[1])


def test_tool_rounds_are_capped(tool_tokenizer):
    call = qwen_call("calculate", {"expression": "1+1"})
    chat, model = session(tool_tokenizer, [call] * 3, max_tool_rounds=2)
    chat.ask("Loop")
    assert len(chat.tool_calls) == 2 and len(model.prompts) == 3 and not model.answers


def test_moss_chat_reads_xtuners_commands_and_writes_its_results(tool_tokenizer):
    chat, model = session(tool_tokenizer, ['<|Inner Thoughts|>: add<eot>\n<|Commands|>: Calculate("2+3")<eoc>',
                                           "<|MOSS|>: 5<eom>"], template="moss_sft")
    assert chat.ask("What is 2+3?") == "<|MOSS|>: 5"
    assert chat.tool_calls == [{"name": "Calculate", "arguments": {"expression": "2+3"}, "result": "5"}]
    second = chat.tokenizer.decode(model.prompts[1])
    assert second.endswith('<|Human|>: What is 2+3?<eoh>\n<|Inner Thoughts|>: add<eot>\n'
                           '<|Commands|>: Calculate("2+3")<eoc>\n<|Results|>:\nCalculate("2+3") => 5\n<eor>\n')


def test_batch_lines_list_the_calls(tool_tokenizer):
    chat, _ = session(tool_tokenizer, [qwen_call("calculate", {"expression": "2*21"}), "42", "Hi!"])
    out = io.StringIO()
    run_batch(chat, read_batch(['{"prompt": "2*21?"}', "Hello"], "in.jsonl"), out, "in.jsonl")
    first, second = map(json.loads, out.getvalue().splitlines())
    assert first == {"line": 1, "turn": 1, "prompt": "2*21?", "answer": "42",
                     "tool_calls": [{"name": "calculate", "arguments": {"expression": "2*21"}, "result": "42"}]}
    assert second == {"line": 2, "turn": 2, "prompt": "Hello", "answer": "Hi!", "tool_calls": []}


@pytest.mark.parametrize("template", sorted(FORMS))
@pytest.mark.parametrize("markers_special", [True, False])
def test_the_stream_shows_each_call_and_result_never_the_raw_call(template, markers_special, tool_tokenizer,
                                                                   tokenizer_dir):
    """The raw call is held back as it is generated (its opener a special token, or visible
    text), and shown as the call and its result once run."""
    from transformers import AutoTokenizer

    call = {"name": "calculate", "arguments": {"expression": "2+3"}}
    answers = [FORMS[template].calls("Let me see.", [call]), "It is 5."]
    if markers_special:
        tokenizer = tool_tokenizer(template)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir(template)))
    chat = ChatSession(ScriptedModel(tokenizer, answers), tokenizer, TEMPLATES[template], temperature=0,
                       toolbox=load_toolbox(["calculate"]))
    out = io.StringIO()
    chat.ask("2+3?", stream=out)
    assert out.getvalue() == 'Let me see.\n[calculate({"expression": "2+3"}) -> 5]\nIt is 5.\n'


def test_chat_refuses_tools_with_a_template_that_cannot_write_or_read_them(tool_tokenizer, tokenizer_for):
    with pytest.raises(ChatError, match="template 'default' cannot write tool calls"):
        ChatSession(None, tokenizer_for("default"), TEMPLATES["default"], toolbox=Toolbox())
    with pytest.raises(ChatError, match="template 'hf': the tokenizer has no response_template"):
        ChatSession(None, tool_tokenizer("qwen_chat"), HF, toolbox=Toolbox())


def test_cli_refuses_tools_before_loading_the_model(tmp_path, capsys):
    from tunemake.cli import main

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "tunemake.json").write_text(json.dumps({"template": {"name": "default"}}))
    assert main(["chat", str(model), "--with-plugins", "calculate"]) != 0
    err = capsys.readouterr().err
    assert "template 'default' cannot write tool calls" in err and "Traceback" not in err
    assert main(["chat", str(model), "--with-plugins", "search"]) != 0
    assert "unknown plugin 'search'" in capsys.readouterr().err


# --- evaluations of tool use ---------------------------------------------------------------------


CALC = [{"type": "function", "function": {"name": "calculate", "parameters": {
    "type": "object", "properties": {"expression": {"type": "string"}}}}}]
ASKED = {"dataset": "d", "conversation": [
    {"system": "", "input": "What is 2+3?", "output": "", "tools": CALC,
     "tool_calls": [{"name": "calculate", "arguments": {"expression": "2+3"}}]},
    {"system": "", "input": "", "output": "It is 5.", "tool_results": [{"name": "calculate", "content": "5"}]},
]}


def scripted_generate(tokenizer, replies: dict[str, str], seen: list[str]):
    """``generate(prompts)`` answering each prompt by the first key its text ends with."""
    def generate(prompts):
        out = []
        for prompt in prompts:
            text = tokenizer.decode(prompt)
            seen.append(text)
            reply = next(answer for ending, answer in replies.items() if text.endswith(ending))
            out.append(tokenizer.encode(reply, add_special_tokens=False) + [tokenizer.eos_token_id])
        return out
    return generate


def scorer(tool_tokenizer, replies, seen, toolbox=None):
    from tunemake.encode import generation_stops
    from tunemake.tool_eval import ToolScorer

    tokenizer = tool_tokenizer("qwen_chat")
    template = TEMPLATES["qwen_chat"]
    return ToolScorer(scripted_generate(tokenizer, replies, seen), tokenizer, template,
                      generation_stops(tokenizer, template), toolbox or load_toolbox(["calculate", "solve"]))


ASKS = "What is 2+3?<|im_end|>\n<|im_start|>assistant\n"
READS = "</tool_response><|im_end|>\n<|im_start|>assistant\n"


def test_evaluation_scores_calls_and_the_answer_reached_with_the_tools_run(tool_tokenizer):
    seen: list[str] = []
    tools = scorer(tool_tokenizer, {ASKS: qwen_call("calculate", {"expression": "2+3"}), READS: "It is 5."}, seen)
    assert tools.call_accuracy([ASKED]) == [(1, 1)]
    assert tools.final_answers([ASKED]) == ["It is 5."]
    assert seen[-1].endswith("<tool_response>\n5\n" + READS)  # calculate ran
    assert len(seen) == 2  # the call turn's prompt is the first round's: generated once


def test_evaluation_counts_wrong_arguments_as_a_wrong_call(tool_tokenizer):
    tools = scorer(tool_tokenizer, {ASKS: qwen_call("calculate", {"expression": "3+2"}), READS: "It is 5."}, [])
    assert tools.call_accuracy([ASKED]) == [(0, 1)]


def test_a_recorded_call_without_an_implementation_replays_its_result(tool_tokenizer):
    record = json.loads(json.dumps(ASKED))
    first = record["conversation"][0]
    first["tools"] = [{"type": "function", "function": {"name": "weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    first["input"], first["tool_calls"] = "Weather in Paris?", [{"name": "weather", "arguments": {"city": "Paris"}}]
    record["conversation"][1] = {"system": "", "input": "", "output": "Sunny.",
                                 "tool_results": [{"name": "weather", "content": "sunny"}]}
    seen: list[str] = []
    replies = {"Weather in Paris?<|im_end|>\n<|im_start|>assistant\n": qwen_call("weather", {"city": "Paris"}),
               READS: "Sunny."}
    assert scorer(tool_tokenizer, replies, seen).final_answers([record]) == ["Sunny."]
    assert "<tool_response>\nsunny\n</tool_response>" in seen[-1]
    replies["Weather in Paris?<|im_end|>\n<|im_start|>assistant\n"] = qwen_call("weather", {"city": "Rome"})
    scorer(tool_tokenizer, replies, seen).final_answers([record])
    assert "<tool_response>\nerror: no tool 'weather' to run\n</tool_response>" in seen[-1]


def test_summary_has_a_tool_call_accuracy_column_per_family(tmp_path):
    from tunemake.evaluate import summarize

    ev = {"experiment": "e", "epoch": 1, "heldout": {"loss": 1.0, "perplexity": 2.7},
          "exact_match": {"tools": {"rate": 0.5}, "all": {"rate": 0.5}},
          "tool_calls": {"tools": {"rate": 0.75}, "all": {"rate": 0.75}}}
    (tmp_path / "e.json").write_text(json.dumps(ev))
    summarize([tmp_path / "e.json"], tmp_path / "summary.tsv", plots_dir=tmp_path / "plots")
    header, row = (tmp_path / "summary.tsv").read_text().splitlines()
    assert header.split("\t")[-2:] == ["tool_call_accuracy_tools", "tool_call_accuracy_all"]
    assert row.split("\t")[-2:] == ["0.7500", "0.7500"]
