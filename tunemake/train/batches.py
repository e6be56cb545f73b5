"""Batches of a templated dataset's packed rows: each rank's share of an epoch, in a seeded order,
in the layout the model takes them (:mod:`tunemake.train.documents`)."""

from __future__ import annotations

import math

import numpy as np
import torch

from tunemake.encode import IGNORE_INDEX
from tunemake.train import documents
from tunemake.train.spec import TrainError


class Rows:
    """Rows of a templated dataset split as flat arrays (no per-row Python objects)."""

    def __init__(self, data_dir: str, split: str):
        import datasets

        table = datasets.load_from_disk(data_dir)[split].data.table
        self.columns = {}
        for name in table.column_names:
            arr = table.column(name).combine_chunks()
            self.columns[name] = (arr.offsets.to_numpy().astype(np.int64), arr.values.to_numpy())
        self.num_rows = len(table)

    def row(self, name: str, index: int) -> np.ndarray:
        offsets, values = self.columns[name]
        return values[offsets[index]:offsets[index + 1]]


def make_batch(rows: Rows, indices, pad_id: int, layout: str) -> dict:
    """Rows ``indices`` as a micro-batch in ``layout`` (:mod:`tunemake.train.documents`)."""
    positions = "position_ids" in rows.columns
    return documents.make_batch([(rows.row("input_ids", i), rows.row("labels", i),
                                  rows.row("position_ids", i) if positions else None) for i in indices], pad_id, layout)


def row_tokens(rows: Rows, indices) -> int:
    offsets = rows.columns["input_ids"][0]
    return int(sum(offsets[i + 1] - offsets[i] for i in indices))


def epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def layout(num_rows: int, batch_size: int, world: int, accumulation: int) -> tuple[int, int]:
    """(micro-batches per rank per epoch, optimizer steps per epoch); incomplete batches dropped."""
    micro = num_rows // (batch_size * world)
    if micro == 0:
        raise TrainError(
            f"the dataset has {num_rows} rows, fewer than one batch of batch_size {batch_size} "
            f"x {world} processes; lower batch_size or gpus, or add data"
        )
    return micro, math.ceil(micro / accumulation)


def step_seed(seed: int, epoch: int, micro_step: int) -> int:
    """A seed per micro-step, so dropout does not depend on where a run was resumed."""
    return (seed * 1_000_003 + epoch * 10_007 + micro_step) % (2**63)


class EpochBatches:
    """One rank's micro-batches of one epoch: the epoch's seeded order of rows, dealt round-robin
    over the ranks, ``batch_size`` rows each; ``grad_accumulation`` of them make an optimizer step
    (the last step of an epoch may have fewer)."""

    def __init__(self, rows: Rows, batch_size: int, accumulation: int, seed: int, epoch: int, rank: int, world: int):
        self.rows, self.batch_size, self.accumulation = rows, batch_size, accumulation
        self.micro_per_epoch, self.steps = layout(rows.num_rows, batch_size, world, accumulation)
        order = epoch_order(rows.num_rows, seed, epoch)
        self.mine = order[rank::world][: self.micro_per_epoch * batch_size]

    def micro_batches(self, step: int) -> range:
        """The micro-batches of optimizer step ``step`` (0-based)."""
        return range(step * self.accumulation, min((step + 1) * self.accumulation, self.micro_per_epoch))

    def stream(self, first_step: int, pad_id: int, layout: str, device: torch.device):
        """The micro-batches from optimizer step ``first_step`` to the epoch's end, in order, each
        ``(batch on the device, tokens, labelled tokens)`` (tokens: the rows', padding not counted).
        A batch is built when the loop asks for it, after launching the previous one's work, so on
        CUDA the CPU builds it while the GPU runs; it is copied from pinned memory without blocking."""
        for micro in range(first_step * self.accumulation, self.micro_per_epoch):
            indices = self.mine[micro * self.batch_size:(micro + 1) * self.batch_size]
            batch = make_batch(self.rows, indices, pad_id, layout)
            counts = row_tokens(self.rows, indices), int((batch["labels"] != IGNORE_INDEX).sum())
            yield to_device(batch, device), *counts


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on ``device`` (from pinned memory, without blocking, on CUDA)."""
    pin = device.type == "cuda"
    return {k: (v.pin_memory() if pin else v).to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}
