"""tunemake's own CUDA kernels (``tunemake.train.fast.kernels``) against torch, on Llama-2-7B's shapes, with a tile sweep.

- ``low_rank_add``: ``c + x @ y`` for a rank-r ``x`` (the LoRA terms the fast path adds to the
  frozen products' outputs and input gradients): ``torch.addmm`` (the baseline, cuBLAS) against
  ``tunemake.train.fast.kernels.low_rank_add`` as shipped, and against the same kernel with other tiles
  (rows x columns x rank per step, warps, pipeline stages). Shapes: 2,048 tokens, outputs of
  4,096 (ranks 64, 128, 192: o and down, gate/up, q/k/v) and 11,008 (rank 64: down's input
  gradient).
- ``swiglu_backward``: SiLU's backward over the concatenated [gate, up] product, the torch ops
  compiled (what a compiled layer runs without the kernel) against ``tunemake.train.fast.kernels``' kernel as
  shipped and with other blocks and warps.

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
    print(f"{torch.cuda.get_device_name()}, {args.dtype}, {ROWS} tokens")
    worst = 0.0
    for (kernel, case), group in itertools.groupby(rows, key=lambda r: (r["kernel"], r["case"])):
        group = list(group)
        base = group[0]["us"]
        best = min((r for r in group[2:] if r["max_rel_err"] < MAX_ERROR), key=lambda r: r["us"], default=None)
        print(f"{kernel}: {case}")
        for r in group:
            r["ratio"] = base / r["us"]
            mark = "  <- best tile" if r is best else "  WRONG" if r["max_rel_err"] >= MAX_ERROR else ""
            print(f"  {r['variant']:<26}{r['us']:>8.1f} us{r['GB_per_s']:>7.0f} GB/s{r['ratio']:>6.2f}x"
                  f"  err {r['max_rel_err']:.1e}{mark}")
        worst = max(worst, group[1]["max_rel_err"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": args.dtype,
                       "results": rows}, f, indent=2)
    return 0 if worst < MAX_ERROR else 1


if __name__ == "__main__":
    sys.exit(main())
