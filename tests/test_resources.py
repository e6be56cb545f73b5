"""Resource requests (tunemake.resources) and what the rules ask a scheduler for, read from dry runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from smk import REPO, snakemake, write_config

from tunemake.config import load_config
from tunemake.errors import ConfigError
from tunemake.resources import DEFAULT_TRAIN_RUNTIME, LARGEST_COMMON_GPU_MB, estimate_resources

# Llama-2's published config.json shapes: a 7B with full attention, a 70B with grouped-query attention.
LLAMA2_7B = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 11008,
             "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
             "vocab_size": 32000, "tie_word_embeddings": False, "torch_dtype": "float16"}
LLAMA2_70B = {**LLAMA2_7B, "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
              "num_hidden_layers": 80, "num_key_value_heads": 8}


def model_dir(root: Path, name: str, config: dict) -> str:
    path = root / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def estimates(models: dict, *experiments: dict, datasets: dict | None = None) -> dict[str, dict]:
    """Experiment name -> estimate_resources, for a config of these models and experiments."""
    config = load_config({"models": models, "datasets": datasets or {"chat": {"hub": "org/chat"}},
                          "experiments": [{"datasets": "chat", **e} for e in experiments]})
    return {name: estimate_resources(exp, config) for name, exp in config["experiments"].items()}


@pytest.fixture
def llamas(tmp_path):
    return {"llama7b": {"path": model_dir(tmp_path, "llama7b", LLAMA2_7B), "dtype": "bfloat16"},
            "llama70b": {"path": model_dir(tmp_path, "llama70b", LLAMA2_70B), "dtype": "bfloat16"}}


def test_parameter_counts_match_the_published_sizes(llamas):
    found = estimates(llamas, {"model": "llama7b", "method": "lora"}, {"model": "llama70b", "method": "lora"})
    assert found["llama7b_lora_chat"]["model"]["parameters"] == pytest.approx(6.74e9, rel=0.01)
    assert found["llama70b_lora_chat"]["model"]["parameters"] == pytest.approx(68.98e9, rel=0.01)
    assert found["llama7b_lora_chat"]["model"]["source"].endswith("config.json")


def test_7b_qlora_asks_for_less_than_a_70b_full_fine_tune(llamas):
    found = estimates(llamas, {"model": "llama7b", "method": "qlora", "gpus": 1},
                      {"model": "llama70b", "method": "full", "gpus": 8, "deepspeed": "zero3", "nodes": 4})
    small, large = found["llama7b_qlora_chat"], found["llama70b_full_chat"]
    for stage in ("train", "convert", "evaluate"):
        assert small[stage]["mem_mb"] < large[stage]["mem_mb"], stage
    assert small["train"]["gpu_mem_mb"] < large["train"]["gpu_mem_mb"]
    assert small["train"]["threads"] < large["train"]["threads"]
    # A 7B QLoRA fits a 24 GB GPU (QLoRA paper: a 7B LLaMA in under 10 GB beside activations).
    assert small["train"]["gpu_mem_mb"] < 24_000


def test_lora_needs_less_gpu_memory_than_full_and_qlora_less_than_lora(llamas):
    found = estimates(llamas, *({"model": "llama7b", "method": m, "gpus": 1} for m in ("full", "lora", "qlora")))
    gpu = {name.split("_")[1]: e["train"]["gpu_mem_mb"] for name, e in found.items()}
    assert gpu["qlora"] < gpu["lora"] < gpu["full"]
    # The full fine-tune holds float32 weights, gradients and Adam moments: 16 bytes a parameter.
    assert gpu["full"] > 16 * 6.7e9 / 2**20


def test_lora_without_dropout_counts_the_b_copies_of_the_fast_paths_concatenated_products(llamas):
    config = load_config({"models": llamas, "datasets": {"chat": {"hub": "org/chat"}},
                          "methods": {"nodrop": {"type": "lora", "dropout": 0.0}},
                          "experiments": [{"datasets": "chat", "model": "llama7b", "method": m, "gpus": 1}
                                          for m in ("lora", "nodrop")]})
    gpu = {exp["method"]: estimate_resources(exp, config)["train"]["gpu_mem_mb"]
           for exp in config["experiments"].values()}
    # the stacked q/k/v [12288, 4096] and gate/up [22016, 4096] weights get 3 x 64 and 2 x 64 more
    # columns, bf16, in each of 32 layers (x 1.1, the estimate's margin): 348 MiB
    extra = (3 * 4096 * 3 * 64 + 2 * 11008 * 2 * 64) * 32 * 2 * 1.1 / 2**20
    assert gpu["nodrop"] - gpu["lora"] == pytest.approx(extra, abs=100)  # each rounded up to 100 MB


def test_zero3_shards_the_training_state_over_every_gpu_of_the_job(llamas):
    runs = [{"model": "llama70b", "method": "full", "gpus": 8, "nodes": nodes, "deepspeed": ds, "name": f"{ds}_{nodes}"}
            for ds in ("zero3", "zero2") for nodes in (1, 4)]
    gpu = {name: e["train"]["gpu_mem_mb"] for name, e in estimates(llamas, *runs).items()}
    assert gpu["zero3_4"] < gpu["zero3_1"] < gpu["zero2_1"]
    assert gpu["zero2_4"] < gpu["zero2_1"]  # gradients and optimizer states shard; weights do not
    assert gpu["zero2_4"] > gpu["zero3_4"]


def test_zero3_processes_hold_their_partition_of_the_weights_in_host_memory(llamas):
    runs = [{"model": "llama7b", "method": "lora", "gpus": 0, "nproc": 2, "deepspeed": ds, "name": ds or "ddp"}
            for ds in (None, "zero3")]
    host = {name: e["train"]["mem_mb"] for name, e in estimates(llamas, *runs).items()}
    # each of the 2 CPU processes keeps half of the bfloat16 weights, not all of them: the job
    # holds one copy less (with the estimate's margins, less than two)
    weights_mib = 6.74e9 * 2 / 2**20
    assert weights_mib < host["ddp"] - host["zero3"] < 2 * weights_mib


def test_a_job_without_gpus_holds_the_training_state_in_host_memory(llamas):
    found = estimates(llamas, {"model": "llama7b", "method": "lora", "gpus": 1, "name": "gpu"},
                      {"model": "llama7b", "method": "lora", "gpus": 0, "name": "cpu"})
    assert found["gpu"]["train"]["mem_mb"] < found["cpu"]["train"]["mem_mb"]
    assert found["cpu"]["train"]["gpu_mem_mb"] is None and found["cpu"]["evaluate"]["gpu_mem_mb"] is None


def test_evaluation_asks_for_the_fewest_of_the_training_gpus_that_hold_the_model(llamas):
    runs = [{"model": model, "method": "lora", "gpus": gpus, "name": f"{model}_{gpus}"}
            for model in ("llama7b", "llama70b") for gpus in (0, 1, 8)]
    found = {name: e["evaluate"] for name, e in estimates(llamas, *runs).items()}
    # 138 GB of bf16 weights: more than one 80 GB GPU holds, so a few of the job's 8, each within 80 GB.
    spread = found["llama70b_8"]
    assert 1 < spread["gpus"] < 8 and spread["gpu_mem_mb"] <= LARGEST_COMMON_GPU_MB
    assert spread["gpus"] * spread["gpu_mem_mb"] > 2 * 68.98e9 / 2**20  # every weight is on one of them
    one_fewer = estimates(llamas, {"model": "llama70b", "method": "lora", "gpus": 8,
                                   "resources": {"evaluate": {"gpus": spread["gpus"] - 1}}})
    assert next(iter(one_fewer.values()))["evaluate"]["gpu_mem_mb"] > LARGEST_COMMON_GPU_MB
    # Never more than training has on a node: with one GPU, that one (too small: a warning says so).
    assert found["llama70b_1"]["gpus"] == 1 and found["llama70b_1"]["gpu_mem_mb"] > LARGEST_COMMON_GPU_MB
    assert found["llama7b_1"]["gpus"] == found["llama7b_8"]["gpus"] == 1
    assert found["llama7b_8"]["gpu_mem_mb"] == found["llama7b_1"]["gpu_mem_mb"] <= LARGEST_COMMON_GPU_MB
    # Training on the CPU: evaluation too, in float32.
    for name in ("llama7b_0", "llama70b_0"):
        assert (found[name]["gpus"], found[name]["gpu_mem_mb"]) == (0, None)
    assert found["llama7b_0"]["mem_mb"] > found["llama7b_1"]["mem_mb"]


def test_an_experiment_sets_its_evaluations_gpus(llamas, tmp_path, monkeypatch):
    import huggingface_hub.constants

    def evaluate_on(gpus: int) -> dict:
        return {"evaluate": {"gpus": gpus}}

    runs = [("llama70b", 8, "set", 2), ("llama70b", 8, "four", 4), ("llama7b", 0, "cpu", 2)]
    found = estimates(llamas, *({"model": model, "method": "lora", "gpus": gpus, "name": name,
                                 "resources": evaluate_on(on)} for model, gpus, name, on in runs))
    assert found["set"]["evaluate"]["gpus"] == 2
    # gpu_mem_mb is per GPU of those asked for.
    assert found["four"]["evaluate"]["gpu_mem_mb"] < found["set"]["evaluate"]["gpu_mem_mb"]
    assert found["cpu"]["evaluate"]["gpus"] == 2 and found["cpu"]["evaluate"]["gpu_mem_mb"] > 0
    with pytest.raises(ConfigError, match=r"resources.evaluate.gpus"):
        estimates(llamas, {"model": "llama7b", "method": "lora", "resources": evaluate_on(-1)})
    with pytest.raises(ConfigError, match="unknown key"):  # train's GPUs are the experiment's gpus
        estimates(llamas, {"model": "llama7b", "method": "lora", "resources": {"train": {"gpus": 2}}})
    # A model of unknown size: every training GPU of a node, unless set.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    memory = {stage: {"mem_mb": 9000} for stage in ("train", "convert", "merge", "evaluate")}
    unsized = estimates({"m": {"path": "org/mystery-model"}},
                        {"model": "m", "method": "lora", "gpus": 4, "name": "all", "resources": memory},
                        {"model": "m", "method": "lora", "gpus": 4, "name": "set",
                         "resources": {**memory, "evaluate": {"mem_mb": 9000, "gpus": 1}}})
    assert (unsized["all"]["evaluate"]["gpus"], unsized["set"]["evaluate"]["gpus"]) == (4, 1)


def test_convert_and_merge_hold_the_checkpoint_not_the_base_model(llamas):
    found = estimates(llamas, {"model": "llama70b", "method": "lora", "gpus": 1},
                      {"model": "llama7b", "method": "full", "gpus": 1})
    lora, full = found["llama70b_lora_chat"], found["llama7b_full_chat"]
    # a 70B LoRA adapter of r=64 is 3.3 GB in float32; the base, 138 GB in bfloat16
    assert lora["convert"]["mem_mb"] < 20_000 and lora["merge"]["mem_mb"] < 20_000
    # a full fine-tune's checkpoint holds every weight in float32, and nothing else is held whole
    checkpoint_mb = 4 * 6.74e9 / 2**20
    assert checkpoint_mb < full["convert"]["mem_mb"] < 1.3 * (checkpoint_mb + 3000)
    assert "gpu_mem_mb" not in lora["data"]  # a CPU job


def test_training_runtime_follows_the_tokens_and_the_gpus(llamas, tmp_path):
    small, large = tmp_path / "small.jsonl", tmp_path / "large.jsonl"
    small.write_text("{}\n")
    with open(large, "wb") as handle:  # sparse: 4 GB on paper, about 10^9 tokens
        handle.truncate(4 * 10**9)
    datasets = {"small": {"path": str(small)}, "large": {"path": str(large)}, "hub": {"hub": "org/chat"}}
    runs = [{"model": "llama7b", "method": "qlora", "gpus": gpus, "datasets": data, "name": f"{data}_{gpus}"}
            for data in ("small", "large", "hub") for gpus in (1, 8)]
    found = estimates(llamas, *runs, datasets=datasets)
    runtime = {name: e["train"]["runtime"] for name, e in found.items()}
    assert runtime["small_1"] < runtime["large_8"] < runtime["large_1"]
    assert found["large_1"]["train"]["tokens"] == 10**9
    # A hub dataset has no size before it is tokenized: the configurable default applies.
    assert runtime["hub_1"] == runtime["hub_8"] == DEFAULT_TRAIN_RUNTIME
    assert found["large_1"]["data"]["mem_mb"] > found["small_1"]["data"]["mem_mb"]


def test_the_built_datasets_token_count_is_used_once_it_exists(llamas, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_text("x" * 400)
    run = {"model": "llama7b", "method": "qlora", "gpus": 1, "datasets": "d"}
    config = load_config({"models": llamas, "datasets": {"d": {"path": "data.jsonl"}},
                          "experiments": [{**run}]})
    exp = next(iter(config["experiments"].values()))
    before = estimate_resources(exp, config)["train"]
    built = tmp_path / "data" / "templated" / exp["data_key"]
    built.mkdir(parents=True)
    (built / "stats.json").write_text(json.dumps({"tokens": 5 * 10**8}))
    after = estimate_resources(exp, config)["train"]
    assert (before["tokens"], after["tokens"]) == (100, 5 * 10**8)
    assert after["runtime"] > before["runtime"]


def test_a_model_without_config_json_is_sized_from_its_weights(tmp_path):
    from safetensors.numpy import save_file

    weights = tmp_path / "weights_only"
    weights.mkdir()
    tensors = {"a": np.zeros((1000, 300), np.float16), "b": np.zeros(7, np.float16)}
    save_file(tensors, str(weights / "model.safetensors"))
    found = estimates({"m": {"path": str(weights)}}, {"model": "m", "method": "full"})["m_full_chat"]
    assert found["model"]["parameters"] == 300_007
    assert "weights" in found["model"]["source"]


def test_a_demo_model_is_sized_before_the_workflow_builds_it(tmp_path):
    demo = {"vocab_size": 2048, "hidden_size": 192, "num_layers": 2, "num_heads": 3, "intermediate_size": 512}
    models = {"tiny": {"path": str(tmp_path / "not_built_yet"), "demo": demo},
              "wide": {"path": str(tmp_path / "not_built_either"), "demo": {**demo, "hidden_size": 384}}}
    found = estimates(models, {"model": "tiny", "method": "full"}, {"model": "wide", "method": "full"})
    tiny, wide = found["tiny_full_chat"]["model"]["parameters"], found["wide_full_chat"]["model"]["parameters"]
    # embeddings and head 2 * 2048 * 192, 2 layers of 4 * 192^2 attention + 3 * 192 * 512 MLP, norms
    assert tiny == 2 * 2048 * 192 + 2 * (4 * 192**2 + 3 * 192 * 512 + 2 * 192) + 192
    assert wide > tiny
    assert not (tmp_path / "not_built_yet").exists()


def test_a_hub_model_in_the_local_cache_is_read_from_its_config(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--org--chat-model" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(LLAMA2_70B))
    (cache / "models--org--chat-model" / "refs").mkdir()
    (cache / "models--org--chat-model" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    found = estimates({"m": {"path": "org/chat-model"}}, {"model": "m", "method": "lora"})["m_lora_chat"]
    assert found["model"]["parameters"] == pytest.approx(68.98e9, rel=0.01)


def test_a_hub_model_not_on_disk_is_sized_from_its_name_or_refused_clearly(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    named = estimates({"m": {"path": "meta-llama/Llama-2-7b-hf"}}, {"model": "m", "method": "qlora"})
    assert named["m_qlora_chat"]["model"]["parameters"] == pytest.approx(7e9, rel=0.2)

    with pytest.raises(ConfigError, match=r"org/mystery-model: cannot estimate.*config\.json.*resources"):
        estimates({"m": {"path": "org/mystery-model"}}, {"model": "m", "method": "qlora"})
    # With every memory request set by hand, nothing needs the model's size.
    memory = {stage: {"mem_mb": 9000} for stage in ("train", "convert", "merge", "evaluate")}
    found = estimates({"m": {"path": "org/mystery-model"}}, {"model": "m", "method": "qlora", "resources": memory})
    assert found["m_qlora_chat"]["train"]["mem_mb"] == 9000


def test_an_experiments_resources_replace_the_estimate_key_by_key(llamas):
    override = {"train": {"mem_mb": 123_000, "slurm_partition": "long"}, "merge": {"runtime": 5}}
    found = estimates(llamas, {"model": "llama7b", "method": "qlora", "gpus": 1, "name": "set", "resources": override},
                      {"model": "llama7b", "method": "qlora", "gpus": 1, "name": "unset"})
    found_set = found["set"]
    assert found_set["train"]["mem_mb"] == 123_000 != found["unset"]["train"]["mem_mb"]
    assert found_set["train"]["slurm_partition"] == "long"
    assert found_set["train"]["runtime"] == found["unset"]["train"]["runtime"]  # unset keys keep the estimate
    assert found_set["merge"]["runtime"] == 5


@pytest.mark.parametrize("bad, message", [
    ({"gpu_model": "a100:2"}, "gpu_model"),
    ({"resources": {"train": {"memory": 1}}}, "unknown key"),
    ({"resources": {"training": {}}}, "unknown key"),
    ({"resources": {"train": {"runtime": 0}}}, "runtime"),
])
def test_the_schema_refuses_malformed_resource_keys(llamas, bad, message):
    with pytest.raises(ConfigError, match=message):
        estimates(llamas, {"model": "llama7b", "method": "lora", **bad})


# --- the rules, as Snakemake sees them ---------------------------------------------------------

def planned_resources(workdir: Path, *args: str) -> dict[tuple[str, str], dict[str, str]]:
    """(rule, wildcards) -> {resource: value, "threads": n} from a dry run's job listing."""
    out = snakemake(workdir, "-n", *args, target="all").stdout
    jobs = {}
    for block in re.split(r"\n(?=rule \w+:)", out):
        rule = re.match(r"rule (\w+):", block)
        if not rule:
            continue
        wildcards = re.search(r"^\s+wildcards: (.*)$", block, re.M)
        resources = re.search(r"^\s+resources: (.*)$", block, re.M)
        threads = re.search(r"^\s+threads: (\d+)$", block, re.M)
        values = dict(item.split("=", 1) for item in resources.group(1).split(", ")) if resources else {}
        values["threads"] = threads.group(1) if threads else "1"
        jobs[(rule.group(1), wildcards.group(1) if wildcards else "")] = values
    return jobs


def small_demo_config() -> dict:
    return yaml.safe_load((REPO / "tests" / "configs" / "demo_small.yaml").read_text())


def test_every_cluster_rule_asks_for_threads_memory_and_runtime(tmp_path):
    config = small_demo_config()
    config["experiments"][2].update(gpus=2, gpu_model="a100")  # the QLoRA one asks for GPUs
    config["models"]["llama70b"] = {"path": model_dir(tmp_path, "llama70b", LLAMA2_70B), "template": "internlm2_chat"}
    config["experiments"].append({"model": "llama70b", "datasets": "tasks", "method": "lora", "gpus": 8})
    write_config(tmp_path, config)
    jobs = planned_resources(tmp_path)
    local = {"all", "merged", "eval_summary"}
    rules = {rule for rule, _ in jobs}
    assert {"demo_data", "demo_tokenizer", "demo_model", "templated_dataset", "train_epoch", "convert_epoch",
            "merge_epoch", "evaluate_epoch"} <= rules
    for (rule, wildcards), values in jobs.items():
        if rule not in local:
            assert int(values["mem_mb"]) > 0 and int(values["runtime"]) > 0, (rule, wildcards, values)
    on_gpu = {rule: values for (rule, wildcards), values in jobs.items() if "tiny_qlora_tasks" in wildcards}
    assert (on_gpu["train_epoch"]["gpu"], on_gpu["train_epoch"]["gpu_model"]) == ("2", "a100")
    assert int(on_gpu["train_epoch"]["gpu_mem_mb"]) > 0
    # The tiny model fits one of the two: evaluation asks for that one; a 70B, for a few of its 8.
    assert (on_gpu["evaluate_epoch"]["gpu"], on_gpu["evaluate_epoch"]["gpu_model"]) == ("1", "a100")
    large = {rule: values for (rule, wildcards), values in jobs.items() if "llama70b_lora_tasks" in wildcards}
    assert large["train_epoch"]["gpu"] == "8" and 1 < int(large["evaluate_epoch"]["gpu"]) < 8
    # Data, convert and merge run on CPU nodes; so does training that asks for no GPU.
    for (rule, wildcards), values in jobs.items():
        if rule in ("templated_dataset", "convert_epoch", "merge_epoch") or "=tiny_full_corpus," in wildcards + ",":
            assert values.get("gpu", "0") == "0" and "gpu_model" not in values, (rule, wildcards, values)


def test_per_experiment_resources_win_over_estimates_and_set_resources_over_both(tmp_path):
    config = small_demo_config()
    config["experiments"][2]["resources"] = {"train": {"mem_mb": 77_000, "runtime": 999, "threads": 1,
                                                       "slurm_partition": "long"},
                                             "merge": {"mem_mb": 66_000}, "evaluate": {"gpus": 2}}
    write_config(tmp_path, config)

    def train(jobs, experiment):
        return next(v for (rule, wc), v in jobs.items() if rule == "train_epoch" and f"experiment={experiment}," in wc)

    jobs = planned_resources(tmp_path, "--default-resources", "slurm_partition=general")
    qlora, full = train(jobs, "tiny_qlora_tasks"), train(jobs, "tiny_full_corpus")
    assert [qlora[key] for key in ("mem_mb", "runtime", "threads", "slurm_partition")] == ["77000", "999", "1", "long"]
    assert full["mem_mb"] != "77000" and full["runtime"] != "999"
    # An experiment that sets no partition keeps the profile's default one.
    assert full["slurm_partition"] == "general"
    merges = {wc: v["mem_mb"] for (rule, wc), v in jobs.items() if rule == "merge_epoch"}
    assert [m for wc, m in merges.items() if "tiny_qlora_tasks" in wc] == ["66000"]
    assert all(m != "66000" for wc, m in merges.items() if "tiny_qlora_tasks" not in wc)
    # An experiment training on the CPU evaluates on the GPUs it asks for (any model: no gpu_model).
    evals = {wc: (v.get("gpu", "0"), v.get("gpu_model")) for (rule, wc), v in jobs.items() if rule == "evaluate_epoch"}
    assert {e for wc, e in evals.items() if "tiny_qlora_tasks" in wc} == {("2", None)}
    assert all(e == ("0", None) for wc, e in evals.items() if "tiny_qlora_tasks" not in wc)

    # --set-resources (a profile's set-resources) is applied last, to every experiment of the rule.
    jobs = planned_resources(tmp_path, "--set-resources", "train_epoch:mem_mb=5000", "train_epoch:slurm_partition=gpu")
    for experiment in ("tiny_qlora_tasks", "tiny_full_corpus"):
        assert (train(jobs, experiment)["mem_mb"], train(jobs, experiment)["slurm_partition"]) == ("5000", "gpu")
