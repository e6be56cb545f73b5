"""The evaluate stage and the summary on a tiny random Llama: loss, exact match, generation, outputs, errors."""

from __future__ import annotations

import itertools
import json
import math
import shutil
import struct
import zlib
from pathlib import Path

import datasets
import pytest
import torch
from test_train import MODEL
from transformers import AutoModelForCausalLM, AutoTokenizer

import tunemake.evaluate as evaluate
from tunemake.atomic import write_json
from tunemake.config import load_config
from tunemake.data import build_templated_dataset
from tunemake.demo import build_demo_model, build_demo_tokenizer, generate_demo_data
from tunemake.encode import IGNORE_INDEX, generation_stops, prompt_ids
from tunemake.evaluate import (METRICS_PLOT, TRAINING_PLOT, EvaluateError, evaluate_model, generate_answers,
                               gpu_placement, summarize)
from tunemake.resources import shape_from_config
from tunemake.templates import TEMPLATES

TEMPLATE = TEMPLATES["internlm2_chat"]
FAST = {"max_new_tokens": 6, "threads": 1}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """Demo data (tasks and corpus, both with held-out records), tokenizer, tiny model, templated dataset."""
    root = tmp_path_factory.mktemp("evaluate_project")
    generate_demo_data(root / "demo", seed=0, corpus_docs=120, tasks_per_family=20)
    build_demo_tokenizer(root / "demo" / "corpus.txt", root / "model", TEMPLATE, vocab_size=400)
    build_demo_model(root / "model", root / "model", **MODEL)
    config = {
        "models": {"tiny": {"path": str(root / "model"), "template": "internlm2_chat"}},
        "datasets": {"tasks": {"path": str(root / "demo" / "tasks.jsonl"), "heldout_fraction": 0.3},
                     "corpus": {"path": str(root / "demo" / "corpus.txt"), "format": "pretrain",
                                "heldout_fraction": 0.1}},
        "experiments": [{"model": "tiny", "datasets": ["corpus", "tasks"], "method": "full", "max_length": 128}],
    }
    recipe = next(iter(load_config(config)["experiments"].values()))["data_recipe"]
    build_templated_dataset(recipe, root / "data")
    return root


@pytest.fixture(scope="module")
def heldout(project) -> list[dict]:
    return [json.loads(line) for line in (project / "data" / "heldout.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def model_and_tokenizer(project):
    tokenizer = AutoTokenizer.from_pretrained(project / "model")
    model = AutoModelForCausalLM.from_pretrained(project / "model", dtype=torch.float32).eval()
    return model, tokenizer


def scored(records: list[dict]) -> list[dict]:
    """The held-out records that get an answer: conversations, not pretrain text."""
    return [r for r in records if any(turn["input"] for turn in r["conversation"])]


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_heldout_loss_is_the_mean_over_labelled_tokens(project, model_and_tokenizer, tmp_path):
    model, _ = model_and_tokenizer
    result = evaluate_model(project / "model", project / "data", tmp_path / "e.json", template=TEMPLATE,
                            batch_size=5, max_prompts=1, **FAST)
    rows = datasets.load_from_disk(str(project / "data"))["heldout"]
    assert len(rows) == result["heldout"]["records"] > 0
    total, tokens = 0.0, 0
    with torch.no_grad():
        for row in rows:  # one record at a time: no padding, no mask
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
            targets = torch.tensor(row["labels"][1:])
            total += torch.nn.functional.cross_entropy(logits[:-1], targets, ignore_index=IGNORE_INDEX,
                                                       reduction="sum").item()
            tokens += int((targets != IGNORE_INDEX).sum())
    assert result["heldout"]["tokens"] == tokens
    # the reference is float32 on the CPU; evaluation on a GPU multiplies in TF32 / bf16
    assert result["heldout"]["loss"] == pytest.approx(total / tokens, abs=1e-4 if torch.cuda.is_available() else 1e-5)
    assert result["heldout"]["perplexity"] == pytest.approx(math.exp(result["heldout"]["loss"]), rel=1e-5)
    assert 5.0 < result["heldout"]["loss"] < 7.0  # a random model: about ln(vocab 400) = 6.0


def test_exact_match_per_family(project, heldout, tmp_path, monkeypatch):
    conversations = scored(heldout)
    assert len(conversations) < len(heldout), "the fixture should hold pretrain records too"
    # Right for arithmetic and for every third other record; whitespace around an answer is ignored.
    wanted = [f"  {r['conversation'][-1]['output']}\n" if r["task"] == "arithmetic" or i % 3 == 0 else "wrong"
              for i, r in enumerate(conversations)]
    calls = []

    def fake_generate(model, tokenizer, prompts, template, **kwargs):
        calls.append(prompts)
        return wanted[:len(prompts)]

    monkeypatch.setattr(evaluate, "generate_answers", fake_generate)
    max_prompts = len(conversations) - 2
    result = evaluate_model(project / "model", project / "data", tmp_path / "e.json", template="internlm2_chat",
                            max_prompts=max_prompts, **FAST)

    tokenizer = AutoTokenizer.from_pretrained(project / "model")
    assert calls == [[prompt_ids(r["conversation"], TEMPLATE, tokenizer)[1] for r in conversations[:max_prompts]]]
    expected: dict[str, dict] = {}
    for record, answer in zip(conversations[:max_prompts], wanted):
        for family in (record["task"], "all"):
            counts = expected.setdefault(family, {"correct": 0, "total": 0})
            counts["correct"] += answer != "wrong"
            counts["total"] += 1
    for counts in expected.values():
        counts["rate"] = round(counts["correct"] / counts["total"], 6)
    assert result["exact_match"] == expected
    assert expected["arithmetic"]["rate"] == 1.0 and 0 < expected["all"]["rate"] < 1
    assert "corpus" not in result["exact_match"]  # pretrain records: loss only
    assert len(result["examples"]) == 8
    first = result["examples"][0]
    assert first["reference"] == conversations[0]["conversation"][-1]["output"]
    assert first["prompt"].endswith("<|im_start|>assistant\n") and first["correct"] == (wanted[0] != "wrong")


def test_real_run_json_is_complete_and_deterministic(project, heldout, tmp_path):
    first = evaluate_model(project / "model", project / "data", tmp_path / "a.json", template=TEMPLATE,
                           experiment="tiny_full", epoch=0, seed=3, **FAST)
    evaluate_model(project / "model", project / "data", tmp_path / "b.json", template=TEMPLATE,
                   experiment="tiny_full", epoch=0, seed=3, **FAST)
    assert set(first) == {"experiment", "epoch", "model", "data", "template", "heldout", "exact_match",
                          "generation", "examples", "seconds"}
    assert first["generation"] == {"seed": 3, "max_new_tokens": 6, "greedy": True}
    assert first["template"] == "internlm2_chat" and (first["experiment"], first["epoch"]) == ("tiny_full", 0)
    families = {r["task"] for r in scored(heldout)}
    assert set(first["exact_match"]) == families | {"all"}
    assert first["exact_match"]["all"]["total"] == len(scored(heldout))
    assert first["exact_match"]["all"]["rate"] <= 0.1  # a random model answers next to nothing
    assert all(set(e) == {"task", "prompt", "reference", "answer", "correct"} for e in first["examples"])

    on_disk = [json.loads((tmp_path / name).read_text()) for name in ("a.json", "b.json")]
    assert on_disk[0] == first
    for result in on_disk:
        result.pop("seconds")
    assert on_disk[0] == on_disk[1]
    assert (tmp_path / "a.json").read_text() == json.dumps(first, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def test_batched_generation_equals_one_by_one(heldout, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = [prompt_ids(r["conversation"], TEMPLATE, tokenizer)[1] for r in scored(heldout)]
    assert len({len(p) for p in prompts}) > 3, "prompts of one length would need no padding"
    batched = generate_answers(model, tokenizer, prompts, TEMPLATE, max_new_tokens=12, batch_size=16, progress=False)
    single = generate_answers(model, tokenizer, prompts, TEMPLATE, max_new_tokens=12, batch_size=1, progress=False)
    assert batched == single
    assert any(batched), "every answer empty: nothing was compared"


def test_generation_stops_at_the_templates_end_of_turn(heldout, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    stop_ids = generation_stops(tokenizer, TEMPLATE).ids
    assert end_of_turn in stop_ids and tokenizer.eos_token_id in stop_ids
    words = [tokenizer.encode(w, add_special_tokens=False)[0] for w in ("The", " capital")]
    script = [*words, end_of_turn, words[0]]  # the last token must never be generated
    calls = []

    def force_next_token(module, args, logits):
        forced = torch.full_like(logits, -1e4)
        forced[..., script[min(len(calls), len(script) - 1)]] = 1e4
        calls.append(1)
        return forced

    handle = model.lm_head.register_forward_hook(force_next_token)
    try:
        prompt = prompt_ids(scored(heldout)[0]["conversation"], TEMPLATE, tokenizer)[1]
        answers = generate_answers(model, tokenizer, [prompt], TEMPLATE, max_new_tokens=20, progress=False)
    finally:
        handle.remove()
    assert answers == ["The capital"]
    assert len(calls) == 3, "generation went on past <|im_end|>"


@pytest.mark.parametrize("heldout_fraction", [0.2, 0.0])
def test_pretrain_data_gives_loss_only(project, tmp_path, heldout_fraction):
    config = {
        "models": {"tiny": {"path": str(project / "model"), "template": "internlm2_chat"}},
        "datasets": {"corpus": {"path": str(project / "demo" / "corpus.txt"), "format": "pretrain",
                                "heldout_fraction": heldout_fraction}},
        "experiments": [{"model": "tiny", "datasets": "corpus", "method": "full", "max_length": 128}],
    }
    recipe = next(iter(load_config(config)["experiments"].values()))["data_recipe"]
    build_templated_dataset(recipe, tmp_path / "data")
    result = evaluate_model(project / "model", tmp_path / "data", tmp_path / "e.json", template=TEMPLATE, **FAST)
    assert result["exact_match"] == {} and result["examples"] == []
    if heldout_fraction:
        assert result["heldout"]["records"] > 0 and result["heldout"]["loss"] > 0
    else:  # nothing held out: nothing to measure, but the file exists for the summary
        assert result["heldout"] == {"loss": None, "perplexity": None, "tokens": 0, "records": 0}


def test_errors_leave_nothing_behind(project, tmp_path):
    out = tmp_path / "evals" / "x" / "epoch_1.json"

    def fails(model_dir, data_dir, message):
        with pytest.raises(EvaluateError, match=message):
            evaluate_model(model_dir, data_dir, out, template=TEMPLATE, **FAST)
        assert leftovers(out.parent) == []

    fails(tmp_path / "merges" / "x" / "epoch_1", project / "data", r"epoch_1: not a model directory")

    no_split = tmp_path / "no_split"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"input_ids": [[1, 2]]})}).save_to_disk(str(no_split))
    fails(project / "model", no_split, r"no_split: has no 'heldout' split")

    no_jsonl = tmp_path / "no_jsonl"
    shutil.copytree(project / "data", no_jsonl)
    (no_jsonl / "heldout.jsonl").unlink()
    fails(project / "model", no_jsonl, r"no_jsonl/heldout.jsonl: missing")

    short = tmp_path / "short"
    shutil.copytree(project / "data", short)
    lines = (short / "heldout.jsonl").read_text().splitlines(keepends=True)
    (short / "heldout.jsonl").write_text("".join(lines[:-1]))
    fails(project / "model", short, rf"{len(lines) - 1} records, but the heldout split has {len(lines)} rows")


GB = 1000**3


def test_a_model_that_fits_the_first_gpu_stays_on_it():
    assert gpu_placement(10 * GB, [79 * GB] * 4, 5 * GB, GB) is None
    # The only GPU: the load is tried there, as it always was.
    assert gpu_placement(140 * GB, [79 * GB], 5 * GB, 2 * GB) is None


def test_a_model_larger_than_one_gpu_spreads_over_the_fewest_that_hold_it_each_capped():
    # 140 GB and a layer's room per GPU, and one more, in 2 x (79 - 5) GB: a batch kept free on each.
    assert gpu_placement(140 * GB, [79 * GB] * 8, 5 * GB, 2 * GB) == {0: 74 * GB, 1: 74 * GB}
    # A busy first GPU gives what it has; a third GPU makes up the rest.
    assert gpu_placement(140 * GB, [30 * GB, 79 * GB, 79 * GB, 79 * GB], 5 * GB, 2 * GB) == {
        0: 25 * GB, 1: 74 * GB, 2: 74 * GB}
    with pytest.raises(EvaluateError, match=r"400.0 GB of weights do not fit the 4 visible GPUs .*evaluate.gpus"):
        gpu_placement(400 * GB, [79 * GB] * 4, 5 * GB, 2 * GB)


def test_the_caps_place_every_layer_on_a_gpu_however_full_the_gpus_are():
    """What from_pretrained(device_map="sequential", max_memory=caps) computes, for GPUs with
    different free memory: nothing left for the CPU or the disk, and no GPU past the caps."""
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.integrations.accelerate import infer_auto_device_map

    config = LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=16,
                         num_attention_heads=2, num_key_value_heads=2)
    with init_empty_weights():
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    weights = sum(p.numel() for p in model.parameters()) * 2
    largest = shape_from_config(config.to_dict(), "llama").largest_module_parameters * 2
    batch = 10_000
    spread = 0
    for fractions in itertools.product([0.3, 0.5, 0.7, 1.2], repeat=3):
        try:
            caps = gpu_placement(weights, [int(f * weights) + batch for f in fractions], batch, largest)
        except EvaluateError:
            continue
        if caps is None:
            continue
        device_map = infer_auto_device_map(model, max_memory=dict(caps),
                                           no_split_module_classes=model._no_split_modules)
        assert set(device_map.values()) <= set(caps), (fractions, caps, device_map)
        spread += 1
    assert spread > 20


def fake_eval(experiment: str, epoch: int, loss: float | None, rates: dict[str, float]) -> dict:
    return {
        "experiment": experiment, "epoch": epoch,
        "heldout": {"loss": loss, "perplexity": None if loss is None else math.exp(loss), "tokens": 10, "records": 2},
        "exact_match": {f: {"correct": 0, "total": 1, "rate": r} for f, r in rates.items()},
    }


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and zlib.crc32(data[12:16 + length]) == struct.unpack(">I", data[16 + length:20 + length])[0]
    assert data.endswith(b"IEND\xaeB`\x82")
    return struct.unpack(">II", data[16:24])


def test_summary_rows_columns_and_plots(tmp_path):
    evals = tmp_path / "evals"
    files = []
    # Written out of order; "b_lora" never scores facts, "a_full" never scores the extra family.
    for experiment, epoch, loss, rates in [
        ("b_lora", 2, 1.25, {"arithmetic": 0.5, "qa": 0.25, "all": 0.375}),
        ("a_full", 1, 2.0, {"arithmetic": 0.1, "facts": 0.2, "all": 0.15}),
        ("b_lora", 0, 6.0, {"arithmetic": 0.0, "qa": 0.0, "all": 0.0}),
        ("a_full", 0, 6.5, {"arithmetic": 0.0, "facts": 0.0, "all": 0.0}),
        ("b_lora", 1, 2.5, {"arithmetic": 0.25, "qa": 0.125, "all": 0.1875}),
        ("a_full", 2, 1.5, {"arithmetic": 0.3, "facts": 0.6, "all": 0.45}),
    ]:
        files.append(evals / experiment / f"epoch_{epoch}.json")
        write_json(files[-1], fake_eval(experiment, epoch, loss, rates))
    files.append(evals / "c_pretrain" / "epoch_10.json")  # no experiment/epoch recorded: from the path
    write_json(files[-1], {**fake_eval(None, None, 3.0, {}), "experiment": None, "epoch": None})

    logs = tmp_path / "logs"
    (logs / "a_full").mkdir(parents=True)
    steps = [{"epoch": 1, "step": s, "global_step": s + 1, "loss": 5 - s / 10, "lr": 1e-3} for s in range(20)]
    steps.append({"epoch": 1, "global_step": 20, "end_of_epoch": True, "heldout_loss": 2.0})
    (logs / "a_full" / "epoch_1.metrics.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    train_logs = {"a_full": [logs / "a_full" / "epoch_1.metrics.jsonl", logs / "a_full" / "epoch_2.metrics.jsonl"],
                  "b_lora": [logs / "b_lora" / "epoch_1.metrics.jsonl"]}

    rows = summarize(files, evals / "summary.tsv", plots_dir=tmp_path / "plots", train_logs=train_logs)
    assert (evals / "summary.tsv").read_text() == (
        "experiment\tepoch\theldout_loss\tperplexity\texact_match_arithmetic\texact_match_facts\texact_match_qa\texact_match_all\n"
        f"a_full\t0\t6.5000\t{math.exp(6.5):.4f}\t0.0000\t0.0000\t\t0.0000\n"
        f"a_full\t1\t2.0000\t{math.exp(2.0):.4f}\t0.1000\t0.2000\t\t0.1500\n"
        f"a_full\t2\t1.5000\t{math.exp(1.5):.4f}\t0.3000\t0.6000\t\t0.4500\n"
        f"b_lora\t0\t6.0000\t{math.exp(6.0):.4f}\t0.0000\t\t0.0000\t0.0000\n"
        f"b_lora\t1\t2.5000\t{math.exp(2.5):.4f}\t0.2500\t\t0.1250\t0.1875\n"
        f"b_lora\t2\t1.2500\t{math.exp(1.25):.4f}\t0.5000\t\t0.2500\t0.3750\n"
        f"c_pretrain\t10\t3.0000\t{math.exp(3.0):.4f}\t\t\t\t\n"
    )
    assert [(r["experiment"], r["epoch"]) for r in rows][:3] == [("a_full", 0), ("a_full", 1), ("a_full", 2)]
    assert rows[3]["exact_match_facts"] is None and rows[1]["heldout_loss"] == 2.0

    plots = tmp_path / "plots"
    assert leftovers(plots) == [METRICS_PLOT, TRAINING_PLOT]
    width, height = png_size(plots / METRICS_PLOT)
    assert width > 800 and height > 300
    assert min(png_size(plots / TRAINING_PLOT)) > 200
    first = {name: (plots / name).read_bytes() for name in (METRICS_PLOT, TRAINING_PLOT)}
    summarize(files, evals / "summary.tsv", plots_dir=plots, train_logs=train_logs)
    assert {name: (plots / name).read_bytes() for name in first} == first


def test_summary_of_real_evaluations(project, tmp_path):
    files = []
    for epoch in (0, 1):
        files.append(tmp_path / "evals" / "tiny" / f"epoch_{epoch}.json")
        evaluate_model(project / "model", project / "data", files[-1], template=TEMPLATE, experiment="tiny",
                       epoch=epoch, max_prompts=4, **FAST)
    rows = summarize(files, tmp_path / "evals" / "summary.tsv")
    lines = (tmp_path / "evals" / "summary.tsv").read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("experiment\tepoch\theldout_loss\tperplexity\texact_match_")
    assert lines[0].endswith("\texact_match_all") and rows[0]["heldout_loss"] == rows[1]["heldout_loss"]


def test_summary_errors_write_nothing(tmp_path):
    a = tmp_path / "evals" / "x" / "epoch_0.json"
    write_json(a, fake_eval("x", 0, 1.0, {}))
    copy = tmp_path / "evals" / "y" / "epoch_3.json"
    write_json(copy, fake_eval("x", 0, 1.0, {}))
    out = tmp_path / "out" / "summary.tsv"
    with pytest.raises(EvaluateError, match=r"y/epoch_3.json: experiment 'x' epoch 0 is also evaluated in .*x/epoch_0.json"):
        summarize([a, copy], out)
    broken = tmp_path / "evals" / "z" / "epoch_1.json"
    broken.parent.mkdir()
    broken.write_text('{"experiment": "z", ')
    with pytest.raises(EvaluateError, match=r"z/epoch_1.json: not an evaluation JSON"):
        summarize([a, broken], out)
    with pytest.raises(EvaluateError, match=r"missing.json: no such evaluation"):
        summarize([a, tmp_path / "missing.json"], out)
    assert leftovers(out.parent) == []


def test_an_experiment_has_one_colour_in_every_panel(monkeypatch, tmp_path):
    """The legend is drawn in the first panel only: an experiment missing from a panel must not
    shift the others' colours there."""
    from tunemake import evaluate

    figures = []
    monkeypatch.setattr(evaluate, "_save", lambda figure, target: figures.append(figure))
    rows = [{"experiment": "a_full", "epoch": 1, "heldout_loss": 2.0, "exact_match_qa": None},
            {"experiment": "b_lora", "epoch": 1, "heldout_loss": 2.5, "exact_match_qa": 0.5}]
    evaluate.plot_metrics(rows, ["exact_match_qa"], tmp_path / "plot.png")
    colours = {(line.get_label(), line.get_color()) for ax in figures[0].axes for line in ax.get_lines()}
    assert len(colours) == len({label for label, _ in colours}) == 2, colours
