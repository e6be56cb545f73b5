"""Causal attention inside each packed document, by the fastest backend the machine has.

:func:`choose` picks one per model and device, :func:`metadata` turns a step's ``position_ids``
into what it reads, :func:`attend` runs it inside the compiled layer:

- ``fa4``: FlashAttention-4 (package ``flash-attn-4``, optional) on the GPUs it has kernels for
  and heads of 32 to 256 (128 on Blackwell); ``TUNEMAKE_FA4=0`` turns it off;
- ``flash``: aten's FlashAttention-2 varlen ops called directly;
- ``varlen``: ``torch.nn.attention.varlen.varlen_attn``, torch's public API for the same kernels;
- ``flex``: flex attention with a block mask per document, where neither of those exists, and
  for models that soft-cap attention logits or have sliding-window layers (Gemma 2);
- ``dense``: SDPA with a block-diagonal mask (the CPU); the exact maths with soft-capping.
"""

from __future__ import annotations

import functools
import inspect
import math
import os

import torch
import torch.nn.functional as F

VARLEN = ("fa4", "flash", "varlen")


def choose(device, heads: int, kv_heads: int, head_dim: int, scale: float, masked: bool = False) -> str:
    """The backend for a model's attention on ``device`` (one of the module docstring's names);
    ``masked``: the model soft-caps attention logits or has sliding-window layers."""
    if device.type != "cuda":
        return "dense"
    if masked:
        return "flex"
    if fa4() is not None and fa4_head_dim_ok(head_dim):
        return "fa4"
    if flash_available():
        return "flash"
    varlen = varlen_function()
    if varlen is not None and (kv_heads == heads or varlen.gqa) and (
            varlen.scaled or math.isclose(scale, head_dim ** -0.5)):
        return "varlen"
    return "flex"


def metadata(position_ids, backend: str, window: int | None = None):
    """What :func:`attend` reads for a step: a row's documents start where ``position_ids`` is 0
    (and at the row's start). Varlen backends: (document offsets, longest length, function);
    flex: a block mask; dense: a boolean mask [B, 1, L, L]. ``window``: a query sees the keys
    less than this many positions back (flex and dense only)."""
    b, n = position_ids.shape
    starts = position_ids == 0
    starts[:, 0] = True
    if backend in VARLEN:
        flat = torch.nonzero(starts.reshape(-1)).squeeze(1)
        cu = torch.cat([flat, flat.new_tensor([b * n])]).to(torch.int32)
        if backend == "varlen":
            return cu, n, varlen_function()
        # the longest document, not the row: the kernel's grid follows it (1.5x faster on
        # short documents); after a second value the compiled layer takes it as a symbol
        return cu, int(torch.diff(cu).max()), _fa4_function if backend == "fa4" else _flash_function
    doc = torch.cumsum(starts, dim=1)
    if backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        def same_document_causal(bi, hi, qi, ki):
            seen = (doc[bi, qi] == doc[bi, ki]) & (qi >= ki)
            return seen if window is None else seen & (qi - ki < window)

        return create_block_mask(same_document_causal, b, None, n, n, device=position_ids.device)
    index = torch.arange(n, device=position_ids.device)
    distance = index[:, None] - index[None, :]
    seen = distance >= 0 if window is None else (distance >= 0) & (distance < window)
    return ((doc[:, :, None] == doc[:, None, :]) & seen)[:, None]


def attend(q, k, v, meta, shape):
    """q, k, v: [B, L, H, D] -> [B, L, H * D] attention inside each document, causal.

    ``shape`` (a :class:`tunemake.train.fast.layer.Shape`) gives the backend, head counts and scale.
    """
    b, n = q.shape[:2]
    if shape.attention in VARLEN:
        cu_seqlens, max_len, varlen = meta
        out = varlen(q.reshape(b * n, shape.heads, shape.head_dim), k.reshape(b * n, shape.kv_heads, shape.head_dim),
                     v.reshape(b * n, shape.kv_heads, shape.head_dim), cu_seqlens, max_len, shape)
        return out.reshape(b, n, shape.heads * shape.head_dim)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    gqa = shape.heads != shape.kv_heads
    if shape.attention == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        cap = shape.softcap

        def capped(score, bi, hi, qi, ki):
            return cap * torch.tanh(score / cap)

        out = flex_attention(q, k, v, score_mod=capped if cap else None, block_mask=meta, scale=shape.scale,
                             enable_gqa=gqa)
    elif shape.softcap:
        out = capped_attention(q, k, v, meta, shape)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=meta, scale=shape.scale, enable_gqa=gqa)
    return out.transpose(1, 2).reshape(b, n, shape.heads * shape.head_dim)


def capped_attention(q, k, v, mask, shape):
    """Attention with soft-capped logits and a boolean ``mask``, the exact maths (the CPU):
    q [B, H, L, D], k/v [B, kv heads, L, D]."""
    groups = shape.heads // shape.kv_heads
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * shape.scale
    scores = torch.tanh(scores / shape.softcap) * shape.softcap
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


@functools.cache
def varlen_function():
    """``torch.nn.attention.varlen.varlen_attn`` adapted to its published signatures, or None.

    The returned function takes (q, k, v, offsets, longest, shape); its ``gqa`` says whether it
    takes fewer key/value heads than query heads, ``scaled`` whether it takes a scale other than
    1/sqrt(head_dim).
    """
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        gqa = "enable_gqa" in params  # torch 2.11 has window_size and scale but not enable_gqa

        def call(q, k, v, cu, max_len, shape):
            extra = {"enable_gqa": True} if shape.heads != shape.kv_heads else {}
            return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=shape.scale, window_size=(-1, 0), **extra)
        call.gqa, call.scaled = gqa, True
    elif "is_causal" in params:
        def call(q, k, v, cu, max_len, shape):
            return varlen_attn(q, k, v, cu, cu, max_len, max_len, is_causal=True)
        call.gqa, call.scaled = False, False  # the default scale 1/sqrt(head_dim) only
    else:
        return None
    return call


def flash_available() -> bool:
    """Whether aten's flash attention ops exist and take the arguments :class:`FlashVarlen` passes.

    They are private (``aten._flash_attention_forward`` / ``_backward``), so their schemas are
    checked here; where they differ, or cannot be read, :func:`choose` falls back to the public
    ``varlen`` backend.
    """
    ops = [getattr(torch.ops.aten, name, None) for name in ("_flash_attention_forward", "_flash_attention_backward")]
    return all(op is not None and "window_size_left" in str(getattr(op.default, "_schema", "")) for op in ops)


class FlashVarlen(torch.autograd.Function):
    """Causal varlen flash attention through aten's own forward and backward ops.

    The kernels ``torch.nn.attention.varlen.varlen_attn`` runs, without its Python custom-op layer
    between the compiled graph and the kernels, which costs CPU time at every call (it allocates
    an RNG state too): on a slow host the CPU's time to issue a 7B step's forward pass fell by
    about 40% with the direct call. Same outputs and gradients (tests/test_fast.py compares both
    against the model's own forward on CUDA). q [tokens, heads, d], k/v [tokens, kv_heads, d].
    """

    @staticmethod
    def forward(ctx, q, k, v, cu, max_len, scale):
        out, lse, rng, _, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, max_len, max_len, 0.0, True, False, scale=scale, window_size_left=-1, window_size_right=0)
        ctx.save_for_backward(q, k, v, out, lse, cu, rng)
        ctx.max_len, ctx.scale = max_len, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu, rng = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout.contiguous(), q, k, v, out, lse, cu, cu, ctx.max_len, ctx.max_len, 0.0, True, rng, q.new_empty(0),
            scale=ctx.scale, window_size_left=-1, window_size_right=0)
        return dq, dk, dv, None, None, None


def _flash_function(q, k, v, cu, max_len, shape):
    return FlashVarlen.apply(q, k, v, cu, max_len, shape.scale)


#: the keyword arguments tunemake passes to FlashAttention-4's forward and backward
_FA4_ARGUMENTS = {"cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "softmax_scale", "causal"}


@functools.cache
def fa4():
    """FlashAttention-4's interface (``flash_attn.cute.interface``, package ``flash-attn-4``) when
    it is installed, ``TUNEMAKE_FA4`` is not ``0`` and the GPU is one it has kernels for (compute
    capability 9.x or 10.x: H100/H200, B200/GB200; not consumer Blackwell, 12.x); else None.
    Decided once per process (``TUNEMAKE_FA4`` is read at the first call).

    Its public ``flash_attn_varlen_func`` is an autograd function that torch.compile cannot take
    as one opaque op; its forward and backward, ``_flash_attn_fwd`` and ``_flash_attn_bwd``, can
    be (:func:`_fa4_forward`), so they are used where they exist with the keyword arguments passed
    here, and otherwise FlashAttention-4 is not used.
    """
    if os.environ.get("TUNEMAKE_FA4", "1") == "0" or not torch.cuda.is_available():
        return None
    if torch.cuda.get_device_capability()[0] not in (9, 10):
        return None
    try:
        from flash_attn.cute import interface
    except Exception:  # not installed, or its CUDA DSL does not load on this machine
        return None
    for name, extra in (("_flash_attn_fwd", {"return_lse"}), ("_flash_attn_bwd", set())):
        function = getattr(interface, name, None)
        if function is None or not (_FA4_ARGUMENTS | extra) <= set(inspect.signature(function).parameters):
            return None
    return interface


def fa4_head_dim_ok(head_dim: int) -> bool:
    """Head sizes FlashAttention-4 is used for: 32 to 256 on Hopper, 32 to 128 on Blackwell, a
    multiple of 8. Its Hopper backward pass gave wrong query gradients for heads of 16; 32 and up
    matched FlashAttention-2 (tests/test_fast.py checks the heads used here on CUDA)."""
    top = 256 if torch.cuda.get_device_capability()[0] == 9 else 128
    return 32 <= head_dim <= top and head_dim % 8 == 0


def _fa4_failed(exc: Exception) -> RuntimeError:
    # its kernels are compiled at their first call (forward and backward): say how to do without
    return RuntimeError(f"FlashAttention-4 failed ({type(exc).__name__}: {exc}); set TUNEMAKE_FA4=0 to train "
                        "with FlashAttention-2 instead")


# FlashAttention-4's kernels as custom ops: opaque to torch.compile, with shapes it can infer
@torch.library.custom_op("tunemake::fa4_forward", mutates_args=(),
                         schema="(Tensor q, Tensor k, Tensor v, Tensor cu, SymInt max_len, float scale) -> (Tensor, Tensor)")
def fa4_forward(q, k, v, cu, max_len, scale):
    try:
        result = fa4()._flash_attn_fwd(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len,
                                       max_seqlen_k=max_len, softmax_scale=scale, causal=True, return_lse=True)
    except Exception as exc:
        raise _fa4_failed(exc) from exc
    return result[0], result[1].contiguous()


@fa4_forward.register_fake
def _(q, k, v, cu, max_len, scale):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("tunemake::fa4_backward", mutates_args=(),
                         schema="(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu, "
                                "SymInt max_len, float scale) -> (Tensor, Tensor, Tensor)")
def fa4_backward(dout, q, k, v, out, lse, cu, max_len, scale):
    try:
        dq, dk, dv = fa4()._flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale=scale, causal=True,
                                           cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len,
                                           max_seqlen_k=max_len)[:3]
    except Exception as exc:
        raise _fa4_failed(exc) from exc
    return dq, dk, dv


@fa4_backward.register_fake
def _(dout, q, k, v, out, lse, cu, max_len, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class FA4Varlen(torch.autograd.Function):
    """Causal varlen attention by FlashAttention-4 (:func:`fa4`); the arguments of :class:`FlashVarlen`."""

    @staticmethod
    def forward(ctx, q, k, v, cu, max_len, scale):
        out, lse = fa4_forward(q, k, v, cu, max_len, scale)
        ctx.save_for_backward(q, k, v, out, lse, cu)
        ctx.max_len, ctx.scale = max_len, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu = ctx.saved_tensors
        dq, dk, dv = fa4_backward(dout.contiguous(), q, k, v, out, lse, cu, ctx.max_len, ctx.scale)
        return dq, dk, dv, None, None, None


def _fa4_function(q, k, v, cu, max_len, shape):
    return FA4Varlen.apply(q, k, v, cu, max_len, shape.scale)
