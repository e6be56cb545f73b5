"""Tool use in the data: the formats that carry tools, the templates' tool forms and their labels,
the chat_template a merged model ships, and the data stage's errors and counts.

Expected texts are written out literally (from Qwen2.5's and InternLM2's published formats and
XTuner's MOSS data), never derived from the code under test.
"""

from __future__ import annotations

import json

import pytest

from tunemake.encode import BOS, EOS, IGNORE_INDEX, UNLABELLED_EOS, encode_record, plan
from tunemake.errors import ConfigError, DataError
from tunemake.formats import map_conversation, map_moss_sft, map_msagent_react, map_openai, map_sharegpt
from tunemake.templates import HF, TEMPLATES
from tunemake.toolforms import TOOL_TEMPLATES

LOC = "tools.jsonl:3"

CALCULATE = {
    "name": "calculate",
    "description": "Evaluate arithmetic",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
}
TOOLS = [{"type": "function", "function": CALCULATE}]
CALCULATE_JSON = ('{"type": "function", "function": {"name": "calculate", "description": "Evaluate arithmetic", '
                  '"parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, '
                  '"required": ["expression"]}}}')

OPENAI_RECORD = {
    "tools": TOOLS,
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "calculate", "arguments": '{"expression": "2+3"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "5"},
        {"role": "assistant", "content": "It is 5."},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "Welcome."},
    ],
}
# the unified record of OPENAI_RECORD
TURNS = [
    {"system": "Be brief.", "input": "What is 2+3?", "output": "", "tools": TOOLS,
     "tool_calls": [{"name": "calculate", "arguments": {"expression": "2+3"}}]},
    {"system": "", "input": "", "output": "It is 5.", "tool_results": [{"name": "calculate", "content": "5"}]},
    {"system": "", "input": "Thanks", "output": "Welcome."},
]
# the same conversation as apply_chat_template takes it
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "calculate", "arguments": {"expression": "2+3"}}}]},
    {"role": "tool", "name": "calculate", "content": "5"},
    {"role": "assistant", "content": "It is 5."},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "Welcome."},
]

QWEN_TEXT = (
    "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n" + CALCULATE_JSON +
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n"
    "</tool_call><|im_end|>\n"
    "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    "<tool_call>\n{\"name\": \"calculate\", \"arguments\": {\"expression\": \"2+3\"}}\n</tool_call><|im_end|>\n"
    "<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    "It is 5.<|im_end|>\n"
    "<|im_start|>user\nThanks<|im_end|>\n<|im_start|>assistant\nWelcome.<|im_end|>\n"
)
INTERNLM2_TEXT = (
    "<|im_start|>system\nBe brief.<|im_end|>\n"
    "<|im_start|>system name=<|plugin|>\n[\n    {\n        \"name\": \"calculate\",\n"
    "        \"description\": \"Evaluate arithmetic\",\n        \"parameters\": {\n            \"type\": \"object\",\n"
    "            \"properties\": {\n                \"expression\": {\n                    \"type\": \"string\"\n"
    "                }\n            },\n            \"required\": [\n                \"expression\"\n            ]\n"
    "        }\n    }\n]<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    "<|action_start|><|plugin|>\n{\"name\": \"calculate\", \"parameters\": {\"expression\": \"2+3\"}}<|action_end|>"
    "<|im_end|>\n"
    "<|im_start|>environment name=<|plugin|>\n5<|im_end|>\n<|im_start|>assistant\nIt is 5.<|im_end|>\n"
    "<|im_start|>user\nThanks<|im_end|>\n<|im_start|>assistant\nWelcome.<|im_end|>\n"
)
MOSS_TEXT = (
    "<s>Be brief.\n- Evaluate arithmetic: enabled. API: calculate(expression)\n"
    "<|Human|>: What is 2+3?<eoh>\n<|Commands|>: calculate(\"2+3\")<eoc>\n"
    "<|Results|>:\ncalculate(\"2+3\") => 5\n<eor>\n"
    "It is 5.</s>\n<s><|Human|>: Thanks<eoh>\nWelcome.</s>\n"
)
# as training writes them, bos and eos included
EXPECTED = {"qwen_chat": "<s>" + QWEN_TEXT, "internlm2_chat": "<s>" + INTERNLM2_TEXT, "moss_sft": MOSS_TEXT}

# Qwen2.5-Instruct's chat_template, verbatim from its tokenizer_config.json
QWEN25_CHAT_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are "
    "provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)


def text_of(pieces) -> str:
    return "".join("<s>" if p is BOS else "</s>" if p in (EOS, UNLABELLED_EOS) else p[0] for p in pieces)


# --- formats ------------------------------------------------------------------------------------


def test_openai_tool_calls_and_results_map_to_the_unified_record():
    assert map_openai(OPENAI_RECORD, LOC) == TURNS


def test_openai_tool_message_by_name_and_arguments_as_an_object():
    record = json.loads(json.dumps(OPENAI_RECORD))
    record["messages"][2]["tool_calls"] = [{"name": "calculate", "arguments": {"expression": "2+3"}}]
    record["messages"][3] = {"role": "tool", "name": "calculate", "content": 5}
    turns = map_openai(record, LOC)
    assert turns[0]["tool_calls"] == TURNS[0]["tool_calls"]
    assert turns[1]["tool_results"] == [{"name": "calculate", "content": "5"}]


@pytest.mark.parametrize("change, message", [
    (lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments='{"expression": 2+3}'),
     "messages[2]: tool call 'calculate': arguments are not valid JSON"),
    (lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments='[1]'),
     "messages[2]: tool call 'calculate': arguments should be a JSON object"),
    (lambda r: r["messages"].insert(2, {"role": "tool", "name": "calculate", "content": "5"}),
     "messages[2]: a tool result with no tool call before it"),
    (lambda r: r["messages"][3].pop("tool_call_id"), 'messages[3]: a tool message needs a "name"'),
    (lambda r: r.update(tools="[{"), "tools: not valid JSON"),
])
def test_openai_bad_tool_data_names_the_record(change, message):
    record = json.loads(json.dumps(OPENAI_RECORD))
    change(record)
    with pytest.raises(DataError) as info:
        map_openai(record, LOC)
    assert str(info.value).startswith(f"{LOC}: ") and message in str(info.value)


def test_conversation_format_reads_tools_back_as_the_held_out_file_writes_them():
    record = {"conversation": TURNS}
    assert map_conversation(json.loads(json.dumps(record)), LOC) == TURNS
    record_level = {"tools": TOOLS, "conversation": [{k: v for k, v in TURNS[0].items() if k != "tools"}, *TURNS[1:]]}
    assert map_conversation(record_level, LOC) == TURNS


SHAREGPT_RECORD = {
    "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "What is 2+3?"},
        {"from": "function_call", "value": '{"name": "calculate", "arguments": {"expression": "2+3"}}'},
        {"from": "observation", "value": "5"},
        {"from": "gpt", "value": "It is 5."},
        {"from": "human", "value": "Thanks"},
        {"from": "gpt", "value": "Welcome."},
        {"from": "human", "value": "a trailing question has no answer to learn"},
    ],
    "tools": json.dumps([CALCULATE]),
}


def test_sharegpt_with_tools_maps_as_llama_factory_reads_it():
    assert map_sharegpt(SHAREGPT_RECORD, LOC) == TURNS


def test_sharegpt_plain_chat_and_role_names_from_fields():
    record = {"msgs": [{"role": "u", "text": "Hi"}, {"role": "a", "text": "Hello"}], "sys": "Be kind."}
    fields = {"messages": "msgs", "role_tag": "role", "content_tag": "text", "user_tag": "u", "assistant_tag": "a",
              "system": "sys"}
    assert map_sharegpt(record, LOC, fields) == [{"system": "Be kind.", "input": "Hi", "output": "Hello"}]


@pytest.mark.parametrize("messages, message", [
    ([{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}], "conversations[1]: unknown role 'bot'"),
    ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}],
     "conversations[1]: 'human' where a gpt or function_call message was expected"),
    ([{"from": "observation", "value": "5"}, {"from": "gpt", "value": "b"}],
     "conversations[0]: a tool result with no tool call before it"),
    ([{"from": "human", "value": "a"}, {"from": "function_call", "value": "{calculate}"}],
     "conversations[1]: function_call: not valid JSON"),
])
def test_sharegpt_bad_records_name_the_message(messages, message):
    with pytest.raises(DataError) as info:
        map_sharegpt({"conversations": messages}, LOC)
    assert str(info.value).startswith(f"{LOC}: ") and message in str(info.value)


MOSS_RECORD = {
    "conversation_id": 1,
    "meta_instruction": "You are an AI assistant whose name is MOSS.\nCapabilities and tools that MOSS can possess.\n"
                        "- Inner thoughts: enabled.\n- Web search: disabled.\n"
                        "- Calculator: enabled. API: Calculate(expression)\n- Equation solver: disabled.\n",
    "num_turns": 2,
    "chat": {
        "turn_1": {
            "Human": "<|Human|>: Hi<eoh>\n",
            "Inner Thoughts": "<|Inner Thoughts|>: None<eot>\n",
            "Commands": "<|Commands|>: None<eoc>\n",
            "Tool Responses": "<|Results|>:\nNone\n<eor>\n",
            "MOSS": "<|MOSS|>: Hello!<eom>\n",
        },
        "turn_2": {
            "Human": "<|Human|>: What is 2+3?<eoh>\n",
            "Inner Thoughts": "<|Inner Thoughts|>: I should calculate.<eot>\n",
            "Commands": "<|Commands|>: Calculate(\"2+3\")<eoc>\n",
            "Tool Responses": "<|Results|>:\nCalculate(\"2+3\") => 5\n<eor>\n",
            "MOSS": "<|MOSS|>: It is 5.<eom>\n",
        },
    },
}


def test_moss_sft_record_renders_xtuners_text_with_the_moss_template():
    turns = map_moss_sft(MOSS_RECORD, LOC)
    assert turns[0]["tools"][0]["function"]["name"] == "Calculate"
    assert turns[1]["tool_calls"] == [{"name": "Calculate", "arguments": {"expression": "2+3"}}]
    assert turns[2]["tool_results"] == [{"name": "Calculate", "content": "5"}]
    pieces = plan(turns, TEMPLATES["moss_sft"], False)
    assert text_of(pieces) == (
        "<s>You are an AI assistant whose name is MOSS.\nCapabilities and tools that MOSS can possess.\n"
        "- Inner thoughts: enabled.\n- Web search: disabled.\n"
        "- Calculator: enabled. API: Calculate(expression)\n- Equation solver: disabled.\n"
        "<|Human|>: Hi<eoh>\n"
        "<|Inner Thoughts|>: None<eot>\n<|Commands|>: None<eoc>\n<|Results|>:\nNone\n<eor>\n<|MOSS|>: Hello!<eom></s>\n"
        "<s><|Human|>: What is 2+3?<eoh>\n"
        "<|Inner Thoughts|>: I should calculate.<eot>\n<|Commands|>: Calculate(\"2+3\")<eoc>\n"
        "<|Results|>:\nCalculate(\"2+3\") => 5\n<eor>\n"
        "<|MOSS|>: It is 5.<eom></s>\n"
    )
    trained = "".join(p[0] for p in pieces if isinstance(p, tuple) and p[1])
    assert "Calculate(\"2+3\")<eoc>" in trained and "=> 5" not in trained and "What is" not in trained


def test_moss_sft_call_to_a_disabled_api_is_an_unknown_call():
    from tunemake.tools import unknown_calls

    record = json.loads(json.dumps(MOSS_RECORD))
    record["chat"]["turn_2"]["Commands"] = "<|Commands|>: Search(\"weather\")<eoc>\n"
    assert unknown_calls(map_moss_sft(record, LOC)) == ["Search"]


def test_moss_sft_keeps_raw_command_text_and_results_on_the_next_line(tool_tokenizer):
    record = json.loads(json.dumps(MOSS_RECORD))
    record["meta_instruction"] += "- Equation solver: enabled. API: Solve(equation)\n"
    record["chat"]["turn_2"]["Commands"] = '<|Commands|>: Solve("x^2 = 4"), Calculate("2\\times 3")<eoc>\n'
    record["chat"]["turn_2"]["Tool Responses"] = ('<|Results|>:\nSolve("x^2 = 4") =>\nx = -2; x = 2\n'
                                                  'Calculate("2\\times 3") => 6\n<eor>\n')
    turns = map_moss_sft(record, LOC)
    assert turns[2]["tool_results"] == [{"name": "Solve", "content": "\nx = -2; x = 2"},
                                        {"name": "Calculate", "content": "6"}]
    text = text_of(plan(turns, TEMPLATES["moss_sft"], False))
    assert (record["chat"]["turn_2"]["Commands"] + record["chat"]["turn_2"]["Tool Responses"]) in text
    messages = [{"role": "system", "content": turns[0]["system"]}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": turns[0]["output"]},
                {"role": "user", "content": turns[1]["input"]},
                {"role": "assistant", "content": turns[1]["output"],
                 "tool_calls": [{"type": "function", "function": c} for c in turns[1]["tool_calls"]]},
                *({"role": "tool", **r} for r in turns[2]["tool_results"]),
                {"role": "assistant", "content": turns[2]["output"]}]
    assert tool_tokenizer("moss_sft").apply_chat_template(messages, tools=turns[0]["tools"], tokenize=False) == text


@pytest.mark.parametrize("count", ["two", 2.5, None])
def test_moss_sft_bad_num_turns_names_the_record(count):
    record = {**MOSS_RECORD, "num_turns": count}
    with pytest.raises(DataError, match=f"^{LOC}: "):
        map_moss_sft(record, LOC)


def test_sharegpt_system_message_after_the_first_is_named():
    record = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                                {"from": "system", "value": "c"}]}
    with pytest.raises(DataError, match=r"conversations\[2\]: a 'system' message is allowed only first"):
        map_sharegpt(record, LOC)


def test_openai_tool_data_from_parquet_keeps_each_rows_own_tools_and_arguments(tmp_path):
    """Arrow gives every row the union of the keys of a column's objects, as nulls."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tunemake.formats import read_dataset

    weather = {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]}
    other = {"tools": [{"type": "function", "function": WEATHER}],
             "messages": [{"role": "user", "content": "Weather?"}, weather,
                          {"role": "tool", "name": "weather", "content": "sunny"},
                          {"role": "assistant", "content": "Sunny."}]}
    first = json.loads(json.dumps(OPENAI_RECORD))
    first["messages"][2]["tool_calls"][0]["function"]["arguments"] = {"expression": "2+3"}
    first["messages"][3] = {"role": "tool", "name": "calculate", "content": "5"}
    pq.write_table(pa.Table.from_pylist([first, other]), tmp_path / "calls.parquet")
    read = [turns for _, _, turns in read_dataset({"format": "openai"}, [str(tmp_path / "calls.parquet")])]
    assert read[0] == TURNS
    assert read[1][0]["tools"] == [{"type": "function", "function": WEATHER}]
    assert read[1][0]["tool_calls"] == [{"name": "weather", "arguments": {"city": "Paris"}}]


def test_msagent_react_maps_as_xtuner():
    api = {"name": "weather", "description": "Look up the weather",
           "paths": [{"parameters": [{"name": "city", "description": "the city"}]}]}
    record = {"conversations": [
        {"from": "system", "value": "Tools: " + json.dumps(api)},
        {"from": "user", "value": "Weather in Paris?"},
        {"from": "assistant", "value": "Let me look.<|startofthink|>```JSON\n{\"api_name\": \"weather\", "
                                       "\"parameters\": {\"city\": \"Paris\"}}\n```<|endofthink|>"
                                       "<|startofexec|>```JSON\n{\"result\": \"sunny\"}\n```<|endofexec|>It is sunny."},
    ]}
    turns = map_msagent_react(record, LOC)
    assert turns[0]["system"].startswith("你是一个可以调用外部工具的助手，可以使用的工具包括：\n"
                                         "{'weather': \"Look up the weather\\n输入参数: {'city': 'the city'}\"}\n")
    assert "Action:工具名称，你的工具必须从 [['weather']] 选择\n" in turns[0]["system"]
    assert turns[0]["input"] == "Weather in Paris?\n"
    assert turns[0]["output"] == "Thought:Let me look.\nAction:weather\nAction Input:{'city': 'Paris'}\n\n"
    assert turns[1] == {"system": "Response:{'result': 'sunny'}\n", "input": "", "output": "Final Answer:It is sunny.\n"}


def test_msagent_react_drops_a_record_whose_think_block_does_not_parse():
    record = {"conversations": [{"from": "user", "value": "q"},
                                {"from": "assistant", "value": "<|startofthink|>{oops<|endofthink|>"}]}
    assert map_msagent_react(record, LOC) == []


# --- templates: the tool forms, labels and the chat_template a merged model ships -------------


@pytest.mark.parametrize("name", ["qwen_chat", "internlm2_chat", "moss_sft"])
def test_tool_form_training_text(name):
    assert text_of(plan(TURNS, TEMPLATES[name], False)) == EXPECTED[name]


def test_qwen_chat_writes_tools_as_qwens_own_chat_template(tool_tokenizer):
    tokenizer = tool_tokenizer("qwen_chat")
    assert tokenizer.apply_chat_template(MESSAGES, tools=TOOLS, tokenize=False,
                                         chat_template=QWEN25_CHAT_TEMPLATE) == QWEN_TEXT


@pytest.mark.parametrize("name", ["qwen_chat", "internlm2_chat", "moss_sft"])
def test_chat_template_renders_tools_calls_and_results_as_training_encodes_them(name, tool_tokenizer):
    tokenizer = tool_tokenizer(name)
    assert tokenizer.apply_chat_template(MESSAGES, tools=TOOLS, tokenize=False) == EXPECTED[name]
    # the generation prompt after a result ends where training's answer starts
    prompt = tokenizer.apply_chat_template(MESSAGES[:4], tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert EXPECTED[name].startswith(prompt) and EXPECTED[name][len(prompt):].startswith("It is 5.")


WEATHER = {"name": "weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
# two calls at once, their two results, then the user asks on; no system prompt
PARALLEL_TURNS = [
    {"system": "", "input": "2+3, and the weather?", "output": "Both.",
     "tools": [*TOOLS, {"type": "function", "function": WEATHER}],
     "tool_calls": [{"name": "calculate", "arguments": {"expression": "2+3"}},
                    {"name": "weather", "arguments": {"city": "Paris"}}]},
    {"system": "", "input": "And in words?", "output": "Five; sunny.",
     "tool_results": [{"name": "calculate", "content": "5"}, {"name": "weather", "content": '{"sky": "sunny"}'}]},
]
PARALLEL_MESSAGES = [
    {"role": "user", "content": "2+3, and the weather?"},
    {"role": "assistant", "content": "Both.", "tool_calls": [
        {"type": "function", "function": {"name": "calculate", "arguments": {"expression": "2+3"}}},
        {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "name": "calculate", "content": "5"},
    {"role": "tool", "name": "weather", "content": {"sky": "sunny"}},  # a JSON value, as clients send it
    {"role": "user", "content": "And in words?"},
    {"role": "assistant", "content": "Five; sunny."},
]


@pytest.mark.parametrize("name", ["qwen_chat", "internlm2_chat", "moss_sft"])
def test_parallel_calls_and_results_then_a_question_render_as_trained(name, tool_tokenizer):
    tokenizer = tool_tokenizer(name)
    tools = PARALLEL_TURNS[0]["tools"]
    rendered = tokenizer.apply_chat_template(PARALLEL_MESSAGES, tools=tools, tokenize=False)
    assert rendered == text_of(plan(PARALLEL_TURNS, TEMPLATES[name], False))
    assert rendered.count("sunny") == 2  # the result as JSON, and the answer
    encoded = encode_record(PARALLEL_TURNS, tokenizer, TEMPLATES[name], max_length=4096)
    if name != "moss_sft":  # every seam a special token
        assert tokenizer.encode(rendered, add_special_tokens=False) == encoded.input_ids
    prompt = tokenizer.apply_chat_template(PARALLEL_MESSAGES[:5], tools=tools, tokenize=False,
                                           add_generation_prompt=True)
    assert rendered.startswith(prompt) and rendered[len(prompt):].startswith("Five; sunny.")


def test_qwen_chat_parallel_calls_are_qwens_own_text(tool_tokenizer):
    tokenizer = tool_tokenizer("qwen_chat")
    messages = [{"role": "system", "content": "Be brief."}, *PARALLEL_MESSAGES]
    turns = [{**PARALLEL_TURNS[0], "system": "Be brief."}, PARALLEL_TURNS[1]]
    qwen = tokenizer.apply_chat_template(messages, tools=PARALLEL_TURNS[0]["tools"], tokenize=False,
                                         chat_template=QWEN25_CHAT_TEMPLATE)
    # Qwen's own template writes a JSON tool result with Python's repr; training writes JSON
    assert text_of(plan(turns, TEMPLATES["qwen_chat"], False)) == "<s>" + qwen.replace("{'sky': 'sunny'}",
                                                                                         '{"sky": "sunny"}')


def test_moss_chat_template_refuses_arguments_given_as_a_json_string(tool_tokenizer):
    messages = json.loads(json.dumps(MESSAGES))
    messages[2]["tool_calls"][0]["function"]["arguments"] = '{"expression": "2+3"}'
    with pytest.raises(Exception, match="moss_sft: give tool call arguments as an object"):
        tool_tokenizer("moss_sft").apply_chat_template(messages, tools=TOOLS, tokenize=False)


@pytest.mark.parametrize("name", ["qwen_chat", "internlm2_chat"])
def test_chat_template_gives_the_trained_ids_where_every_seam_is_a_special_token(name, tool_tokenizer):
    tokenizer = tool_tokenizer(name)
    encoded = encode_record(TURNS, tokenizer, TEMPLATES[name], max_length=4096)
    rendered = tokenizer.apply_chat_template(MESSAGES, tools=TOOLS, tokenize=False)
    assert tokenizer.decode(encoded.input_ids) == rendered
    assert tokenizer.encode(rendered, add_special_tokens=False) == encoded.input_ids


@pytest.mark.parametrize("name", ["qwen_chat", "internlm2_chat", "moss_sft"])
def test_calls_are_trained_and_tools_results_and_prompts_are_not(name, tool_tokenizer):
    tokenizer = tool_tokenizer(name)
    encoded = encode_record(TURNS, tokenizer, TEMPLATES[name], max_length=4096)
    trained = tokenizer.decode([t for t, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX])
    untrained = tokenizer.decode([t for t, label in zip(encoded.input_ids, encoded.labels) if label == IGNORE_INDEX])
    assert '"2+3"' in trained and "It is 5." in trained and "Welcome." in trained
    for text in ("Be brief.", "Evaluate arithmetic", "What is 2+3?", "Thanks"):
        assert text in untrained and text not in trained
    assert "5" not in trained.replace("It is 5.", "")  # the tool's result is never trained


def test_a_template_without_a_tool_form_refuses_tools_in_training_and_chat(tool_tokenizer, tokenizer_for):
    with pytest.raises(DataError, match="template 'default' cannot write tool calls; .* hf, qwen_chat"):
        plan(TURNS, TEMPLATES["default"], False)
    tokenizer = tokenizer_for("default")
    with pytest.raises(Exception, match="template 'default' has no tool form"):
        tokenizer.apply_chat_template(MESSAGES, tools=TOOLS, tokenize=False,
                                      chat_template=TEMPLATES["default"].chat_template())


def test_hf_template_renders_tools_through_the_tokenizers_own_template(tool_tokenizer):
    tokenizer = tool_tokenizer("qwen_chat")
    hf = text_of(plan(TURNS, HF, False, tokenizer=_with_template(tokenizer, QWEN25_CHAT_TEMPLATE)))
    assert hf == QWEN_TEXT
    pieces = plan(TURNS, HF, False, tokenizer=_with_template(tokenizer, QWEN25_CHAT_TEMPLATE))
    trained = "".join(p[0] for p in pieces if p[1])
    assert trained.startswith("<tool_call>\n") and "<tool_response>" not in trained


def test_hf_template_that_ignores_tools_is_an_error_naming_the_record(tmp_path, tool_tokenizer):
    from tunemake.data import check_dataset

    ignores = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
              "{% if add_generation_prompt %}assistant: {% endif %}"
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps(OPENAI_RECORD) + "\n", encoding="utf-8")
    tokenizer = _with_template(tool_tokenizer("qwen_chat"), ignores)
    with pytest.raises(DataError) as info:
        check_dataset({"name": "calls", "format": "openai"}, [str(path)], tokenizer, HF, 4096)
    assert str(info.value).startswith(f"{path}:1: this record has tools, and template 'hf': the tokenizer's "
                                      "chat_template ignores tools")


def _with_template(tokenizer, chat_template):
    import copy

    copied = copy.deepcopy(tokenizer)
    copied.chat_template = chat_template
    return copied


# --- the data stage -----------------------------------------------------------------------------


def _recipe(tmp_path, tokenizer_dir, records, template="qwen_chat", fmt="openai", heldout=0.0, tokenizer=None):
    from tunemake.config import load_config

    path = tmp_path / "tools.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    config = {
        "models": {"tiny": {"path": str(tokenizer or tokenizer_dir("qwen_chat")), "template": template}},
        "datasets": {"calls": {"path": str(path), "format": fmt, "heldout_fraction": heldout}},
        "experiments": [{"model": "tiny", "datasets": "calls", "method": "lora", "max_length": 1024}],
    }
    return path, next(iter(load_config(config)["experiments"].values()))["data_recipe"]


def test_data_stage_counts_tool_records_and_calls_and_drops_unknown_calls(tmp_path, tokenizer_dir, corpus_path,
                                                                         caplog):
    from dataclasses import replace

    from tunemake.data import build_templated_dataset
    from tunemake.demo import build_demo_tokenizer

    # a tokenizer for qwen_chat's text, but not for its tool markers
    without_markers = tmp_path / "tokenizer"
    build_demo_tokenizer(corpus_path, without_markers, replace(TEMPLATES["qwen_chat"], tool_form=None), vocab_size=500)
    unknown = json.loads(json.dumps(OPENAI_RECORD))
    unknown["messages"][2]["tool_calls"][0]["function"]["name"] = "search"
    plain = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    path, recipe = _recipe(tmp_path, tokenizer_dir, [OPENAI_RECORD, unknown, plain, OPENAI_RECORD],
                           tokenizer=without_markers)
    with caplog.at_level("WARNING", logger="tunemake.data"):
        stats = build_templated_dataset(recipe, tmp_path / "out")
    calls = stats["datasets"]["calls"]
    assert (calls["tool_records"], calls["tool_calls"], calls["dropped"]["unknown_tool"]) == (2, 2, 1)
    assert (stats["tool_records"], stats["records_in"], stats["records_out"]["train"]) == (2, 4, 3)
    assert f"{path}:2: calls 'search'" in caplog.text
    assert caplog.text.count("no single token for <tool_call>") == 1  # said once


def test_data_stage_refuses_tools_with_a_template_that_cannot_write_them(tmp_path, tokenizer_dir):
    from tunemake.data import build_templated_dataset

    """A tool record past the records the config looks at is refused by the data job."""
    from tunemake.formats import PEEK_RECORDS

    plain = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    path, recipe = _recipe(tmp_path, tokenizer_dir, [plain] * PEEK_RECORDS + [OPENAI_RECORD], template="default")
    with pytest.raises(DataError) as info:
        build_templated_dataset(recipe, tmp_path / "out")
    assert str(info.value).startswith(f"{path}:{PEEK_RECORDS + 1}: this record has tools, and template 'default' "
                                      "cannot write tool calls")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_tool_records_with_a_template_without_a_tool_form_are_a_config_error(tmp_path, tokenizer_dir, suffix):
    """The config looks at the first records of each local file, whatever the format's file type."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tunemake.config import load_config

    plain = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    records = [plain, SHAREGPT_RECORD]
    path = tmp_path / f"calls{suffix}"
    if suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records) if suffix == ".jsonl" else json.dumps(records))
    where = {".jsonl": f"{path}:2", ".json": f"{path}: record 1", ".parquet": f"{path}: row 1"}[suffix]
    config = {
        "models": {"tiny": {"path": str(tokenizer_dir("qwen_chat")), "template": "default"}},
        "datasets": {"calls": {"path": str(path), "format": "sharegpt"}},
        "experiments": [{"name": "plain", "model": "tiny", "datasets": ["calls"], "method": "lora"},
                        {"name": "tools", "model": "tiny", "datasets": ["calls"], "method": "lora",
                         "template": "qwen_chat"}],
    }
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert str(info.value) == (f"config: experiments[0].template: dataset 'calls' (first at {where}) calls tools, and "
                               "template 'default' cannot write them; the templates with a tool form are "
                               + ", ".join(TOOL_TEMPLATES))
    config["experiments"].pop(0)
    load_config(config)  # a template with a tool form reads them


def test_moss_data_with_a_template_without_a_tool_form_is_a_config_error(tmp_path, tokenizer_dir):
    with pytest.raises(ConfigError, match=r"experiments\[0\].template: dataset 'calls' \(format moss_sft\) calls "
                                          r"tools, and template 'default' cannot write them"):
        _recipe(tmp_path, tokenizer_dir, [MOSS_RECORD], template="default", fmt="moss_sft")


def test_sharegpt_fields_are_checked_against_the_format(tmp_path, tokenizer_dir):
    from tunemake.config import load_config

    config = {
        "models": {"tiny": {"path": str(tokenizer_dir("qwen_chat")), "template": "qwen_chat"}},
        "datasets": {"calls": {"path": "x.jsonl", "format": "sharegpt", "fields": {"input": "q"}}},
        "experiments": [{"model": "tiny", "datasets": "calls", "method": "lora"}],
    }
    with pytest.raises(ConfigError, match=r"config: datasets.calls.fields.input: format sharegpt reads messages, system"):
        load_config(config, check_files=False)


def test_held_out_tool_records_keep_their_tools(tmp_path, tokenizer_dir):
    from tunemake.data import build_templated_dataset

    records = [{**OPENAI_RECORD, "messages": [*OPENAI_RECORD["messages"][:5],
                                              {"role": "user", "content": f"Thanks {i}"},
                                              {"role": "assistant", "content": "Welcome."}]} for i in range(20)]
    _, recipe = _recipe(tmp_path, tokenizer_dir, records, heldout=0.5)
    build_templated_dataset(recipe, tmp_path / "out")
    held = [json.loads(line) for line in (tmp_path / "out" / "heldout.jsonl").read_text().splitlines()]
    assert held and all(map_conversation(r, LOC)[0]["tools"] == TOOLS for r in held)


def test_check_dataset_shows_calls_and_results_with_the_trained_spans_marked(tmp_path, tool_tokenizer):
    from tunemake.data import check_dataset

    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps(OPENAI_RECORD) + "\n", encoding="utf-8")
    text = check_dataset({"name": "calls", "format": "openai"}, [str(path)], tool_tokenizer("qwen_chat"),
                         TEMPLATES["qwen_chat"], 4096)
    assert "1 tool call" in text.splitlines()[0]
    assert "[[<tool_call>\n{\"name\": \"calculate\", \"arguments\": {\"expression\": \"2+3\"}}\n</tool_call><|im_end|>]]" in text
    assert "<tool_response>\n5\n</tool_response>" in text and "[[<tool_response>" not in text


def test_check_dataset_marks_a_record_the_data_stage_drops_and_refuses_a_template_without_tools(
        tmp_path, tool_tokenizer, tokenizer_for):
    from tunemake.data import check_dataset

    unknown = json.loads(json.dumps(OPENAI_RECORD))
    unknown["messages"][2]["tool_calls"][0]["function"]["name"] = "search"
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps(unknown) + "\n", encoding="utf-8")
    dataset = {"name": "calls", "format": "openai"}
    text = check_dataset(dataset, [str(path)], tool_tokenizer("qwen_chat"), TEMPLATES["qwen_chat"], 4096)
    assert "(dropped: calls 'search', which its tools do not offer)" in text.splitlines()[0]
    with pytest.raises(DataError, match=f"^{path}:1: this record has tools, and template 'default' cannot"):
        check_dataset(dataset, [str(path)], tokenizer_for("default"), TEMPLATES["default"], 4096)


def test_a_merged_models_saved_tokenizer_speaks_the_trained_tool_form(tmp_path, tokenizer_dir):
    """The merge's tokenizer, saved and loaded back by plain transformers, renders tools, calls and
    results as training wrote them."""
    from transformers import AutoTokenizer

    from tunemake.merge import _load_tokenizer

    _load_tokenizer(tokenizer_dir("internlm2_chat"), TEMPLATES["internlm2_chat"]).save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert loaded.apply_chat_template(MESSAGES, tools=TOOLS, tokenize=False) == EXPECTED["internlm2_chat"]
