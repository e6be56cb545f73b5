"""Templates: the exact text XTuner trains on (xtuner/utils/templates.py), the Jinja chat_template that
renders the same text, custom templates and lookup errors.

Expected strings are written out literally from XTuner's PROMPT_TEMPLATE strings, never derived from the
``Template`` objects under test.
"""

from __future__ import annotations

import pytest

from tunemake.encode import BOS, EOS, plan
from tunemake.errors import ConfigError
from tunemake.templates import HF, TEMPLATES, Template, get_template, template_from_config

SYSTEM, Q1, A1, Q2, A2 = "SYS", "Q1", "A1", "Q2", "A2"

TURNS_WITH_SYSTEM = [
    {"system": SYSTEM, "input": Q1, "output": A1},
    {"system": "", "input": Q2, "output": A2},
]
TURNS_WITHOUT_SYSTEM = [
    {"system": "", "input": Q1, "output": A1},
    {"system": "", "input": Q2, "output": A2},
]
MESSAGES_WITH_SYSTEM = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": Q1},
    {"role": "assistant", "content": A1},
    {"role": "user", "content": Q2},
    {"role": "assistant", "content": A2},
]

LLAMA2_SYSTEM = (
    "[INST] <<SYS>>\n You are a helpful, respectful and honest assistant. Always answer as helpfully "
    "as possible, while being safe. Your answers should not include any harmful, unethical, racist, "
    "sexist, toxic, dangerous, or illegal content. Please ensure that your responses are socially "
    "unbiased and positive in nature.\nSYS\n<</SYS>>\n [/INST] "
)
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions. SYS\n "
)
DEEPSEEK_CODER_SYSTEM = (
    "You are an AI programming assistant, utilizing the DeepSeek Coder model, developed by DeepSeekCompany, "
    "and you only answer questions related to computer science. For politically sensitive questions, "
    "security and privacy issues, and other non-computer science questions, you will refuse to answer. SYS\n"
)
WIZARDCODER_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\nSYS\n "
)

# name -> (text with system prompt, text without); <s> / </s> are the bos / eos.
EXPECTED = {
    "default": (
        "<s><|System|>:SYS\n<|User|>:Q1\n<|Bot|>:A1</s>\n<s><|User|>:Q2\n<|Bot|>:A2</s>\n",
        "<s><|User|>:Q1\n<|Bot|>:A1</s>\n<s><|User|>:Q2\n<|Bot|>:A2</s>\n",
    ),
    "zephyr": (
        "<s><|system|>\nSYS\n<|user|>\nQ1\n<|assistant|>\nA1</s>\n"
        "<s><|user|>\nQ2\n<|assistant|>\nA2</s>\n",
        "<s><|user|>\nQ1\n<|assistant|>\nA1</s>\n<s><|user|>\nQ2\n<|assistant|>\nA2</s>\n",
    ),
    "internlm_chat": (
        "<s><|System|>:SYS\n<|User|>:Q1<eoh>\n<|Bot|>:A1<eoa>\n<|User|>:Q2<eoh>\n<|Bot|>:A2<eoa>\n",
        "<s><|User|>:Q1<eoh>\n<|Bot|>:A1<eoa>\n<|User|>:Q2<eoh>\n<|Bot|>:A2<eoa>\n",
    ),
    "internlm2_chat": (
        "<s><|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n"
        "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n"
        "<|im_start|>assistant\nA2<|im_end|>\n",
        "<s><|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\nA2<|im_end|>\n",
    ),
    "qwen_chat": (
        "<s><|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n"
        "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n"
        "<|im_start|>assistant\nA2<|im_end|>\n",
        "<s><|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\nA2<|im_end|>\n",
    ),
    "llama2_chat": (
        "<s>" + LLAMA2_SYSTEM + "[INST] Q1 [/INST]A1</s>\n<s>[INST] Q2 [/INST]A2</s>\n",
        "<s>[INST] Q1 [/INST]A1</s>\n<s>[INST] Q2 [/INST]A2</s>\n",
    ),
    "llama3_chat": (
        "<s><|start_header_id|>system<|end_header_id|>\n\nSYS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nQ1<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA1<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nQ2<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA2<|eot_id|>",
        "<s><|start_header_id|>user<|end_header_id|>\n\nQ1<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA1<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nQ2<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA2<|eot_id|>",
    ),
    "chatglm3": (
        "<s><|system|>\nSYS<|user|>\nQ1<|assistant|>\nA1</s>\n<s><|user|>\nQ2<|assistant|>\nA2</s>\n",
        "<s><|user|>\nQ1<|assistant|>\nA1</s>\n<s><|user|>\nQ2<|assistant|>\nA2</s>\n",
    ),
    "mistral": (
        "<s>[INST] SYS [/INST]\n[INST] Q1 [/INST]A1</s>\n<s>[INST] Q2 [/INST]A2</s>\n",
        "<s>[INST] Q1 [/INST]A1</s>\n<s>[INST] Q2 [/INST]A2</s>\n",
    ),
    "baichuan2_chat": (
        "<s>SYS\n<reserved_106>Q1<reserved_107>A1</s>\n<s><reserved_106>Q2<reserved_107>A2</s>\n",
        "<s><reserved_106>Q1<reserved_107>A1</s>\n<s><reserved_106>Q2<reserved_107>A2</s>\n",
    ),
    "vicuna": (
        "<s>" + VICUNA_SYSTEM + "USER: Q1 ASSISTANT:A1</s>\n<s>USER: Q2 ASSISTANT:A2</s>\n",
        "<s>USER: Q1 ASSISTANT:A1</s>\n<s>USER: Q2 ASSISTANT:A2</s>\n",
    ),
    # Some summaries of XTuner's templates leave chatglm2's SYSTEM empty; its source has "{system}\n".
    "chatglm2": (
        "<s>SYS\n[Round 1]\n\n问：Q1\n\n答：A1</s>\n\n<s>[Round 2]\n\n问：Q2\n\n答：A2</s>\n\n",
        "<s>[Round 1]\n\n问：Q1\n\n答：A1</s>\n\n<s>[Round 2]\n\n问：Q2\n\n答：A2</s>\n\n",
    ),
    # The other 12 names of XTuner 0.2.0's PROMPT_TEMPLATE (its string literals).
    "baichuan_chat": (
        "<s>SYS\n<reserved_102>Q1<reserved_103>A1</s>\n<s><reserved_102>Q2<reserved_103>A2</s>\n",
        "<s><reserved_102>Q1<reserved_103>A1</s>\n<s><reserved_102>Q2<reserved_103>A2</s>\n",
    ),
    "code_llama_chat": (  # no SEP
        "<s>SYS\n[INST] Q1 [/INST]A1</s><s>[INST] Q2 [/INST]A2</s>",
        "<s>[INST] Q1 [/INST]A1</s><s>[INST] Q2 [/INST]A2</s>",
    ),
    "cohere_chat": (  # SUFFIX_AS_EOS, no SEP
        "<s><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>SYS<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Q1<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"
        "A1<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Q2<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"
        "A2<|END_OF_TURN_TOKEN|>",
        "<s><|START_OF_TURN_TOKEN|><|USER_TOKEN|>Q1<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"
        "A1<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Q2<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"
        "A2<|END_OF_TURN_TOKEN|>",
    ),
    "deepseek_coder": (
        "<s>" + DEEPSEEK_CODER_SYSTEM + "### Instruction:\nQ1\n### Response:\nA1</s>\n"
        "<s>### Instruction:\nQ2\n### Response:\nA2</s>\n",
        "<s>### Instruction:\nQ1\n### Response:\nA1</s>\n<s>### Instruction:\nQ2\n### Response:\nA2</s>\n",
    ),
    "deepseek_v2": (  # SUFFIX_AS_EOS, no SEP
        "<s>SYS\n\nUser: Q1\n\nAssistant: A1<｜end▁of▁sentence｜>User: Q2\n\nAssistant: A2<｜end▁of▁sentence｜>",
        "<s>User: Q1\n\nAssistant: A1<｜end▁of▁sentence｜>User: Q2\n\nAssistant: A2<｜end▁of▁sentence｜>",
    ),
    "gemma": (  # a SUFFIX that is not the eos: suffix, then eos, then bos again
        "<s><start_of_turn>system\nSYS<end_of_turn>\n<start_of_turn>user\nQ1<end_of_turn>\n"
        "<start_of_turn>model\nA1<end_of_turn></s>\n"
        "<s><start_of_turn>user\nQ2<end_of_turn>\n<start_of_turn>model\nA2<end_of_turn></s>\n",
        "<s><start_of_turn>user\nQ1<end_of_turn>\n<start_of_turn>model\nA1<end_of_turn></s>\n"
        "<s><start_of_turn>user\nQ2<end_of_turn>\n<start_of_turn>model\nA2<end_of_turn></s>\n",
    ),
    "minicpm": (  # no SYSTEM: a system prompt is an error (test_minicpm_refuses_a_system_prompt)
        None,
        "<s><用户> Q1 <AI>A1</s>\n<s><用户> Q2 <AI>A2</s>\n",
    ),
    "minicpm3": (
        "<s><|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n"
        "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n"
        "<|im_start|>assistant\nA2<|im_end|>\n",
        "<s><|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\nA2<|im_end|>\n",
    ),
    "moss_sft": (
        "<s>SYS\n<|Human|>: Q1<eoh>\nA1</s>\n<s><|Human|>: Q2<eoh>\nA2</s>\n",
        "<s><|Human|>: Q1<eoh>\nA1</s>\n<s><|Human|>: Q2<eoh>\nA2</s>\n",
    ),
    "phi3_chat": (
        "<s><|system|>\nSYS<|end|>\n<|user|>\nQ1<|end|>\n<|assistant|>\nA1<|end|>\n"
        "<|user|>\nQ2<|end|>\n<|assistant|>\nA2<|end|>\n",
        "<s><|user|>\nQ1<|end|>\n<|assistant|>\nA1<|end|>\n<|user|>\nQ2<|end|>\n<|assistant|>\nA2<|end|>\n",
    ),
    "wizardcoder": (
        "<s>" + WIZARDCODER_SYSTEM + "### Instruction:\nQ1\n\n### Response:A1</s>\n\n"
        "<s>### Instruction:\nQ2\n\n### Response:A2</s>\n\n",
        "<s>### Instruction:\nQ1\n\n### Response:A1</s>\n\n<s>### Instruction:\nQ2\n\n### Response:A2</s>\n\n",
    ),
}
EXPECTED["mixtral"] = EXPECTED["deepseek_moe"] = EXPECTED["mistral"]
EXPECTED["wizardlm"] = EXPECTED["vicuna"]
EXPECTED["deepseekcoder"] = EXPECTED["deepseek_coder"]

NAMES = sorted(EXPECTED)
#: The templates that have a system field (all but minicpm).
NAMES_WITH_SYSTEM = [name for name in NAMES if EXPECTED[name][0] is not None]

#: XTuner 0.2.0's PROMPT_TEMPLATE keys, aliases included.
XTUNER_NAMES = {
    "default", "zephyr", "internlm_chat", "internlm2_chat", "moss_sft", "llama2_chat", "code_llama_chat",
    "chatglm2", "chatglm3", "qwen_chat", "baichuan_chat", "baichuan2_chat", "wizardlm", "wizardcoder",
    "vicuna", "deepseek_coder", "deepseekcoder", "deepseek_moe", "deepseek_v2", "mistral", "mixtral",
    "minicpm", "minicpm3", "gemma", "cohere_chat", "llama3_chat", "phi3_chat",
}


def training_text(turns, template) -> str:
    """The pieces of ``plan`` joined, bos / eos written as ``<s>`` / ``</s>``."""
    out = []
    for piece in plan(turns, template, pretrain=False):
        if piece is BOS:
            out.append("<s>")
        elif piece is EOS:
            out.append("</s>")
        else:
            out.append(piece[0])
    return "".join(out)


def test_every_reference_template_is_known():
    assert set(NAMES) <= set(TEMPLATES)
    for name in NAMES:
        assert get_template(name) is TEMPLATES[name]


def test_all_27_xtuner_names():
    assert len(XTUNER_NAMES) == 27
    assert set(TEMPLATES) == XTUNER_NAMES
    assert set(NAMES) == XTUNER_NAMES


def test_list_templates_shows_all_27_names_and_hf(capsys):
    from tunemake.cli import main

    assert main(["list-templates"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()].count("hf") == 1
    assert {line.split()[0] for line in out.splitlines()} == XTUNER_NAMES | {"hf"}
    assert repr("<start_of_turn>user\n{input}<end_of_turn>\n<start_of_turn>model\n") in out


@pytest.mark.parametrize("name", NAMES_WITH_SYSTEM)
def test_training_text_with_system(name):
    assert training_text(TURNS_WITH_SYSTEM, TEMPLATES[name]) == EXPECTED[name][0]


@pytest.mark.parametrize("name", NAMES)
def test_training_text_without_system(name):
    assert training_text(TURNS_WITHOUT_SYSTEM, TEMPLATES[name]) == EXPECTED[name][1]


@pytest.mark.parametrize("name", NAMES_WITH_SYSTEM)
def test_system_is_rendered_only_on_the_turn_that_carries_it(name):
    # A system text on turn 2 only (XTuner renders SYSTEM wherever the turn has one).
    turns = [dict(TURNS_WITHOUT_SYSTEM[0]), {"system": SYSTEM, "input": Q2, "output": A2}]
    text = training_text(turns, TEMPLATES[name])
    first_turn_end = text.index(A1)
    assert SYSTEM not in text[:first_turn_end]


@pytest.mark.parametrize("name", NAMES)
def test_chat_template_renders_the_training_text(name, tokenizer_for):
    """The saved chat_template (Jinja) renders exactly what tunemake trains on."""
    tokenizer = tokenizer_for(name)
    assert tokenizer.bos_token == "<s>" and tokenizer.eos_token == "</s>"
    if EXPECTED[name][0] is not None:
        rendered = tokenizer.apply_chat_template(MESSAGES_WITH_SYSTEM, tokenize=False)
        assert rendered == EXPECTED[name][0]
    rendered = tokenizer.apply_chat_template(MESSAGES_WITH_SYSTEM[1:], tokenize=False)
    assert rendered == EXPECTED[name][1]


@pytest.mark.parametrize("name", NAMES)
def test_template_tokenizer_serves_its_template(name, tokenizer_for):
    """Every stop word is one token of the template's test tokenizer, and its markers are special."""
    from tunemake.templates import encoding_problem

    tokenizer = tokenizer_for(name)
    assert encoding_problem(TEMPLATES[name], tokenizer) is None
    for word in TEMPLATES[name].stop_words:
        assert len(tokenizer.encode(word, add_special_tokens=False)) == 1


def test_minicpm_refuses_a_system_prompt(tokenizer_for):
    """XTuner's minicpm has no SYSTEM, and XTuner fails on a system prompt: so does tunemake."""
    from jinja2.exceptions import TemplateError

    from tunemake.errors import DataError

    assert TEMPLATES["minicpm"].system is None
    with pytest.raises(DataError, match=r"template 'minicpm' has no system field"):
        plan(TURNS_WITH_SYSTEM, TEMPLATES["minicpm"], pretrain=False)
    with pytest.raises(TemplateError, match="minicpm"):
        tokenizer_for("minicpm").apply_chat_template(MESSAGES_WITH_SYSTEM, tokenize=False)
    # an empty system text is no system prompt
    assert training_text([{**TURNS_WITH_SYSTEM[0], "system": ""}], TEMPLATES["minicpm"]) == "<s><用户> Q1 <AI>A1</s>\n"


@pytest.mark.parametrize("name", NAMES_WITH_SYSTEM)
def test_chat_template_with_a_foreign_tokenizer(name, tokenizer_for):
    """Rendered with a tokenizer that lacks the template's special tokens: still the same text."""
    tokenizer = tokenizer_for("default")
    rendered = tokenizer.apply_chat_template(
        MESSAGES_WITH_SYSTEM, tokenize=False, chat_template=TEMPLATES[name].chat_template()
    )
    assert rendered == EXPECTED[name][0]


@pytest.mark.parametrize("name", ["default", "internlm2_chat", "llama3_chat"])
def test_generation_prompt_ends_with_the_assistant_prefix(name, tokenizer_for):
    tokenizer = tokenizer_for(name)
    prompt = tokenizer.apply_chat_template(
        MESSAGES_WITH_SYSTEM[:4], tokenize=False, add_generation_prompt=True
    )
    full = EXPECTED[name][0]
    # The prompt is the training text up to (not including) the last answer.
    assert prompt == full[: full.rindex(A2)]


def test_chat_template_escapes_quotes_and_backslashes(tokenizer_for):
    template = template_from_config(
        "odd", {"system": "S'{system}'\\n\n", "instruction": 'U"\\{input}\'', "sep": "\\"}, "templates.odd"
    )
    tokenizer = tokenizer_for("default")
    rendered = tokenizer.apply_chat_template(
        MESSAGES_WITH_SYSTEM[:3], tokenize=False, chat_template=template.chat_template()
    )
    assert rendered == "<s>S'SYS'\\n\nU\"\\Q1'A1</s>\\"


def test_special_tokens_of_templates():
    assert TEMPLATES["internlm2_chat"].special_tokens() == ["<|im_start|>", "<|im_end|>"]
    assert set(TEMPLATES["internlm_chat"].special_tokens()) == {"<|System|>", "<|User|>", "<|Bot|>", "<eoh>", "<eoa>"}
    assert set(TEMPLATES["baichuan2_chat"].special_tokens()) == {"<reserved_106>", "<reserved_107>"}
    assert TEMPLATES["mistral"].special_tokens() == []
    assert set(TEMPLATES["gemma"].special_tokens()) == {"<start_of_turn>", "<end_of_turn>"}
    assert TEMPLATES["deepseek_v2"].special_tokens() == ["<｜end▁of▁sentence｜>"]
    assert set(TEMPLATES["moss_sft"].special_tokens()) == {"<|Human|>", "<eoh>", "<eoc>", "<eom>"}
    assert set(TEMPLATES["cohere_chat"].special_tokens()) == {
        "<|START_OF_TURN_TOKEN|>", "<|SYSTEM_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>",
    }
    assert set(TEMPLATES["minicpm"].special_tokens()) == {"<用户>", "<AI>"}
    for name in ("code_llama_chat", "deepseek_coder", "wizardcoder"):
        assert TEMPLATES[name].special_tokens() == []


def test_suffix_as_eos_and_stop_words_match_reference():
    assert TEMPLATES["internlm_chat"].stop_words == ("<eoa>",)
    assert TEMPLATES["qwen_chat"].stop_words == ("<|im_end|>", "<|endoftext|>")
    assert TEMPLATES["llama3_chat"].stop_words == ("<|eot_id|>",)
    assert TEMPLATES["cohere_chat"].stop_words == ("<|END_OF_TURN_TOKEN|>",)
    assert TEMPLATES["deepseek_v2"].stop_words == ("<｜end▁of▁sentence｜>",)
    assert TEMPLATES["gemma"].stop_words == ("<end_of_turn>",)
    assert TEMPLATES["minicpm3"].stop_words == ("<|im_end|>", "<|endoftext|>")
    assert TEMPLATES["moss_sft"].stop_words == ("<eoc>", "<eom>")
    assert TEMPLATES["phi3_chat"].stop_words == ("<|end|>",)
    for name in ("internlm_chat", "internlm2_chat", "qwen_chat", "llama3_chat", "cohere_chat", "deepseek_v2",
                 "minicpm3", "phi3_chat"):
        assert TEMPLATES[name].suffix_as_eos
    for name in ("default", "zephyr", "llama2_chat", "chatglm3", "mistral", "baichuan2_chat", "vicuna", "chatglm2",
                 "baichuan_chat", "code_llama_chat", "deepseek_coder", "minicpm", "moss_sft", "wizardcoder"):
        assert not TEMPLATES[name].suffix_as_eos
        assert TEMPLATES[name].suffix == ""
    assert TEMPLATES["gemma"].suffix == "<end_of_turn>" and not TEMPLATES["gemma"].suffix_as_eos


# --- custom templates and lookup ---------------------------------------------------------------


def test_custom_template_renders_its_fields():
    template = template_from_config(
        "mine",
        {"system": "<sys>{system}</sys>", "instruction": "#{round} Q: {input} A:", "suffix": "<end>",
         "suffix_as_eos": True, "sep": "\n", "stop_words": ["<end>"]},
        "templates.mine",
    )
    assert isinstance(template, Template)
    assert template.stop_words == ("<end>",)
    assert training_text(TURNS_WITH_SYSTEM, template) == "<s><sys>SYS</sys>#1 Q: Q1 A:A1<end>\n#2 Q: Q2 A:A2<end>\n"


def test_custom_template_literal_braces():
    template = template_from_config("braces", {"instruction": "{{json}} {input}"}, "templates.braces")
    assert training_text([{"system": "", "input": "x", "output": "y"}], template) == "<s>{json} xy</s>"


def test_custom_template_unknown_placeholder_names_the_key():
    with pytest.raises(ConfigError) as info:
        template_from_config("mine", {"instruction": "{input} {user}"}, "templates.mine")
    assert str(info.value).startswith("templates.mine.instruction:")
    assert "{user}" in str(info.value)
    with pytest.raises(ConfigError) as info:
        template_from_config("mine", {"system": "{sys}", "instruction": "{input}"}, "templates.mine")
    assert str(info.value).startswith("templates.mine.system:")
    assert "{sys}" in str(info.value)


def test_custom_template_unbalanced_brace_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^templates\.mine\.instruction:"):
        template_from_config("mine", {"instruction": "{input"}, "templates.mine")


def test_custom_template_without_input_is_an_error():
    with pytest.raises(ConfigError, match=r"templates\.mine\.instruction: .*\{input\}"):
        template_from_config("mine", {"instruction": "Round {round}:"}, "templates.mine")


def test_custom_template_shadows_builtin_and_hf():
    custom = {"default": {"instruction": "> {input}\n"}}
    template = get_template("default", custom)
    assert template.instruction == "> {input}\n"
    assert get_template(HF) == HF


def test_unknown_template_lists_known_names():
    with pytest.raises(ConfigError) as info:
        get_template("nope", {"mine": {"instruction": "{input}"}})
    message = str(info.value)
    assert "'nope'" in message
    for name in ("default", "internlm2_chat", "llama3_chat", "chatglm2", "mixtral", "hf", "mine"):
        assert name in message


def test_chat_template_keeps_carriage_returns(tokenizer_for):
    template = template_from_config("crlf", {"instruction": "U: {input}\r\nA: ", "sep": "\r\n"}, "templates.crlf")
    assert training_text(TURNS_WITHOUT_SYSTEM, template) == "<s>U: Q1\r\nA: A1</s>\r\n<s>U: Q2\r\nA: A2</s>\r\n"
    rendered = tokenizer_for("default").apply_chat_template(
        MESSAGES_WITH_SYSTEM[1:], tokenize=False, chat_template=template.chat_template()
    )
    assert rendered == "<s>U: Q1\r\nA: A1</s>\r\n<s>U: Q2\r\nA: A2</s>\r\n"


def test_custom_template_format_spec_is_rejected_or_rendered_alike(tokenizer_for):
    fields = {"instruction": "#{round:03d} {input}\n"}
    try:
        template = template_from_config("spec", fields, "templates.spec")
    except ConfigError:
        return  # rejecting the spec is a fine fix too
    rendered = tokenizer_for("default").apply_chat_template(
        MESSAGES_WITH_SYSTEM[1:], tokenize=False, chat_template=template.chat_template()
    )
    assert training_text(TURNS_WITHOUT_SYSTEM, template) == "<s>#001 Q1\nA1</s><s>#002 Q2\nA2</s>"
    assert rendered == "<s>#001 Q1\nA1</s><s>#002 Q2\nA2</s>"
