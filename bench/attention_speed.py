"""Attention over packed documents on CUDA: forward + backward time of each way to compute it.

Rows of ``--seq`` tokens packed from documents (the train bench's 128..1024-token documents, and
two harder mixes: many short documents, one long document with short ones), ``--rows-per-call``
rows per call so that the GPU's time outweighs the launch, Llama-2-7B's 32 heads of 128, bf16.
Each variant computes causal attention inside each document; the first, varlen flash attention
with the row length as ``max_len`` (what ``tunemake.train.fast`` runs), is the baseline the others are
timed and checked against (output and q/k/v gradients on every token):

- ``varlen``: ``torch.nn.attention.varlen`` with ``max_len`` = the row length;
- ``varlen_max``: the same with ``max_len`` = the longest document;
- ``padded_cudnn`` / ``padded_flash`` / ``padded_efficient``: the documents gathered into a padded
  batch [documents, heads, longest, head_dim] and run through ``scaled_dot_product_attention``
  with ``is_causal`` on one backend (right padding is exact for causal attention: a real query
  never sees a padded key, and the padded queries' outputs are dropped, so their gradients are 0);
- ``aten_flash``: ``tunemake.train.fast.attention.FlashVarlen``, aten's flash ops called directly;
- ``fa4``: FlashAttention-4's varlen function (``flash_attn.cute``, package ``flash-attn-4``), where
  it is installed.

    python bench/attention_speed.py [--json out.json]

Prints a table (ms per forward + backward, TFLOP/s of the causal work, ratio to ``varlen``) and
the largest difference from ``varlen``; and, where NVML's energy counter can be read
(bench/energy.py), each variant's joules for the forward + backward of one row, and of a step's
``--layers`` layers. docs/performance.md has the results.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from energy import Meter  # noqa: E402
from tunemake.train.fast.attention import FlashVarlen, varlen_function  # noqa: E402
from tunemake.train.fast.layer import Shape  # noqa: E402


def documents(kind: str, seq: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    low, high = {"train_bench": (128, 1025), "short": (16, 129), "long_and_short": (16, 129)}[kind]
    lengths = [1024] if kind == "long_and_short" else []
    while sum(lengths) < seq:
        lengths.append(int(min(rng.integers(low, high), seq - sum(lengths))))
    return lengths


def padded_index(lengths, device, multiple: int = 64):
    """Row positions of a padded batch of the documents [documents, longest] (a padded slot
    repeats its document's last token), and each token's slot in it."""
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    longest = -(-int(lengths.max()) // multiple) * multiple
    t = np.arange(longest)
    gather = starts[:, None] + np.minimum(t[None, :], lengths[:, None] - 1)
    scatter = np.concatenate([d * longest + np.arange(n) for d, n in enumerate(lengths)])
    return torch.as_tensor(gather, device=device), torch.as_tensor(scatter, device=device)


def variants(shape: Shape, row: int):
    varlen = varlen_function()

    def offsets(lengths, device):
        return torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device=device)

    def run_varlen(q, k, v, lengths, max_len):
        return varlen(q, k, v, offsets(lengths, q.device), max_len, shape)

    def padded(backend):
        def run(q, k, v, lengths):
            gather, scatter = padded_index(lengths, q.device)
            docs, longest = gather.shape
            gather = gather.reshape(-1)
            qp, kp, vp = (t.index_select(0, gather).view(docs, longest, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=shape.scale)
            return out.transpose(1, 2).reshape(docs * longest, *q.shape[1:]).index_select(0, scatter)
        return run

    def aten_flash(q, k, v, lengths):  # tunemake.train.fast's direct call of aten's flash ops
        return FlashVarlen.apply(q, k, v, offsets(lengths, q.device), row, shape.scale)

    try:
        from flash_attn.cute.interface import flash_attn_varlen_func
    except ImportError:
        flash_attn_varlen_func = None

    def fa4(q, k, v, lengths):
        cu = offsets(lengths, q.device)
        out = flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=row, max_seqlen_k=row,
                                     softmax_scale=shape.scale, causal=True)
        return out[0] if isinstance(out, tuple) else out

    found = {"fa4": fa4} if flash_attn_varlen_func is not None else {}
    return {
        "varlen": lambda q, k, v, lengths: run_varlen(q, k, v, lengths, row),
        "varlen_max": lambda q, k, v, lengths: run_varlen(q, k, v, lengths, max(lengths)),
        "padded_cudnn": padded(SDPBackend.CUDNN_ATTENTION),
        "padded_flash": padded(SDPBackend.FLASH_ATTENTION),
        "padded_efficient": padded(SDPBackend.EFFICIENT_ATTENTION),
        "aten_flash": aten_flash,
        **found,
    }


def forward_backward(fn, q, k, v, lengths, grad):
    """One forward + backward of ``fn`` from fresh q/k/v gradients; the output."""
    for t in (q, k, v):
        t.grad = None
    out = fn(q, k, v, lengths)
    out.backward(grad)
    return out


def timed(fn, q, k, v, lengths, grad, iters):
    def once():
        return forward_backward(fn, q, k, v, lengths, grad)

    for _ in range(3):
        out = once()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        once()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times)), out.detach(), [t.grad.detach().clone() for t in (q, k, v)]


def joules_per_call(fn, q, k, v, lengths, grad, meter, seconds: float) -> float | None:
    """The card's energy for one forward + backward, over calls back to back for ``seconds``."""
    torch.cuda.synchronize()
    start, calls, began = meter.joules(), 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        for _ in range(10):
            forward_backward(fn, q, k, v, lengths, grad)
        calls += 10
        torch.cuda.synchronize()
    end = meter.joules()
    return None if start is None or end is None else (end - start) / calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=32, help="layers a step, for the energy a step")
    parser.add_argument("--rows", type=int, default=6, help="rows (document mixes) per kind")
    parser.add_argument("--rows-per-call", type=int, default=16,
                        help="rows attended in one call, so the GPU's time outweighs the launch")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--energy-seconds", type=float, default=2.0,
                        help="per variant, on the first row of the train bench's documents: the card's joules a call, "
                             "from calls back to back for this long (0: none)")
    parser.add_argument("--json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("attention_speed: needs CUDA", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    shape = Shape(args.heads, args.heads, args.head_dim, 1e-5, args.head_dim ** -0.5, torch.bfloat16, "varlen")
    fns = variants(shape, args.seq)
    results = []
    meter, energy = Meter(device), {}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    for kind in ("train_bench", "short", "long_and_short"):
        totals = {name: 0.0 for name in fns}
        errors = {name: 0.0 for name in fns}
        flops = 0.0
        for row in range(args.rows):
            lengths = sum((documents(kind, args.seq, 100 * row + 7 + i) for i in range(args.rows_per_call)), [])
            flops += sum(4 * n * (n + 1) / 2 * args.head_dim * args.heads for n in lengths) * 3.5  # fwd 1 + bwd 2.5
            gen = torch.Generator(device=device).manual_seed(row)
            q, k, v, grad = (torch.randn(args.seq * args.rows_per_call, args.heads, args.head_dim, device=device, dtype=torch.bfloat16,
                                         generator=gen) for _ in range(4))
            q, k, v = (t.requires_grad_() for t in (q, k, v))
            ref = None
            for name, fn in fns.items():
                try:
                    ms, out, grads = timed(fn, q, k, v, lengths, grad, args.iters)
                except RuntimeError as err:  # a backend that refuses these shapes
                    print(f"  {kind} row {row} {name}: {str(err).splitlines()[0][:160]}")
                    totals[name] = float("nan")
                    continue
                totals[name] += ms
                if kind == "train_bench" and row == 0 and args.energy_seconds > 0 and meter.available:
                    energy[name] = joules_per_call(fn, q, k, v, lengths, grad, meter, args.energy_seconds)
                if ref is None:
                    ref = (out, grads)
                else:
                    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip([out, *grads], [ref[0], *ref[1]]))
                    errors[name] = max(errors[name], diff)
        base = totals["varlen"]
        print(f"\n{kind}: {args.rows} calls of {args.rows_per_call} rows of {args.seq} tokens")
        print(f"{'variant':18} {'ms/call':>8} {'TFLOP/s':>8} {'vs varlen':>9} {'max diff':>9}")
        for name, total in totals.items():
            ms = total / args.rows
            rate = flops / args.rows / (ms * 1e-3) / 1e12 if ms == ms else float("nan")
            print(f"{name:18} {ms:8.3f} {rate:8.1f} {base / total:8.2f}x {errors[name]:9.2e}")
            results.append({"kind": kind, "variant": name, "ms": ms, "tflops": rate, "speedup": base / total,
                            "max_diff": errors[name]})
        if kind == "train_bench" and energy:
            print(f"energy, first row, calls back to back for {args.energy_seconds:g} s: joules for one row "
                  f"({args.seq} tokens) forward + backward, and for the {args.layers} layers of a step")
            for name, joules in energy.items():
                if joules is not None:
                    row_j = joules / args.rows_per_call
                    print(f"{name:18} {row_j * 1e3:8.2f} mJ a row-layer {row_j * args.layers:7.2f} J a step")
                    results.append({"kind": kind, "variant": name, "joules_per_row_layer": row_j,
                                    "joules_per_step": row_j * args.layers})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
