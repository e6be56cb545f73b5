"""Packed rows for tests, and the reference the ways of computing them are checked against: the
model's own forward with a dense block-diagonal causal mask."""

from __future__ import annotations

import numpy as np
import torch

from tunemake.train.batches import Rows, make_batch
from tunemake.train.documents import ROWS


def packed_rows(lengths_per_row, vocab=97, seed=0) -> Rows:
    """Rows of several documents each, with position_ids restarting at every document."""
    rng = np.random.default_rng(seed)
    rows = Rows.__new__(Rows)
    values = {"input_ids": [], "labels": [], "position_ids": []}
    offsets = [0]
    for docs in lengths_per_row:
        ids = rng.integers(1, vocab, size=sum(docs))
        labels = ids.copy()
        labels[: docs[0] // 2] = -100  # a prompt without targets
        values["input_ids"].append(ids)
        values["labels"].append(labels)
        values["position_ids"].append(np.concatenate([np.arange(d) for d in docs]))
        offsets.append(offsets[-1] + sum(docs))
    rows.columns = {k: (np.array(offsets, dtype=np.int64), np.concatenate(v)) for k, v in values.items()}
    rows.num_rows = len(lengths_per_row)
    return rows


def dense_batch(rows: Rows, indices, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """The rows padded, with the (batch, 1, L, L) mask that lets a token see the tokens before it
    in its own document only (padding forms a document of its own)."""
    batch = make_batch(rows, indices, pad_id, ROWS)
    doc = torch.cumsum(batch["position_ids"] == 0, dim=1)
    length = doc.shape[1]
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
    return {**batch, "attention_mask": ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]}
