"""The tunemake command: listings, check-dataset, build-data, and errors as one line + exit 1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tunemake.cli import main
from tunemake.templates import TEMPLATES

REPO = Path(__file__).resolve().parents[1]


def test_list_templates_names_every_template(capsys):
    assert main(["list-templates"]) == 0
    out = capsys.readouterr().out
    listed = {line.split()[0] for line in out.splitlines()}
    assert listed == set(TEMPLATES) | {"hf"}
    assert repr("<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n") in out


def test_list_formats(capsys):
    assert main(["list-formats"]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines()}
    assert listed == {"conversation", "oasst1", "alpaca", "openai", "sharegpt", "moss_sft", "msagent_react",
                      "pretrain", "custom"}


def test_list_experiments_on_the_demo_config(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["list-experiments"]) == 0
    out = capsys.readouterr().out
    assert "tiny_full_corpus\n" in out
    assert "tiny_full_corpus_lora_embed_tasks\n  from experiment tiny_full_corpus" in out


@pytest.fixture
def project(tmp_path, tokenizer_dir):
    tok = tokenizer_dir("internlm2_chat")
    (tmp_path / "chat.jsonl").write_text(
        json.dumps({"conversation": [{"system": "Be brief.", "input": "Hi", "output": "Hello!"}]}) + "\n"
        + json.dumps({"conversation": [{"input": "2+2?", "output": "4"}, {"input": "Double it", "output": "8"}]}) + "\n"
    )
    config = {
        "models": {"tok": {"path": str(tok), "template": "internlm2_chat"}},
        "datasets": {"chat": {"path": "chat.jsonl"}},
        "experiments": [{"model": "tok", "datasets": "chat", "method": "lora", "max_length": 64}],
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def test_check_dataset_marks_trained_spans(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    assert main(["check-dataset", "chat", "-n", "2", "--no-color"]) == 0
    out = capsys.readouterr().out
    assert "chat.jsonl:1:" in out and "chat.jsonl:2:" in out
    assert "[[Hello!<|im_end|>]]" in out
    assert "[[4<|im_end|>]]" in out and "[[8<|im_end|>]]" in out
    assert "[[Be brief" not in out


def test_build_data_writes_where_the_workflow_would(project, monkeypatch, capsys):
    from tunemake.config import load_config
    from tunemake.paths import templated_dataset

    monkeypatch.chdir(project)
    assert main(["build-data", "tok_lora_chat"]) == 0
    key = load_config("config.yaml")["experiments"]["tok_lora_chat"]["data_key"]
    built = project / templated_dataset(key)
    assert (built / "stats.json").exists()
    capsys.readouterr()

    # built: left alone, or Snakemake would retrain every epoch on it
    before = built.stat().st_mtime_ns
    assert main(["build-data", "tok_lora_chat"]) == 0
    assert "already built, left as it is" in capsys.readouterr().out
    assert built.stat().st_mtime_ns == before
    assert main(["build-data", "tok_lora_chat", "--out", "copy"]) == 0  # --out builds, beside it
    def files(root):
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != "stats.json"}

    assert files(built) and files(project / "copy") == files(built)


def test_errors_are_one_line_and_exit_1(project):
    with open(project / "chat.jsonl", "a") as handle:
        handle.write('{"conversation": [{"input": "x"}]}\n')
    proc = subprocess.run(
        [sys.executable, "-m", "tunemake.cli", "build-data", "tok_lora_chat"],
        cwd=project, capture_output=True, text=True,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == "error: chat.jsonl:3: conversation[0]: missing key 'output'"
    assert not (project / "data" / "templated").exists() or not any((project / "data" / "templated").iterdir())


def test_unknown_experiment(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    assert main(["build-data", "nope"]) == 1
    assert "unknown experiment 'nope'" in capsys.readouterr().err


def test_check_dataset_on_an_empty_file_is_one_error_line(project):
    (project / "chat.jsonl").write_text("")
    proc = subprocess.run([sys.executable, "-m", "tunemake.cli", "check-dataset", "chat"],
                          cwd=project, capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == ["error: config.yaml: datasets.chat.path: chat.jsonl is empty"]
    assert proc.stdout == ""


def test_check_dataset_on_a_file_of_blank_lines(project, monkeypatch, capsys):
    (project / "chat.jsonl").write_text("\n  \n")
    monkeypatch.chdir(project)
    assert main(["check-dataset", "chat", "--no-color"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == "error: chat.jsonl: the file is empty: no record to read"


def test_only_commands_that_read_data_check_the_data_files(project, monkeypatch, capsys):
    config = yaml.safe_load((project / "config.yaml").read_text())
    config["datasets"]["chat"]["path"] = "raw/*.jsonl"
    (project / "config.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(project)
    assert main(["list-experiments"]) == 0
    assert main(["check-dataset", "chat"]) == 1
    assert "error: config.yaml: datasets.chat.path: 'raw/*.jsonl' matches no file" in capsys.readouterr().err


def test_output_into_a_closed_pipe_ends_quietly():
    """`tunemake list-templates | head -1`: the reader leaves early; no traceback (exit 1, as
    Python advises for a write that failed)."""
    proc = subprocess.Popen([sys.executable, "-m", "tunemake.cli", "list-templates"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # before the command writes anything
    assert proc.wait(timeout=120) == 1
    assert proc.stderr.read() == b""


@pytest.mark.parametrize("argv, message", [
    (["chat", "m", "--max-new-tokens", "0"], "argument --max-new-tokens: 0 is out of range (must be > 0)"),
    (["chat", "m", "--repetition-penalty", "0"], "argument --repetition-penalty: 0 is out of range (must be > 0)"),
    (["chat", "m", "--top-p", "2"], "argument --top-p: 2 is out of range (must be > 0 and <= 1)"),
    (["chat", "m", "--temperature", "-1"], "argument --temperature: -1 is out of range (must be >= 0)"),
    (["check-dataset", "d", "--max-length", "-5"], "argument --max-length: -5 is out of range (must be > 0)"),
    (["check-dataset", "d", "-n", "x"], "argument -n/--count: 'x' is not an integer"),
    (["chat", "m", "--top-p", "nan"], "argument --top-p: nan is out of range (must be > 0 and <= 1)"),
])
def test_out_of_range_options_are_usage_errors(argv, message, capsys):
    """Caught before anything loads (transformers would raise a traceback later, or slicing would
    quietly drop tokens)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"error: {message}")


def test_lock_without_hub_sources_says_so_and_writes_nothing(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    assert main(["lock", "--update"]) == 0
    assert "no model or dataset from the hub, nothing to pin" in capsys.readouterr().out
    assert not (project / "tunemake.lock").exists()
