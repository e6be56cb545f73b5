"""tunemake's own CUDA kernels (``tunemake.train.fast.kernels``) against torch, on Llama-2-7B's shapes, with a tile sweep.

- ``low_rank_add``: ``c + x @ y`` for a rank-r ``x`` (the LoRA terms the fast path adds to the
  frozen products' outputs and input gradients): ``torch.addmm`` (the baseline, cuBLAS) against
  ``tunemake.train.fast.kernels.low_rank_add`` as shipped, and against the same kernel with other tiles
  (rows x columns x rank per step, warps, pipeline stages). Shapes: 2,048 tokens, outputs of
  4,096 (ranks 64, 128, 192: o and down, gate/up, q/k/v) and 11,008 (rank 64: down's input
  gradient).
- ``swiglu_backward``: SiLU's backward over the concatenated [gate, up] product, the torch ops
  compiled (what a compiled layer runs without the kernel) against ``tunemake.train.fast.kernels``' kernel as
  shipped and with other blocks and warps; where liger-kernel is installed, against Liger's
  fused gate-up backward (with the output ``silu(gate) * up`` from Liger's forward, which the fast
  path's kernel writes in the same pass).
- ``loss`` (with liger-kernel): the cross-entropy from the last hidden state, forward and
  backward, 2,048 tokens x 4,096 x a 32,000 vocabulary: ``tunemake.train.fast.loss.LinearCrossEntropy``
  against Liger's fused linear cross-entropy, time (CUDA events, not a graph: both loop over
  chunks on the host) and peak memory.

Each time is the median of ``--repeats`` replays of a CUDA graph of 20 calls, divided by 20
(the GPU's time, not the launches'). The 4,096-column operands (32 MB with the output) fit the
H200's L2 cache between calls, as they may in the step, where ``c`` was just written; the
11,008-column ones do not. Each output is checked against fp32 maths (relative error under
2e-2); a tile that fails the check is marked and never the best. Prints microseconds, the
bandwidth reached and the ratio to the baseline (higher is faster).

    python bench/kernel_speed.py [--no-sweep] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nf4_speed import time_us  # noqa: E402  (the same CUDA-graph timer)

from tunemake.train.fast import kernels  # noqa: E402

#: calls a graph replay: one replay's launch cost (a few us) is shared by this many
CALLS = 20
MAX_ERROR = 2e-2
ROWS = 2048
LOW_RANK_CASES = [("o, down: forward B, o input grad", 4096, 64), ("gate/up input grad", 4096, 128),
                  ("q/k/v input grad", 4096, 192), ("down's input grad", 11008, 64)]
#: (rows, columns, rank) per tile, warps, stages
LOW_RANK_TILES = [(bt, bn, bk, w, s) for (bt, bn), bk, w, s in itertools.product(
    [(64, 128), (128, 128), (64, 256), (128, 64), (32, 256), (128, 256)], [64, 32], [4, 8], [2, 3])]
SWIGLU_BLOCKS = [(b, w) for b in (512, 1024, 2048, 4096) for w in (2, 4, 8, 16) if b >= w * 32 * 2]


def low_rank_sweep(dtype, repeats: int, sweep: bool = True) -> list[dict]:
    from triton import cdiv

    rows = []
    for name, cols, rank in LOW_RANK_CASES:
        c = torch.randn(ROWS, cols, device="cuda", dtype=dtype)
        x = torch.randn(ROWS, rank, device="cuda", dtype=dtype) * 0.1
        y = torch.randn(rank, cols, device="cuda", dtype=dtype) * 0.1
        exact = torch.addmm(c.float(), x.float(), y.float())
        moved = (2 * ROWS * cols + rank * (ROWS + cols)) * c.element_size()

        def row(variant, fn):
            out = fn()
            err = ((out.float() - exact).abs().max() / exact.abs().max()).item()
            us = time_us(lambda _: fn(), None, repeats, CALLS)
            return {"kernel": "low_rank_add", "case": name, "cols": cols, "rank": rank, "variant": variant,
                    "us": us, "GB_per_s": moved / us / 1e3, "max_rel_err": err}

        case = [row("torch_addmm", lambda: torch.addmm(c, x, y)), row("tunemake", lambda: kernels.low_rank_add(c, x, y))]
        for bt, bn, bk, w, s in LOW_RANK_TILES if sweep else []:
            out = torch.empty_like(c)

            def launch(bt=bt, bn=bn, bk=bk, w=w, s=s, out=out):
                kernels.low_rank_add_kernel[(cdiv(ROWS, bt), cdiv(cols, bn))](
                    c, x, y, out, ROWS, cols, c.stride(0), RANK=rank, BLOCK_T=bt, BLOCK_N=bn, BLOCK_K=bk,
                    num_warps=w, num_stages=s)
                return out

            try:
                case.append(row(f"tile {bt}x{bn}x{bk} w{w} s{s}", launch))
            except Exception as exc:  # a tile that does not fit shared memory: skip it, say so
                print(f"  {name}: tile {bt}x{bn}x{bk} w{w} s{s} failed: {type(exc).__name__}", file=sys.stderr)
        rows.extend(case)
    return rows


def swiglu_sweep(dtype, repeats: int, sweep: bool = True) -> list[dict]:
    from triton import cdiv

    cols = 11008
    dh = torch.randn(ROWS, cols, device="cuda", dtype=dtype)
    gate_up = torch.randn(ROWS, 2 * cols, device="cuda", dtype=dtype)
    exact, exact_h = kernels.swiglu_backward_torch(dh.float(), None, None, gate_up.float(), True)
    moved = (ROWS * cols * 2 + ROWS * 2 * cols * 2) * dh.element_size()
    compiled = torch.compile(lambda d, g: kernels.swiglu_backward_torch(d, None, None, g, True))

    def row(variant, fn):
        grad, h = fn()
        err = max(((grad.float() - exact).abs().max() / exact.abs().max()).item(),
                  ((h.float() - exact_h).abs().max() / exact_h.abs().max()).item())
        us = time_us(lambda _: fn(), None, repeats, CALLS)
        return {"kernel": "swiglu_backward", "case": f"2,048 x 11,008 ({dtype})", "variant": variant, "us": us,
                "GB_per_s": moved / us / 1e3, "max_rel_err": err}

    rows = [row("torch_compiled", lambda: compiled(dh, gate_up)),
            row("tunemake", lambda: kernels.swiglu_backward(dh, None, None, gate_up, True))]
    liger = liger_ops()
    if liger:
        rows.append(row("liger (bwd + fwd for h)", lambda: (liger.swiglu_fused_gate_up_backward(gate_up, dh),
                                                            liger.swiglu_fused_gate_up_forward(gate_up)[1])))
    for block, warps in SWIGLU_BLOCKS if sweep else []:
        grad, h = torch.empty_like(gate_up), torch.empty_like(dh)

        def launch(block=block, warps=warps, grad=grad, h=h):
            kernels.swiglu_backward_kernel[(ROWS, cdiv(cols, block))](dh, gate_up, grad, h, cols, WANT_H=True,
                                                                   BLOCK=block, num_warps=warps)
            return grad, h

        try:
            rows.append(row(f"block {block} w{warps}", launch))
        except Exception as exc:  # a block the compiler refuses: skip it, say so
            print(f"  swiglu: block {block} w{warps} failed: {type(exc).__name__}", file=sys.stderr)
    return rows


def liger_ops():
    """Liger-Kernel's SwiGLU ops module, or None where it is not installed."""
    try:
        from liger_kernel.ops import swiglu
    except ImportError:
        return None
    return swiglu


def loss_rows(dtype, repeats: int, hidden: int = 4096, vocab: int = 32000) -> list[dict]:
    """The loss from the last hidden state, forward + backward: tunemake's against Liger's."""
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
    except ImportError:
        return []
    from tunemake.train.fast.loss import LinearCrossEntropy

    torch.manual_seed(0)
    h = (torch.randn(ROWS, hidden, device="cuda", dtype=dtype)).requires_grad_(True)
    w = (torch.randn(vocab, hidden, device="cuda", dtype=dtype) * 0.02).requires_grad_(True)
    targets = torch.randint(0, vocab, (ROWS,), device="cuda")
    logits = (h.float() @ w.float().T)
    exact = torch.nn.functional.cross_entropy(logits, targets)
    exact.backward()
    exact_h, exact_w = h.grad.clone(), w.grad.clone()
    del logits
    variants = {"tunemake": lambda: LinearCrossEntropy.apply(h, w, targets, dtype, True),
                "liger": lambda: LigerFusedLinearCrossEntropyFunction.apply(h, w, targets)[0]}
    rows = []
    for variant, fn in variants.items():
        def step():
            h.grad = w.grad = None
            loss = fn()
            loss.backward()
            return loss
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1000)
        err = max(abs(loss.item() - exact.item()) / exact.item(),
                  ((h.grad.float() - exact_h).norm() / exact_h.norm()).item(),
                  ((w.grad.float() - exact_w).norm() / exact_w.norm()).item())
        rows.append({"kernel": "loss", "case": f"2,048 x {hidden:,} x {vocab:,} ({dtype})", "variant": variant,
                     "us": statistics.median(times), "GB_per_s": float("nan"), "max_rel_err": err,
                     "peak_extra_mib": (torch.cuda.max_memory_allocated() - before) / 2**20})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--no-sweep", action="store_true", help="the baselines and the shipped kernels only")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or not kernels.TRITON_OPS:
        print("kernel_speed: needs CUDA and Triton with torch >= 2.6", file=sys.stderr)
        return 1
    dtype = getattr(torch, args.dtype)
    sweep = not args.no_sweep
    rows = low_rank_sweep(dtype, args.repeats, sweep) + swiglu_sweep(dtype, args.repeats, sweep)
    rows += loss_rows(dtype, min(args.repeats, 20))
    print(f"{torch.cuda.get_device_name()}, {args.dtype}, {ROWS} tokens")
    worst = 0.0
    for (kernel, case), group in itertools.groupby(rows, key=lambda r: (r["kernel"], r["case"])):
        group = list(group)
        base = group[0]["us"]
        best = min((r for r in group[2:] if r["max_rel_err"] < MAX_ERROR and not r["variant"].startswith("liger")),
                   key=lambda r: r["us"], default=None)
        print(f"{kernel}: {case}")
        for r in group:
            r["ratio"] = base / r["us"]
            mark = "  <- best tile" if r is best else "  WRONG" if r["max_rel_err"] >= MAX_ERROR else ""
            extra = f"  peak +{r['peak_extra_mib']:,.0f} MiB" if "peak_extra_mib" in r else ""
            print(f"  {r['variant']:<26}{r['us']:>8.1f} us{r['GB_per_s']:>7.0f} GB/s{r['ratio']:>6.2f}x"
                  f"  err {r['max_rel_err']:.1e}{mark}{extra}")
        worst = max(worst, next(r for r in group if r["variant"] == "tunemake")["max_rel_err"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": args.dtype,
                       "results": rows}, f, indent=2)
    return 0 if worst < MAX_ERROR else 1


if __name__ == "__main__":
    sys.exit(main())
