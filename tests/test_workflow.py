"""The workflow through real Snakemake runs in a temp dir: what builds, what rebuilds, what fails.

Uses tests/configs/demo_small.yaml, a scaled-down copy of the demo (synthetic data, a demo
tokenizer and model built by the workflow, two experiments sharing one templated dataset).
"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import yaml
from smk import REPO, planned_jobs, snakemake, write_config

from tunemake.config import canonical, load_config

SMALL_CONFIG = REPO / "tests" / "configs" / "demo_small.yaml"

pytestmark = pytest.mark.slow


def small_config() -> dict:
    return yaml.safe_load(SMALL_CONFIG.read_text())


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The small demo, built once; tests copy it before changing anything."""
    workdir = tmp_path_factory.mktemp("built")
    write_config(workdir, small_config())
    snakemake(workdir)
    return workdir


def copy_of(built: Path, tmp_path: Path) -> Path:
    # copytree keeps mtimes, so the copy is as up to date as the original
    work = tmp_path / "work"
    shutil.copytree(built, work, symlinks=True, ignore=shutil.ignore_patterns("locks", "incomplete"))
    return work


def templated_dirs(workdir: Path) -> list[Path]:
    return sorted(p for p in (workdir / "data" / "templated").iterdir() if not p.name.startswith("."))


def test_demo_builds_datasets_and_base_model(built):
    dirs = templated_dirs(built)
    # three experiments, two templated datasets: the corpus, and the tasks shared by two experiments
    assert len(dirs) == 2
    for d in dirs:
        stats = json.loads((d / "stats.json").read_text())
        assert stats["records_out"]["train"] > 0
        assert 0.9 < stats["packing_efficiency"] <= 1.0
        assert (d / "dataset_dict.json").exists() and (d / "heldout.jsonl").exists()
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(built / "models" / "tiny")
    model = AutoModelForCausalLM.from_pretrained(built / "models" / "tiny")
    assert model.config.vocab_size == len(tokenizer)
    tasks = next(d for d in dirs if json.loads((d / "stats.json").read_text())["records_out"]["heldout"])
    dd = datasets.load_from_disk(str(tasks))
    assert set(dd) == {"train", "heldout"}
    assert max(len(r) for r in dd["train"]["input_ids"]) == 128


def test_second_run_does_nothing(built):
    assert planned_jobs(built) == {}


def test_shared_data_is_one_job(tmp_path):
    write_config(tmp_path, small_config())
    jobs = planned_jobs(tmp_path)
    assert jobs["templated_dataset"] == 2  # corpus + tasks; the tasks build serves two experiments
    assert jobs["demo_data"] == 1 and jobs["demo_tokenizer"] == 1


def test_training_settings_do_not_touch_data(built, tmp_path):
    work = copy_of(built, tmp_path)
    config = small_config()
    for exp in config["experiments"]:
        exp.update(lr=0.123, seed=42, epochs=5)
    config["experiments"][2]["method"] = "full"
    write_config(work, config)
    assert planned_jobs(work) == {}


def test_max_length_change_rebuilds_only_that_data(built, tmp_path):
    work = copy_of(built, tmp_path)
    config = small_config()
    config["experiments"][0]["max_length"] = 64  # the corpus experiment only
    write_config(work, config)
    assert planned_jobs(work) == {"templated_dataset": 1, "datasets": 1}
    snakemake(work)
    assert len(templated_dirs(work)) == 3  # the old build stays, the new one sits beside it
    assert planned_jobs(work) == {}


def test_source_edit_rebuilds_in_place(built, tmp_path):
    work = copy_of(built, tmp_path)
    tasks = work / "data" / "demo" / "tasks.jsonl"
    record = {"conversation": [{"input": "What is tunemake?", "output": "A build system."}]}
    with open(tasks, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
    assert planned_jobs(work) == {"templated_dataset": 1, "datasets": 1}


def test_tokenizer_rebuild_rebuilds_data_not_sources(built, tmp_path):
    work = copy_of(built, tmp_path)
    config = small_config()
    config["models"]["tiny"]["demo"]["vocab_size"] = 420
    write_config(work, config)
    jobs = planned_jobs(work)
    assert jobs.get("demo_data") is None
    assert jobs["demo_tokenizer"] == 1 and jobs["templated_dataset"] == 2


def _assert_clean_failure(work: Path, proc, *fragments: str) -> None:
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in output:\n{text[-4000:]}"
    templated = work / "data" / "templated"
    leftovers = sorted(p.name for p in templated.iterdir()) if templated.exists() else []
    assert leftovers == [], f"left behind: {leftovers}"


def test_malformed_line_fails_cleanly(tmp_path):
    (tmp_path / "chat.jsonl").write_text(
        '{"conversation": [{"input": "a", "output": "b"}]}\n{"conversation": [{"input": "a", "output": }]}\n'
    )
    config = small_config()
    config["datasets"]["chat"] = {"path": "chat.jsonl"}
    config["experiments"] = [{"model": "tiny", "datasets": "chat", "method": "lora", "max_length": 64}]
    write_config(tmp_path, config)
    proc = snakemake(tmp_path, check=False)
    _assert_clean_failure(tmp_path, proc, "chat.jsonl:2: invalid JSON")


def test_missing_field_fails_cleanly(tmp_path):
    (tmp_path / "chat.jsonl").write_text('{"conversation": [{"input": "a", "reply": "b"}]}\n')
    config = small_config()
    config["datasets"]["chat"] = {"path": "chat.jsonl"}
    config["experiments"] = [{"model": "tiny", "datasets": "chat", "method": "lora", "max_length": 64}]
    write_config(tmp_path, config)
    proc = snakemake(tmp_path, check=False)
    _assert_clean_failure(tmp_path, proc, "chat.jsonl:1: conversation[0]: missing key 'output'")


def test_empty_after_filtering_fails_cleanly(tmp_path):
    (tmp_path / "alpaca.json").write_text(json.dumps([
        {"instruction": "Say nothing", "input": "", "output": "<nooutput>"},
    ]))
    config = small_config()
    config["datasets"]["alpaca"] = {"path": "alpaca.json", "format": "alpaca"}
    config["experiments"] = [{"model": "tiny", "datasets": "alpaca", "method": "lora", "max_length": 64}]
    write_config(tmp_path, config)
    proc = snakemake(tmp_path, check=False)
    _assert_clean_failure(tmp_path, proc, "alpaca.json: dataset 'alpaca' has no trainable record left")


def test_missing_source_file_fails_before_any_job(tmp_path):
    config = small_config()
    config["datasets"]["chat"] = {"path": "nowhere/chat.jsonl"}
    config["experiments"] = [{"model": "tiny", "datasets": "chat", "method": "lora"}]
    write_config(tmp_path, config)
    proc = snakemake(tmp_path, check=False)
    _assert_clean_failure(tmp_path, proc, "nowhere/chat.jsonl")
    assert not (tmp_path / "models").exists()


def _assert_one_line_error(proc, start: str) -> None:
    """Snakemake failed with one line starting with ``start``, and no traceback frames."""
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert any(line.startswith(start) for line in text.splitlines()), text[-3000:]
    assert "Traceback" not in text and 'File "' not in text, text[-3000:]


@pytest.mark.parametrize(
    "change, fragment",
    [
        (lambda c: c["experiments"][0].update(max_length="long"), "experiments[0].max_length: 'long' is not of type 'integer'"),
        (lambda c: c["experiments"][0].update(epochs=0), "experiments[0].epochs: 0 is less than the minimum of 1"),
        (lambda c: c["datasets"]["tasks"].update(format="csv"), "datasets.tasks.format: 'csv' is not one of"),
        (lambda c: c["experiments"][0].update(template="nope"), "experiments[0].template: unknown template 'nope'"),
        (lambda c: c["datasets"]["tasks"].update(path="data/*.nothing"), "datasets.tasks.path: 'data/*.nothing' matches no file"),
        (lambda c: c["datasets"]["tasks"].update(path="empty.jsonl"), "datasets.tasks.path: empty.jsonl is empty"),
    ],
)
def test_config_errors_name_the_key(tmp_path, change, fragment):
    (tmp_path / "empty.jsonl").write_text("")
    config = small_config()
    change(config)
    write_config(tmp_path, config)
    proc = snakemake(tmp_path, "-n", check=False)
    _assert_one_line_error(proc, f"error: config.yaml: {fragment}")


def test_config_error_names_the_configfile_that_set_the_key(tmp_path):
    write_config(tmp_path, small_config())
    (tmp_path / "extra.yaml").write_text(yaml.safe_dump({"experiments": [{"model": "tiny", "datasets": "tasks",
                                                                           "method": "lora", "epochs": 0}]}))
    proc = snakemake(tmp_path, "-n", check=False, configfiles=("config.yaml", "extra.yaml"))
    _assert_one_line_error(proc, "error: extra.yaml: experiments[0].epochs: 0 is less than the minimum of 1")

    # Snakemake's own reader keeps the later of two values; tunemake's names both lines
    lines = (tmp_path / "config.yaml").read_text().splitlines()
    (tmp_path / "config.yaml").write_text("\n".join([*lines, "demo: {seed: 2}", ""]))
    proc = snakemake(tmp_path, "-n", check=False, configfiles=("config.yaml", "extra.yaml"))
    _assert_one_line_error(proc, f"error: config.yaml:{len(lines) + 1}: key 'demo' is written twice, on lines 1 "
                                 f"and {len(lines) + 1}")


def test_configfile_replaces_the_demo_config(tmp_path):
    """`snakemake --configfile examples/X.yaml` builds what X configures, nothing of config.yaml's demo."""
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")  # found by the Snakefile's `configfile:` in -d
    (tmp_path / "chat.jsonl").write_text('{"conversation": [{"input": "a", "output": "b"}]}\n')
    mini = small_config()["models"]["tiny"]
    example = {"models": {"mini": {**mini, "path": "models/mini"}}, "datasets": {"chat": {"path": "chat.jsonl"}},
               "experiments": [{"model": "mini", "datasets": "chat", "method": "lora", "max_length": 64}]}
    (tmp_path / "example.yaml").write_text(yaml.safe_dump(example))
    # merged in, the demo's `models:` would add its tiny model: two demo_tokenizer and demo_model jobs
    assert planned_jobs(tmp_path, configfiles=("example.yaml",)) == {
        "demo_data": 1, "demo_tokenizer": 1, "demo_model": 1, "templated_dataset": 1, "datasets": 1}


def test_base_weights_are_not_a_data_input(built, tmp_path):
    work = copy_of(built, tmp_path)
    (work / "models" / "tiny" / "model.safetensors").touch()  # newer weights, same tokenizer
    assert planned_jobs(work) == {}


def test_the_readme_demo_data_builds(tmp_path):
    """`snakemake datasets --cores all` on the shipped config.yaml: the README's demo data."""
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")
    snakemake(tmp_path)
    dirs = templated_dirs(tmp_path)
    assert len(dirs) == 2
    stats = [json.loads((d / "stats.json").read_text()) for d in dirs]
    assert all(s["records_out"]["heldout"] > 0 for s in stats)  # corpus and tasks both hold some out
    assert planned_jobs(tmp_path) == {}


# tiny_qlora_tasks trained, converted, merged and evaluated; tiny_full_corpus's one epoch trained beside it
QLORA_EVAL = "evals/tiny_qlora_tasks/epoch_1.json"
FULL_CHECKPOINT = "checkpoints/tiny_full_corpus/epoch_1.pth"

# tests/configs/demo_small.yaml with every mapping's keys in another order, restyled and respelled
RESTYLED_SMALL_CONFIG = """\
experiments:
  - max_length: 128.0          # an integer written as a float
    lr: 2.0e-4                 # the default, written out
    epochs: 1
    method: "full"
    datasets: [corpus]
    model: tiny
  - weight_decay: 0            # the default 0.0
    epochs: "2"
    max_length: 1.28e+2
    method: lora
    datasets: tasks
    model:
      experiment: tiny_full_corpus
  - {seed: 3, lr: 1e-3, max_length: 128, epochs: 1, method: qlora, datasets: 'tasks', model: tiny}
methods:
  qlora: {double_quant: yes, type: qlora, alpha: 16}   # the built-in qlora, written out
evaluation: {seed: 0, max_prompts: 200}                # defaults
datasets:
  tasks:
    heldout_fraction: 1e-1     # a string to YAML 1.1
    path: "data/demo/tasks.jsonl"
  corpus: {format: pretrain, path: data/demo/corpus.txt}
models:
  tiny:
    demo:
      intermediate_size: 128
      num_heads: 2
      num_layers: 1
      hidden_size: 64
      vocab_size: 400
    template: 'internlm2_chat'
    path: models/tiny
demo: {tasks_per_family: "40", corpus_docs: 200, seed: 1}
"""


@pytest.fixture(scope="module")
def trained(built, tmp_path_factory) -> Path:
    """The built small demo, with QLORA_EVAL and FULL_CHECKPOINT built too (about a minute)."""
    work = copy_of(built, tmp_path_factory.mktemp("trained"))
    # one thread a training job, so that the two run side by side on the two cores
    snakemake(work, FULL_CHECKPOINT, "--set-threads", "train_epoch=1", target=QLORA_EVAL)
    return work


def test_restyled_config_reruns_nothing(trained, tmp_path):
    """Key order, comments, quoting, flow or block style, 2.0e-4 or 0.0002, defaults written out."""
    assert load_config(yaml.safe_load(RESTYLED_SMALL_CONFIG), check_files=False) == load_config(
        small_config(), check_files=False)  # the same values
    work = copy_of(trained, tmp_path)
    (work / "config.yaml").write_text(RESTYLED_SMALL_CONFIG)
    assert planned_jobs(work, target=QLORA_EVAL) == {}
    assert planned_jobs(work, target=FULL_CHECKPOINT) == {}


def test_lr_change_reruns_exactly_that_experiments_training_chain(trained, tmp_path):
    work = copy_of(trained, tmp_path)
    config = small_config()
    config["experiments"][2]["lr"] = "2e-3"  # tiny_qlora_tasks, its lr written as YAML 1.1's string
    write_config(work, config)
    # its epoch, adapter, merge and evaluation; not the data, not the other experiment
    assert planned_jobs(work, target=QLORA_EVAL) == {
        "train_epoch": 1, "convert_epoch": 1, "merge_epoch": 1, "evaluate_epoch": 1}
    assert planned_jobs(work, target=FULL_CHECKPOINT) == {}


def test_every_recorded_param_is_canonical(trained):
    """What Snakemake recorded of each job it ran (demo, data, train, convert, merge, evaluate):
    plain data with sorted keys, which it compares by repr."""
    records = [json.loads(path.read_text()) for path in (trained / ".snakemake" / "metadata").rglob("*")
               if path.is_file()]
    assert {record["rule"] for record in records} == {
        "demo_data", "demo_tokenizer", "demo_model", "templated_dataset", "train_epoch", "convert_epoch",
        "merge_epoch", "evaluate_epoch"}
    for record in records:
        for param in record["params"]:
            assert repr(canonical(ast.literal_eval(param))) == param, (record["rule"], param)


def test_a_syntax_error_in_the_default_config_is_named_by_line(tmp_path):
    """`snakemake` without --configfile reads ./config.yaml: its syntax error names the line, in
    one line of output, before Snakemake's own reading (which names none)."""
    import subprocess
    import sys

    text = (REPO / "config.yaml").read_text().replace("seed: 0", "seed: [0", 1)
    line = next(n for n, row in enumerate(text.splitlines(), 1) if "seed: [0" in row)
    (tmp_path / "config.yaml").write_text(text)
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                           "-n", "--cores", "1"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: config.yaml:{line + 1}: invalid YAML"), proc.stderr
    assert "Traceback" not in proc.stderr
