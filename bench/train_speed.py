"""Training throughput: tunemake's training step against plain transformers + PEFT, same card, same batch.

Builds a model with random weights in the shape of a public one (``--shape``: Llama-2-7B by
default, Qwen3-8B, Gemma-2-9B; saved once under --workdir, then loaded by
``tunemake.train.model.build_model``, as the train stage does) and one packed batch of documents
with ``position_ids``. For each setting (``lora``: LoRA bf16; ``lora_ckpt``: with gradient
checkpointing; ``qlora``: NF4 + double quant + checkpointing) it times, from the same weights:

- ``baseline``: the model's own forward (SDPA, packed documents found from ``position_ids``) +
  ``torch.optim.AdamW``, bf16 autocast: what a user writes with transformers + PEFT;
- ``strong`` (CUDA, with ``liger-kernel`` installed): the same, with the packed row handed over as
  varlen documents to FlashAttention-4 or torch's varlen kernel and Liger-Kernel applied
  (bench/strong_baseline.py): what a user who cares about speed configures;
- ``tunemake``: ``tunemake.train.engine.step_model`` (the fast path the train stage picks on CUDA) +
  ``make_optimizer``; both through ``tunemake.train.engine.micro_step`` and ``optimizer_step``.

``--profile N`` lists the kernels that take longest (``--trace DIR`` adds the profiler's timeline);
``--timeline`` records CUDA events around each layer instead, without the profiler, whose CPU
overhead moves the GPU's waits: where the GPU waited for the CPU and each layer's GPU time.

Reports tokens/s (median over --steps after --warmup), peak memory, first-step loss and grad
norm, ratios to the baseline and to the strong baseline, the card's joules a step (NVML's energy counter, bench/energy.py:
at the card's power limit the step's time follows its energy); prints a table and writes JSON.
``--rounds N`` times the baselines and tunemake N times in turns and reports the median of the N
same-round ratios (the baseline's speed follows the host's CPU, which drifts within a run; the
host's CPU model is in the JSON).
Under ``torchrun`` (several GPUs) it times the tunemake step in DDP only.

    python bench/train_speed.py --json train_speed.json
    python bench/train_speed.py --settings lora --rounds 7 --json train_speed.json   # a sturdier ratio
    python bench/train_speed.py --layers 2 --hidden 256 --intermediate 512 --heads 4 --vocab 1000 --seq 256   # CPU smoke
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from energy import Meter  # noqa: E402
import strong_baseline  # noqa: E402
from tunemake.train.fast import FastCausalLM  # noqa: E402
from tunemake.train.batches import Rows, make_batch, to_device  # noqa: E402
from tunemake.train.documents import FLAT, ROWS  # noqa: E402
from tunemake.train.engine import make_optimizer, micro_step, optimizer_step, step_model  # noqa: E402
from tunemake.train.launch import setup_processes  # noqa: E402
from tunemake.train.model import build_model, fast_path, trainable_state  # noqa: E402
from tunemake.train.spec import BaseModel, Method, Settings  # noqa: E402

TRAIN = Settings(seed=0, batch_size=1, grad_accumulation=1, lr=1e-5, weight_decay=0.0, betas=(0.9, 0.999),
                 max_grad_norm=1.0, precision="bf16", deepspeed=None, gpus=1, nodes=1, nproc=1, epochs=1,
                 schedule={"type": "constant", "warmup_steps": 0}, save_steps=500)


def method(kind: str, args) -> Method:
    return Method(type="qlora" if kind == "qlora" else "lora", r=64, alpha=16, dropout=args.dropout,
                  gradient_checkpointing=kind != "lora")


#: ``--shape``: the transformers config class and the public model's sizes (its config.json).
SHAPES = {
    "llama2-7b": ("LlamaConfig", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)),
    "qwen3-8b": ("Qwen3Config", dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                     num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                     vocab_size=151936, tie_word_embeddings=False)),
    "gemma2-9b": ("Gemma2Config", dict(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                                       num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                                       vocab_size=256000, sliding_window=4096, query_pre_attn_scalar=256,
                                       attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
}
#: the options that shrink a shape (CPU smoke runs) and the config keys they set
SIZES = {"layers": "num_hidden_layers", "hidden": "hidden_size", "intermediate": "intermediate_size",
         "heads": "num_attention_heads", "vocab": "vocab_size"}


def model_config(args):
    """``--shape``'s config with the sizes given on the command line in place of its own; a
    smaller head count keeps the shape's ratio of query to key/value heads."""
    import transformers

    name, sizes = SHAPES[args.shape]
    sizes = {**sizes, "max_position_embeddings": max(8192, args.seq)}
    given = {key: getattr(args, option) for option, key in SIZES.items() if getattr(args, option) is not None}
    if given:
        groups = sizes["num_attention_heads"] // sizes["num_key_value_heads"]
        sizes.update(given)
        heads = sizes["num_attention_heads"]
        sizes["num_key_value_heads"] = max(1, heads // groups)
        sizes["head_dim"] = sizes["hidden_size"] // heads
        if "query_pre_attn_scalar" in sizes:
            sizes["query_pre_attn_scalar"] = sizes["head_dim"]
    return getattr(transformers, name)(**sizes)


def save_model(config, path: Path, device) -> None:
    from transformers import AutoModelForCausalLM

    if (path / "config.json").exists():
        return
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp, max_shard_size="4GB")
    os.replace(tmp, path)


def packed_batch(args, vocab: int, rank: int) -> Rows:
    """``--batch`` rows of ``--seq`` tokens, each several documents of 128..1024 tokens."""
    rng = np.random.default_rng(1000 + rank)
    rows = Rows.__new__(Rows)
    ids, pos, offsets = [], [], [0]
    for _ in range(args.batch):
        lengths = []
        while sum(lengths) < args.seq:
            lengths.append(int(min(rng.integers(128, 1025), args.seq - sum(lengths))))
        ids.append(rng.integers(3, vocab, size=args.seq))
        pos.append(np.concatenate([np.arange(n) for n in lengths]))
        offsets.append(offsets[-1] + args.seq)
    ids = np.concatenate(ids)
    rows.columns = {"input_ids": (np.array(offsets), ids), "labels": (np.array(offsets), ids.copy()),
                    "position_ids": (np.array(offsets), np.concatenate(pos))}
    rows.num_rows = args.batch
    return rows


def run(name, model, batch, params, optimizer, args, device, with_phases=True) -> dict:
    """Warm-up, then timed steps; the first step's loss and gradient norm.

    ``with_phases``: time the phases of 5 more steps (CUDA).
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times, first, joules_before = [], None, None
    meter = Meter(device) if device.type == "cuda" else None
    model.train()
    for step in range(args.warmup + args.steps):
        sync()
        if step == args.warmup and meter:
            joules_before = meter.joules()
        t0 = time.perf_counter()
        loss = micro_step(model, batch, torch.bfloat16)
        grad_norm = optimizer_step(optimizer, params, TRAIN.max_grad_norm)
        sync()
        times.append(time.perf_counter() - t0)
        if step == 0:
            first = {"loss": loss.item(), "grad_norm": float(grad_norm)}
    median = statistics.median(times[args.warmup:])
    tokens = batch["input_ids"].numel()
    result = {"variant": name, "tokens_per_s": tokens / median, "step_s_median": median,
              "step_s": [round(t, 4) for t in times], "first_step": first,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
    if joules_before is not None and (end := meter.joules()) is not None:
        # the card's energy over the timed steps (host gaps between them included): at the power
        # limit the step's time follows it (bench/energy.py)
        result["joules_per_step"] = (end - joules_before) / args.steps
        result["watts"] = (end - joules_before) / sum(times[args.warmup:])
    if device.type == "cuda" and with_phases:
        result["phases_ms"] = phases(model, batch, params, optimizer)
    if torch.distributed.is_initialized():  # every process must hold the same parameters after the steps
        check = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1)
        gathered = [torch.zeros_like(check) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(gathered, check)
        result["ranks_in_sync"] = bool(all(torch.equal(g, gathered[0]) for g in gathered))
    print(f"  {name}: {result['tokens_per_s']:,.0f} tok/s, peak {result['peak_gib'] or 0:.2f} GiB, "
          f"loss {first['loss']:.5f}, grad norm {first['grad_norm']:.5f}, first step {times[0]:.1f} s, "
          + (f"energy {result['joules_per_step']:.1f} J a step at {result['watts']:.0f} W, " if "watts" in result else "")
          + f"phases (ms) {result.get('phases_ms')}, ranks in sync {result.get('ranks_in_sync')}", flush=True)
    return result


def profile_step(model, batch, params, optimizer, args) -> dict:
    """Two steps under the profiler: the kernels that take longest and, with --trace, a timeline.

    Run last in a setting: a profiler pass slows what the same process measures after it.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):  # compiled and warm before the profiler starts
        micro_step(model, batch, torch.bfloat16)
        optimizer_step(optimizer, params, TRAIN.max_grad_norm)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):  # two steps: the gap between them shows too
            micro_step(model, batch, torch.bfloat16)
            optimizer_step(optimizer, params, TRAIN.max_grad_norm)
        torch.cuda.synchronize()
    averages = prof.key_averages()
    result = {"table": averages.table(sort_by="cuda_time_total", row_limit=args.profile),
              # every kernel's GPU time, per step: what the GPU did, whatever the CPU did around it
              # (the kernels' own rows only: a CPU op's row counts its kernels' time again, and so
              # does a GPU row of a record_function range, such as the optimizer's step)
              "kernels_ms_per_step": sum(e.self_device_time_total for e in averages
                                         if e.device_type != DeviceType.CPU
                                         and not getattr(e, "is_user_annotation", False)) / 2e3}
    print(result["table"], flush=True)
    print(f"  kernels: {result['kernels_ms_per_step']:.2f} ms of GPU time a step", flush=True)
    if args.trace:
        trace = Path(args.trace) / "trace-tunemake.json"
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
        result["timeline"] = timeline(trace)
        print(json.dumps(result["timeline"], indent=1), flush=True)
        subprocess.run(["gzip", "-f", str(trace)], check=False)
    return result


def layer_timeline(fast, batch, params, optimizer, steps: int = 3) -> dict:
    """Where the GPU waits in a step, layer by layer, without the profiler (whose CPU overhead moves the gaps).

    Records a CUDA event and the host time before and after each decoder layer in the forward
    pass and at the start of each layer's backward pass (a gradient hook on the layer's output,
    or, with recomputation, the layer's second call). Reports (ms, last of ``steps`` steps) the
    GPU time per layer (kernels plus any wait inside), the GPU's waits between forward layers,
    the time before the first layer and around the loss, and the host's lead over the GPU (how
    long after the host issued a layer the GPU reached it). The parts add up to the step.
    """
    marks = []  # (label, event, host time)
    forward = [True]

    def mark(label):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        marks.append((label, event, time.perf_counter()))

    run_layer = fast._run_layer

    def timed(layer, x, *rest):
        if not forward[0]:  # a recomputation: this layer's backward pass starts
            mark("bwd_start")
            return run_layer(layer, x, *rest)
        mark("fwd_start")
        y = run_layer(layer, x, *rest)
        mark("fwd_end")
        if y.requires_grad:
            y.register_hook(lambda grad: mark("bwd_start"))
        return y

    fast._run_layer = timed
    try:
        for _ in range(steps):
            marks.clear()
            forward[0] = True
            torch.cuda.synchronize()
            mark("start")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = fast(**batch, use_cache=False).loss
            mark("loss")
            forward[0] = False
            loss.backward()
            mark("backward_end")
            optimizer_step(optimizer, params, TRAIN.max_grad_norm)
            mark("end")
            torch.cuda.synchronize()
    finally:
        del fast._run_layer
    t0_event, t0_host = marks[0][1], marks[0][2]
    gpu = [t0_event.elapsed_time(e) for _, e, _ in marks]
    host = [1e3 * (h - t0_host) for _, _, h in marks]
    labels = [m[0] for m in marks]
    at = {label: labels.index(label) for label in ("loss", "backward_end")}
    starts = [i for i, l in enumerate(labels) if l == "fwd_start"]
    ends = [i for i, l in enumerate(labels) if l == "fwd_end"]
    bwd = [i for i, l in enumerate(labels) if l == "bwd_start"] + [at["backward_end"]]
    fwd_layer = [gpu[e] - gpu[s] for s, e in zip(starts, ends)]
    fwd_wait = [gpu[s] - gpu[e] for e, s in zip(ends, starts[1:])]
    bwd_layer = [gpu[b] - gpu[a] for a, b in zip(bwd, bwd[1:])]  # the last: the first layer's, to the end

    def lead(i):
        return gpu[i] - host[i]

    return {"step": round(gpu[-1], 2), "before_first_layer": round(gpu[starts[0]], 2),
            "host_before_first_layer": round(host[starts[0]], 2),
            "fwd_layers": round(sum(fwd_layer), 2), "fwd_layer_median": round(statistics.median(fwd_layer), 3),
            "fwd_waits": round(sum(fwd_wait), 2), "fwd_layer_first5": [round(t, 3) for t in fwd_layer[:5]],
            "after_last_layer_to_loss": round(gpu[at["loss"]] - gpu[ends[-1]], 2),
            "loss_to_first_bwd_layer": round(gpu[bwd[0]] - gpu[at["loss"]], 2),
            "bwd_layers": round(sum(bwd_layer), 2),
            "bwd_layer_median": round(statistics.median(bwd_layer), 3) if bwd_layer else None,
            "bwd_layer_max": round(max(bwd_layer), 3) if bwd_layer else None,
            "optimizer": round(gpu[-1] - gpu[at["backward_end"]], 2),
            "host_lead_fwd_layers": [round(lead(i), 2) for i in starts[::4]],
            "host_lead_bwd_layers": [round(lead(i), 2) for i in bwd[:-1:4]],
            "host_step": round(host[-1], 2)}


def alternate(first: dict, steppers: dict, params, args, device, restore) -> dict:
    """``--rounds``: the baselines and tunemake timed again in turns, the order reversed each round.

    The baseline's speed follows the host's CPU, which can change within minutes (its step is
    close to CPU-bound), so one comparison per setting can meet a slow or a fast spell on one
    side only. Each later round times every variant (``--warmup`` 1, ``--steps`` as given, fresh
    optimizers) back to back; round 1 is ``first``, the measurements above. ``steppers``: name ->
    (model, optimizer factory, batch, context the step runs in). Reports each round's tokens/s and
    tunemake's ratio to each baseline, their medians, and the median of each side's joules a step.
    """
    quick = argparse.Namespace(**{**vars(args), "warmup": 1})
    rounds = [{name: first[name]["tokens_per_s"] for name in steppers}]
    joules = {name: [first[name]["joules_per_step"]] for name in steppers if "joules_per_step" in first[name]}
    for index in range(1, args.rounds):
        tokens = {}
        for name in (list(steppers) if index % 2 == 0 else list(steppers)[::-1]):
            model, make_opt, batch, context = steppers[name]
            restore()
            optimizer = make_opt()
            with context():
                timed = run(f"{name} (round {index + 1})", model, batch, params, optimizer, quick, device,
                            with_phases=False)
            tokens[name] = timed["tokens_per_s"]
            if "joules_per_step" in timed:
                joules.setdefault(name, []).append(timed["joules_per_step"])
            del optimizer
        rounds.append(tokens)
    ratios = [r["tunemake"] / r["baseline"] for r in rounds]
    summary = {"rounds": [{**r, "ratio": q} for r, q in zip(rounds, ratios)],
               "median_ratio": statistics.median(ratios), "min_ratio": min(ratios), "max_ratio": max(ratios),
               **{f"median_{name}_tokens_per_s": statistics.median(r[name] for r in rounds) for name in steppers},
               **{f"median_{name}_joules_per_step": statistics.median(j) for name, j in joules.items()}}
    if "strong" in steppers:
        strong_ratios = [r["tunemake"] / r["strong"] for r in rounds]
        summary.update(median_ratio_strong=statistics.median(strong_ratios), min_ratio_strong=min(strong_ratios),
                       max_ratio_strong=max(strong_ratios))
    print(f"  rounds: ratio median {summary['median_ratio']:.3f} (min {summary['min_ratio']:.3f}, max "
          f"{summary['max_ratio']:.3f}) over {len(rounds)}"
          + (f", to the strong baseline {summary['median_ratio_strong']:.3f} (min {summary['min_ratio_strong']:.3f}, "
             f"max {summary['max_ratio_strong']:.3f})" if "strong" in steppers else "")
          + "; medians (tok/s): " + ", ".join(f"{name} {summary[f'median_{name}_tokens_per_s']:,.0f}" for name in steppers)
          + (f"; J a step, medians: { {name: round(statistics.median(j), 1) for name, j in joules.items()} }"
             if joules else ""), flush=True)
    return summary


def phases(model, batch, params, optimizer, steps: int = 5) -> dict:
    """GPU time (ms, median over ``steps``) of forward + loss, backward and the optimizer, by CUDA events.

    Events are recorded on the stream without synchronizing, so each phase's time includes the
    GPU waiting for the CPU to launch it; the phases add up to the step. ``host_*``: the CPU's
    time to issue each phase (a phase whose host time is close to its GPU time is CPU-bound);
    ``syncs``: operations of one more step that made the CPU wait for the GPU.
    """
    def one_step() -> list:
        events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        host = [time.perf_counter()]
        events[0].record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch, use_cache=False).loss
        events[1].record()
        host.append(time.perf_counter())
        loss.backward()
        events[2].record()
        host.append(time.perf_counter())
        optimizer_step(optimizer, params, TRAIN.max_grad_norm)
        events[3].record()
        host.append(time.perf_counter())
        torch.cuda.synchronize()
        return [a.elapsed_time(b) for a, b in zip(events, events[1:])] + [1e3 * (b - a) for a, b in zip(host, host[1:])]

    spans = [one_step() for _ in range(steps)]
    names = ("forward", "backward", "optimizer", "host_forward", "host_backward", "host_optimizer")
    result = {name: round(statistics.median(s[i] for s in spans), 2) for i, name in enumerate(names)}
    with warnings.catch_warnings(record=True) as caught:  # one more step, reporting each wait for the GPU
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            one_step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message).splitlines()[0][:120] for w in caught if "synchroniz" in str(w.message)]
    result["syncs"] = len(syncs)
    result["sync_kinds"] = sorted(set(syncs))[:5]
    return result


def timeline(trace: Path) -> dict:
    """What the GPU did in a profiler trace: busy time, idle gaps, time by kind of kernel (ms)."""
    events = json.loads(trace.read_text())["traceEvents"]
    kernels = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
                     if e.get("cat") == "kernel" and "dur" in e)
    if not kernels:
        return {}
    busy, gaps, end = 0.0, [], kernels[0][0]
    for start, stop, name in kernels:
        if start > end:
            gaps.append((start - end, name))
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)

    def kind(name: str) -> str:
        low = name.lower()
        for key, label in (("nccl", "nccl"), ("flash", "attention"), ("fmha", "attention"), ("attn", "attention"),
                           ("gemm", "gemm"), ("sm90_xmma", "gemm"), ("cutlass", "gemm"), ("nvjet", "gemm"),
                           ("triton_", "triton (compiled)"), ("adam", "optimizer"), ("multi_tensor", "foreach"),
                           ("reduce", "reduction"), ("elementwise", "aten elementwise"), ("copy", "copy"),
                           ("index", "index"), ("scatter", "index"), ("gather", "index")):
            if key in low:
                return label
        return "other"

    by_kind, by_name = {}, {}
    for start, stop, name in kernels:
        by_kind.setdefault(kind(name), [0.0, 0])
        by_kind[kind(name)][0] += (stop - start) / 1e3
        by_kind[kind(name)][1] += 1
        by_name.setdefault(name[:90], [0.0, 0])
        by_name[name[:90]][0] += (stop - start) / 1e3
        by_name[name[:90]][1] += 1
    span = (end - kernels[0][0]) / 1e3
    gaps.sort(reverse=True)
    return {"span_ms": round(span, 2), "busy_ms": round(busy / 1e3, 2), "kernels": len(kernels),
            "gaps_over_20us_ms": round(sum(g for g, _ in gaps if g > 20) / 1e3, 2),
            "gaps_under_20us_ms": round(sum(g for g, _ in gaps if g <= 20) / 1e3, 2),
            "largest_gaps": [(round(g / 1e3, 3), n[:80]) for g, n in gaps[:15]],
            "by_kind_ms": {k: [round(v[0], 2), v[1]] for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1][0])},
            "top_kernels_ms": [(n, round(v[0], 2), v[1]) for n, v in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:25]]}


def setting(kind, args, model_dir, dist, results, out):
    device = dist.device
    chosen = method(kind, args)
    torch.manual_seed(0)
    model = build_model(chosen, BaseModel(str(model_dir), dtype="bfloat16"), device, TRAIN.precision)
    with torch.no_grad():  # B = 0 at init: random B makes the A gradients part of the check
        gen = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 1e-3)
    start = trainable_state(model)
    params = [p for p in model.parameters() if p.requires_grad]
    rows = packed_batch(args, model.config.vocab_size, dist.rank)
    user_batch = to_device(make_batch(rows, range(args.batch), 0, ROWS), device)

    def restore():
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in start:
                    p.copy_(start[name])
            model.zero_grad(set_to_none=True)

    def baseline_optimizer():  # what a user writes: torch's own AdamW
        return torch.optim.AdamW(params, lr=TRAIN.lr, weight_decay=0.0)

    entry = {"setting": kind, "variants": []}
    results.append(entry)
    steppers = {}
    if dist.world == 1 and not args.only_tunemake:
        steppers["baseline"] = (model, baseline_optimizer, user_batch, contextlib.nullcontext)
        why_not = strong_baseline.unavailable(device)
        if why_not:
            print(f"  strong baseline: skipped, {why_not}", flush=True)
        else:
            flat = to_device(make_batch(rows, range(args.batch), 0, FLAT), device)
            steppers["strong"] = (model, baseline_optimizer, flat, lambda: strong_baseline.strong(model))
            entry["strong"] = strong_baseline.describe(model.config)
    for name, (stepper, make_opt, batch, context) in steppers.items():
        optimizer = make_opt()
        with context():
            entry["variants"].append(run(name, stepper, batch, params, optimizer, args, device))
        del optimizer
        restore()
    stepped = step_model(model, dist, torch.bfloat16, checkpoint=chosen.gradient_checkpointing)
    optimizer = make_optimizer(params, TRAIN, device)
    entry["variants"].append(run("tunemake", stepped, user_batch, params, optimizer, args, device))
    fast = fast_path(stepped)
    entry["attention"] = fast.attention if fast else "the model's own forward"
    del optimizer
    if args.rounds > 1 and steppers:
        first = {v["variant"]: v for v in entry["variants"]}
        steppers["tunemake"] = (stepped, lambda: make_optimizer(params, TRAIN, device), user_batch,
                                contextlib.nullcontext)
        entry["alternating"] = alternate(first, steppers, params, args, device, restore)
    del stepped, fast
    if args.timeline and device.type == "cuda" and dist.world == 1:
        restore()
        optimizer = make_optimizer(params, TRAIN, device)
        fast = FastCausalLM(model, torch.bfloat16, checkpoint=chosen.gradient_checkpointing)
        entry["timeline"] = layer_timeline(fast, user_batch, params, optimizer)
        print(f"  timeline (ms): {json.dumps(entry['timeline'])}", flush=True)
        del optimizer, fast
    if args.profile and device.type == "cuda" and dist.world == 1:
        restore()
        optimizer = make_optimizer(params, TRAIN, device)
        fast = FastCausalLM(model, torch.bfloat16, checkpoint=chosen.gradient_checkpointing)
        entry["profile"] = profile_step(fast, user_batch, params, optimizer, args)
        del optimizer, fast
    restore()
    model = params = start = None  # freed before the next setting builds its model
    torch.compiler.reset()  # compiled code can hold the last fast path's tensors
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if out and dist.main:
        out.write_text(json.dumps({"results": results, **environment(args, dist)}, indent=2))


def environment(args, dist) -> dict:
    import transformers

    return {"card": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "gpus": dist.world,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "date": time.strftime("%Y-%m-%d"), "args": vars(args),
            "cpus": len(os.sched_getaffinity(0)), "omp_threads": torch.get_num_threads(), "host_cpu": host_cpu()}


def host_cpu() -> str:
    """The host CPU's model name: the baselines' speed follows it."""
    try:
        with open("/proc/cpuinfo") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b", help="the public model whose sizes to take")
    parser.add_argument("--layers", type=int, help="in place of the shape's (also --hidden, --intermediate, --heads, --vocab)")
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--intermediate", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (PEFT's default 0)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1,
                        help="time the baseline and tunemake again in turns, this many rounds in all (median ratio)")
    parser.add_argument("--settings", default="lora,lora_ckpt,qlora")
    parser.add_argument("--profile", type=int, default=0, help="profile two tunemake steps: the N kernels that take longest")
    parser.add_argument("--trace", help="with --profile: write the profiler's trace and a timeline summary to this folder")
    parser.add_argument("--timeline", action="store_true", help="GPU time and waits layer by layer, without the profiler")
    parser.add_argument("--only-tunemake", action="store_true", help="skip the baseline")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "tunemake-train-speed"))
    parser.add_argument("--json")
    args = parser.parse_args()
    dist = setup_processes(1 if torch.cuda.is_available() else 0)
    config = model_config(args)
    model_dir = Path(args.workdir) / (f"{args.shape}-{config.num_hidden_layers}x{config.hidden_size}"
                                      f"-{config.vocab_size}")
    if dist.main:
        model_dir.parent.mkdir(parents=True, exist_ok=True)
        save_model(config, model_dir, dist.device)
    dist.barrier()
    out = Path(args.json) if args.json else None
    results = []
    for kind in args.settings.split(","):
        if kind == "qlora" and dist.device.type != "cuda":
            print("qlora: skipped on the CPU")
            continue
        if dist.main:
            print(f"{kind}:", flush=True)
        setting(kind, args, model_dir, dist, results, out)

    if dist.main:
        env = environment(args, dist)
        print(f"\n{args.shape} shape, card: {env['card']} x {dist.world}, host {env['host_cpu']}, torch {env['torch']}, seq {args.seq}, "
              f"batch {args.batch} per GPU, {env['cpus']} CPUs, {env['omp_threads']} threads")
        print(f"{'setting':10} {'variant':11} {'tok/s/GPU':>10} {'peak GiB':>9} {'ratio':>6} {'/strong':>7} {'loss':>9} "
              f"{'grad norm':>10} {'J/step':>7}")
        for entry in results:
            found = {v["variant"]: v for v in entry["variants"]}
            base, strong = found.get("baseline"), found.get("strong")
            for v in entry["variants"]:
                ratio = v["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
                v["ratio"] = ratio
                to_strong = v["tokens_per_s"] / strong["tokens_per_s"] if strong else float("nan")
                if strong:
                    v["ratio_strong"] = to_strong
                if base:
                    v["loss_rel_diff"] = abs(v["first_step"]["loss"] / base["first_step"]["loss"] - 1)
                    v["grad_norm_rel_diff"] = abs(v["first_step"]["grad_norm"] / base["first_step"]["grad_norm"] - 1)
                print(f"{entry['setting']:10} {v['variant']:11} {v['tokens_per_s']:>10,.0f} {v['peak_gib'] or 0:>9.2f} "
                      f"{ratio:>6.2f} {to_strong:>7.2f} {v['first_step']['loss']:>9.5f} {v['first_step']['grad_norm']:>10.5f} "
                      + (f"{v['joules_per_step']:>7.1f}" if "joules_per_step" in v else f"{'-':>7}"))
            if "alternating" in entry:
                alt = entry["alternating"]
                print(f"{entry['setting']:10} {'rounds':11} {alt['median_tunemake_tokens_per_s']:>10,.0f} {'':>9} "
                      f"{alt['median_ratio']:>6.2f} {alt.get('median_ratio_strong', float('nan')):>7.2f}  median of "
                      f"{len(alt['rounds'])} same-round ratios ({alt['min_ratio']:.2f}-{alt['max_ratio']:.2f}); "
                      + ", ".join(f"{name} median {alt[f'median_{name}_tokens_per_s']:,.0f} tok/s"
                                  for name in ("baseline", "strong") if f"median_{name}_tokens_per_s" in alt))
        if out:
            out.write_text(json.dumps({"results": results, **env}, indent=2))
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
