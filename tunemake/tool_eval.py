"""Evaluations of tool use, for held-out records with tools (``tunemake.tools``).

Two scores per record, both greedy:

- **tool-call accuracy**: at every turn where the record calls tools, the model is given the
  conversation up to that turn (the recorded history) and its calls are read with the template's
  tool form; a turn is right when it makes the same calls, in order, with the same names and
  arguments equal as parsed JSON.
- **final answer with the tools run**: from the record's last user message, the model answers as
  in chat: its calls are run and the results fed back, up to ``max_rounds`` times, and its final
  answer is compared with the record's (stripped, exactly). Calls run on the built-in plugins
  and the module of ``evaluation.tools``; a call with no implementation that matches one the
  record made (name and arguments) replays the recorded result; any other call gets an
  ``error: ...`` result.

Not supported: the ``hf`` template with a tokenizer that has no ``response_template`` (its calls
cannot be read: the record's tool-call accuracy is not scored and its answer is taken as it is).
"""

from __future__ import annotations

import json
import logging

from tunemake.encode import answer_text, prompt_ids, raw_text
from tunemake.templates import HF
from tunemake.toolforms import FORMS, bind_arguments

log = logging.getLogger("tunemake.evaluate")


def call_turns(conversation: list[dict]) -> list[int]:
    """The indices of the turns that call tools."""
    return [index for index, turn in enumerate(conversation) if turn.get("tool_calls")]


def same_calls(made: list[dict], recorded: list[dict]) -> bool:
    return len(made) == len(recorded) and all(
        m["name"] == r["name"] and m.get("arguments") == r["arguments"] for m, r in zip(made, recorded))


class ToolScorer:
    """Reads and runs the calls a model writes while it answers held-out records.

    Args:
        generate: ``generate(prompts) -> list of generated id lists`` (greedy, batched).
        tokenizer, template, stops: the model's tokenizer, template and answer stops.
        toolbox: the tools that run (a :class:`tunemake.toolbox.Toolbox`).
        max_rounds: calls run per answer before the model must answer. Default 5.
    """

    def __init__(self, generate, tokenizer, template, stops, toolbox, max_rounds: int = 5):
        self._generate, self.tokenizer, self.template, self.stops = generate, tokenizer, template, stops
        self.toolbox, self.max_rounds = toolbox, max_rounds
        self._generated: dict[tuple, list[int]] = {}  # a call turn's prompt is often a first round's
        self.readable = template != HF or bool(getattr(tokenizer, "response_template", None))
        if not self.readable:
            log.warning("template 'hf': the tokenizer has no response_template, so tool calls cannot be read: "
                        "tool-call accuracy is not scored and answers are taken as they come")

    def generate(self, prompts: list[list[int]]) -> list[list[int]]:
        """Greedy generations, each distinct prompt generated once per scorer."""
        missing = [p for p in dict.fromkeys(map(tuple, prompts)) if p not in self._generated]
        self._generated.update(zip(missing, self._generate([list(p) for p in missing]) if missing else []))
        return [self._generated[tuple(p)] for p in prompts]

    def calls(self, new_ids: list[int], prompt: list[int], tools: list[dict]) -> tuple[str, list[dict]]:
        """The text before the calls a generation makes, and the calls (arguments named)."""
        if not self.readable:
            return "", []
        if self.template == HF:
            from tunemake.tools import normalize_call

            parsed = self.tokenizer.parse_response(new_ids, prefix=prompt, tools=tools)
            return parsed.get("content") or "", [normalize_call(c, "answer") for c in parsed.get("tool_calls") or []]
        content, calls = FORMS[self.template.tool_form].parse(raw_text(new_ids, self.tokenizer, self.stops))
        return content, [bind_arguments(call, tools) for call in calls]

    def call_accuracy(self, records: list[dict]) -> list[tuple[int, int]]:
        """Per record, ``(turns whose calls are right, turns that call tools)``."""
        if not self.readable:
            return [(0, 0) for _ in records]
        asked = [(r, k) for r, record in enumerate(records) for k in call_turns(record["conversation"])]
        prompts = [prompt_ids(records[r]["conversation"][:k + 1], self.template, self.tokenizer)[1] for r, k in asked]
        counts = [[0, len(call_turns(record["conversation"]))] for record in records]
        for (r, k), prompt, new_ids in zip(asked, prompts, self.generate(prompts)):
            conversation = records[r]["conversation"]
            _, made = self.calls(new_ids, prompt, conversation[0].get("tools") or [])
            counts[r][0] += same_calls(made, conversation[k]["tool_calls"])
        return [tuple(c) for c in counts]

    def final_answers(self, records: list[dict]) -> list[str]:
        """Each record's final answer, with the tools run from its last user message on."""
        states = [_start(record["conversation"]) for record in records]
        answers = [""] * len(records)
        active = list(range(len(records)))
        for round_ in range(self.max_rounds + 1):
            prompts = [prompt_ids([*states[i]["turns"], states[i]["turn"]], self.template, self.tokenizer)[1]
                       for i in active]
            still = []
            for i, prompt, new_ids in zip(active, prompts, self.generate(prompts)):
                state = states[i]
                content, calls = self.calls(new_ids, prompt, state["tools"]) if round_ < self.max_rounds else ("", [])
                if not calls:
                    answers[i] = answer_text(new_ids, self.tokenizer, self.stops)
                    continue
                results = [self._run(call, state["recorded"]) for call in calls]
                readable = not any(call.get("error") for call in calls)
                state["turns"].append({**state["turn"], "output": content if readable else raw_text(
                    new_ids, self.tokenizer, self.stops), **({"tool_calls": calls} if readable else {})})
                state["turn"] = {"system": "", "input": "", "output": "", "tool_results": [
                    {"name": call["name"], "content": result} for call, result in zip(calls, results)]}
                still.append(i)
            active = still
        return answers

    def _run(self, call: dict, recorded: dict) -> str:
        if call.get("error") or self.toolbox.resolve(call["name"]) is not None:
            return self.toolbox.run(call)
        replay = recorded.get(_key(call))
        return replay if replay is not None else f"error: no tool {call['name']!r} to run"


def _key(call: dict) -> str:
    return json.dumps([call["name"], call["arguments"]], sort_keys=True)


def _start(conversation: list[dict]) -> dict:
    """Where a record's final answer starts: its last user message, with the recorded history
    before it, and the results its recorded calls got from there on (for replay)."""
    start = max((k for k, turn in enumerate(conversation) if turn.get("input")), default=0)
    recorded = {}
    for k in range(start, len(conversation) - 1):
        for call, result in zip(conversation[k].get("tool_calls") or [], conversation[k + 1].get("tool_results") or []):
            recorded[_key(call)] = result["content"]
    turn = {key: value for key, value in conversation[start].items() if key != "tool_calls"}
    return {"turns": list(conversation[:start]), "turn": {**turn, "output": ""}, "recorded": recorded,
            "tools": conversation[0].get("tools") or []}
