"""Benchmark the merge stage's memory: tunemake's streaming merge against XTuner's ``convert merge``.

Run from the repository root: ``python bench/merge_memory.py [--layers 8] [--shard-size 250MB]
[--json out.json]``. Everything is built in a temporary directory, seeded, no hub: a random Llama
in float16 (default: hidden 2048, MLP 5632, 8 layers, vocab 32000, about 1.1 GB over 5 shards),
the demo tokenizer, and a LoRA adapter (rank 16 on every linear layer, lora_B random so the update
is not zero) with a ``tunemake.json``. Then, each in a fresh subprocess:

- baseline, XTuner's way: ``AutoModelForCausalLM.from_pretrained(base, dtype=float16)``,
  ``PeftModel.from_pretrained``, ``merge_and_unload()``, ``save_pretrained(max_shard_size)`` and the
  tokenizer's ``save_pretrained``;
- tunemake: ``tunemake.merge.merge_model`` with the same shard size.

Peak memory is the process's peak RSS (``VmHWM``) minus its RSS just before the merge starts, after
every import; the absolute peaks are printed too. It must stay below (largest base shard + adapter)
* 1.25, or the benchmark prints FAIL and exits 1. The two outputs must hold the same tensors, equal
within float16 rounding (at most 2 float16 steps apart: the baseline rounds ``BA`` to float16 before
adding it, tunemake rounds ``W + BA`` once), or it exits 2. ``--workdir DIR`` keeps what it builds
there and reuses it on the next run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

TEMPLATE = "internlm2_chat"
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rss_kib(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def build(root: Path, args) -> dict:
    """Base model, tokenizer and adapter, in this process (which the measurements never share)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunemake.atomic import write_json
    from tunemake.demo import build_demo_tokenizer, generate_demo_data
    from tunemake.templates import TEMPLATES, template_to_dict

    base, adapter = root / "base", root / "adapter"
    generate_demo_data(root / "data", seed=0, corpus_docs=300, tasks_per_family=10)
    build_demo_tokenizer(root / "data" / "corpus.txt", base, TEMPLATES[TEMPLATE], vocab_size=1024)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128,
                         num_key_value_heads=args.hidden // 128, max_position_embeddings=2048,
                         bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float16)
    model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(base, max_shard_size=args.shard_size)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=LINEAR,
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    model.save_pretrained(adapter)
    write_json(adapter / "tunemake.json", {
        "experiment": "bench", "epoch": 1, "method": {"type": "lora", "r": args.rank, "alpha": 2 * args.rank},
        "base_model": str(base), "template": template_to_dict(TEMPLATES[TEMPLATE]), "fingerprint": "0" * 32,
        "versions": {}, "dtype": "float16"})
    shards = sorted(base.glob("model*.safetensors"))
    return {"params": sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n),
            "base_bytes": sum(p.stat().st_size for p in shards), "shards": len(shards),
            "largest_shard": max(p.stat().st_size for p in shards),
            "adapter_bytes": (adapter / "adapter_model.safetensors").stat().st_size}


def child(way: str, root: Path, shard_size: str) -> None:
    """One measured merge; prints its numbers as JSON on the last line."""
    import torch  # every import before the first RSS reading
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tunemake.merge

    base, adapter, out = root / "base", root / "adapter", root / f"out_{way}"
    before = rss_kib("VmRSS")
    start = time.perf_counter()
    if way == "baseline":
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16)
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        model.save_pretrained(out, max_shard_size=shard_size)
        AutoTokenizer.from_pretrained(base).save_pretrained(out)
    else:
        tunemake.merge.merge_model(adapter, out, max_shard_size=shard_size, dtype="float16")
    seconds = time.perf_counter() - start
    print(json.dumps({"before_kib": before, "peak_kib": rss_kib("VmHWM"), "seconds": seconds}))


def measure(way: str, root: Path, shard_size: str) -> dict:
    shutil.rmtree(root / f"out_{way}", ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, __file__, "--child", way, "--root", str(root), "--shard-size", shard_size],
                          env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{way} failed:\n{done.stderr[-3000:]}")
    numbers = json.loads(done.stdout.strip().splitlines()[-1])
    return {**numbers, "peak_above_start": (numbers["peak_kib"] - numbers["before_kib"]) * 1024}


def compare(root: Path) -> dict:
    """Every tensor of the two outputs, one at a time: the largest difference, in float16 steps."""
    import torch
    from safetensors import safe_open

    def locate(directory: Path) -> dict[str, Path]:
        index = directory / "model.safetensors.index.json"
        if index.exists():
            return {k: directory / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        with safe_open(directory / "model.safetensors", "pt") as handle:
            return dict.fromkeys(handle.keys(), directory / "model.safetensors")

    ours, theirs = locate(root / "out_tunemake"), locate(root / "out_baseline")
    if ours.keys() != theirs.keys():
        return {"same_names": False}
    worst_steps, differing, total = 0.0, 0, 0
    for name in sorted(ours):
        with safe_open(ours[name], "pt") as a, safe_open(theirs[name], "pt") as b:
            x, y = a.get_tensor(name), b.get_tensor(name)
        if x.dtype != y.dtype or x.shape != y.shape:
            return {"same_names": True, "same_layout": False, "tensor": name}
        x, y = x.float(), y.float()
        # one float16 step (ulp) at the larger magnitude; subnormals have a fixed step of 2^-24
        step = torch.exp2(torch.floor(torch.log2(torch.maximum(x.abs(), y.abs()).clamp_min(2**-14))) - 10)
        worst_steps = max(worst_steps, ((x - y).abs() / step).max().item())
        differing += (x != y).sum().item()
        total += x.numel()
    return {"same_names": True, "same_layout": True, "max_diff_fp16_steps": worst_steps,
            "differing_fraction": differing / total, "tensors": len(ours)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--shard-size", default="250MB", help="base shards and both outputs (default 250MB)")
    parser.add_argument("--json", help="write the numbers to this file")
    parser.add_argument("--workdir", help="build into this directory and keep it (default: a temporary one); "
                        "a base and adapter already there are reused")
    parser.add_argument("--child", choices=["baseline", "tunemake"], help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, Path(args.root), args.shard_size)
        return 0

    mb = 1e6
    with (nullcontext(args.workdir) if args.workdir else tempfile.TemporaryDirectory(prefix="merge_memory-")) as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        built = root / "sizes.json"
        if built.exists():
            sizes = json.loads(built.read_text())
        else:
            sizes = build(root, args)
            built.write_text(json.dumps(sizes))
        print(f"built in {time.perf_counter() - start:.0f} s: {sizes['base_bytes'] / mb:.0f} MB float16 Llama in "
              f"{sizes['shards']} shards, adapter {sizes['adapter_bytes'] / mb:.1f} MB (rank {args.rank}, all linear)")
        bound = (sizes["largest_shard"] + sizes["adapter_bytes"]) * 1.25
        results = {way: measure(way, root, args.shard_size) for way in ("baseline", "tunemake")}
        equal = compare(root)
        out_shards = {way: len(list((root / f"out_{way}").glob("model*.safetensors"))) for way in results}

    ours, theirs = results["tunemake"]["peak_above_start"], results["baseline"]["peak_above_start"]
    passed = ours < bound
    print("peak RSS = the process's peak (VmHWM) minus its RSS just before the merge, after all imports")
    print(f"{'largest base shard':34} {sizes['largest_shard'] / mb:9.1f} MB")
    print(f"{'adapter':34} {sizes['adapter_bytes'] / mb:9.1f} MB")
    print(f"{'bound (largest shard + adapter) x1.25':34} {bound / mb:9.1f} MB")
    for way, label in (("baseline", "baseline (XTuner's merge)"), ("tunemake", "tunemake merge_model")):
        r = results[way]
        print(f"{label:34} {r['peak_above_start'] / mb:9.1f} MB peak above start   (absolute peak "
              f"{r['peak_kib'] * 1024 / mb:.0f} MB, at start {r['before_kib'] * 1024 / mb:.0f} MB; "
              f"{r['seconds']:.1f} s; {out_shards[way]} shards)")
    print(f"{'tunemake / baseline':34} {ours / theirs:9.3f}")
    print(f"outputs: {equal}")
    print(f"{'PASS' if passed else 'FAIL'}: tunemake's peak {ours / mb:.1f} MB {'<' if passed else '>='} bound {bound / mb:.1f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
            "cpus": os.cpu_count(), "args": {k: v for k, v in vars(args).items() if k not in ("child", "root", "json")},
            "sizes": sizes, "bound_bytes": bound, "results": results, "outputs": equal, "output_shards": out_shards,
            "ratio": ours / theirs, "pass": passed}, indent=2) + "\n")
    if not (equal.get("same_layout") and equal["max_diff_fp16_steps"] <= 2.0):
        print("the two outputs differ by more than float16 rounding")
        return 2
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
