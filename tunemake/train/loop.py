"""The epoch loop: one epoch of one experiment, in every training process."""

from __future__ import annotations

import logging
import math
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tunemake.schedule import lr_factor
from tunemake.train import documents
from tunemake.train.batches import EpochBatches, Rows, step_seed
from tunemake.train.checkpoint import find_start, save_resume_point, write_epoch
from tunemake.train.engine import make_engine, partition_context, set_lr
from tunemake.train.evaluation import heldout_loss, sample_generations
from tunemake.train.launch import Dist, setup_processes
from tunemake.train.metrics import EpochLog, memory_mb
from tunemake.train.model import autocast_dtype, build_model, is_partitioned_model, load_trainable, unwrap
from tunemake.train.spec import EpochSpec, TrainError

log = logging.getLogger("tunemake.train")

RESUME_EXIT_CODE = 75  # EX_TEMPFAIL: interrupted with a resume point written; rerun to continue


class Interrupt:
    """SIGTERM / SIGUSR1 (Slurm's warnings before preemption) set a flag checked every step."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        log.warning("received %s: writing a resume point at the next step", signal.Signals(signum).name)
        self.requested = True


def train_epoch(spec: EpochSpec) -> int:
    """Train epoch ``spec.epoch`` of ``spec.experiment`` and write its artefacts
    (:mod:`tunemake.train.checkpoint`).

    Returns:
        0 when the epoch is done, :data:`RESUME_EXIT_CODE` when interrupted (resume point written).

    Raises:
        TrainError: bad configuration, non-finite loss, pruned previous state.
    """
    spec = spec.resolved()
    spec.check()
    train, epoch = spec.train, spec.epoch
    dist = setup_processes(train.gpus or 0)
    torch.set_num_threads(max(1, spec.threads // max(1, dist.world)))
    torch.use_deterministic_algorithms(dist.device.type == "cpu", warn_only=True)
    interrupt, started = Interrupt(), time.perf_counter()

    start = find_start(spec, dist)
    batches = EpochBatches(Rows(spec.data_dir, "train"), train.batch_size, train.grad_accumulation, train.seed, epoch,
                           dist.rank, dist.world)
    torch.manual_seed(train.seed)
    model = build_model(spec.method, spec.base_model, dist.device, train.precision, partition_context(train, dist))
    if start.trainable is not None:
        load_trainable(model, start.trainable, start.trainable_source)
    amp_dtype = autocast_dtype(train.precision, dist.device)
    engine = make_engine(model, spec.method, train, dist, amp_dtype, start.state_dir)
    if start.step and dist.main:
        log.info("resuming epoch %d at step %d/%d from %s", epoch, start.step, batches.steps, start.state_dir)
    counters, metrics, pad_id = start.counters, start.metrics, spec.pad_id()

    reports = EpochLog(spec.log_dir, spec.experiment, epoch, batches.steps, start.step, dist.main)
    layout = engine.route.layout
    if dist.main:
        log.info("epoch %d: %s", epoch, engine.route.why)
    stream = batches.stream(start.step, pad_id, layout, device=dist.device)
    pending: list[Step] = []  # steps whose loss and grad norm are still on the device
    engine.model.train()
    lr = 0.0
    try:
        for step in range(start.step, batches.steps):
            global_step = (epoch - 1) * batches.steps + step
            lr = train.lr * lr_factor(global_step, train.schedule, batches.steps, train.epochs)
            set_lr(engine.optimizer, lr)
            micro_batches = batches.micro_batches(step)
            current = Step(step + 1, global_step + 1, lr, len(micro_batches), torch.zeros((), device=dist.device))
            for micro in micro_batches:
                batch, tokens, trained = next(stream)
                torch.manual_seed(step_seed(train.seed, epoch, micro * dist.world + dist.rank))
                with documents.apart(unwrap(engine.model), layout, amp_dtype):
                    current.loss_sum += engine.forward_backward(batch, len(micro_batches),
                                                                boundary=micro == micro_batches[-1])
                current.tokens, current.trained = current.tokens + tokens, current.trained + trained
            current.grad_norm = engine.step()
            pending.append(current)
            last = step + 1 == batches.steps
            save = not last and (step + 1) % train.save_steps == 0
            stop = dist.any(interrupt.requested)
            if not (last or save or stop or (step + 1) % train.log_steps == 0):
                continue
            read_back(pending, dist, epoch, counters, metrics, reports)
            pending = []
            if not last and (stop or save):
                save_resume_point(Path(spec.out.resume), engine, dist, start.fingerprint, step + 1, counters, metrics)
                if stop:
                    if dist.main:
                        log.warning("interrupted: resume point at step %d/%d in %s; rerun to continue",
                                    step + 1, batches.steps, spec.out.resume)
                    return RESUME_EXIT_CODE

        epoch_metrics = _end_of_epoch(spec, engine, dist, pad_id, amp_dtype, metrics, lr, batches.steps, started)
        reports.end(counters["global_step"], epoch_metrics)
        write_epoch(spec, engine, dist, start.fingerprint, counters, epoch_metrics, batches.steps)
    finally:
        reports.close()
    if dist.main:
        shutil.rmtree(spec.out.resume, ignore_errors=True)
        log.info("epoch %d done: train loss %.4f, held-out loss %s, %d steps in %.0f s", epoch,
                 epoch_metrics["train_loss"], "n/a" if epoch_metrics["heldout_loss"] is None
                 else f"{epoch_metrics['heldout_loss']:.4f}", batches.steps, epoch_metrics["seconds"])
    dist.barrier()
    return 0


@dataclass
class Step:
    """One optimizer step, as the loop left it: its loss still on the device until :func:`read_back`."""

    number: int  # 1-based, within the epoch
    global_step: int
    lr: float
    micro_batches: int
    loss_sum: torch.Tensor  # over this rank's micro-batches
    tokens: int = 0
    trained: int = 0
    grad_norm: torch.Tensor | float = 0.0


def read_back(steps: list[Step], dist: Dist, epoch: int, counters: dict, metrics: dict, reports: EpochLog) -> None:
    """Bring the steps' losses from the device in one transfer, summed over the processes; refuse a
    non-finite one; count and report each step."""
    ints = torch.tensor([[s.micro_batches, s.tokens, s.trained] for s in steps], dtype=torch.float64)
    totals = torch.cat([torch.stack([s.loss_sum for s in steps]).double()[:, None], ints.to(dist.device)], dim=1)
    totals = dist.all_reduce(totals).cpu()  # the one wait for the device in these steps
    seconds = reports.lap() / len(steps)
    for s, (loss_sum, micro_batches, tokens, trained) in zip(steps, totals.tolist()):
        loss = loss_sum / max(1.0, micro_batches)
        if not math.isfinite(loss):
            raise TrainError(f"epoch {epoch}, step {s.number} (global step {s.global_step}): loss is {loss}; lower lr, "
                             "check the data, or use fp32/bf16 instead of fp16")
        counters["global_step"] += 1
        counters["tokens"] += int(tokens)
        counters["trained_tokens"] += int(trained)
        metrics["loss_sum"] += loss
        metrics["loss_count"] += 1
        reports.step({"step": s.number, "global_step": counters["global_step"], "loss": loss, "lr": s.lr,
                      "grad_norm": float(s.grad_norm), "tokens_per_s": tokens / seconds,
                      "memory_mb": memory_mb(dist.device)})


def _end_of_epoch(spec: EpochSpec, engine, dist: Dist, pad_id: int, amp_dtype, metrics: dict, lr: float, steps: int,
                  started: float) -> dict:
    """The epoch's metrics: mean train loss, held-out loss, sample generations (main rank)."""
    heldout = heldout_loss(engine.model, spec.data_dir, spec.train.batch_size, dist, pad_id, amp_dtype)
    samples = []
    if spec.train.evaluation_inputs and (dist.main or is_partitioned_model(engine.model)):
        samples = sample_generations(engine.model, spec.train.evaluation_inputs, spec.load_tokenizer(), spec.template)
    return {"train_loss": metrics["loss_sum"] / max(1, metrics["loss_count"]), "heldout_loss": heldout,
            "lr_last": lr, "steps": steps, "seconds": time.perf_counter() - started, "samples": samples}


