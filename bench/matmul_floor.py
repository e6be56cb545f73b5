"""The floor under a LoRA step: the frozen weights' matrix products of one Llama-2-7B step, at the card's power limit.

A LoRA step cannot skip these products: each layer's four frozen projections forward (q/k/v
stacked, o, gate/up stacked, down) and their input gradients backward (all but the first
layer's q/k/v, whose input is the frozen embeddings), and the head forward and backward: about
1.66 TFLOP a layer and 54 TFLOP a step for 2,048 tokens. They run here alone, bf16, from one CUDA
graph (no CPU in the way), with the shapes and layouts of ``torch.nn.functional.linear`` and
its backward:

- ``burst`` (the baseline): after the card has idled ``--rest`` seconds, one replay to ramp the
  clock up, then one timed; the fastest of ``--bursts`` such (a best case, as the burst is);
  the products at the card's full clock;
- ``sustained``: back-to-back replays for ``--seconds`` after as long a warm-up, as a training
  run keeps the card busy, the median of groups of five; the clock, power and throttle reasons
  that ``nvidia-smi`` reports meanwhile (polled every second by a process of its own, so the
  card never waits for it), and the joules a step from NVML's energy counter (bench/energy.py).

Multi-head attention (q, k and v each ``--hidden`` wide), as Llama-2-7B.

The ratio sustained / burst is what the power limit costs the products. With ``--baseline-ms``
(the plain HF + PEFT step on the same card, from bench/train_speed.py) it also prints the step
time that 2x that baseline needs and how much of it the floor takes.

    python bench/matmul_floor.py [--baseline-ms 207] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from energy import Meter  # noqa: E402


def products(hidden: int, intermediate: int, layers: int, vocab: int, tokens: int, dev="cuda"):
    """Weights and the list of (input, weight, transposed) products of one step; TFLOP a step."""
    dtype = torch.bfloat16
    outs = [3 * hidden, hidden, 2 * intermediate, hidden]  # q/k/v stacked, o, gate/up stacked, down
    ins = [hidden, hidden, hidden, intermediate]
    weights = [[torch.randn(o, i, device=dev, dtype=dtype) * 0.02 for o, i in zip(outs, ins)] for _ in range(layers)]
    head = torch.randn(vocab, hidden, device=dev, dtype=dtype) * 0.02
    acts = {n: torch.randn(tokens, n, device=dev, dtype=dtype) for n in set(ins + outs + [vocab])}
    plan = []
    for layer in weights:  # forward: x @ W^T
        plan += [(acts[w.shape[1]], w, True) for w in layer]
    plan.append((acts[hidden], head, True))
    plan.append((acts[vocab], head, False))  # head backward: dlogits @ W
    for index, layer in enumerate(reversed(weights)):  # input gradients: dy @ W
        first = index == len(weights) - 1
        plan += [(acts[w.shape[0]], w, False) for k, w in enumerate(layer) if not (first and k == 0)]
    flops = sum(2 * tokens * w.shape[0] * w.shape[1] for _, w, _ in plan)
    return plan, flops / 1e12


def smi_polling():
    """``nvidia-smi`` printing the clock, power, limit and throttle reasons every second, or None."""
    try:
        return subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw,power.limit,clocks_throttle_reasons.active",
                                 "--format=csv,noheader", "-lms", "1000"], stdout=subprocess.PIPE, text=True)
    except OSError:
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--seconds", type=float, default=15.0, help="sustained: warm-up and timed, each")
    parser.add_argument("--bursts", type=int, default=5)
    parser.add_argument("--rest", type=float, default=1.0, help="idle seconds before each burst")
    parser.add_argument("--baseline-ms", type=float, help="the HF + PEFT step on this card (bench/train_speed.py)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("matmul_floor: needs CUDA", file=sys.stderr)
        return 1
    plan, tflop = products(args.hidden, args.intermediate, args.layers, args.vocab, args.tokens)
    outs = [torch.empty(a.shape[0], w.shape[0] if t else w.shape[1], device="cuda", dtype=torch.bfloat16)
            for a, w, t in plan]

    def step():
        for (a, w, transposed), out in zip(plan, outs):
            torch.mm(a, w.t() if transposed else w, out=out)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    def timed(replays: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / replays

    bursts = []
    for _ in range(args.bursts):
        time.sleep(args.rest)
        graph.replay()  # the clock ramps up on the first one
        bursts.append(timed(1))
    burst = min(bursts)
    end = time.perf_counter() + args.seconds
    while time.perf_counter() < end:  # warm-up: the card reaches its power limit
        timed(5)
    sustained = []
    poll = smi_polling()
    meter = Meter()
    before = meter.joules()
    end = time.perf_counter() + args.seconds
    while time.perf_counter() < end:
        sustained.append(timed(5))
    after = meter.joules()
    joules = (after - before) / (5 * len(sustained)) if before is not None and after is not None else None
    if poll is None:
        readings = ["nvidia-smi not available"]
    else:
        poll.terminate()
        readings = [line.strip() for line in poll.communicate()[0].splitlines() if line.strip()]
    sustain = statistics.median(sustained)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tflop_per_step": tflop,
              "products": len(plan), "burst_ms": burst, "bursts_ms": bursts, "sustained_ms": sustain,
              "sustained_tflops": tflop / sustain * 1e3, "burst_tflops": tflop / burst * 1e3,
              "ratio_sustained_to_burst": sustain / burst, "nvidia_smi_sustained": readings,
              "sustained_joules_per_step": joules, "energy_meter": meter.why or "NVML",
              "date": time.strftime("%Y-%m-%d")}
    print(f"{result['device']}: {len(plan)} frozen products a step, {tflop:.1f} TFLOP ({args.tokens} tokens)")
    print(f"  burst (full clock, baseline): {burst:7.2f} ms a step, {result['burst_tflops']:5.0f} TFLOP/s")
    print(f"  sustained (power limit):      {sustain:7.2f} ms a step, {result['sustained_tflops']:5.0f} TFLOP/s, "
          f"{sustain / burst:.2f}x the burst's time")
    if joules is not None:
        print(f"  sustained energy:             {joules:7.2f} J a step, {joules / sustain * 1e3:.0f} W")
    print("  nvidia-smi while sustained (clock, power, limit, throttle reasons; 0x4 = power cap):")
    for line in readings[:: max(1, len(readings) // 5)]:
        print(f"    {line}")
    if args.baseline_ms:
        need = args.baseline_ms / 2
        result.update(baseline_ms=args.baseline_ms, step_needed_ms=need, floor_share_of_needed=sustain / need)
        print(f"  2x a {args.baseline_ms:.1f} ms baseline needs a {need:.1f} ms step: the products alone take "
              f"{sustain / need:.0%} of it, {need - sustain:.1f} ms left for everything else")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
