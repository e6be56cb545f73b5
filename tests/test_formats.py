"""Formats: XTuner's map functions with their edge cases, and the readers' file:line errors."""

from __future__ import annotations

import json
import re

import pytest

from tunemake.errors import DataError
from tunemake.formats import (
    MAP_FUNCTIONS,
    map_alpaca,
    map_conversation,
    map_custom,
    map_oasst1,
    map_openai,
    map_pretrain,
    read_dataset,
    read_file,
)

LOC = "data.jsonl:7"


# --- map functions ------------------------------------------------------------------------------


def test_alpaca_joins_instruction_and_input():
    record = {"instruction": "Translate.", "input": "Hallo", "output": "Hello"}
    assert map_alpaca(record, LOC) == [{"system": "", "input": "Translate.\nHallo", "output": "Hello"}]


def test_alpaca_empty_input_leaves_trailing_newline():
    record = {"instruction": "Say hi.", "input": "", "output": "Hi"}
    assert map_alpaca(record, LOC) == [{"system": "", "input": "Say hi.\n", "output": "Hi"}]
    record = {"instruction": "Say hi.", "output": "Hi"}  # no input key at all
    assert map_alpaca(record, LOC)[0]["input"] == "Say hi.\n"


def test_alpaca_nooutput_drops_the_record():
    record = {"instruction": "Say hi.", "input": "", "output": "<nooutput>"}
    assert map_alpaca(record, LOC) == []


def test_alpaca_missing_instruction():
    with pytest.raises(DataError, match=r"^data\.jsonl:7: missing key 'instruction'"):
        map_alpaca({"output": "x"}, LOC)


def test_oasst1_multi_turn():
    text = (
        "### Human: Can you explain xxx ### Assistant: Sure! xxx"
        "### Human: I didn't understand how xxx### Assistant: It has to do with a process xxx."
    )
    assert map_oasst1({"text": text}, LOC) == [
        {"system": "", "input": "Can you explain xxx", "output": "Sure! xxx"},
        {"system": "", "input": "I didn't understand how xxx", "output": "It has to do with a process xxx."},
    ]


def test_oasst1_trailing_human_turn_dropped():
    text = "### Human: Q1 ### Assistant: A1 ### Human: unanswered"
    assert map_oasst1({"text": text}, LOC) == [{"system": "", "input": "Q1", "output": "A1"}]
    assert map_oasst1({"text": "### Human: alone"}, LOC) == []


def test_openai_roles():
    messages = [
        {"role": "assistant", "content": "leading, skipped"},
        {"role": "assistant", "content": "also skipped"},
        {"role": "user", "content": "Hel"},
        {"role": "user", "content": "lo"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye."},
        {"role": "user", "content": "no answer, dropped"},
    ]
    assert map_openai({"messages": messages}, LOC) == [
        {"system": "", "input": "Hello", "output": "Hi!"},
        {"system": "Be terse.", "input": "Bye", "output": "Bye."},
    ]


def test_openai_system_first():
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a2"},
    ]
    assert map_openai({"messages": messages}, LOC) == [
        {"system": "S", "input": "u", "output": "a"},
        {"system": "", "input": "u2", "output": "a2"},
    ]


def test_openai_unknown_role_names_the_location():
    messages = [{"role": "user", "content": "u"}, {"role": "function", "content": "x"}]
    with pytest.raises(DataError) as info:
        map_openai({"messages": messages}, LOC)
    assert str(info.value).startswith("data.jsonl:7:")
    assert "'function'" in str(info.value)


def test_openai_message_without_content():
    with pytest.raises(DataError, match=r"^data\.jsonl:7: messages\[1\]: missing key 'content'"):
        map_openai({"messages": [{"role": "user", "content": "u"}, {"role": "assistant"}]}, LOC)


def test_pretrain_strips_text():
    assert map_pretrain({"text": "  \n some text \n\n"}, LOC) == [{"system": "", "input": "", "output": "some text"}]


def test_custom_field_mapping_with_system():
    fields = {"input": "question", "output": "answer", "system": "persona"}
    record = {"question": "Q", "answer": "A", "persona": "P", "other": 1}
    assert map_custom(record, LOC, fields) == [{"system": "P", "input": "Q", "output": "A"}]
    record = {"question": "Q", "answer": "A"}  # system column missing: empty
    assert map_custom(record, LOC, fields) == [{"system": "", "input": "Q", "output": "A"}]
    with pytest.raises(DataError, match=r"^data\.jsonl:7: missing key 'answer'"):
        map_custom({"question": "Q"}, LOC, fields)


def test_custom_defaults_to_input_output():
    assert map_custom({"input": "i", "output": "o"}, LOC, {"input": "input", "output": "output", "system": None}) == [
        {"system": "", "input": "i", "output": "o"}
    ]


def test_conversation_passthrough():
    record = {"conversation": [
        {"system": "S", "input": "i1", "output": "o1"},
        {"input": "i2", "output": "o2"},
        {"output": "o3"},
    ]}
    assert map_conversation(record, LOC) == [
        {"system": "S", "input": "i1", "output": "o1"},
        {"system": "", "input": "i2", "output": "o2"},
        {"system": "", "input": "", "output": "o3"},
    ]


def test_conversation_errors_name_the_turn():
    with pytest.raises(DataError, match=r"^data\.jsonl:7: conversation\[1\]: missing key 'output'"):
        map_conversation({"conversation": [{"input": "a", "output": "b"}, {"input": "c"}]}, LOC)
    with pytest.raises(DataError, match=r"^data\.jsonl:7: key 'conversation' should be list, got str"):
        map_conversation({"conversation": "hi"}, LOC)
    with pytest.raises(DataError, match=r"^data\.jsonl:7: expected a JSON object, got list"):
        map_conversation([1, 2], LOC)


# --- per-turn loss: XTuner's output_with_loss ----------------------------------------------------


def test_conversation_output_with_loss():
    record = {"conversation": [
        {"input": "i1", "output": "o1", "output_with_loss": False},
        {"input": "i2", "output": "o2", "output_with_loss": True},
        {"input": "i3", "output": "o3", "output_with_loss": None},  # Arrow's "absent"
        {"input": "i4", "output": "o4"},
    ]}
    assert map_conversation(record, LOC) == [
        {"system": "", "input": "i1", "output": "o1", "output_with_loss": False},
        {"system": "", "input": "i2", "output": "o2"},
        {"system": "", "input": "i3", "output": "o3"},
        {"system": "", "input": "i4", "output": "o4"},
    ]


@pytest.mark.parametrize("value", ["false", 0, 1, "no"])
def test_conversation_output_with_loss_must_be_a_boolean(value):
    record = {"conversation": [{"input": "i", "output": "o"}, {"input": "i", "output": "o", "output_with_loss": value}]}
    with pytest.raises(DataError, match=r"^data\.jsonl:7: conversation\[1\]: key 'output_with_loss' should be bool"):
        map_conversation(record, LOC)


def _openai_with_loss(*losses):
    """A two-turn openai record; each loss is the assistant message's "loss" value, or ABSENT."""
    messages = [{"role": "system", "content": "S"}]
    for k, loss in enumerate(losses):
        messages.append({"role": "user", "content": f"u{k}"})
        messages.append({"role": "assistant", "content": f"a{k}", **({} if loss is ABSENT else {"loss": loss})})
    return {"messages": messages}


ABSENT = object()


@pytest.mark.parametrize("loss, trained", [
    (False, False), ("False", False), ("false", False), (0, False), (1, False), ("no", False), ("", False),
    (ABSENT, True), (True, True), ("True", True), ("true", True), ("TRUE", True),
    (None, True),  # null: what Arrow-backed sources write for a key other messages have
])
def test_openai_loss_key_as_xtuner(loss, trained):
    """XTuner: str(msg.get("loss", "True")).lower() == "true" decides each assistant turn."""
    turns = map_openai(_openai_with_loss(loss, ABSENT), LOC)
    expected_first = {"system": "S", "input": "u0", "output": "a0"}
    if not trained:
        expected_first["output_with_loss"] = False
    assert turns == [expected_first, {"system": "", "input": "u1", "output": "a1"}]


def test_openai_loss_on_a_user_message_is_ignored():
    messages = [{"role": "user", "content": "u", "loss": False}, {"role": "assistant", "content": "a"}]
    assert map_openai({"messages": messages}, LOC) == [{"system": "", "input": "u", "output": "a"}]


def test_custom_loss_column():
    fields = {"input": "q", "output": "a", "system": None, "loss": "train_me"}
    assert map_custom({"q": "Q", "a": "A", "train_me": False}, LOC, fields) == [
        {"system": "", "input": "Q", "output": "A", "output_with_loss": False}
    ]
    assert map_custom({"q": "Q", "a": "A", "train_me": True}, LOC, fields) == [{"system": "", "input": "Q", "output": "A"}]
    assert map_custom({"q": "Q", "a": "A"}, LOC, fields) == [{"system": "", "input": "Q", "output": "A"}]
    with pytest.raises(DataError, match=r"^data\.jsonl:7: key 'train_me' should be bool, got str"):
        map_custom({"q": "Q", "a": "A", "train_me": "no"}, LOC, fields)
    # without a loss column, a column that happens to be called "loss" means nothing
    assert map_custom({"q": "Q", "a": "A", "loss": False}, LOC, {"input": "q", "output": "a"}) == [
        {"system": "", "input": "Q", "output": "A"}
    ]


def test_check_dataset_leaves_untrained_turns_unmarked(tmp_path, tokenizer_for):
    from tunemake.data import check_dataset
    from tunemake.templates import TEMPLATES

    chat = tmp_path / "chat.jsonl"
    path = write_jsonl(chat, [
        {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "the fox", "loss": False},
                      {"role": "user", "content": "again"}, {"role": "assistant", "content": "Paris"}]},
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "loss": "False"}]},
    ])
    text = check_dataset({"name": "chat", "format": "openai"}, [path], tokenizer_for("default"),
                         TEMPLATES["default"], 64, count=2)
    first, second = text.split("--- ")[1:]
    assert "\n<s><|User|>:hello\n<|Bot|>:the fox</s>\n<s><|User|>:again\n<|Bot|>:[[Paris</s>]]\n" in first
    assert "(dropped" not in first
    assert second.startswith(f"{path}:2: ") and "0 trained" in second
    assert "(dropped: no labelled token)" in second
    assert second.endswith("<s><|User|>:x\n<|Bot|>:y</s>\n") and "[[" not in second


def test_build_drops_records_with_every_turn_untrained(tmp_path, tokenizer_dir):
    """Through the config schema (fields.loss) to the built dataset's stats."""
    from tunemake.config import load_config
    from tunemake.data import build_templated_dataset

    rows = tmp_path / "rows.jsonl"
    write_jsonl(rows, [
        {"q": "What is the capital of France?", "a": "Paris", "keep": True},
        {"q": "Add 12 and 30.", "a": "42", "keep": False},
        {"q": "Hello", "a": "world"},
    ])
    config = {
        "models": {"tiny": {"path": str(tokenizer_dir("default")), "template": "default"}},
        "datasets": {"rows": {"path": str(rows), "format": "custom",
                              "fields": {"input": "q", "output": "a", "loss": "keep"}}},
        "experiments": [{"model": "tiny", "datasets": "rows", "method": "lora", "max_length": 64}],
    }
    recipe = next(iter(load_config(config)["experiments"].values()))["data_recipe"]
    stats = build_templated_dataset(recipe, tmp_path / "out")
    assert stats["records_out"]["train"] == 2
    assert stats["dropped"]["no_labels"] == 1


def test_every_format_has_a_map_function():
    assert set(MAP_FUNCTIONS) == {"conversation", "oasst1", "alpaca", "openai", "pretrain", "custom", "sharegpt",
                                  "moss_sft", "msagent_react"}


# --- readers ------------------------------------------------------------------------------------


def write_jsonl(path, records, blank_after=None):
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_jsonl_locations_are_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}, {"text": "two"}, {"text": "three"}], blank_after=1)
    assert list(read_file(path)) == [
        (f"{path}:1", {"text": "one"}),
        (f"{path}:3", {"text": "two"}),
        (f"{path}:4", {"text": "three"}),
    ]


def test_jsonl_crlf_line_endings(tmp_path):
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(b'{"text": "a"}\r\n{"text": "b"}\r\n')
    assert [loc for loc, _ in read_file(str(path))] == [f"{path}:1", f"{path}:2"]


def test_jsonl_line_separator_inside_a_string(tmp_path):
    records = [{"text": "first\u2028second"}, {"text": "next\u0085line"}]
    path = write_jsonl(tmp_path / "u2028.jsonl", records)
    assert list(read_file(path)) == [(f"{path}:1", records[0]), (f"{path}:2", records[1])]


def test_txt_lines_split_only_at_newlines(tmp_path):
    path = tmp_path / "ff.txt"
    path.write_text("page one\x0cstill line one\nline two\n", encoding="utf-8")
    assert list(read_file(str(path))) == [
        (f"{path}:1", {"text": "page one\x0cstill line one"}),
        (f"{path}:2", {"text": "line two"}),
    ]


def test_jsonl_malformed_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n{"text": "ok"}\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        list(read_file(str(path)))
    assert str(info.value).startswith(f"{path}:3:")
    assert "invalid JSON" in str(info.value)


@pytest.mark.parametrize(
    "fmt, record, message",
    [
        ("alpaca", {"instruction": "i", "input": ""}, "missing key 'output'"),
        ("alpaca", {"instruction": "i", "input": "", "output": 3}, "key 'output' should be str, got int"),
        ("pretrain", {"txt": "x"}, "missing key 'text'"),
        ("oasst1", {"text": None}, "missing key 'text'"),
        ("openai", {"messages": {"role": "user"}}, "key 'messages' should be list, got dict"),
        ("conversation", "just a string", "expected a JSON object, got str"),
    ],
)
def test_read_dataset_field_errors_name_file_and_line(tmp_path, fmt, record, message):
    path = write_jsonl(tmp_path / "d.jsonl", [_valid(fmt), record])
    with pytest.raises(DataError) as info:
        list(read_dataset({"format": fmt}, [path]))
    assert str(info.value).startswith(f"{path}:2: ")
    assert message in str(info.value)


def _valid(fmt):
    return {
        "alpaca": {"instruction": "i", "input": "", "output": "o"},
        "pretrain": {"text": "t"},
        "oasst1": {"text": "### Human: a ### Assistant: b"},
        "openai": {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
        "conversation": {"conversation": [{"input": "i", "output": "o"}]},
    }[fmt]


def test_read_dataset_yields_location_raw_and_turns(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "i", "input": "x", "output": "o"}])
    assert list(read_dataset({"format": "alpaca"}, [path])) == [
        (f"{path}:1", {"instruction": "i", "input": "x", "output": "o"},
         [{"system": "", "input": "i\nx", "output": "o"}])
    ]


def test_read_dataset_unknown_format():
    with pytest.raises(DataError, match="unknown format 'chatml'"):
        list(read_dataset({"format": "chatml"}, []))


def test_json_list(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b"}]), encoding="utf-8")
    records = list(read_file(str(path)))
    assert [r for _, r in records] == [{"text": "a"}, {"text": "b"}]
    assert records[1][0].startswith(str(path)) and "1" in records[1][0][len(str(path)):]


def test_json_object_holding_data_list(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"version": 2, "data": [{"text": "a"}, {"text": "b"}]}), encoding="utf-8")
    assert [r for _, r in read_file(str(path))] == [{"text": "a"}, {"text": "b"}]


def test_json_errors(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"text": "a"},\n {"text": }\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: invalid JSON"):
        list(read_file(str(path)))
    path.write_text('{"a": [], "b": []}', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: "):
        list(read_file(str(path)))
    path.write_text('"a string"', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: "):
        list(read_file(str(path)))


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"input": ["q1", "q2", "q3"], "output": ["a1", "a2", "a3"]}), path)
    records = list(read_file(str(path)))
    assert [r for _, r in records] == [
        {"input": "q1", "output": "a1"}, {"input": "q2", "output": "a2"}, {"input": "q3", "output": "a3"},
    ]
    assert [loc for loc, _ in records] == [f"{path}: row 0", f"{path}: row 1", f"{path}: row 2"]
    dataset = {"format": "custom", "fields": {"input": "input", "output": "output"}}
    turns = [t for _, _, t in read_dataset(dataset, [str(path)])]
    assert turns[2] == [{"system": "", "input": "q3", "output": "a3"}]


def test_parquet_damaged(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"not a parquet file at all")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: cannot read parquet"):
        list(read_file(str(path)))


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("a.jsonl", "", "the file is empty: no record to read"),
        ("a.jsonl", "\n \r\n\n", "the file is empty: no record to read"),
        ("a.txt", "\n\n", "the file is empty: no record to read"),
        ("a.json", "[]", "the list of records is empty: no record to read"),
        ("a.json", '{"data": []}', "the list of records is empty: no record to read"),
        ("a.parquet", None, "the table has no rows: no record to read"),
    ],
)
def test_a_file_without_records_is_an_error(tmp_path, name, content, message):
    path = tmp_path / name
    if content is None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": pa.array([], type=pa.string())}), path)
    else:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as info:
        list(read_file(str(path), "file"))
    assert str(info.value) == f"{path}: {message}"


TXT = "first line\nsecond line\n\n\nthird paragraph line 1\nline 2\n  \nlast\n"


def test_txt_lines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(TXT, encoding="utf-8")
    assert list(read_file(str(path), "line")) == [
        (f"{path}:1", {"text": "first line"}),
        (f"{path}:2", {"text": "second line"}),
        (f"{path}:5", {"text": "third paragraph line 1"}),
        (f"{path}:6", {"text": "line 2"}),
        (f"{path}:8", {"text": "last"}),
    ]


def test_txt_paragraphs(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(TXT, encoding="utf-8")
    assert list(read_file(str(path), "paragraph")) == [
        (f"{path}:1", {"text": "first line\nsecond line"}),
        (f"{path}:5", {"text": "third paragraph line 1\nline 2"}),
        (f"{path}:8", {"text": "last"}),
    ]


def test_txt_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(TXT, encoding="utf-8")
    assert list(read_file(str(path), "file")) == [(f"{path}:1", {"text": TXT})]


def test_non_utf8_names_the_line(tmp_path):
    for suffix in (".txt", ".jsonl"):
        path = tmp_path / f"latin1{suffix}"
        path.write_bytes(b'{"text": "a"}\n{"text": "b"}\n{"text": "caf\xe9"}\n')
        with pytest.raises(DataError) as info:
            list(read_file(str(path)))
        assert str(info.value).startswith(f"{path}:3:")
        assert "UTF-8" in str(info.value)


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: no such file"):
        list(read_file(str(path)))
    with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path))}: "):
        list(read_file(str(tmp_path)))


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("a,b\n1,2\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        list(read_file(str(path)))
    assert str(info.value).startswith(f"{path}:")
    assert "'.csv'" in str(info.value)


def test_read_dataset_reads_files_in_order(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "1"}, {"text": "2"}])
    b = tmp_path / "b.txt"
    b.write_text("3\n\n4\n", encoding="utf-8")
    got = [(loc, turns[0]["output"]) for loc, _, turns in read_dataset({"format": "pretrain"}, [a, str(b)])]
    assert got == [(f"{a}:1", "1"), (f"{a}:2", "2"), (f"{b}:1", "3"), (f"{b}:3", "4")]
