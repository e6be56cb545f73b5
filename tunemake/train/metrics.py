"""What an epoch reports as it runs, on the main process: a line per optimizer step in
``epoch_{n}.metrics.jsonl``, TensorBoard scalars (where tensorboard is installed), a progress bar."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

log = logging.getLogger("tunemake.train")

SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s", "memory_mb")


class EpochLog:
    """The reports of one epoch; on other ranks than the main one, every method does nothing."""

    def __init__(self, log_dir: str, experiment: str, epoch: int, steps: int, start_step: int, main: bool):
        self.main, self.epoch = main, epoch
        self.file = Path(log_dir) / f"epoch_{epoch}.metrics.jsonl"
        self.out = None
        if main:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            self.out = open(self.file, "a" if start_step else "w", encoding="utf-8")
        self.writer = _tensorboard(log_dir, epoch) if main else None
        from tqdm.auto import tqdm

        self.bar = tqdm(total=steps, initial=start_step, desc=f"{experiment} epoch {epoch}", unit="step",
                        disable=not main, mininterval=1.0)
        self._lap = time.perf_counter()

    def lap(self) -> float:
        """Seconds since the last call (or since the log was opened)."""
        now = time.perf_counter()
        seconds, self._lap = now - self._lap, now
        return seconds

    def step(self, record: dict) -> None:
        """One optimizer step's record (``global_step`` and the :data:`SCALARS`)."""
        if not self.main:
            return
        self.out.write(json.dumps({"epoch": self.epoch, **record}) + "\n")
        self.out.flush()
        if self.writer:
            for key in SCALARS:
                self.writer.add_scalar(f"train/{key}", record[key], record["global_step"])
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        self.bar.update(1)

    def end(self, global_step: int, metrics: dict) -> None:
        """The epoch's summary: its line in the JSONL file, held-out loss and samples in TensorBoard."""
        self.bar.close()
        if not self.main:
            return
        self.out.write(json.dumps({"epoch": self.epoch, "global_step": global_step, "end_of_epoch": True,
                                   **{k: v for k, v in metrics.items() if k != "seconds"}}) + "\n")
        if self.writer:
            if metrics["heldout_loss"] is not None:
                self.writer.add_scalar("heldout/loss", metrics["heldout_loss"], global_step)
            for s in metrics["samples"]:
                self.writer.add_text(f"samples/{s['prompt'][:40]}", s["output"], global_step)

    def close(self) -> None:
        self.bar.close()
        if self.out:
            self.out.close()
        if self.writer:
            self.writer.close()


def memory_mb(device: torch.device) -> float:
    """Peak memory so far: the device's allocated bytes on CUDA, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except ImportError:
        return 0.0


def _tensorboard(log_dir: str, epoch: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard is not installed: metrics go to the JSONL file only")
        return None
    return SummaryWriter(str(Path(log_dir) / "tensorboard"), filename_suffix=f".epoch_{epoch}")
