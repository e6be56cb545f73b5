"""Benchmark every stage's memory on 7B-wide, shallow Llamas: what grows when the model does.

Run from the repository root: ``python bench/stage_memory.py [--layers 2 4] [--json out.json]``.
About 8 minutes on 2 CPU cores. Everything is built in a temporary directory, seeded, offline:
for each depth, a random float16 Llama of Llama-2-7B's width (hidden 4096, MLP 11008, 32 heads,
vocab 32000, untied), a small tokenizer and 8 short conversations (6 for training). Then each stage runs as the
workflow runs it, in fresh processes: data (templated dataset); one LoRA epoch (rank 16, every
linear layer, 64-token rows, batch 1: a few steps) in 1 process, in 2 processes (DDP) and in 2
processes under ZeRO-3 (all on the CPU, so weights in float32); convert (the 1-process epoch);
merge; evaluate (2 prompts, 8 new tokens).

For each stage and process it prints the peak RSS beyond what the imports alone take (``VmHWM``
minus ``VmRSS`` after every import) and the wall time, beside the model's float32 weights. For
training, "load" is the peak up to the engine being built (weights loaded, LoRA applied, DeepSpeed
initialised) and the time it took; "train" the peak after it (the steps, the held-out loss, writing
the epoch) and the whole stage's time.

Targets (issue 24), on what each grows by from the smallest to the largest depth:

- convert: at most the added adapter (float32) + 50 MB;
- ZeRO-3 load: per process, at most 0.6 x the added float32 weights (half of them is its partition);
- merge: at most the added adapter + one output shard (2 GB, merge's default);
- the epoch fingerprint: the same time (within 20%) at every depth (it reads no weight).

A missed target prints FAIL and the run exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

MB = 1e6
CONVERT_SLACK = 50 * MB
MERGE_SHARD = 2e9  # merge_model's max_shard_size default
ZERO3_SHARE = 0.6
FINGERPRINT_SPREAD = 0.2
TRAIN_VARIANTS = {"1 process": (1, None), "2 processes DDP": (2, None), "2 processes ZeRO-3": (2, "zero3")}
HERE = Path(__file__).resolve()


def rss_kib(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def restart_peak() -> None:
    """Make ``VmHWM`` start again from the RSS now (Linux: ``clear_refs`` 5)."""
    Path("/proc/self/clear_refs").write_text("5")


# --- what the parent builds ------------------------------------------------------------------------

def experiment_name(variant: str) -> str:
    return variant.replace(" ", "_").replace("-", "")


def config() -> dict:
    experiments = [{"name": experiment_name(name), "model": "base", "datasets": "qa",
                    "method": "lora16", "epochs": 1, "max_length": 64, "batch_size": 1, "grad_accumulation": 1,
                    "gpus": 0, "nproc": nproc, "deepspeed": deepspeed, "lr": 1e-4}
                   for name, (nproc, deepspeed) in TRAIN_VARIANTS.items()]
    return {"models": {"base": {"path": "models/base", "template": "internlm2_chat"}},
            "datasets": {"qa": {"path": "data/qa.jsonl", "format": "openai", "heldout_fraction": 0.25}},
            "methods": {"lora16": {"type": "lora", "r": 16, "alpha": 32, "dropout": 0.0}},
            "experiments": experiments}


def build(root: Path, layers: int) -> dict:
    """The base model, tokenizer and data under ``root``, in this process."""
    import torch
    from transformers import LlamaConfig

    from tunemake.demo import build_demo_tokenizer
    from tunemake.shards import DTYPE_NAMES, PlannedTensor, ShardWriter
    from tunemake.templates import TEMPLATES
    from tunemake.train.model import empty_model
    from tunemake.train.spec import BaseModel, Method

    base = root / "models" / "base"
    base.mkdir(parents=True)
    records = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}? Answer with the number only."},
                             {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
               for a, b in zip(range(11, 19), range(97, 89, -1))]
    (root / "data").mkdir()
    (root / "data" / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    corpus = root / "data" / "corpus.txt"
    corpus.write_text("\n".join(m["content"] for r in records for m in r["messages"]) + "\n")
    build_demo_tokenizer(corpus, base, TEMPLATES["internlm2_chat"], vocab_size=300)
    LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, bos_token_id=1,
                eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, dtype="float16").save_pretrained(base)
    torch.manual_seed(0)
    model = empty_model(Method("full"), BaseModel(str(base), dir=str(base)), "float16")
    planned = [PlannedTensor(name, DTYPE_NAMES[torch.float16], tuple(t.shape)) for name, t in model.state_dict().items()]
    with ShardWriter(base / "model.safetensors", planned) as writer:
        for tensor in planned:
            writer.write(torch.randn(tensor.shape).mul_(0.02).half())
    return {"layers": layers, "parameters": sum(p.numel() for p in model.parameters())}


# --- the stages, each in a child process -----------------------------------------------------------

def child(stage: str, root: Path, report: Path, args: list[str]) -> None:
    """Run one stage in this process (under torchrun for training) and write its measurements."""
    os.chdir(root)
    import deepspeed  # noqa: F401  (imported by every train variant: the baseline is the same)
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import tunemake.train.loop as loop
    from tunemake import convert, data, evaluate, merge
    from tunemake.config import load_config
    from tunemake.paths import templated_dataset

    resolved = load_config(config())
    experiments = resolved["experiments"]
    first = next(iter(experiments.values()))
    data_dir = templated_dataset(first["data_key"])
    marks: dict = {}
    imports = rss_kib("VmRSS")
    started = time.perf_counter()
    if stage == "data":
        data.build_templated_dataset(first["data_recipe"], data_dir)
    elif stage == "fingerprint":
        marks["median_s"] = _fingerprint_times([Path(a) for a in args])
    elif stage == "train":
        _train(loop, experiments[args[0]], resolved, data_dir, marks)
    elif stage == "convert":
        convert.convert_checkpoint(args[0], "out/adapter")
    elif stage == "merge":
        merge.merge_model("out/adapter", "out/merged")
    elif stage == "evaluate":
        evaluate.evaluate_model("out/merged", data_dir, "out/eval.json", template="internlm2_chat", max_prompts=2,
                                max_new_tokens=8, batch_size=2, threads=2)
    marks.update(seconds=time.perf_counter() - started, imports_kib=imports, peak_kib=rss_kib("VmHWM"))
    rank = os.environ.get("RANK", "0")
    report.with_name(f"{report.name}.{rank}").write_text(json.dumps(marks))


def _fingerprint_times(roots: list[Path]) -> list[float]:
    """The median time of the first epoch's fingerprint in each project, timed in turns (one
    process, so that the depths share its state)."""
    from tunemake.config import load_config
    from tunemake.paths import templated_dataset
    from tunemake.train.checkpoint import fingerprint
    from tunemake.train.spec import EpochSpec

    specs = []
    for root in roots:
        os.chdir(root)
        resolved = load_config(config())
        first = next(iter(resolved["experiments"].values()))
        specs.append(EpochSpec.from_config(first, 1, resolved, threads=1,
                                           data_dir=templated_dataset(first["data_key"])).resolved())
    timings: list[list[float]] = [[] for _ in roots]
    for turn in range(202):
        for root, spec, times in zip(roots, specs, timings):
            os.chdir(root)
            tick = time.perf_counter()
            fingerprint(spec, None)
            if turn:  # the first turn warms the page cache and the imports
                times.append(time.perf_counter() - tick)
    return [statistics.median(times) for times in timings]


def _train(loop, experiment: dict, resolved: dict, data_dir: str, marks: dict) -> None:
    from tunemake.train.spec import EpochSpec

    make_engine = loop.make_engine

    def measured_make_engine(*args, **kwargs):
        engine = make_engine(*args, **kwargs)
        marks["load_kib"], marks["load_seconds"] = rss_kib("VmHWM"), time.perf_counter() - started
        restart_peak()
        return engine

    loop.make_engine = measured_make_engine
    started = time.perf_counter()
    spec = EpochSpec.from_config(experiment, 1, resolved, threads=2, data_dir=data_dir)
    if loop.train_epoch(spec) != 0:
        raise SystemExit(f"{experiment['name']}: training did not finish")


def run_child(stage: str, root: Path, *args: str, nproc: int = 0) -> list[dict]:
    """Run ``stage`` in fresh processes (under torchrun when ``nproc``); one report per process."""
    report = root / "reports" / f"{stage}-{Path(args[0]).name if args else 'run'}"
    report.parent.mkdir(exist_ok=True)
    command = [sys.executable, str(HERE), "--child", stage, "--root", str(root), "--report", str(report), *args]
    if nproc:
        command[1:2] = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(HERE)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(HERE.parents[1])}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return [json.loads(p.read_text()) for p in sorted(report.parent.glob(report.name + ".*"))]


def measure(layers: int, tmp: Path) -> dict:
    from tunemake import paths

    root = tmp / f"layers{layers}"
    root.mkdir()
    print(f"{layers} layers: building the model", flush=True)
    model = build(root, layers)
    stages: dict[str, list[dict]] = {"data": run_child("data", root)}
    for name, (nproc, _) in TRAIN_VARIANTS.items():
        print(f"{layers} layers: train, {name}", flush=True)
        stages[f"train, {name}"] = run_child("train", root, experiment_name(name), nproc=nproc)
    pth = paths.checkpoint(experiment_name("1 process"), 1)
    for stage, args in (("convert", [pth]), ("merge", []), ("evaluate", [])):
        print(f"{layers} layers: {stage}", flush=True)
        stages[stage] = run_child(stage, root, *args)
    adapter = root / "out" / "adapter" / "adapter_model.safetensors"
    shutil.rmtree(root / "out" / "merged")
    return {**model, "weights_fp32_bytes": 4 * model["parameters"], "adapter_fp32_bytes": 2 * adapter.stat().st_size,
            "stages": stages}


# --- the report --------------------------------------------------------------------------------------

def beyond_imports(report: dict, key: str = "peak_kib") -> float:
    return (report[key] - report["imports_kib"]) * 1024


def print_table(results: list[dict]) -> None:
    print(f"\n{'stage':<30}{'process':>8}" + "".join(f"{str(r['layers']) + ' layers':>22}" for r in results))
    print(" " * 38 + "".join(f"{'peak MB':>12}{'s':>10}" for _ in results))
    for stage in results[0]["stages"]:
        for index in range(len(results[0]["stages"][stage])):
            rows = [(beyond_imports(r["stages"][stage][index]) / MB, r["stages"][stage][index]["seconds"]) for r in results]
            if stage.startswith("train"):
                loads = [(beyond_imports(r["stages"][stage][index], "load_kib") / MB,
                          r["stages"][stage][index]["load_seconds"]) for r in results]
                print(f"{stage + ': load':<30}{index:>8}" + "".join(f"{m:>12.0f}{s:>10.1f}" for m, s in loads))
                stage_label = stage + ": train"
            else:
                stage_label = stage
            print(f"{stage_label:<30}{index:>8}" + "".join(f"{m:>12.0f}{s:>10.1f}" for m, s in rows))
    print(f"{'epoch fingerprint (ms)':<38}" + "".join(f"{'':>12}{r['fingerprint_s'] * 1e3:>10.2f}" for r in results))
    print(f"{'float32 weights':<38}" + "".join(f"{r['weights_fp32_bytes'] / MB:>12.0f}{'':>10}" for r in results))
    print(f"{'adapter (float32)':<38}" + "".join(f"{r['adapter_fp32_bytes'] / MB:>12.0f}{'':>10}" for r in results))


def check_targets(small: dict, large: dict) -> list[str]:
    """One line per target: its growth against its limit, PASS or FAIL."""
    added_weights = large["weights_fp32_bytes"] - small["weights_fp32_bytes"]
    added_adapter = large["adapter_fp32_bytes"] - small["adapter_fp32_bytes"]

    def growth(stage, key="peak_kib"):
        return [beyond_imports(b, key) - beyond_imports(a, key) for a, b in zip(small["stages"][stage], large["stages"][stage])]

    checks = [("convert", growth("convert")[0], added_adapter + CONVERT_SLACK),
              ("merge", growth("merge")[0], added_adapter + MERGE_SHARD)]
    checks += [(f"ZeRO-3 load, process {i}", g, ZERO3_SHARE * added_weights)
               for i, g in enumerate(growth("train, 2 processes ZeRO-3", "load_kib"))]
    lines = [f"{'PASS' if value <= limit else 'FAIL'} {name}: grows {value / MB:.0f} MB, limit {limit / MB:.0f} MB"
             for name, value, limit in checks]
    times = [small["fingerprint_s"], large["fingerprint_s"]]
    spread = max(times) / min(times) - 1
    lines.append(f"{'PASS' if spread <= FINGERPRINT_SPREAD else 'FAIL'} epoch fingerprint: "
                 f"{times[0] * 1e3:.2f} ms and {times[1] * 1e3:.2f} ms ({spread:.0%} apart, limit 20%)")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--json", type=Path, help="write the measurements here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child:
        child(args.child, args.root, args.report, rest)
        return 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="stage-memory-") as tmp:
        results = [measure(layers, Path(tmp)) for layers in sorted(args.layers)]
        roots = [str(Path(tmp) / f"layers{r['layers']}") for r in results]
        times = run_child("fingerprint", Path(roots[0]), *roots)[0]["median_s"]
        for result, seconds in zip(results, times):
            result["fingerprint_s"] = seconds
    print_table(results)
    lines = check_targets(results[0], results[-1])
    print("\n" + "\n".join(lines))
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{datetime.now(timezone.utc):%Y-%m-%d}, {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "targets": lines}, indent=2))
    return 1 if any(line.startswith("FAIL") for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
