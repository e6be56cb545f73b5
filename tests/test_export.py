"""Export and use through real Snakemake: `snakemake merged/`, chained experiments, evaluations,
the summary and report, and bit-identical rebuilds.

The small demo (tests/configs/demo_small.yaml: pre-training, a chained LoRA experiment, a QLoRA
experiment) checks the wiring in seconds; the shipped config.yaml checks the demo's promise that
the fine-tune works (exact match on held-out tasks).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from smk import REPO, artefact_digests, planned_jobs, snakemake, write_config

from tunemake.toolbox import calculate

pytestmark = pytest.mark.slow

SMALL_CONFIG = REPO / "tests" / "configs" / "demo_small.yaml"
SMALL_EXPERIMENTS = {"tiny_full_corpus": 1, "tiny_full_corpus_lora_tasks": 2, "tiny_qlora_tasks": 1}


@pytest.fixture(scope="module")
def merged_small(tmp_path_factory) -> Path:
    """The small demo built with the literal `snakemake merged/ --cores 2`."""
    work = tmp_path_factory.mktemp("merged_small")
    write_config(work, yaml.safe_load(SMALL_CONFIG.read_text()))
    snakemake(work, target="merged/")
    return work


def copy_of(work: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(work, target, symlinks=True, ignore=shutil.ignore_patterns("locks", "incomplete"))
    return target


VANILLA_GENERATE = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True)
ids = torch.tensor([ids["input_ids"] if hasattr(ids, "keys") else ids])
out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
print(out.shape[1] - ids.shape[1])
"""


def test_merged_links_every_experiment_to_its_final_merge(merged_small):
    merged = merged_small / "merged"
    assert sorted(p.name for p in merged.iterdir() if not p.name.startswith(".")) == sorted(SMALL_EXPERIMENTS)
    for name, epochs in SMALL_EXPERIMENTS.items():
        link = merged / name
        assert link.is_symlink() and not os.path.isabs(os.readlink(link))
        assert link.resolve() == (merged_small / "merges" / name / f"epoch_{epochs}").resolve()
        assert (link / "config.json").exists() and (link / "tokenizer.json").exists()
        assert json.loads((link / "tunemake.json").read_text())["epoch"] == epochs
    # vanilla transformers, no tunemake on the path, loads and generates from a merged model
    out = subprocess.run([sys.executable, "-c", VANILLA_GENERATE, str(merged / "tiny_qlora_tasks")],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""}, cwd="/")
    assert out.returncode == 0, out.stderr[-2000:]
    assert 1 <= int(out.stdout.split()[-1]) <= 4
    # `merged/` is the models alone: nothing was evaluated
    assert not (merged_small / "evals").exists()


def test_chained_experiment_trains_on_its_upstreams_final_merge(merged_small):
    adapter = json.loads((merged_small / "adapters" / "tiny_full_corpus_lora_tasks" / "epoch_2" / "tunemake.json").read_text())
    assert adapter["base_model"] == "merges/tiny_full_corpus/epoch_1"
    merge = json.loads((merged_small / "merges" / "tiny_full_corpus_lora_tasks" / "epoch_2" / "tunemake.json").read_text())
    assert merge["base_model"] == "merges/tiny_full_corpus/epoch_1"


def test_merged_is_up_to_date_after_building_it(merged_small):
    assert planned_jobs(merged_small, target="merged/") == {}


def test_default_target_adds_evaluations_summary_and_report(merged_small, tmp_path):
    work = copy_of(merged_small, tmp_path)
    jobs = planned_jobs(work, target="all")
    assert "train_epoch" not in jobs and "templated_dataset" not in jobs
    assert jobs["evaluate_epoch"] == sum(e + 1 for e in SMALL_EXPERIMENTS.values())
    assert jobs["merge_epoch"] == 1  # only the chained experiment has an earlier epoch to merge
    snakemake(work, target="all")
    for name, epochs in SMALL_EXPERIMENTS.items():
        for epoch in range(epochs + 1):
            result = json.loads((work / "evals" / name / f"epoch_{epoch}.json").read_text())
            assert result["epoch"] == epoch
            if name == "tiny_full_corpus":  # its corpus holds nothing out: no loss, nothing to score
                assert result["heldout"]["loss"] is None and result["exact_match"] == {}
            else:
                assert result["heldout"]["loss"] > 0 and result["exact_match"]["all"]["total"] > 0
    with open(work / "evals" / "summary.tsv", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert [(r["experiment"], int(r["epoch"])) for r in rows] == [
        (name, epoch) for name in sorted(SMALL_EXPERIMENTS) for epoch in range(SMALL_EXPERIMENTS[name] + 1)]
    for name in ("metrics_per_epoch", "training_loss"):
        assert (work / "evals" / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    snakemake(work, "--report", str(work / "report.html"), target="all")
    report = (work / "report.html").read_text(errors="replace")
    assert "metrics_per_epoch.png" in report and "summary.tsv" in report


def test_rebuilding_from_scratch_gives_identical_files(tmp_path):
    """Deleting every output and rebuilding with the same config: bit-identical artefacts on CPU."""
    config = {
        "demo": {"seed": 4, "corpus_docs": 120, "tasks_per_family": 20},
        "models": {"tiny": {"path": "models/tiny", "template": "internlm2_chat",
                            "demo": {"vocab_size": 400, "hidden_size": 64, "num_layers": 1, "num_heads": 2,
                                     "intermediate_size": 128}}},
        "datasets": {"tasks": {"path": "data/demo/tasks.jsonl", "heldout_fraction": 0.1}},
        "methods": {"lora_embed": {"type": "lora", "r": 8, "alpha": 16, "modules_to_save": ["lm_head"]}},
        "experiments": [{"model": "tiny", "datasets": "tasks", "method": "lora_embed", "epochs": 2,
                         "max_length": 64, "batch_size": 4, "grad_accumulation": 1, "lr": 0.001,
                         "max_shard_size": "100KB"}],
    }
    work = tmp_path / "work"
    work.mkdir()
    write_config(work, config)
    snakemake(work, target="merged/")
    first = artefact_digests(work)
    assert any(name.startswith("merges/") and name.endswith(".safetensors") for name in first)
    assert sum(name.startswith("merges/tiny_lora_embed_tasks/epoch_2/model-") for name in first) > 1
    assert any(name.startswith("adapters/") and name.endswith("adapter_model.safetensors") for name in first)
    for child in work.iterdir():
        if child.name != "config.yaml":
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    snakemake(work, target="merged/")
    assert artefact_digests(work) == first


def test_demo_config_fine_tune_works(tmp_path):
    """The README's demo: `snakemake merged/`, then the default target; the final model answers
    at least half of the held-out questions of two task families exactly, half of the tool
    family's through the calculate tool, and chats."""
    work = tmp_path / "demo"
    work.mkdir()
    shutil.copy(REPO / "config.yaml", work / "config.yaml")
    snakemake(work, target="merged/")
    assert not (work / "evals").exists()
    jobs = planned_jobs(work, target="all")
    assert "train_epoch" not in jobs and jobs["eval_summary"] == 1
    snakemake(work, target="all")
    with open(work / "evals" / "summary.tsv", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    final = max((r for r in rows if r["experiment"] == "tiny_full_corpus_lora_embed_tasks"), key=lambda r: int(r["epoch"]))
    base = next(r for r in rows if r["experiment"] == "tiny_full_corpus_lora_embed_tasks" and r["epoch"] == "0")
    assert int(final["epoch"]) == config["experiments"][1]["epochs"]
    rates = {key: float(value) for key, value in final.items() if key.startswith("exact_match_") and value}
    assert sum(rate >= 0.5 for key, rate in rates.items() if key != "exact_match_all") >= 2, rates
    assert float(final["heldout_loss"]) < float(base["heldout_loss"])
    # the chat CLI on the final merged model, non-interactively
    prompt = json.dumps({"prompt": "Reverse: cat dog sun"})
    out = subprocess.run([sys.executable, "-m", "tunemake.cli", "chat", "merged/tiny_full_corpus_lora_embed_tasks",
                          "--batch", "-", "--temperature", "0", "--max-new-tokens", "16"],
                         input=prompt + "\n", capture_output=True, text=True, cwd=work)
    assert out.returncode == 0, out.stderr[-2000:]
    answer = json.loads(out.stdout.splitlines()[-1])
    assert answer["prompt"] == "Reverse: cat dog sun" and answer["answer"]
    # with the calculate plugin, the tool family's question goes through a call that runs
    out = subprocess.run([sys.executable, "-m", "tunemake.cli", "chat", "merged/tiny_full_corpus_lora_embed_tasks",
                          "--batch", "-", "--temperature", "0", "--with-plugins", "calculate"],
                         input=json.dumps({"prompt": "What is 27 plus 16?"}) + "\n", capture_output=True, text=True,
                         cwd=work)
    assert out.returncode == 0, out.stderr[-2000:]
    (call, *_) = json.loads(out.stdout.splitlines()[-1])["tool_calls"]
    assert call["name"] == "calculate" and call["result"] == calculate(call["arguments"]["expression"])
    # the tool family is learnt: its calls, and its answers with the tool run
    assert float(final["tool_call_accuracy_tool_arithmetic"]) >= 0.5, final
    assert float(final["exact_match_tool_arithmetic"]) >= 0.5, final
