"""The epoch loop: one epoch of one experiment, in every training process."""

from __future__ import annotations

import logging
import shutil
import signal
import time
from pathlib import Path

import torch

from tunemake.encode import IGNORE_INDEX
from tunemake.schedule import lr_factor
from tunemake.train.batches import EpochBatches, Rows, step_seed
from tunemake.train.checkpoint import find_start, save_resume_point, write_epoch
from tunemake.train.engine import make_engine, set_lr
from tunemake.train.evaluation import heldout_loss, sample_generations
from tunemake.train.launch import Dist, setup_processes
from tunemake.train.metrics import EpochLog, memory_mb
from tunemake.train.model import autocast_dtype, build_model, load_trainable
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
    model = build_model(spec.method, spec.base_model, dist.device, train.precision)
    if start.trainable is not None:
        load_trainable(model, start.trainable, start.trainable_source)
    amp_dtype = autocast_dtype(train.precision, dist.device)
    engine = make_engine(model, spec.method, train, dist, amp_dtype, start.state_dir)
    if start.step and dist.main:
        log.info("resuming epoch %d at step %d/%d from %s", epoch, start.step, batches.steps, start.state_dir)
    counters, metrics, pad_id = start.counters, start.metrics, spec.pad_id()

    reports = EpochLog(spec.log_dir, spec.experiment, epoch, batches.steps, start.step, dist.main)
    engine.model.train()
    lr = 0.0
    try:
        for step in range(start.step, batches.steps):
            t0 = time.perf_counter()
            global_step = (epoch - 1) * batches.steps + step
            lr = train.lr * lr_factor(global_step, train.schedule, batches.steps, train.epochs)
            set_lr(engine.optimizer, lr)
            micro_batches = batches.micro_batches(step)
            loss_sum, tokens, trained = torch.zeros(()), 0, 0
            for micro in micro_batches:
                torch.manual_seed(step_seed(train.seed, epoch, micro * dist.world + dist.rank))
                batch = batches.batch(micro, pad_id, dense_mask=not engine.fast, device=dist.device)
                loss = engine.forward_backward(batch, len(micro_batches), boundary=micro == micro_batches[-1])
                _check_finite(loss, epoch, step, global_step)
                loss_sum += loss.item()
                tokens += int(batch["input_ids"].numel())
                trained += int((batch["labels"] != IGNORE_INDEX).sum())
            grad_norm = engine.step()
            totals = dist.all_reduce(torch.tensor([loss_sum.item(), len(micro_batches), tokens, trained,
                                                   float(interrupt.requested)], dtype=torch.float64))
            loss_mean = totals[0].item() / max(1.0, totals[1].item())
            counters["global_step"] += 1
            counters["tokens"] += int(totals[2].item())
            counters["trained_tokens"] += int(totals[3].item())
            metrics["loss_sum"] += loss_mean
            metrics["loss_count"] += 1
            reports.step({"step": step + 1, "global_step": counters["global_step"], "loss": loss_mean, "lr": lr,
                          "grad_norm": float(grad_norm), "tokens_per_s": totals[2].item() / (time.perf_counter() - t0),
                          "memory_mb": memory_mb(dist.device)})
            stop = totals[4].item() > 0
            if step + 1 < batches.steps and (stop or (step + 1) % train.save_steps == 0):
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


def _end_of_epoch(spec: EpochSpec, engine, dist: Dist, pad_id: int, amp_dtype, metrics: dict, lr: float, steps: int,
                  started: float) -> dict:
    """The epoch's metrics: mean train loss, held-out loss, sample generations (main rank)."""
    heldout = heldout_loss(engine.model, spec.data_dir, spec.train.batch_size, dist, pad_id, amp_dtype)
    samples = []
    if dist.main and spec.train.evaluation_inputs:
        samples = sample_generations(engine.model, spec.train.evaluation_inputs, spec.load_tokenizer(), spec.template)
    return {"train_loss": metrics["loss_sum"] / max(1, metrics["loss_count"]), "heldout_loss": heldout,
            "lr_last": lr, "steps": steps, "seconds": time.perf_counter() - started, "samples": samples}


def _check_finite(loss: torch.Tensor, epoch: int, step: int, global_step: int) -> None:
    if not torch.isfinite(loss):
        raise TrainError(f"epoch {epoch}, step {step + 1} (global step {global_step + 1}): loss is {loss.item()}; "
                         "lower lr, check the data, or use fp32/bf16 instead of fp16")
