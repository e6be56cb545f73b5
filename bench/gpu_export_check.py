"""What the CPU cannot prove about export and chat: a QLoRA epoch trained on CUDA, converted,
merged into the unquantized base, and chatted with on CUDA in fp16 and in 4-bit.

Builds offline the demo tokenizer and a small Llama (about 100M parameters, bf16), trains one
QLoRA epoch on the demo tasks through ``tunemake.train.launch``, converts it
(``tunemake.convert``), merges it (``tunemake.merge``), then answers held-out prompts with
``tunemake chat --batch`` (the CLI) three ways: the merge in fp16, base + ``--adapter`` in fp16,
and the merge with ``--bits 4``. Prints agreement between the first two (greedy; fp16 rounding may
flip a few tokens), each way's time, and the card. A functional record, not a speed benchmark.

    python bench/gpu_export_check.py [--json out.json] [--prompts 32]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from tunemake.cli import main as tunemake_main
from tunemake.config import load_config
from tunemake.convert import convert_checkpoint
from tunemake.data import build_templated_dataset
from tunemake.demo import build_demo_model, build_demo_tokenizer, generate_demo_data
from tunemake.merge import merge_model
from tunemake.paths import templated_dataset
from tunemake.templates import TEMPLATES
from tunemake.train import EpochSpec, launch

MODEL = {"hidden_size": 1024, "num_layers": 8, "num_heads": 16, "intermediate_size": 2816, "max_position_embeddings": 2048}


def chat(model: str, prompts: Path, *extra: str) -> tuple[list[str], float]:
    """Answers of `tunemake chat MODEL --batch PROMPTS --temperature 0`, and the seconds it took."""
    out = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(out):
        status = tunemake_main(["chat", model, "--batch", str(prompts), "--temperature", "0",
                                "--max-new-tokens", "32", *extra])
    if status:
        raise SystemExit(f"tunemake chat {model} {' '.join(extra)}: exit {status}")
    return [json.loads(line)["answer"] for line in out.getvalue().splitlines()], time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--prompts", type=int, default=32, help="held-out prompts to answer (default 32)")
    parser.add_argument("--epochs", type=int, default=4, help="QLoRA epochs (default 4)")
    parser.add_argument("--workdir", help="default: a temporary directory")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here (the CPU paths are tested by pytest)")
        return 0
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tunemake-gpu-export-"))
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    generate_demo_data("data/demo", seed=0, corpus_docs=3000, tasks_per_family=1200)
    build_demo_tokenizer("data/demo/corpus.txt", "models/small", TEMPLATES["internlm2_chat"])
    build_demo_model("models/small", "models/small", **MODEL)
    config = {
        "models": {"small": {"path": "models/small", "template": "internlm2_chat", "dtype": "bfloat16"}},
        "datasets": {"tasks": {"path": "data/demo/tasks.jsonl", "heldout_fraction": 0.1}},
        "methods": {"qlora_embed": {"type": "qlora", "r": 64, "alpha": 128, "modules_to_save": ["embed_tokens", "lm_head"]}},
        "experiments": [{"name": "qlora", "model": "small", "datasets": "tasks", "method": "qlora_embed",
                         "epochs": args.epochs, "max_length": 128, "batch_size": 4, "grad_accumulation": 1, "lr": 0.001, "gpus": 1,
                         "precision": "bf16"}],
    }
    resolved = load_config(config)
    exp = resolved["experiments"]["qlora"]
    data_dir = templated_dataset(exp["data_key"])
    build_templated_dataset(exp["data_recipe"], data_dir, threads=8)
    started = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        spec = EpochSpec.from_config(exp, epoch, resolved, threads=8)
        if launch(spec) != 0:
            print(f"training epoch {epoch} failed")
            return 1
    train_seconds = time.perf_counter() - started
    adapter_dir, merge_dir = f"adapters/qlora/epoch_{args.epochs}", f"merges/qlora/epoch_{args.epochs}"
    convert_checkpoint(spec.out.pth, adapter_dir, base_model="models/small")
    started = time.perf_counter()
    merge_model(adapter_dir, merge_dir, max_shard_size="100MB")
    merge_seconds = time.perf_counter() - started
    shards = sorted(p.name for p in Path(merge_dir).glob("*.safetensors"))

    records = [json.loads(line) for line in Path(data_dir, "heldout.jsonl").read_text().splitlines()]
    records = [r for r in records if len(r["conversation"]) == 1][: args.prompts]
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": r["conversation"][0]["input"], "reset": True}) + "\n" for r in records))
    references = [r["conversation"][0]["output"] for r in records]

    merged, merged_s = chat(merge_dir, prompts)
    adapter, adapter_s = chat("models/small", prompts, "--adapter", adapter_dir)
    four_bit, four_bit_s = chat(merge_dir, prompts, "--bits", "4")

    def exact(answers):
        return sum(a.strip() == r.strip() for a, r in zip(answers, references)) / len(references)

    card = torch.cuda.get_device_name(0)
    result = {
        "card": card, "torch": torch.__version__, "train_seconds": round(train_seconds, 1),
        "merge_seconds": round(merge_seconds, 1), "merged_shards": len(shards), "prompts": len(records),
        "merged_fp16": {"exact_match": exact(merged), "seconds": round(merged_s, 1)},
        "base_plus_adapter_fp16": {"exact_match": exact(adapter), "seconds": round(adapter_s, 1)},
        "merged_4bit": {"exact_match": exact(four_bit), "seconds": round(four_bit_s, 1)},
        "merged_equals_adapter": sum(a == b for a, b in zip(merged, adapter)) / len(records),
        "examples": [{"prompt": r["conversation"][0]["input"], "reference": ref, "merged": m, "adapter": a, "4bit": q}
                     for r, ref, m, a, q in list(zip(records, references, merged, adapter, four_bit))[:5]],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
