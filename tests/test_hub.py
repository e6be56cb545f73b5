"""Hub datasets go through the real ``datasets.load_dataset`` path (pointed at a local dataset dir)."""

from __future__ import annotations

import json

import pytest

from tunemake.config import load_config
from tunemake.data import build_templated_dataset
from tunemake.errors import DataError


def _config(tokenizer_path, dataset_dir, fmt="alpaca"):
    return load_config({
        "models": {"tok": {"path": str(tokenizer_path), "template": "default"}},
        "datasets": {"remote": {"hub": str(dataset_dir), "split": "train", "format": fmt}},
        "experiments": [{"model": "tok", "datasets": "remote", "method": "lora", "max_length": 64}],
    })


def test_hub_dataset_is_loaded_with_load_dataset(tmp_path, tokenizer_dir):
    ds_dir = tmp_path / "hub_dataset"
    ds_dir.mkdir()
    rows = [{"instruction": f"Say {i}", "input": "", "output": str(i)} for i in range(20)]
    rows.append({"instruction": "Say nothing", "input": "", "output": "<nooutput>"})
    (ds_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    exp = _config(tokenizer_dir("default"), ds_dir)["experiments"]["tok_lora_remote"]
    assert exp["data_recipe"]["datasets"][0]["hub"] == str(ds_dir)
    stats = build_templated_dataset(exp["data_recipe"], tmp_path / "out")
    assert stats["records_in"] == 21
    assert stats["records_out"]["train"] == 20
    assert stats["dropped"]["empty_conversation"] == 1


def test_hub_record_errors_name_the_row(tmp_path, tokenizer_dir):
    ds_dir = tmp_path / "hub_dataset"
    ds_dir.mkdir()
    (ds_dir / "train.jsonl").write_text(json.dumps({"text": "### Human: hi"}) + "\n")
    exp = _config(tokenizer_dir("default"), ds_dir, fmt="alpaca")["experiments"]["tok_lora_remote"]
    with pytest.raises(DataError, match=r"^hub:.*hub_dataset\[train\]: row 0: missing key 'output'"):
        build_templated_dataset(exp["data_recipe"], tmp_path / "out")
    assert not (tmp_path / "out").exists()

