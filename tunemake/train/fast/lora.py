"""Autograd functions for frozen projections with LoRA adapters, written to pass over memory less.

:class:`LoraLinear` (one projection), :class:`GatedDown` (the MLP's SiLU and down projection),
:class:`ConcatLora` (stacked projections and their B blocks as one matrix product, :class:`Wide`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kernels import low_rank_add, swiglu_backward


def lora_projection(x, weight, lora_a, lora_b, scale):
    """``(x W^T + xa B^T, xa)`` with ``xa = s x A^T`` (None without an adapter), the B product
    added by :func:`low_rank_add`: the forward pass of :class:`LoraLinear` and :class:`GatedDown`."""
    dtype = x.dtype
    out = F.linear(x, weight.to(dtype))
    if lora_a is None:
        return out, None
    xa = F.linear(x, lora_a.to(dtype)) * scale
    shape = out.shape
    out = low_rank_add(out.reshape(-1, shape[-1]), xa.reshape(-1, xa.shape[-1]), lora_b.to(dtype).t().contiguous())
    return out.reshape(shape), xa


def adapter_grads(d2, dxa, x2, xa, lora_a, lora_b, need=(True, True)):
    """The gradients of A and B, in their dtypes, from the output gradient ``d2`` [N, out], that of
    ``xa`` (``dxa`` = s d2 B), the input ``x2`` [N, in] and ``xa`` = s x A^T; None where ``need``
    (A's, B's) says it is not wanted."""
    da = (dxa.t() @ x2).to(lora_a.dtype) if need[0] else None
    db = (d2.t() @ xa.reshape(-1, xa.shape[-1])).to(lora_b.dtype) if need[1] else None
    return da, db


class LoraLinear(torch.autograd.Function):
    """``x @ W^T + s * (x A^T) B^T``: a frozen projection with a plain LoRA adapter (no dropout, no
    bias), whose rank-r terms (the B product forward, the A term of the input gradient backward)
    are added to the frozen product's output by :func:`low_rank_add`."""

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scale):
        out, xa = lora_projection(x, weight, lora_a, lora_b, scale)
        ctx.save_for_backward(x, weight, lora_a, lora_b, xa)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight, lora_a, lora_b, xa = ctx.saved_tensors
        dtype = x.dtype
        d2 = dout.reshape(-1, dout.shape[-1]).to(dtype)
        x2 = x.reshape(-1, x.shape[-1])
        dxa = (d2 @ lora_b.to(dtype)) * ctx.scale
        dx = None
        if ctx.needs_input_grad[0]:
            dx = low_rank_add(d2 @ weight.to(dtype), dxa, lora_a.to(dtype)).reshape(x.shape)
        return (dx, None, *adapter_grads(d2, dxa, x2, xa, lora_a, lora_b, ctx.needs_input_grad[2:4]), None)


class GatedDown(torch.autograd.Function):
    """The MLP's second half, ``down_proj(silu(gate) * up)`` with its LoRA adapter (no dropout),
    from ``gate_up`` = [gate, up] side by side.

    The backward pass adds the LoRA term of the input gradient by :func:`low_rank_add` and takes
    SiLU's backward in one pass (:func:`swiglu_backward`); it writes the gradient of ``gate_up``
    whole, as the stacked gate/up product's backward wants it, and ``silu(gate) * up`` again for
    the weight gradients (not kept from the forward pass: less memory). ``weight`` is trained too
    where it requires a gradient (full fine-tuning).
    """

    @staticmethod
    def forward(ctx, gate_up, weight, lora_a, lora_b, scale):
        gate, up = gate_up.chunk(2, dim=-1)
        out, xa = lora_projection(F.silu(gate) * up, weight, lora_a, lora_b, scale)
        ctx.save_for_backward(gate_up, weight, lora_a, lora_b, xa)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        gate_up, weight, lora_a, lora_b, xa = ctx.saved_tensors
        dtype = gate_up.dtype
        d2 = dout.reshape(-1, dout.shape[-1]).to(dtype)
        gu2 = gate_up.reshape(-1, gate_up.shape[-1])
        dense = d2 @ weight.to(dtype)
        dxa = a = None
        if lora_a is not None:
            dxa = (d2 @ lora_b.to(dtype)) * ctx.scale
            a = lora_a.to(dtype)
        train_weight = ctx.needs_input_grad[1]
        grad, h = swiglu_backward(dense, dxa, a, gu2, ctx.needs_input_grad[2] or train_weight)
        dw = (d2.t() @ h).to(weight.dtype) if train_weight else None
        da, db = (None, None) if lora_a is None else adapter_grads(d2, dxa, h, xa, lora_a, lora_b,
                                                                    ctx.needs_input_grad[2:4])
        return grad.reshape(gate_up.shape), dw, da, db, None


@dataclass(frozen=True, eq=False)
class Wide:
    """Frozen stacked weights [O, I] stored as the first I columns of ``tensor`` [O, I + R], the
    projections' LoRA B blocks in the other R (written before each forward, zero off the blocks)."""
    tensor: torch.Tensor
    rows: tuple  # output rows of each projection
    ranks: tuple  # LoRA rank of each projection


class ConcatLora(torch.autograd.Function):
    """Stacked projections with their LoRA adapters as one matrix product: ``[x, s * x A^T] @ wide^T``.

    The frozen weights and the B blocks share the product's inner dimension, so the B products and
    the passes that add them to the base outputs disappear; in the backward pass ``dy @ wide`` gives
    the input gradient and the gradient of ``x A^T`` together. ``bs`` (the B parameters) are passed
    for their gradients only: their values are already in ``wide``, in the frozen weights' dtype.

    ``wide`` is rewritten before each forward, so each forward needs its backward before the next
    forward (as the training loop does; two forwards then one backward raise autograd's in-place
    error, without gradient checkpointing).
    """

    @staticmethod
    def forward(ctx, x, wide, a_cat, scales, rows, ranks, *bs):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xa = x2 @ a_cat.t()
        xa = torch.cat([part * s for part, s in zip(xa.split(ranks, dim=1), scales)], dim=1)
        y = torch.cat([x2, xa], dim=1) @ wide.to(x.dtype).t()
        ctx.save_for_backward(x2, xa, a_cat, wide)
        ctx.shape, ctx.scales, ctx.rows, ctx.ranks = shape, scales, rows, ranks
        ctx.b_dtypes = tuple(b.dtype for b in bs)
        return y.reshape(*shape[:-1], wide.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, xa, a_cat, wide = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        inner = x2.shape[1]
        if ctx.needs_input_grad[0]:
            dxin = dy2 @ wide.to(dy2.dtype)  # [dx from the frozen weights | the gradient of s * x A^T]
            dxa = dxin[:, inner:]
        else:  # the first layer (frozen embeddings): the B columns' product only
            dxa = dy2 @ wide[:, inner:].to(dy2.dtype)
        da = torch.cat([part * s for part, s in zip(dxa.split(ctx.ranks, dim=1), ctx.scales)], dim=1)
        dx = low_rank_add(dxin[:, :inner], da, a_cat) if ctx.needs_input_grad[0] else None
        dbs = [(g.t() @ part).to(dtype) for g, part, dtype in
               zip(dy2.split(ctx.rows, dim=1), xa.split(ctx.ranks, dim=1), ctx.b_dtypes)]
        return (None if dx is None else dx.reshape(ctx.shape), None, da.t() @ x2, None, None, None, *dbs)
