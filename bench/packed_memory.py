"""Benchmark the memory of a packed row's forward and backward as the row grows (CPU, fp32).

Run from the repository root: ``python bench/packed_memory.py [--lengths 8192 16384] [--json out.json]``.
About a minute on 2 CPU cores. A seeded random Llama (hidden 256, 2 layers, 4 heads, 2 KV heads,
vocab 2,000), and for each length a row of 1,024-token documents (``position_ids`` restarting at
each). Each measurement in a fresh subprocess, the forward and backward of the row's loss:

- tunemake: the row as the training stage gives it to a model that is not on the CUDA fast path
  (``tunemake.train.documents``: one flat row of documents, attention per document);
- baseline, what a user would otherwise run: the row with its ``position_ids`` and no mask to
  transformers' own SDPA attention, which finds the documents from ``position_ids`` and builds a
  block-diagonal mask (as padding-free collators in TRL and LLaMA-Factory do without flash
  attention).

Peak = the process's peak RSS (``VmHWM``) minus its RSS just before the forward. The target
(issue 27): tunemake's peak at the longest length is at most 2.5x its peak at the shortest when
the length doubles (a dense mask grows 4x); else it prints FAIL and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

MB = 1e6
DOCUMENT = 1024
TARGET_RATIO = 2.5


def rss_kib(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(way: str, length: int) -> None:
    """One measured forward and backward; prints its numbers as JSON on the last line."""
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunemake.train.documents import FLAT, ROWS, apart, make_batch

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=DOCUMENT)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config)
    ids = np.random.default_rng(0).integers(3, 2000, size=length)
    positions = np.arange(length) % DOCUMENT
    batch = make_batch([(ids, ids.copy(), positions)], 0, FLAT)
    if way == "baseline":
        batch = {k: batch[k] for k in ("input_ids", "labels", "position_ids")}
    before = rss_kib("VmRSS")
    start = time.perf_counter()
    with apart(model, FLAT if way == "tunemake" else ROWS):  # ROWS: the model as it is
        model(**batch, use_cache=False).loss.backward()
    print(json.dumps({"before_kib": before, "peak_kib": rss_kib("VmHWM"), "seconds": time.perf_counter() - start}))


def measure(way: str, length: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run([sys.executable, __file__, "--child", way, "--length", str(length)],
                          env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{way} at {length} failed:\n{done.stderr[-3000:]}")
    numbers = json.loads(done.stdout.strip().splitlines()[-1])
    return {**numbers, "peak_above_start": (numbers["peak_kib"] - numbers["before_kib"]) * 1024}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs=2, default=[8192, 16384])
    parser.add_argument("--json", help="write the numbers to this file")
    parser.add_argument("--child", choices=["baseline", "tunemake"], help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.length)
        return 0

    results = {way: {n: measure(way, n) for n in args.lengths} for way in ("tunemake", "baseline")}
    short, long = args.lengths
    print(f"peak = peak RSS (VmHWM) minus RSS just before the forward; rows of {DOCUMENT}-token documents")
    ratios = {}
    for way, runs in results.items():
        for n, r in runs.items():
            print(f"{way:9} {n:6} tokens: peak {r['peak_above_start'] / MB:8,.1f} MB, {r['seconds']:.1f} s")
        ratios[way] = runs[long]["peak_above_start"] / runs[short]["peak_above_start"]
        print(f"{way:9} {short} -> {long}: peak grows {ratios[way]:.2f}x")
    passed = ratios["tunemake"] <= TARGET_RATIO
    print(f"tunemake's peak at {long} tokens is {results['baseline'][long]['peak_above_start'] / results['tunemake'][long]['peak_above_start']:.2f}x "
          "below the baseline's")
    print(f"{'PASS' if passed else 'FAIL'}: tunemake grows {ratios['tunemake']:.2f}x "
          f"{'<=' if passed else '>'} {TARGET_RATIO}x")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
            "cpus": os.cpu_count(), "document": DOCUMENT, "results": results, "ratios": ratios, "pass": passed},
            indent=2) + "\n")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
