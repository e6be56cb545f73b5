"""Batches of a templated dataset's packed rows: each rank's share of an epoch, in a seeded order,
padded, with labels masked where a document starts."""

from __future__ import annotations

import math

import numpy as np
import torch

from tunemake.encode import IGNORE_INDEX
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


def make_batch(rows: Rows, indices, pad_id: int, dense_mask: bool = True) -> dict[str, torch.Tensor]:
    """Pad rows to the longest and build a block-diagonal causal mask from ``position_ids``.

    A document piece starts where ``position_ids`` is 0; tokens attend only within their piece,
    and the first token of a piece is not a target (nothing in its document precedes it).
    Padding forms its own piece, with no targets. Without ``dense_mask`` there is no
    ``attention_mask``: the fast path finds the pieces from ``position_ids`` itself.
    """
    length = max(len(rows.row("input_ids", i)) for i in indices)
    n = len(indices)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((n, length), dtype=torch.long)
    for b, i in enumerate(indices):
        ids = torch.from_numpy(rows.row("input_ids", i).astype(np.int64))
        k = len(ids)
        input_ids[b, :k] = ids
        labels[b, :k] = torch.from_numpy(rows.row("labels", i).astype(np.int64))
        if "position_ids" in rows.columns:
            position_ids[b, :k] = torch.from_numpy(rows.row("position_ids", i).astype(np.int64))
        else:
            position_ids[b, :k] = torch.arange(k)
        position_ids[b, k:] = torch.arange(length - k)
    labels[position_ids == 0] = IGNORE_INDEX
    if not dense_mask:
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    doc = torch.cumsum(position_ids == 0, dim=1)
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
    mask = (doc[:, :, None] == doc[:, None, :]) & causal
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "attention_mask": mask[:, None]}


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

    def stream(self, first_step: int, pad_id: int, dense_mask: bool, device: torch.device):
        """The micro-batches from optimizer step ``first_step`` to the epoch's end, in order, each
        ``(batch on the device, tokens, labelled tokens)``. A batch is built when the loop asks for
        it, after launching the previous one's work, so on CUDA the CPU builds it while the GPU
        runs; it is copied from pinned memory without blocking."""
        pin = device.type == "cuda"
        for micro in range(first_step * self.accumulation, self.micro_per_epoch):
            indices = self.mine[micro * self.batch_size:(micro + 1) * self.batch_size]
            batch = make_batch(self.rows, indices, pad_id, dense_mask=dense_mask)
            counts = batch["input_ids"].numel(), int((batch["labels"] != IGNORE_INDEX).sum())
            yield {k: (v.pin_memory() if pin else v).to(device, non_blocking=True) for k, v in batch.items()}, *counts
