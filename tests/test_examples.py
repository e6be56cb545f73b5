"""The examples run as written, and hub models through every stage, through real Snakemake, offline.

Every base model and hub dataset comes from the offline hub of hub_fixture.py (``offline_hub``):
tiny stand-ins under the ids ``examples/`` names, in the session's own HF_HOME, HF_HUB_OFFLINE=1.
One build serves several tests (module-scoped fixtures); the error cases are dry runs but one.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from glob import glob
from pathlib import Path

import pytest
import torch
import yaml
from hub_fixture import INTERNLM, INTERNLM2, LLAMA3, MODEL_SHAPE
from smk import REPO, planned_jobs, snakemake, write_config

pytestmark = pytest.mark.slow

EXAMPLES = [Path(path).name for path in sorted(glob(str(REPO / "examples" / "*.yaml")))]


# --- the examples as written, on a CPU ---------------------------------------------------------


def on_a_cpu(example: dict) -> dict:
    """``example`` with only what a CPU and the tiny stand-in models force changed: one epoch,
    rows no longer than the stand-ins' positions, no accumulation, fp32 autocast (fp16 and bf16
    autocast need a GPU), the CPU (``gpus: 1`` would ask for a GPU), one node. DeepSpeed, batch
    size, lr, schedule, methods, templates and model dtypes stay as the example sets them."""
    for exp in example["experiments"]:
        exp.update(epochs=1, max_length=min(exp.get("max_length", 2048), MODEL_SHAPE["max_position_embeddings"]),
                   grad_accumulation=1, precision="fp32", gpus=None, nodes=1)
    return example


_TICKETS = [
    ("My printer says it is offline.", "Restart the print spooler, then the printer.", "You are a helpdesk agent."),
    ("I forgot my password.", "Use the reset link on the login page.", "You are a helpdesk agent."),
    ("The VPN drops every hour.", "Update the VPN client to the latest version.", "Answer in one sentence."),
    ("Can I get a second monitor?", "Yes: file a hardware request in the portal.", "Answer in one sentence."),
    ("Outlook will not open.", "Start it in safe mode and disable the add-ins.", "You are a helpdesk agent."),
]
_ALPACA = [
    {"instruction": "Give a colour.", "input": "", "output": "Blue."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Reverse the words.", "input": "cup book lamp", "output": "lamp book cup"},
    {"instruction": "Say hello in French.", "input": "", "output": "Bonjour !"},
]


def _llama3_custom_data(workdir: Path) -> None:
    """data/raw/tickets-*.jsonl (custom: question/answer/context; two files for the glob) and
    data/raw/alpaca_data.json: enough for a few optimizer steps of batch_size 2 at 512 tokens."""
    raw = workdir / "data" / "raw"
    raw.mkdir(parents=True)
    for part in ("2024", "2025"):
        with open(raw / f"tickets-{part}.jsonl", "w", encoding="utf-8") as handle:
            for i in range(15):
                question, answer, context = _TICKETS[i % len(_TICKETS)]
                record = {"question": f"Ticket {part}-{i}: {question}", "answer": answer, "context": context}
                handle.write(json.dumps(record) + "\n")
    (raw / "alpaca_data.json").write_text(json.dumps(_ALPACA * 3, indent=1))


#: The data files an example reads from disk, by file name; hub data comes from ``offline_hub``.
EXAMPLE_DATA = {"llama3_8b_lora_custom_multinode.yaml": _llama3_custom_data}


def experiment_names(config: dict) -> list[str]:
    """As the README names them: ``name``, else ``{model}_{method}_{dataset[+dataset...]}``."""
    names = []
    for exp in config["experiments"]:
        datasets = [exp["datasets"]] if isinstance(exp["datasets"], str) else exp["datasets"]
        names.append(exp.get("name") or f"{exp['model']}_{exp['method']}_{'+'.join(datasets)}")
    return names


@pytest.fixture(scope="module", params=EXAMPLES)
def example_build(request, tmp_path_factory, offline_hub):
    """``snakemake --configfile examples/FILE.yaml`` run to the default target, beside the demo's
    config.yaml (which must not be read): (workdir, the example's file name, the config as run)."""
    name = request.param
    workdir = tmp_path_factory.mktemp(Path(name).stem)
    (workdir / "config.yaml").write_text((REPO / "config.yaml").read_text())
    config = on_a_cpu(yaml.safe_load((REPO / "examples" / name).read_text()))
    (workdir / name).write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    if name in EXAMPLE_DATA:
        EXAMPLE_DATA[name](workdir)
    snakemake(workdir, target="all", configfiles=(name,))
    return workdir, name, config


def _template(config: dict, exp: dict) -> dict:
    """The experiment's template as XTuner's six fields: the config's own, else XTuner's table."""
    from tunemake.templates import TEMPLATES, template_to_dict

    name = exp.get("template") or config["models"][exp["model"]].get("template", "default")
    return (config.get("templates") or {}).get(name) or template_to_dict(TEMPLATES[name])


def xtuner_text(template: dict, bos: str, eos: str, system: str, turns: list[tuple[str, str | None]]) -> str:
    """The text XTuner's template_map_fn + encode_fn make of a conversation (a last output of
    None: the generation prompt): bos first and after every eos; output + suffix, then eos unless
    the suffix is one, then sep."""
    text, needs_bos = "", True
    for round_, (question, answer) in enumerate(turns, start=1):
        text += bos if needs_bos else ""
        text += (template.get("system") or "").format(system=system) if round_ == 1 and system else ""
        text += template["instruction"].format(input=question, round=round_)
        if answer is None:
            break
        text += answer + template.get("suffix", "")
        needs_bos = not template.get("suffix_as_eos", False)
        text += (eos if needs_bos else "") + template.get("sep", "")
    return text


def _hub_commits(offline_hub, workdir: Path, config: dict) -> set[tuple[str, str, str]]:
    """(repo type, id, commit) of every hub model and dataset a config reads, at its revision."""
    repos = {("model", m["path"], m.get("revision") or "main") for m in config["models"].values()
             if not (workdir / m["path"]).exists()}
    repos |= {("dataset", d["hub"], d.get("revision") or "main") for d in config["datasets"].values() if "hub" in d}
    return {(kind, repo_id, offline_hub.commits[repo_id][revision]) for kind, repo_id, revision in repos}


def fetched(workdir: Path, offline_hub) -> set[tuple[str, str, str]]:
    """(repo type, id, commit) of every receipt in fetched/, each pointing at that commit's snapshot."""
    found = set()
    for path in sorted((workdir / "fetched").glob("*.json")):
        receipt = json.loads(path.read_text())
        snapshot = Path(receipt["snapshot"])
        assert snapshot.name == receipt["commit"] and snapshot in offline_hub.snapshots[receipt["repo_id"]].values()
        found.add((receipt["repo_type"], receipt["repo_id"], receipt["commit"]))
    return found


def test_example_builds_no_demo(example_build):
    workdir, _, _ = example_build
    assert not (workdir / "models" / "tiny").exists()
    assert not (workdir / "data" / "demo").exists()


def test_example_second_run_does_nothing(example_build):
    workdir, name, _ = example_build
    assert planned_jobs(workdir, target="all", configfiles=(name,)) == {}


def test_example_fetched_every_hub_repo_at_its_commit(example_build, offline_hub):
    workdir, _, config = example_build
    assert fetched(workdir, offline_hub) == _hub_commits(offline_hub, workdir, config)


def test_example_trains_every_row_once(example_build):
    """Steps = packed rows // batch_size (one process, no accumulation), in the per-step log and
    the checkpoint's counters; the checkpoint and adapter name the hub id they were trained from."""
    workdir, _, config = example_build
    for name, exp in zip(experiment_names(config), config["experiments"]):
        data = json.loads((workdir / "evals" / name / "epoch_1.json").read_text())["data"]
        rows = json.loads((workdir / data / "stats.json").read_text())["rows"]
        steps = rows // exp.get("batch_size", 1)
        assert steps >= 3, f"{name}: the test's data gives only {steps} steps"
        log = (workdir / "logs" / "train" / name / "epoch_1.metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in log if "step" in json.loads(line)] == list(range(1, steps + 1))
        ckpt = torch.load(workdir / "checkpoints" / name / "epoch_1.pth", map_location="cpu", weights_only=True)
        assert ckpt["counters"]["global_step"] == ckpt["counters"]["steps_per_epoch"] == steps
        hub_id = config["models"][exp["model"]]["path"]
        assert ckpt["base_model"] == hub_id
        adapter = workdir / "adapters" / name / "epoch_1"
        assert json.loads((adapter / "tunemake.json").read_text())["base_model"] == hub_id
        assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == hub_id


def test_example_merges_load_with_vanilla_transformers(example_build):
    """merged/<experiment> loads without tunemake, renders the template trained on as XTuner
    does, and stops generating at the template's stop words."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    workdir, _, config = example_build
    for name, exp in zip(experiment_names(config), config["experiments"]):
        merged = workdir / "merged" / name
        remote = config["models"][exp["model"]].get("trust_remote_code", False)
        tokenizer = AutoTokenizer.from_pretrained(merged, trust_remote_code=remote)
        model = AutoModelForCausalLM.from_pretrained(merged, trust_remote_code=remote)
        template = _template(config, exp)
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "请介绍上海"}]
        assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == xtuner_text(
            template, tokenizer.bos_token, tokenizer.eos_token, "Be brief.", [("Hi", "Hello"), ("请介绍上海", None)])
        stops = GenerationConfig.from_pretrained(merged).eos_token_id
        stops = stops if isinstance(stops, list) else [stops]
        assert {tokenizer.convert_tokens_to_ids(w) for w in template.get("stop_words", [])} <= set(stops)
        ids = torch.tensor([tokenizer.apply_chat_template(messages[:2], add_generation_prompt=True, return_dict=False)])
        logits = model(input_ids=ids).logits
        assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()


def test_example_summary_lists_every_experiment(example_build):
    workdir, _, config = example_build
    with open(workdir / "evals" / "summary.tsv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert sorted((row["experiment"], row["epoch"]) for row in rows) == sorted(
        (name, epoch) for name in experiment_names(config) for epoch in ("0", "1"))


# --- a remote-code model through every stage: full fine-tune, sample generations, evals, chat --


def write_chat_data(workdir: Path) -> None:
    """chat.jsonl: 24 one-turn conversations in two task families (a quarter held out)."""
    with open(workdir / "chat.jsonl", "w", encoding="utf-8") as handle:
        for i in range(24):
            a, b = i % 7, i % 5
            turn = {"input": f"What is {a} + {b}?", "output": str(a + b)} if i % 2 else \
                {"input": f"Echo: word{i}", "output": f"word{i}"}
            handle.write(json.dumps({"task": "sum" if i % 2 else "echo", "conversation": [turn]}) + "\n")


REMOTE_EXPERIMENT = "internlm_full"
EVALUATION_INPUTS = ["请给我介绍五个上海的景点", "Echo: hello"]


@pytest.fixture(scope="module")
def remote_code_build(tmp_path_factory, offline_hub) -> Path:
    """internlm/internlm-chat-7b (own code, slow Python tokenizer), method full, run to `all`."""
    workdir = tmp_path_factory.mktemp("remote_code")
    write_chat_data(workdir)
    write_config(workdir, {
        "models": {"internlm": {"path": INTERNLM, "template": "internlm_chat", "trust_remote_code": True}},
        "datasets": {"chat": {"path": "chat.jsonl", "heldout_fraction": 0.25}},
        "experiments": [{"name": REMOTE_EXPERIMENT, "model": "internlm", "datasets": "chat", "method": "full",
                         "epochs": 1, "max_length": 128, "grad_accumulation": 1,
                         "evaluation_inputs": EVALUATION_INPUTS}],
        "evaluation": {"max_prompts": 4, "max_new_tokens": 8},
    })
    snakemake(workdir, target="all")
    return workdir


def test_remote_code_sample_generations_are_in_the_checkpoint(remote_code_build):
    ckpt = torch.load(remote_code_build / "checkpoints" / REMOTE_EXPERIMENT / "epoch_1.pth", map_location="cpu",
                      weights_only=True)
    assert ckpt["base_model"] == INTERNLM and ckpt["method"]["type"] == "full"
    samples = ckpt["metrics"]["samples"]
    assert [s["prompt"] for s in samples] == EVALUATION_INPUTS
    assert all(isinstance(s["output"], str) and "<eoa>" not in s["output"] for s in samples)


def test_remote_code_evaluations_score_generations(remote_code_build):
    from transformers import AutoTokenizer

    from tunemake.templates import TEMPLATES, template_to_dict

    workdir = remote_code_build
    tokenizer = AutoTokenizer.from_pretrained(INTERNLM, trust_remote_code=True)
    assert not tokenizer.is_fast
    template = template_to_dict(TEMPLATES["internlm_chat"])
    for epoch, model in ((0, INTERNLM), (1, f"merges/{REMOTE_EXPERIMENT}/epoch_1")):
        result = json.loads((workdir / "evals" / REMOTE_EXPERIMENT / f"epoch_{epoch}.json").read_text())
        assert result["model"] == model
        heldout = [json.loads(line) for line in (workdir / result["data"] / "heldout.jsonl").read_text().splitlines()]
        assert len(heldout) >= 2 and result["heldout"]["records"] == len(heldout)
        assert result["heldout"]["loss"] > 0 and torch.isfinite(torch.tensor(result["heldout"]["loss"]))
        scored = heldout[:4]
        assert result["exact_match"]["all"]["total"] == len(scored)
        for family in {r["task"] for r in scored}:
            expected = [r for r in scored if r["task"] == family]
            assert result["exact_match"][family]["total"] == len(expected)
        for example, record in zip(result["examples"], scored):
            turn = record["conversation"][-1]
            assert example["reference"] == turn["output"]
            assert example["prompt"] == xtuner_text(template, tokenizer.bos_token, tokenizer.eos_token, "",
                                                    [(turn["input"], None)])
            assert example["correct"] == (example["answer"].strip() == example["reference"].strip())
        correct = sum(e["correct"] for e in result["examples"])
        assert result["exact_match"]["all"]["correct"] == correct


def test_remote_code_merge_carries_its_code_and_the_training(remote_code_build, offline_hub):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = remote_code_build / "merged" / REMOTE_EXPERIMENT
    snapshot = offline_hub.snapshots[INTERNLM]["main"]
    for code in sorted(snapshot.glob("*.py")):
        assert (merged / code.name).read_bytes() == code.read_bytes()
    model = AutoModelForCausalLM.from_pretrained(merged, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(merged, trust_remote_code=True)
    assert type(model).__name__ == "InternLMForCausalLM" and type(model).__module__.startswith("transformers_modules")
    assert type(tokenizer).__name__ == "InternLMTokenizer"
    # every weight is trained in a full fine-tune: compared in the merge's dtype, most differ
    base = load_file(snapshot / "model.safetensors")
    merged_weights = model.state_dict()
    assert set(merged_weights) == set(base)
    changed = [k for k, v in merged_weights.items() if not torch.equal(v, base[k].to(v.dtype))]
    assert len(changed) > len(base) / 2, f"only {changed} differ from the base"


def _tunemake(*args: str, cwd: Path, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunemake.cli", *args], cwd=cwd, input=stdin, capture_output=True,
                          text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_remote_code_chat_answers(remote_code_build):
    prompts = '{"prompt": "Echo: hello"}\n{"prompt": "And again?"}\n'
    proc = _tunemake("chat", f"merged/{REMOTE_EXPERIMENT}", "--batch", "-", "--trust-remote-code",
                     "--max-new-tokens", "8", cwd=remote_code_build, stdin=prompts)
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(a["line"], a["turn"], a["prompt"]) for a in answers] == [(1, 1, "Echo: hello"), (2, 2, "And again?")]
    assert all(isinstance(a["answer"], str) for a in answers)


# --- LoRA from a hub id at a revision ----------------------------------------------------------


def test_hub_revisions_are_fetched_at_their_commits(tmp_path, offline_hub):
    """Two models, one repo: `revision: v1` and the default branch; each receipt holds its commit."""
    write_chat_data(tmp_path)
    write_config(tmp_path, {
        "models": {"llama3_v1": {"path": LLAMA3, "revision": "v1", "template": "llama3_chat"},
                   "llama3": {"path": LLAMA3, "template": "llama3_chat"}},
        "datasets": {"chat": {"path": "chat.jsonl"}},
        "experiments": [{"name": "v1_lora", "model": "llama3_v1", "datasets": "chat", "method": "lora", "epochs": 1},
                        {"name": "main_lora", "model": "llama3", "datasets": "chat", "method": "lora", "epochs": 1}],
    })
    plan = planned_jobs(tmp_path, target="all")
    assert plan["fetch_hub"] == 2 and plan["train_epoch"] == 2
    assert plan["templated_dataset"] == 2  # the revision is part of the data's identity
    snakemake(tmp_path, "--until", "fetch_hub", target="all")
    commits = offline_hub.commits[LLAMA3]
    assert commits["v1"] != commits["main"]
    assert fetched(tmp_path, offline_hub) == {("model", LLAMA3, commits["v1"]), ("model", LLAMA3, commits["main"])}
    assert "fetch_hub" not in planned_jobs(tmp_path, target="all")


# --- errors: one line, no traceback ------------------------------------------------------------


def _assert_one_line(text: str, *fragments: str) -> None:
    assert any(all(f in line for f in fragments) for line in text.splitlines()), \
        f"no line holds all of {fragments}:\n{text[-4000:]}"
    assert "Traceback" not in text and 'File "' not in text, text[-4000:]


@pytest.mark.parametrize("model, fragments", [
    ({"path": "acme/no-such-model", "revision": "v2"},
     ("models.base.path", "acme/no-such-model", "v2", "hf download acme/no-such-model --revision v2")),
    ({"path": INTERNLM, "template": "internlm_chat"}, ("models.base.trust_remote_code", INTERNLM)),
], ids=["not-cached", "remote-code-untrusted"])
def test_hub_model_errors_before_any_job(tmp_path, offline_hub, model, fragments):
    write_chat_data(tmp_path)
    write_config(tmp_path, {"models": {"base": model}, "datasets": {"chat": {"path": "chat.jsonl"}},
                            "experiments": [{"model": "base", "datasets": "chat", "method": "lora"}]})
    proc = snakemake(tmp_path, "-n", check=False, target="all")
    assert proc.returncode != 0
    _assert_one_line(proc.stdout + proc.stderr, "error: config.yaml: ", *fragments)


def test_model_code_that_fails_to_import_is_one_line(tmp_path, offline_hub):
    """InternLM2's own code does not import under transformers 5: the train job says so in one line."""
    import transformers

    write_chat_data(tmp_path)
    write_config(tmp_path, {
        "models": {"internlm2": {"path": INTERNLM2, "template": "internlm2_chat", "trust_remote_code": True}},
        "datasets": {"chat": {"path": "chat.jsonl"}},
        "experiments": [{"name": "broken", "model": "internlm2", "datasets": "chat", "method": "lora",
                         "epochs": 1, "max_length": 128}],
    })
    proc = snakemake(tmp_path, check=False, target="checkpoints/broken/epoch_1.pth")
    assert proc.returncode != 0
    fragments = (INTERNLM2, "own code", f"transformers {transformers.__version__}")
    _assert_one_line(proc.stdout + proc.stderr, *fragments)
    _assert_one_line((tmp_path / "logs" / "train" / "broken" / "epoch_1.log").read_text(), *fragments)
    leftovers = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "checkpoints").rglob("*")) \
        if (tmp_path / "checkpoints").exists() else []
    assert leftovers in ([], ["checkpoints/broken"]), leftovers
