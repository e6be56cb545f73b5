"""Packed rows as the documents they hold: how a batch reaches the model, and the attention that
keeps each document to itself without an O(L²) mask.

A packed row holds several documents, each starting where ``position_ids`` is 0. Three layouts:

- ``rows``: the rows padded to the longest, ``position_ids`` only; the CUDA fast path
  (:mod:`tunemake.train.fast`) finds the documents itself.
- ``flat``: every document of the micro-batch in one row, no padding, with ``cu_seq_lens_q/k`` and
  ``max_length_q/k`` (transformers' ``FlashAttentionKwargs``), for a model whose attention goes
  through transformers' attention interface. The attention is flash attention's varlen kernel
  where ``flash_attn`` is installed on CUDA and the model computes in half precision, else
  :func:`document_attention`: torch's varlen kernel over the whole row on CUDA in half precision
  (without soft-capping or dropout), else causal SDPA per document, or the eager maths per
  document where a sliding window or Gemma's logit soft-capping needs it. Memory grows with the
  documents' lengths, not the row's.
- ``documents``: the documents as a padded batch with a padding mask, for a model whose code
  bypasses the interface (remote code with its own attention): exact for any model, at the cost
  of the padding.

Flex attention is not used: without ``torch.compile`` it computes the full score matrix, and
compiled it would compile anew for every row length.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import numpy as np
import torch

from tunemake.encode import IGNORE_INDEX

ROWS, FLAT, DOCUMENTS = "rows", "flat", "documents"
#: The name :func:`document_attention` is registered under in transformers' AttentionInterface.
ATTENTION = "tunemake_documents"


def layout_for(model, fast: bool) -> str:
    """The layout batches take for ``model`` (PEFT-wrapped or not; ``fast``: the step runs through
    the fast path)."""
    if fast:
        return ROWS
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return FLAT if getattr(base, "_supports_attention_backend", False) else DOCUMENTS


def attention_for(model, amp_dtype=None) -> str:
    """The attention implementation that keeps ``model``'s documents apart in a ``flat`` row
    (``amp_dtype``: the autocast dtype the forward runs in, None without autocast)."""
    from transformers.utils import is_flash_attn_2_available

    param = next(model.parameters())
    half = (amp_dtype or param.dtype) in (torch.bfloat16, torch.float16)
    if param.device.type == "cuda" and half and is_flash_attn_2_available():
        return "flash_attention_2"
    return ATTENTION


@contextlib.contextmanager
def apart(model, layout: str, amp_dtype=None):
    """Within the block, ``model`` (the transformers model, PEFT-wrapped or not) keeps a ``flat``
    row's documents apart (its attention implementation is put back afterwards); other layouts
    need nothing. Wrap the backward too: gradient checkpointing runs the forward again there."""
    if layout != FLAT:
        yield
        return
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, document_attention)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = base.config._attn_implementation
    wanted = attention_for(base, amp_dtype)
    if wanted != before:
        base.set_attn_implementation(wanted)
    try:
        yield
    finally:
        if wanted != before:
            base.set_attn_implementation(before)


def make_batch(pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]], pad_id: int,
               layout: str) -> dict[str, torch.Tensor]:
    """A micro-batch of packed rows ``(input_ids, labels, position_ids or None)`` in ``layout``.

    The first token of a document is never a target (nothing in its document precedes it);
    padding has no targets. A row without ``position_ids`` is one document.
    """
    rows = [(torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(labels.astype(np.int64)),
             torch.arange(len(ids)) if positions is None else torch.from_numpy(positions.astype(np.int64)))
            for ids, labels, positions in pieces]
    if layout == ROWS:
        return _padded(rows, pad_id, with_mask=False)
    documents = [(ids[s:e], labels[s:e], positions[s:e]) for ids, labels, positions in rows
                 for s, e in _bounds(positions)]
    if layout == DOCUMENTS:
        return _padded(documents, pad_id, with_mask=True)
    lengths = torch.tensor([len(ids) for ids, _, _ in documents])
    cu = torch.nn.functional.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)
    input_ids, labels, positions = (torch.cat(parts)[None] for parts in zip(*documents))
    labels[positions == 0] = IGNORE_INDEX
    longest = int(lengths.max())
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions,
            "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def _bounds(positions: torch.Tensor) -> list[tuple[int, int]]:
    starts = (positions == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    return list(zip(starts, [*starts[1:], len(positions)]))


def _padded(rows, pad_id: int, with_mask: bool) -> dict[str, torch.Tensor]:
    length = max(len(ids) for ids, _, _ in rows)
    n = len(rows)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.arange(length).repeat(n, 1)
    mask = torch.zeros((n, length), dtype=torch.long)
    for b, (ids, row_labels, positions) in enumerate(rows):
        k = len(ids)
        input_ids[b, :k], labels[b, :k], position_ids[b, :k], mask[b, :k] = ids, row_labels, positions, 1
        position_ids[b, k:] = torch.arange(length - k)  # padding: a document of its own, untrained
    labels[position_ids == 0] = IGNORE_INDEX
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    return {**batch, "attention_mask": mask} if with_mask else batch


def document_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                       softcap=None, cu_seq_lens_q=None, **kwargs):
    """Causal attention within each document of a ``flat`` row (transformers' attention interface:
    ``query`` ``(1, heads, T, d)``, ``key``/``value`` ``(1, kv_heads, T, d)``; returns
    ``(output (1, T, heads, d), None)``).

    Supported: grouped-query attention, ``scaling``, ``dropout``, ``sliding_window`` (a query sees
    the keys less than that many positions back, as transformers' mask does) and ``softcap``.
    Not supported: a KV cache or a padding mask (this serves training's forward and held-out loss
    only; :func:`apart` puts the model's own implementation back for generation).
    """
    if cu_seq_lens_q is None or attention_mask is not None or query.shape[2] != key.shape[2]:
        raise RuntimeError("document attention needs a flat row of documents (cu_seq_lens_q), without a cache "
                           "or padding mask")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    dropout = dropout if module.training else 0.0
    varlen = _varlen()
    # fp32 inputs under half-precision autocast (QLoRA's 4-bit products) compute in that half
    # precision, as SDPA under autocast does
    half = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else query.dtype
    if varlen and query.is_cuda and half in (torch.bfloat16, torch.float16) and not softcap and not dropout:
        # one kernel for the row, the bounds read on the device: no host sync a layer
        q, k, v = (t[0].transpose(0, 1).to(half) for t in (query, key, value))
        window = (sliding_window - 1 if sliding_window else -1, 0)
        longest = kwargs.get("max_length_q") or int((cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).max())
        out = varlen(q, k, v, cu_seq_lens_q, cu_seq_lens_q, longest, longest, scale=scaling, window_size=window)
        return out[None], None
    bounds = cu_seq_lens_q.tolist()
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        q, k, v = query[:, :, start:end], key[:, :, start:end], value[:, :, start:end]
        if softcap is None and (sliding_window is None or sliding_window >= end - start):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                                                   scale=scaling)
        else:
            out = _eager(q, k, v, scaling, dropout, sliding_window, softcap)
        outputs.append(out)
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


@functools.cache
def _varlen():
    """torch's ``varlen_attn`` where it takes a scale and a window (torch 2.11 on), else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    return varlen_attn if "window_size" in params and "scale" in params else None


def _eager(q, k, v, scaling: float, dropout: float, sliding_window: int | None, softcap: float | None):
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    n = q.shape[2]
    index = torch.arange(n, device=q.device)
    distance = index[:, None] - index[None, :]
    allowed = distance >= 0
    if sliding_window is not None:
        allowed &= distance < sliding_window
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(torch.nn.functional.dropout(probs, p=dropout), v)

