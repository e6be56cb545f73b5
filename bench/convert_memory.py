"""Benchmark the convert stage's memory: what it grows by when the model does, at 7B width.

Run from the repository root: ``python bench/convert_memory.py [--layers 2 4] [--json out.json]``.
About 2 minutes on 2 CPU cores (building the models takes most of it; the baseline 20 s).
Everything is built in a temporary directory, seeded, offline: for each depth, a random float16
Llama of Llama-2-7B's width (hidden 4096, MLP 11008, 32 heads, vocab 32000, untied), written
tensor by tensor, and an epoch checkpoint as ``tunemake.train`` writes it for LoRA (rank 64, alpha
16, every linear layer) whose tensors are random float32 ones with the names and shapes the model
gives them: no training. Then, each in a fresh subprocess:

- tunemake: ``tunemake.convert.convert_checkpoint`` (adapter in float16, as the convert rule writes);
- baseline, how convert wrote it before (and XTuner's ``pth_to_hf`` does): the whole base model
  built in float32 on the CPU, the checkpoint loaded into it, ``.to(float16).save_pretrained``,
  the config's module lists sorted as convert sorts them.

Peak = the process's peak RSS (``VmHWM``) minus its RSS after every import, just before the
conversion. The target (issue 24): from the smallest to the largest depth, tunemake's peak grows
by at most the added adapter (its float16 file) + 50 MB; else it prints FAIL and exits 1. The two
adapters must be byte-identical, or it exits 2.
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
from datetime import datetime, timezone
from pathlib import Path

MB = 1e6
TARGET_SLACK = 50 * MB


def rss_kib(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def build(root: Path, layers: int, rank: int) -> dict:
    """The base model directory and the checkpoint, in this process (the measurements never share it)."""
    import torch
    from transformers import LlamaConfig

    from tunemake.shards import DTYPE_NAMES, PlannedTensor, ShardWriter
    from tunemake.train.checkpoint import CHECKPOINT_FORMAT
    from tunemake.train.model import empty_model
    from tunemake.train.spec import BaseModel, Method

    base = root / "base"
    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, dtype="float16")
    config.save_pretrained(base)
    torch.manual_seed(0)
    shapes = {name: tuple(t.shape) for name, t in empty_model(Method("full"), BaseModel(str(base), dir=str(base)),
                                                              "float16").state_dict().items()}
    planned = [PlannedTensor(name, DTYPE_NAMES[torch.float16], shape) for name, shape in shapes.items()]
    with ShardWriter(base / "model.safetensors", planned) as writer:
        for tensor in planned:
            writer.write(torch.randn(tensor.shape).mul_(0.02).half())
    method = Method("lora", r=rank, alpha=16, dropout=0.1)
    adapter = empty_model(method, BaseModel(str(base), dir=str(base)))
    trainable = {name: torch.randn(p.shape) * 0.02 for name, p in adapter.named_parameters() if p.requires_grad}
    torch.save({"format": CHECKPOINT_FORMAT, "experiment": "bench", "epoch": 1, "method": method.to_dict(),
                "base_model": str(base), "template": None, "fingerprint": "0" * 32, "versions": {},
                "trainable": trainable}, root / "epoch_1.pth")
    return {"layers": layers, "base_bytes": (base / "model.safetensors").stat().st_size,
            "checkpoint_bytes": (root / "epoch_1.pth").stat().st_size,
            "adapter_parameters": sum(t.numel() for t in trainable.values())}


def child(way: str, root: Path) -> None:
    """One measured conversion; prints its numbers as JSON on the last line."""
    import peft  # noqa: F401  every import before the first RSS reading
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: F401

    import tunemake.convert
    import tunemake.train.model
    from tunemake.train.spec import BaseModel, Method

    out = root / f"out_{way}"
    before = rss_kib("VmRSS")
    start = time.perf_counter()
    if way == "tunemake":
        tunemake.convert.convert_checkpoint(root / "epoch_1.pth", out)
    else:
        ckpt = torch.load(root / "epoch_1.pth", map_location="cpu", weights_only=True)
        base = str(root / "base")
        model = tunemake.train.model.build_model(Method.from_dict(ckpt["method"]).for_export(),
                                                 BaseModel(base, dtype="float32", dir=base), torch.device("cpu"))
        tunemake.train.model.load_trainable(model, ckpt["trainable"], "bench")
        model.to(torch.float16).save_pretrained(out)
        tunemake.convert._canonical_adapter_config(out / "adapter_config.json")
    seconds = time.perf_counter() - start
    print(json.dumps({"before_kib": before, "peak_kib": rss_kib("VmHWM"), "seconds": seconds,
                      "adapter_bytes": (out / "adapter_model.safetensors").stat().st_size}))


def measure(way: str, root: Path) -> dict:
    shutil.rmtree(root / f"out_{way}", ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, __file__, "--child", way, "--root", str(root)],
                          env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{way} failed:\n{done.stderr[-3000:]}")
    numbers = json.loads(done.stdout.strip().splitlines()[-1])
    return {**numbers, "peak_above_start": (numbers["peak_kib"] - numbers["before_kib"]) * 1024}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--no-baseline", action="store_true", help="measure tunemake only")
    parser.add_argument("--json", help="write the numbers to this file")
    parser.add_argument("--child", choices=["baseline", "tunemake"], help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, Path(args.root))
        return 0

    ways = ["tunemake"] if args.no_baseline else ["tunemake", "baseline"]
    runs, same = [], True
    for layers in args.layers:
        with tempfile.TemporaryDirectory(prefix="convert_memory-") as tmp:
            root = Path(tmp)
            start = time.perf_counter()
            sizes = build(root, layers, args.rank)
            print(f"{layers} layers: built in {time.perf_counter() - start:.0f} s, base "
                  f"{sizes['base_bytes'] / MB:,.0f} MB float16, checkpoint {sizes['checkpoint_bytes'] / MB:,.1f} MB",
                  flush=True)
            results = {way: measure(way, root) for way in ways}
            if "baseline" in results:
                same = same and all((root / "out_tunemake" / name).read_bytes() == (root / "out_baseline" / name)
                                    .read_bytes() for name in ("adapter_model.safetensors", "adapter_config.json"))
            runs.append({**sizes, "results": results})

    print("peak = the process's peak RSS (VmHWM) minus its RSS after every import, just before converting")
    for run in runs:
        for way, r in run["results"].items():
            print(f"{run['layers']} layers, {way:9} peak {r['peak_above_start'] / MB:8,.1f} MB   (absolute "
                  f"{r['peak_kib'] * 1024 / MB:,.0f} MB, after imports {r['before_kib'] * 1024 / MB:,.0f} MB; "
                  f"{r['seconds']:.1f} s; adapter {r['adapter_bytes'] / MB:.1f} MB)")
    first, last = runs[0], runs[-1]
    growth = {way: last["results"][way]["peak_above_start"] - first["results"][way]["peak_above_start"] for way in ways}
    added_adapter = last["results"]["tunemake"]["adapter_bytes"] - first["results"]["tunemake"]["adapter_bytes"]
    target = added_adapter + TARGET_SLACK
    passed = growth["tunemake"] <= target
    added_base = last["base_bytes"] - first["base_bytes"]
    print(f"{first['layers']} -> {last['layers']} layers: base grows by {added_base / MB:,.0f} MB (float16), "
          f"the adapter by {added_adapter / MB:.1f} MB")
    for way in ways:
        print(f"  {way:9} peak grows by {growth[way] / MB:8,.1f} MB")
    print(f"{'PASS' if passed else 'FAIL'}: tunemake grows by {growth['tunemake'] / MB:.1f} MB "
          f"{'<=' if passed else '>'} target {target / MB:.1f} MB (added adapter + 50 MB)")
    if "baseline" in ways:
        print(f"adapters byte-identical: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
            "cpus": os.cpu_count(), "rank": args.rank, "runs": runs, "growth": growth, "target": target,
            "pass": passed, "identical": same}, indent=2) + "\n")
    if not same:
        return 2
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
