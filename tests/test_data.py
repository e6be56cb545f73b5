"""The data stage end to end on small local files: output layout, stats, held-out split, errors."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import datasets
import pytest

from tunemake.config import load_config
from tunemake.data import build_templated_dataset, check_dataset, load_tokenizer, template_from_recipe
from tunemake.encode import IGNORE_INDEX, encode_record
from tunemake.errors import DataError
from tunemake.templates import TEMPLATES

WORDS = ["the", "quick", "brown", "fox", "capital", "France", "Paris", "sum", "42", "问答", "🎉", "hello"]


def chat_records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        turns = []
        for k in range(rng.randint(1, 3)):
            turns.append({
                "system": "Be brief." if k == 0 and rng.random() < 0.3 else "",
                "input": f"q{seed}-{i}-{k} " + " ".join(rng.choices(WORDS, k=rng.randint(1, 8))),
                "output": " ".join(rng.choices(WORDS, k=rng.randint(0, 8))),
            })
        records.append({"conversation": turns})
    return records


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


@pytest.fixture()
def sources(tmp_path):
    """chat.jsonl: 40 records + one empty conversation + one whose prompt fills max_length;
    corpus.txt: 12 pretrain lines (blank lines between some)."""
    chat = tmp_path / "raw" / "chat.jsonl"
    chat.parent.mkdir()
    records = chat_records(40, seed=1)
    records.insert(5, {"conversation": []})
    records.insert(9, {"conversation": [{"input": "long " * 200, "output": "never seen"}]})
    write_jsonl(chat, records)
    corpus = tmp_path / "raw" / "corpus.txt"
    lines = [" ".join(random.Random(i).choices(WORDS, k=12)) for i in range(12)]
    corpus.write_text("\n".join(lines[:6]) + "\n\n" + "\n".join(lines[6:]) + "\n", encoding="utf-8")
    return {"chat": chat, "corpus": corpus}


def make_recipe(tokenizer_path, chat, corpus=None, template="default", max_length=64, heldout=0.25, **exp):
    config = {
        "models": {"tiny": {"path": str(tokenizer_path), "template": template}},
        "datasets": {"chat": {"path": str(chat), "heldout_fraction": heldout}},
        "experiments": [{"model": "tiny", "datasets": ["chat"], "method": "lora", "max_length": max_length, **exp}],
    }
    if corpus is not None:
        config["datasets"]["corpus"] = {"path": str(corpus), "format": "pretrain"}
        config["experiments"][0]["datasets"].append("corpus")
    return next(iter(load_config(config)["experiments"].values()))["data_recipe"]


def read_heldout_jsonl(out_dir) -> list[dict]:
    with open(out_dir / "heldout.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def test_build_layout_and_stats(tmp_path, sources, tokenizer_dir):
    recipe = make_recipe(tokenizer_dir("default"), sources["chat"], sources["corpus"])
    out_dir = tmp_path / "templated" / "abc"
    stats = build_templated_dataset(recipe, out_dir)

    dd = datasets.load_from_disk(str(out_dir))
    assert set(dd) == {"train", "heldout"}
    assert set(dd["train"].column_names) == {"input_ids", "labels", "position_ids"}
    assert set(dd["heldout"].column_names) == {"input_ids", "labels"}
    assert json.loads((out_dir / "stats.json").read_text()) == stats
    assert json.loads((out_dir / "recipe.json").read_text()) == recipe
    assert not list(out_dir.parent.glob(".tmp-*"))

    # Counts add up, per dataset and in total.
    for name, s in stats["datasets"].items():
        assert s["records_in"] == s["train"] + s["heldout"] + sum(s["dropped"].values()), name
    chat = stats["datasets"]["chat"]
    assert chat["records_in"] == 42
    assert chat["dropped"] == {"empty_conversation": 1, "no_labels": 1, "unknown_tool": 0}
    assert chat["heldout"] >= 2
    corpus = stats["datasets"]["corpus"]
    assert corpus["records_in"] == 12 and corpus["heldout"] == 0 and corpus["train"] == 12
    assert stats["records_in"] == 54
    assert stats["records_out"] == {"train": chat["train"] + 12, "heldout": chat["heldout"]}
    assert stats["records_in"] == sum(stats["records_out"].values()) + sum(stats["dropped"].values())

    # Rows: all max_length but the last; tokens and efficiency as reported.
    train = dd["train"]
    lengths = [len(row) for row in train["input_ids"]]
    assert all(length == 64 for length in lengths[:-1]) and 0 < lengths[-1] <= 64
    assert stats["rows"] == len(train) and stats["tokens"] == sum(lengths)
    assert stats["packing_efficiency"] == pytest.approx(sum(lengths) / (len(lengths) * 64), abs=1e-6)
    assert stats["trained_tokens"] == sum(label != IGNORE_INDEX for row in train["labels"] for label in row)
    assert stats["heldout_tokens"] == sum(len(row) for row in dd["heldout"]["input_ids"])
    for row in train:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"])
        assert row["position_ids"][0] == 0


def test_heldout_rows_match_heldout_jsonl_and_train_holds_the_rest(tmp_path, sources, tokenizer_dir):
    recipe = make_recipe(tokenizer_dir("internlm2_chat"), sources["chat"], sources["corpus"], template="internlm2_chat")
    out_dir = tmp_path / "out"
    build_templated_dataset(recipe, out_dir)
    dd = datasets.load_from_disk(str(out_dir))
    heldout_records = read_heldout_jsonl(out_dir)
    assert len(heldout_records) == len(dd["heldout"]) >= 2

    tokenizer = load_tokenizer(recipe["tokenizer"])
    template = TEMPLATES["internlm2_chat"]
    for record, row in zip(heldout_records, dd["heldout"]):
        assert record["dataset"] == "chat"
        enc = encode_record(record["conversation"], tokenizer, template, 64)
        assert (row["input_ids"], row["labels"]) == (enc.input_ids, enc.labels)

    # Train holds exactly the other records' tokens (in some order, packed).
    held = [json.dumps(r["conversation"], sort_keys=True) for r in heldout_records]
    expected = Counter()
    for line in sources["chat"].read_text(encoding="utf-8").splitlines():
        turns = [{"system": t.get("system", ""), "input": t.get("input", ""), "output": t["output"]}
                 for t in json.loads(line)["conversation"]]
        if not turns or json.dumps(turns, sort_keys=True) in held:
            continue
        enc = encode_record(turns, tokenizer, template, 64)
        if any(label != IGNORE_INDEX for label in enc.labels):
            expected.update(zip(enc.input_ids, enc.labels))
    for line in sources["corpus"].read_text(encoding="utf-8").splitlines():
        if line.strip():
            enc = encode_record([{"input": "", "output": line.strip()}], tokenizer, template, 64, pretrain=True)
            expected.update(zip(enc.input_ids, enc.labels))
    got = Counter(pair for row in dd["train"] for pair in zip(row["input_ids"], row["labels"]))
    assert got == expected


def test_heldout_split_is_stable_when_records_are_appended(tmp_path, sources, tokenizer_dir):
    def heldout_conversations(out_dir):
        return {json.dumps(r["conversation"], sort_keys=True) for r in read_heldout_jsonl(out_dir)}

    chat = sources["chat"]
    recipe = make_recipe(tokenizer_dir("default"), chat)
    build_templated_dataset(recipe, tmp_path / "before")
    before = heldout_conversations(tmp_path / "before")
    original = chat.read_text(encoding="utf-8")
    with open(chat, "a", encoding="utf-8") as handle:
        for record in chat_records(60, seed=2):
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    build_templated_dataset(recipe, tmp_path / "after")
    after = heldout_conversations(tmp_path / "after")

    assert len(before) >= 2 and len(after) > len(before)
    originals = {
        json.dumps([{"system": t.get("system", ""), "input": t.get("input", ""), "output": t["output"]}
                    for t in json.loads(line)["conversation"]], sort_keys=True)
        for line in original.splitlines()
    }
    assert after & originals == before


def test_build_is_reproducible(tmp_path, sources, tokenizer_dir):
    recipe = make_recipe(tokenizer_dir("default"), sources["chat"], sources["corpus"])
    build_templated_dataset(recipe, tmp_path / "one")
    build_templated_dataset(recipe, tmp_path / "two")
    one, two = (datasets.load_from_disk(str(tmp_path / d)) for d in ("one", "two"))
    for split in ("train", "heldout"):
        assert one[split].to_dict() == two[split].to_dict()
    assert (tmp_path / "one" / "heldout.jsonl").read_bytes() == (tmp_path / "two" / "heldout.jsonl").read_bytes()


def test_rebuild_replaces_the_output(tmp_path, sources, tokenizer_dir):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "stale.txt").write_text("old")
    build_templated_dataset(make_recipe(tokenizer_dir("default"), sources["chat"]), out_dir)
    assert not (out_dir / "stale.txt").exists()
    assert (out_dir / "stats.json").exists()


def test_data_seed_changes_the_packing_order_only(tmp_path, sources, tokenizer_dir):
    a = build_templated_dataset(make_recipe(tokenizer_dir("default"), sources["chat"]), tmp_path / "a")
    b = build_templated_dataset(make_recipe(tokenizer_dir("default"), sources["chat"], data_seed=1), tmp_path / "b")
    assert a["tokens"] == b["tokens"] and a["records_out"] == b["records_out"]
    train_a = datasets.load_from_disk(str(tmp_path / "a"))["train"]["input_ids"]
    train_b = datasets.load_from_disk(str(tmp_path / "b"))["train"]["input_ids"]
    assert train_a != train_b
    assert Counter(t for row in train_a for t in row) == Counter(t for row in train_b for t in row)


def test_without_packing_one_row_per_record(tmp_path, sources, tokenizer_dir):
    stats = build_templated_dataset(
        make_recipe(tokenizer_dir("default"), sources["chat"], packing=False), tmp_path / "out")
    train = datasets.load_from_disk(str(tmp_path / "out"))["train"]
    assert len(train) == stats["records_out"]["train"] == stats["rows"]
    for row in train:
        assert row["position_ids"] == list(range(len(row["input_ids"])))


def test_no_trainable_record_is_an_error_and_writes_nothing(tmp_path, tokenizer_dir):
    chat = tmp_path / "chat.jsonl"
    write_jsonl(chat, [{"conversation": [{"system": "A long system prompt that fills everything",
                                          "input": "and a question as well", "output": "answer"}]}] * 3)
    recipe = make_recipe(tokenizer_dir("default"), chat, max_length=8, heldout=0.0)
    out_dir = tmp_path / "templated" / "key"
    with pytest.raises(DataError) as info:
        build_templated_dataset(recipe, out_dir)
    assert str(info.value).startswith(f"{chat}:")
    assert "no trainable record" in str(info.value)
    assert not out_dir.exists()
    assert not list(out_dir.parent.glob(".tmp-*"))


def test_malformed_line_is_an_error_and_writes_nothing(tmp_path, sources, tokenizer_dir):
    chat = sources["chat"]
    lines = chat.read_text(encoding="utf-8").splitlines()
    lines[6] = '{"conversation": [{"input": "x", "output": }]}'
    chat.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out_dir = tmp_path / "templated" / "key"
    with pytest.raises(DataError) as info:
        build_templated_dataset(make_recipe(tokenizer_dir("default"), chat), out_dir)
    assert str(info.value).startswith(f"{chat}:7:")
    assert not out_dir.exists()
    assert not list(out_dir.parent.glob(".tmp-*"))


def test_missing_key_names_file_and_line(tmp_path, sources, tokenizer_dir):
    chat = sources["chat"]
    lines = chat.read_text(encoding="utf-8").splitlines()
    lines[2] = json.dumps({"conversation": [{"input": "x", "answer": "y"}]})
    chat.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{re.escape(str(chat))}:3: conversation\[0\]: missing key 'output'"):
        build_templated_dataset(make_recipe(tokenizer_dir("default"), chat), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unloadable_tokenizer_is_a_data_error(tmp_path, sources):
    recipe = make_recipe(tmp_path / "no-tokenizer-here", sources["chat"])
    (tmp_path / "no-tokenizer-here").mkdir()
    with pytest.raises(DataError, match="cannot load a tokenizer"):
        build_templated_dataset(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_template_from_recipe_round_trips(tokenizer_dir, sources):
    for name in ("default", "internlm2_chat", "llama3_chat"):
        recipe = make_recipe(tokenizer_dir("default"), sources["chat"], template=name)
        template = template_from_recipe(recipe["template"])
        for field in ("system", "instruction", "suffix", "suffix_as_eos", "sep"):
            assert getattr(template, field) == getattr(TEMPLATES[name], field)


def test_check_dataset_marks_trained_spans(tmp_path, tokenizer_for):
    chat = tmp_path / "chat.jsonl"
    write_jsonl(chat, [
        {"conversation": [{"input": "hello", "output": "the fox"}, {"input": "again", "output": "Paris"}]},
        {"conversation": []},
        {"conversation": [{"input": "x", "output": "y"}]},
        {"conversation": [{"input": "never shown", "output": "z"}]},
    ])
    tokenizer = tokenizer_for("default")
    dataset = {"name": "chat", "format": "conversation"}
    text = check_dataset(dataset, [str(chat)], tokenizer, TEMPLATES["default"], 64, count=3)
    blocks = text.split("--- ")[1:]
    assert len(blocks) == 3
    assert blocks[0].startswith(f"{chat}:1: ")
    assert "<s><|User|>:hello\n<|Bot|>:[[the fox</s>]]\n<s><|User|>:again\n<|Bot|>:[[Paris</s>]]\n" in blocks[0]
    assert blocks[1].startswith(f"{chat}:2") and "dropped: empty conversation" in blocks[1]
    assert "<|Bot|>:[[y</s>]]" in blocks[2]
    assert "never shown" not in text

    truncated = check_dataset(dataset, [str(chat)], tokenizer, TEMPLATES["default"], 8, count=1)
    assert "(truncated)" in truncated and "(dropped: no labelled token)" in truncated
    assert "[[" not in truncated


def test_check_dataset_internlm2_suffix_is_trained(tmp_path, tokenizer_for):
    chat = tmp_path / "chat.jsonl"
    write_jsonl(chat, [{"conversation": [{"system": "S", "input": "hi", "output": "yo"}]}])
    text = check_dataset({"format": "conversation"}, [str(chat)], tokenizer_for("internlm2_chat"),
                         TEMPLATES["internlm2_chat"], 64)
    assert text.endswith(
        "<s><|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        "[[yo<|im_end|>]]\n"
    )


def test_heldout_membership_stable_for_a_small_dataset(tmp_path, tokenizer_dir):
    from tunemake.data import split_heldout

    def turns(i):
        return [{"system": "", "input": f"question {i}", "output": f"answer {i}"}]

    fraction = 0.1
    train_only = [i for i in range(200) if not split_heldout(turns(i), fraction, 0)][:3]
    held = next(i for i in range(200) if split_heldout(turns(i), fraction, 0))
    chat = tmp_path / "chat.jsonl"
    write_jsonl(chat, [{"conversation": turns(i)} for i in train_only])
    recipe = make_recipe(tokenizer_dir("default"), chat, heldout=fraction)
    build_templated_dataset(recipe, tmp_path / "before")
    before = [r["conversation"] for r in read_heldout_jsonl(tmp_path / "before")]

    with open(chat, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"conversation": turns(held)}) + "\n")
    build_templated_dataset(recipe, tmp_path / "after")
    after = [r["conversation"] for r in read_heldout_jsonl(tmp_path / "after")]
    originals = [turns(i) for i in train_only]
    assert [c for c in after if c in originals] == [c for c in before if c in originals]


def test_dataset_without_heldout_loads_back(tmp_path, sources, tokenizer_dir):
    recipe = make_recipe(tokenizer_dir("default"), sources["chat"], heldout=0.0)
    build_templated_dataset(recipe, tmp_path / "out")
    dd = datasets.load_from_disk(str(tmp_path / "out"))
    assert len(dd["heldout"]) == 0 and len(dd["train"]) > 0
    assert (tmp_path / "out" / "heldout.jsonl").read_text() == ""


def test_a_template_the_tokenizer_cannot_encode_is_refused(tmp_path, sources):
    """chatglm2's 问/答 with a tokenizer that has no Chinese: every prompt would hold [UNK]."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(WordLevel({"[UNK]": 0, "</s>": 1, "<s>": 2, "Round": 3}, unk_token="[UNK]"))
    words.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", eos_token="</s>",
                            bos_token="<s>").save_pretrained(tmp_path / "word_level")
    out_dir = tmp_path / "templated" / "key"
    recipe = make_recipe(tmp_path / "word_level", sources["chat"], template="chatglm2")
    with pytest.raises(DataError, match=r"template 'chatglm2': its instruction .* encodes to the unknown token "
                                        r"'\[UNK\]', in the tokenizer .*word_level: a template the tokenizer can't encode"):
        build_templated_dataset(recipe, out_dir)
    assert not out_dir.exists() and not list(out_dir.parent.glob(".tmp-*"))
