"""NF4 dequantization on CUDA: one Llama-2-7B layer's weights back to bf16, each way to do it.

The weights of one decoder layer (q/k/v stacked, o, gate/up stacked, down; hidden 4096,
intermediate 11008), quantized by bitsandbytes as the QLoRA setting does (NF4, block 64, double
quantization). Each variant's output is checked bit for bit against the first; the time per layer
is the median of ``--repeats`` replays of a CUDA graph of the calls (the GPU's time, not the
launches'):

- ``bitsandbytes`` (the baseline): ``dequantize_4bit`` per projection, ``torch.cat`` for the
  stacked groups;
- ``torch_compiled``: the dequantization written in torch ops (``tunemake.nf4``'s path without
  Triton) and compiled, what ``torch.compile`` alone makes of it;
- ``tunemake_kernel``: ``tunemake.nf4.dequantize_plan``, one Triton kernel launch for the layer
  (its plan built once, as the fast path does).

    python bench/nf4_speed.py [--json out.json]

Prints microseconds per layer, the bandwidth reached (half a byte read and two written per
weight), the ratio to the baseline, and the CPU's time to issue one layer's calls.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from tunemake import nf4


def layer_weights(hidden: int, intermediate: int) -> list[list[nf4.NF4]]:
    import bitsandbytes.functional as bnbf

    groups = [[hidden] * 3, [hidden], [intermediate] * 2, [hidden]]
    columns = [hidden, hidden, hidden, intermediate]
    out = []
    for rows, cols in zip(groups, columns):
        group = []
        for n in rows:
            w = torch.randn(n, cols, device="cuda", dtype=torch.bfloat16) * 0.02
            packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4",
                                               quant_storage=torch.uint8)
            param = torch.nn.Parameter(packed, requires_grad=False)
            param.quant_state = state
            group.append(nf4.NF4.of(param))
        out.append(group)
    return out


def bitsandbytes_layer(layer):
    import bitsandbytes.functional as bnbf
    from bitsandbytes.functional import QuantState

    out = []
    for group in layer:
        parts = []
        for w in group:
            state2 = QuantState(absmax=w.absmax2, code=w.code2, blocksize=w.blocksize2, dtype=torch.float32)
            state = QuantState(absmax=w.absmax, shape=torch.Size(w.shape), code=w.code, blocksize=w.blocksize,
                               quant_type="nf4", dtype=torch.bfloat16, offset=w.offset, state2=state2)
            parts.append(bnbf.dequantize_4bit(w.packed, state))
        out.append(parts[0] if len(parts) == 1 else torch.cat(parts))
    return out




def time_us(fn, layer, repeats: int, calls: int = 1) -> float:
    """GPU time of ``fn(layer)``, replayed from a CUDA graph so that the launches' CPU time is not
    counted; ``calls`` calls a graph share one replay's launch (for kernels of a few us)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(layer)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn(layer)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return statistics.median(times)


def host_us(fn, layer, repeats: int) -> float:
    """CPU time to issue ``fn(layer)`` (the Python and the launches; the GPU runs behind)."""
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(layer)
        times.append((time.perf_counter() - start) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("nf4_speed: needs CUDA", file=sys.stderr)
        return 1
    layer = layer_weights(args.hidden, args.intermediate)
    weights = sum(w.shape[0] * w.shape[1] for group in layer for w in group)
    expected = bitsandbytes_layer(layer)

    def torch_compiled(layer):
        return [torch.cat([nf4._dequantize_torch(w, torch.bfloat16) for w in group]) for group in layer]

    planned = nf4.plan(layer)

    def tunemake_layer(layer):
        return nf4.dequantize_plan(planned, torch.bfloat16)

    variants = {"bitsandbytes": bitsandbytes_layer, "torch_compiled": torch.compile(torch_compiled),
                "tunemake_kernel": tunemake_layer}
    rows = []
    for name, fn in variants.items():
        same = all(torch.equal(a, b) for a, b in zip(fn(layer), expected))
        us = time_us(fn, layer, args.repeats)
        rows.append({"variant": name, "us_per_layer": us, "GB_per_s": weights * 2.5 / us / 1e3, "bit_exact": same,
                     "host_us_per_layer": host_us(fn, layer, args.repeats)})
    base = rows[0]["us_per_layer"]
    print(f"{torch.cuda.get_device_name()}: {weights / 1e6:.0f}M weights a layer")
    print(f"{'variant':<18}{'us/layer':>10}{'GB/s':>8}{'ratio':>7}{'host us':>9}  bit-exact")
    for row in rows:
        row["ratio"] = base / row["us_per_layer"]
        print(f"{row['variant']:<18}{row['us_per_layer']:>10.1f}{row['GB_per_s']:>8.0f}{row['ratio']:>6.2f}x"
              f"{row['host_us_per_layer']:>9.1f}  {row['bit_exact']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": rows}, f,
                      indent=2)
    return 0 if rows[-1]["bit_exact"] else 1  # torch_compiled may fuse a multiply-add: not exact


if __name__ == "__main__":
    sys.exit(main())
