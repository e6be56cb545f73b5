"""What the CPU cannot prove: the train stage on CUDA (LoRA bf16, QLoRA NF4, ZeRO-2 and DDP on 2 GPUs,
ZeRO-3 LoRA and full fine-tuning).

Builds, offline, the demo tokenizer and a small Llama-architecture model (about 100M parameters),
the demo's templated task data, then trains one epoch per setting through
``tunemake.train.launch`` (the rule's entry point) and prints a table: loss, held-out loss,
tokens/s, peak memory per setting, and the card. Not a speed benchmark against a baseline (see
the GPU performance work for that): a record that each path runs and learns on real GPUs.

    python bench/gpu_train_check.py [--json out.json] [--settings lora,qlora,zero2,ddp,zero3,zero3_full,...]

Each epoch's log says whether it trained through the fast path (``tunemake.train.engine.route``);
``qlora_zero2_1`` / ``qlora`` (one GPU) and ``qlora_zero2`` / ``qlora_ddp`` (two) compare the fast
path under ZeRO-2 with it under plain torch: tokens/s and losses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from tunemake.config import load_config
from tunemake.data import build_templated_dataset
from tunemake.demo import build_demo_model, build_demo_tokenizer, generate_demo_data
from tunemake.paths import templated_dataset
from tunemake.templates import TEMPLATES
from tunemake.train import EpochSpec, launch

MODEL = {"hidden_size": 1024, "num_layers": 8, "num_heads": 16, "intermediate_size": 2816, "max_position_embeddings": 2048}

SETTINGS = {
    "lora": {"method": "lora", "gpus": 1, "precision": "bf16"},
    "qlora": {"method": "qlora", "gpus": 1, "precision": "bf16"},
    "ddp": {"method": "lora", "gpus": 2, "precision": "bf16"},
    "zero2": {"method": "lora", "gpus": 2, "precision": "bf16", "deepspeed": "zero2"},
    # ZeRO-3 built partitioned and read tensor by tensor (on one GPU: the CUDA path; two processes
    # are tested over gloo on the CPU)
    "zero3": {"method": "lora", "gpus": 1, "precision": "bf16", "deepspeed": "zero3"},
    "zero3_full": {"method": "full", "gpus": 1, "precision": "bf16", "deepspeed": "zero3"},
    # the fast path under ZeRO-2 against the same method without DeepSpeed (issue 27)
    "qlora_zero2_1": {"method": "qlora", "gpus": 1, "precision": "bf16", "deepspeed": "zero2"},
    "qlora_ddp": {"method": "qlora", "gpus": 2, "precision": "bf16"},
    "qlora_zero2": {"method": "qlora", "gpus": 2, "precision": "bf16", "deepspeed": "zero2"},
}
#: (DeepSpeed setting, the same without DeepSpeed): tokens/s and losses compared when both ran
PAIRS = (("qlora_zero2_1", "qlora"), ("qlora_zero2", "qlora_ddp"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--workdir", help="default: a temporary directory")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tunemake-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    generate_demo_data("data/demo", seed=0, corpus_docs=3000, tasks_per_family=600)
    build_demo_tokenizer("data/demo/corpus.txt", "models/small", TEMPLATES["internlm2_chat"])
    build_demo_model("models/small", "models/small", **MODEL)

    results = []
    for name in args.settings.split(","):
        setting = dict(SETTINGS[name])
        if setting["gpus"] > torch.cuda.device_count():
            print(f"{name}: skipped, needs {setting['gpus']} GPUs", flush=True)
            continue
        config = {
            "models": {"small": {"path": "models/small", "template": "internlm2_chat", "dtype": "bfloat16"}},
            "datasets": {"tasks": {"path": "data/demo/tasks.jsonl", "heldout_fraction": 0.1},
                         "corpus": {"path": "data/demo/corpus.txt", "format": "pretrain"}},
            "experiments": [{"name": name, "model": "small", "datasets": ["corpus", "tasks"], "epochs": 1,
                             "max_length": 1024, "batch_size": 4, "grad_accumulation": 1, "lr": 0.0002,
                             **setting}],
        }
        resolved = load_config(config)
        exp = resolved["experiments"][name]
        data_dir = templated_dataset(exp["data_key"])
        if not Path(data_dir).exists():
            build_templated_dataset(exp["data_recipe"], data_dir, threads=8)
        spec = EpochSpec.from_config(exp, 1, resolved, threads=8)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        status = launch(spec)
        seconds = time.perf_counter() - started
        if status != 0:
            print(f"{name}: FAILED with status {status}", flush=True)
            results.append({"setting": name, "status": status})
            continue
        ckpt = torch.load(spec.out.pth, map_location="cpu", weights_only=True)
        records = [json.loads(line) for line in Path(spec.log_dir, "epoch_1.metrics.jsonl").read_text().splitlines()]
        steps = [r for r in records if not r.get("end_of_epoch")]  # the last record sums up the epoch
        warm = steps[len(steps) // 5:] or steps
        results.append({
            "setting": name, **setting, "status": 0,
            "first_loss": steps[0]["loss"], "last_loss": steps[-1]["loss"],
            "train_loss": ckpt["metrics"]["train_loss"], "heldout_loss": ckpt["metrics"]["heldout_loss"],
            "steps": len(steps),
            "tokens_per_s_median": sorted(s["tokens_per_s"] for s in warm)[len(warm) // 2],
            "peak_memory_mib_rank0": max(s["memory_mb"] for s in steps),
            "trainable_tensors": len(ckpt["trainable"]), "seconds": round(seconds, 1),
        })
        print(json.dumps(results[-1]), flush=True)

    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"\ncard: {card} x {torch.cuda.device_count()}, torch {torch.__version__}")
    print(f"{'setting':10} {'gpus':>4} {'loss first->last':>18} {'held-out':>9} {'tok/s':>10} {'peak MiB':>9}")
    for r in results:
        if r.get("status") == 0:
            print(f"{r['setting']:10} {r['gpus']:>4} {r['first_loss']:>8.3f} -> {r['last_loss']:<7.3f} "
                  f"{r['heldout_loss']:>9.3f} {r['tokens_per_s_median']:>10.0f} {r['peak_memory_mib_rank0']:>9.0f}")
    done = {r["setting"]: r for r in results if r.get("status") == 0}
    for zero, plain in PAIRS:
        if zero in done and plain in done:
            a, b = done[zero], done[plain]
            print(f"{zero} / {plain}: tokens/s {a['tokens_per_s_median'] / b['tokens_per_s_median']:.3f}, "
                  f"first loss {a['first_loss']:.4f} vs {b['first_loss']:.4f}, last {a['last_loss']:.4f} vs "
                  f"{b['last_loss']:.4f}, held-out {a['heldout_loss']:.4f} vs {b['heldout_loss']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"card": card, "gpus": torch.cuda.device_count(), "results": results}, indent=2))
    return 0 if all(r.get("status") == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
