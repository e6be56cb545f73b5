"""The train stage's fast path on CUDA: the decoder's forward written out for LoRA / QLoRA / full training.

:class:`FastCausalLM` wraps the model :func:`tunemake.train.build_model` made and returns the
same loss, from the same weights and gradients into the same parameters, as the model's own
forward under autocast; it only computes it with fewer passes over memory:

- attention over packed documents with varlen flash attention, so no dense mask and no attention
  across documents: FlashAttention-4 (package ``flash-attn-4``, optional) where it is installed
  and the GPU is a Hopper or Blackwell (1.6x FlashAttention-2 on the bench's documents), else
  aten's FlashAttention-2 ops called directly (``torch.nn.attention.varlen`` or flex attention
  where those are missing); ``TUNEMAKE_FA4=0`` keeps FlashAttention-2;
- each decoder layer compiled once with ``torch.compile`` (norms, rotary, SiLU, LoRA casts and
  dropout fused) and run for every layer; LoRA dropout masks are drawn outside it, from a seed
  per layer call, so that a recomputed layer draws the same ones;
- the cross-entropy computed chunk by chunk from the last hidden state, gradient included, so the
  full logits are never held (only target positions are projected); on CUDA a chunk's softmax
  and its gradient are one compiled function;
- frozen q/k/v and gate/up weights stacked, one matrix product per group; with LoRA (no dropout)
  the adapters' B blocks sit beside the frozen weights, so base and LoRA outputs come from the
  same product (:class:`_ConcatLora`; the blocks are rewritten before each forward by one Triton
  launch, :class:`_BlockCopy`);
- the MLP's SiLU and down projection as one function (:class:`_GatedDown`) whose backward pass
  takes SiLU's gradient in one pass over memory (a Triton kernel on CUDA); the rank-r terms (the
  o and down projections' B products, the A terms of the input gradients) added to the frozen
  products' outputs by one Triton kernel (:func:`_low_rank_add`); without recomputation the
  first layer skips the input gradient of the frozen q/k/v product (the embeddings are frozen);
- QLoRA: 4-bit weights dequantized per layer and never kept (NF4 by :mod:`tunemake.nf4`, a Triton
  kernel on CUDA, before each call of the compiled layer): each layer is recomputed in the
  backward pass (as with gradient checkpointing, which QLoRA uses by default);
- gradient checkpointing without autograd in the first forward (:class:`_Recomputed`): the
  compiled layer's inference graph, then the layer again in the backward pass.

Supported: Llama-architecture decoders (``model_type`` llama, mistral without sliding window,
qwen2 without sliding window), SiLU MLP, q/k/v biases, grouped-query attention, rope scaling (the
model's own rotary module is used), plain LoRA adapters (one active adapter, any dropout, rsLoRA
scaling), NF4/FP4 bitsandbytes base weights, full fine-tuning, trainable embeddings / head
(``modules_to_save``), bf16 or fp16 autocast, DDP. Not supported (:func:`unsupported` says why
and the train stage runs the model's own forward instead): DoRA and other LoRA variants, 8-bit
base weights, sliding-window attention, other architectures, fp32 training, DeepSpeed.
On the CPU the same code runs without compilation and with a dense mask, for the tests.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutput

from tunemake.encode import IGNORE_INDEX
from tunemake.nf4 import NF4, dequantize_plan, plan

try:
    import triton
    import triton.language as tl
except Exception:  # no Triton (the CPU): torch's foreach copy serves
    triton = None

ARCHITECTURES = ("llama", "mistral", "qwen2")
#: rows are padded to a multiple of this, so a run compiles for a few lengths only
LENGTH_MULTIPLE = 128
#: logits held at a time by the loss, in elements (256 MiB in fp32)
LOGIT_CHUNK_ELEMENTS = 1 << 26


def _base_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def unsupported(model, compute_dtype=torch.bfloat16) -> str | None:
    """Why the train stage should not use the fast path for ``model`` (None when it can).

    ``compute_dtype`` is the autocast dtype (None without autocast): fp32 training keeps the
    model's own forward (varlen flash attention has no fp32 kernel); pass None to check the
    model alone.
    """
    if compute_dtype is not None and compute_dtype not in (torch.bfloat16, torch.float16):
        return "fp32 training"
    base = _base_model(model)
    config = base.config
    if config.model_type not in ARCHITECTURES:
        return f"model_type {config.model_type!r} (supported: {', '.join(ARCHITECTURES)})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r}"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp > 1"
    inner = getattr(base, "model", None)
    if inner is None or not all(hasattr(inner, name) for name in ("layers", "norm", "rotary_emb", "embed_tokens")):
        return "not a Llama-style module tree"
    for layer in inner.layers:
        for proj in _projections(layer):
            reason = _projection_problem(proj)
            if reason:
                return reason
    return None


def _projections(layer):
    attn, mlp = layer.self_attn, layer.mlp
    return (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)


def _projection_problem(proj) -> str | None:
    base = proj
    if hasattr(proj, "lora_A"):
        adapters = [a for a in proj.active_adapters if a in proj.lora_A]
        if len(adapters) > 1:
            return "more than one active LoRA adapter"
        if proj.merged or proj.disable_adapters:
            return "merged or disabled LoRA adapters"
        for a in adapters:
            if a in getattr(proj, "lora_variant", {}) or getattr(proj, "use_dora", {}).get(a):
                return "DoRA / LoRA variants"
            if proj.lora_B[a].bias is not None:
                return "LoRA B with a bias"
        base = proj.base_layer
    kind = type(base).__name__
    if kind == "Linear4bit":
        return None
    if kind != "Linear" or not isinstance(base, torch.nn.Linear):
        return f"{kind} layers"
    return None


@dataclass(frozen=True)
class _Shape:
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    scale: float
    compute_dtype: torch.dtype
    attention: str  # "fa4", "flash", "varlen", "flex" or "dense"
    own_kernels: bool = True  # _GatedDown, _LoraLinear and the low-rank Triton kernels


#: what :meth:`FastCausalLM._group` puts in place of a stacked weight for NF4 projections that
#: :func:`_dequantized` dequantizes into one tensor
_STACK_DEQUANTIZED = "stack the dequantized weights"


def _row_blocks(stacked, projs, rows):
    """``projs`` with their weights replaced by consecutive blocks of ``rows`` rows of ``stacked``."""
    out, start = [], 0
    for proj, n in zip(projs, rows):
        out.append((stacked[start:start + n], *proj[1:]))
        start += n
    return out


def _nf4_groups(weights) -> list:
    """A layer's NF4 weights in the order :func:`_dequantized` fills them in: a stacked group
    whole, the other weights one by one (the groups of a :func:`tunemake.nf4.plan`)."""
    ln1, qkv, o_proj, ln2, gate_up, down_proj = weights

    def group(stacked_projs):
        stacked, projs = stacked_projs
        if stacked is _STACK_DEQUANTIZED:
            return [[p[0] for p in projs]]
        return [[p[0]] for p in projs if isinstance(p[0], NF4)]

    def single(proj):
        return [[proj[0]]] if isinstance(proj[0], NF4) else []

    return group(qkv) + single(o_proj) + group(gate_up) + single(down_proj)


def _dequantized(weights, planned, dtype):
    """A layer's weights (from :meth:`FastCausalLM._layer_weights`) with the NF4 ones dequantized.

    Done outside the compiled layer, by :func:`tunemake.nf4.dequantize_plan` (``planned`` from
    :func:`_nf4_groups`; one Triton kernel launch a layer on CUDA), inside the layer's
    recomputation, so that no dequantized weight outlives it.
    """
    values = iter(dequantize_plan(planned, dtype))

    def single(proj):
        return (next(values), *proj[1:]) if isinstance(proj[0], NF4) else proj

    def group(stacked_projs):
        stacked, projs = stacked_projs
        if stacked is not _STACK_DEQUANTIZED:
            return stacked, [single(p) for p in projs]
        stacked = next(values)
        return stacked, _row_blocks(stacked, projs, [p[0].rows for p in projs])

    ln1, qkv, o_proj, ln2, gate_up, down_proj = weights
    qkv = group(qkv)  # in _nf4_groups' order
    o_proj = single(o_proj)
    gate_up = group(gate_up)
    return ln1, qkv, o_proj, ln2, gate_up, single(down_proj)


def _linear(x, proj):
    """``x @ W.T + b + scale * B(A(dropout(x)))`` in the compute dtype; ``proj`` from
    :meth:`FastCausalLM._proj` (4-bit weights dequantized by :func:`_dequantized`)."""
    weight, bias, lora_a, lora_b, scale, dropout = proj
    dtype = x.dtype
    y = F.linear(x, weight.to(dtype), None if bias is None else bias.to(dtype))
    if lora_a is not None:
        y = y + F.linear(F.linear(_dropped(x, dropout), lora_a.to(dtype)), lora_b.to(dtype)) * scale
    return y


def _dropped(x, dropout):
    """``x`` through LoRA dropout: ``dropout`` is 0 (none) or (keep mask, p) from :func:`_with_masks`."""
    if not dropout:
        return x
    keep, p = dropout
    return x * keep.to(x.dtype) * (1.0 / (1.0 - p))


def _linears(x, group, kernels: bool = True):
    """Projections of one input: ``group`` is (stacked base weight or None, [proj, ...]).

    With a stacked weight the base projections are one matmul; without dropout (which PEFT draws
    per adapter) the LoRA A projections are one matmul too.
    """
    stacked, projs = group
    dtype = x.dtype
    if stacked is None:
        return [_linear(x, proj) for proj in projs]
    if isinstance(stacked, _Wide):
        return list(_wide_product(x, stacked, projs, kernels).split(stacked.rows, dim=-1))
    biases = [p[1] for p in projs]
    bias = None if biases[0] is None else torch.cat([b.to(dtype) for b in biases])
    ys = list(F.linear(x, stacked.to(dtype), bias).split([p[0].shape[0] for p in projs], dim=-1))
    loras = [p for p in projs if p[2] is not None]
    if len(loras) == len(projs) and not any(p[5] for p in projs):
        xa = F.linear(x, torch.cat([p[2].to(dtype) for p in projs])).split([p[2].shape[0] for p in projs], dim=-1)
        return [y + F.linear(a, p[3].to(dtype)) * p[4] for y, a, p in zip(ys, xa, projs)]
    for i, (_, _, lora_a, lora_b, scale, dropout) in enumerate(projs):
        if lora_a is not None:
            ys[i] = ys[i] + F.linear(F.linear(_dropped(x, dropout), lora_a.to(dtype)), lora_b.to(dtype)) * scale
    return ys


def _wide_product(x, wide, projs, kernels: bool = True):
    """The outputs of the projections ``projs`` stacked in ``wide`` (a :class:`_Wide`), side by
    side; ``kernels``: the backward's rank-r term by :func:`_low_rank_add`."""
    a_cat = torch.cat([p[2].to(x.dtype) for p in projs])
    return _ConcatLora.apply(x, wide.tensor, a_cat, tuple(p[4] for p in projs), wide.rows, wide.ranks, kernels,
                             *[p[3] for p in projs])


def _joined(x, group):
    """:func:`_linears`' outputs as one tensor [..., sum of the rows] (gate and up side by side):
    the product's own output where the group is a :class:`_Wide`, else a concatenation."""
    if isinstance(group[0], _Wide):
        return _wide_product(x, *group)
    return torch.cat(_linears(x, group), dim=-1)


def _mlp(h, gate_up, down_proj, kernels: bool):
    """The MLP on ``h``: by :class:`_GatedDown` with ``kernels`` where the down projection has no
    bias and no LoRA dropout, else by :func:`_linears` and :func:`_linear`."""
    weight, bias, lora_a, lora_b, scale, dropout = down_proj
    if kernels and bias is None and not dropout:
        return _GatedDown.apply(_joined(h, gate_up), weight, lora_a, lora_b, scale)
    gate, up = _linears(h, gate_up, kernels)
    return _linear(F.silu(gate) * up, down_proj)


def _swiglu_backward_torch(dense, xa, a, gate_up, want_h: bool):
    """:func:`_swiglu_backward` in torch ops (the CPU, and CUDA without Triton)."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    dh = dense.float() if xa is None else dense.float() + xa.float() @ a.float()
    sig = torch.sigmoid(gate)
    silu = gate * sig
    grad = torch.cat([dh * up * sig * (1.0 + gate * (1.0 - sig)), dh * silu], dim=-1).to(gate_up.dtype)
    return grad, (silu * up).to(gate_up.dtype) if want_h else gate_up.new_empty(0)


#: the low-rank and SiLU kernels as custom ops that torch.compile takes whole (torch >= 2.6)
_TRITON_OPS = triton is not None and hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")
#: tiles of the low-rank kernel: rows, columns, rank per step (ranks below 16 padded, masked;
#: each rank compiles its own kernel)
_TILE_ROWS, _TILE_COLS, _TILE_RANK = 64, 128, 64

if _TRITON_OPS:
    @triton.jit
    def _low_rank_tile(x, y, t, n, rows, cols, RANK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
        # (x @ y)[t, n] in fp32 for x [rows, RANK], y [RANK, cols], both contiguous
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for k0 in tl.static_range(0, RANK, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            xs = tl.load(x + t[:, None] * RANK + k[None, :], mask=(t[:, None] < rows) & (k[None, :] < RANK), other=0.0)
            ys = tl.load(y + k[:, None] * cols + n[None, :], mask=(k[:, None] < RANK) & (n[None, :] < cols), other=0.0)
            acc = tl.dot(xs, ys, acc)
        return acc

    @triton.jit
    def _low_rank_add_kernel(c, x, y, out, rows, cols, c_stride, RANK: tl.constexpr, BLOCK_T: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # grid: (row tiles, column tiles); out [rows, cols] = c (row stride c_stride) + x @ y
        t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _low_rank_tile(x, y, t, n, rows, cols, RANK, BLOCK_T, BLOCK_N, BLOCK_K)
        live = (t[:, None] < rows) & (n[None, :] < cols)
        acc += tl.load(c + t[:, None] * c_stride + n[None, :], mask=live).to(tl.float32)
        tl.store(out + t[:, None] * cols + n[None, :], acc.to(out.dtype.element_ty), mask=live)

    @triton.jit
    def _swiglu_backward_kernel(dh, gate_up, grad, h, cols, WANT_H: tl.constexpr, BLOCK: tl.constexpr):
        # grid: (rows, column blocks); dh, h: [rows, cols]; gate_up, grad: [rows, 2 cols]
        row = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        live = c < cols
        d = tl.load(dh + row * cols + c, mask=live).to(tl.float32)
        gate = tl.load(gate_up + row * 2 * cols + c, mask=live).to(tl.float32)
        up = tl.load(gate_up + row * 2 * cols + cols + c, mask=live).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = gate * sig
        out = grad.dtype.element_ty
        tl.store(grad + row * 2 * cols + c, (d * up * sig * (1.0 + gate * (1.0 - sig))).to(out), mask=live)
        tl.store(grad + row * 2 * cols + cols + c, (d * silu).to(out), mask=live)
        if WANT_H:
            tl.store(h + row * cols + c, (silu * up).to(out), mask=live)

    def _tiles(rows, cols):
        return triton.cdiv(rows, _TILE_ROWS), triton.cdiv(cols, _TILE_COLS)

    @torch.library.triton_op("tunemake::low_rank_add", mutates_args=())
    def _low_rank_add_op(c: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        rows, cols = c.shape
        out = torch.empty((rows, cols), dtype=c.dtype, device=c.device)
        torch.library.wrap_triton(_low_rank_add_kernel)[_tiles(rows, cols)](
            c, x, y, out, rows, cols, c.stride(0), RANK=x.shape[1],
            BLOCK_T=_TILE_ROWS, BLOCK_N=_TILE_COLS, BLOCK_K=_TILE_RANK)
        return out

    @torch.library.triton_op("tunemake::swiglu_backward", mutates_args=())
    def _swiglu_backward_op(dh: torch.Tensor, gate_up: torch.Tensor, want_h: bool) -> tuple[torch.Tensor, torch.Tensor]:
        rows, cols = dh.shape
        grad = torch.empty_like(gate_up)
        h = torch.empty_like(dh) if want_h else dh.new_empty(0)
        block = 1024
        torch.library.wrap_triton(_swiglu_backward_kernel)[(rows, triton.cdiv(cols, block))](
            dh, gate_up, grad, h, cols, WANT_H=want_h, BLOCK=block)
        return grad, h


def _triton_takes(*tensors) -> bool:
    """Whether the Triton kernels take these 2-D operands: Triton and torch >= 2.6, CUDA, one dtype
    (bf16 or fp16), contiguous rows (the first may have a row stride; the others contiguous)."""
    first = tensors[0]
    return (_TRITON_OPS and first.is_cuda and first.dtype in (torch.bfloat16, torch.float16)
            and first.stride(1) == 1 and all(t.dtype == first.dtype and t.is_contiguous() for t in tensors[1:]))


def _low_rank_add(c, x, y):
    """``c + x @ y`` for a low rank (``x`` [N, r], ``y`` [r, M], ``c`` [N, M]), a new tensor.

    cuBLAS runs ``x @ y`` with its inner dimension of 64-192 at a third of the memory bandwidth
    (about 32 us for a 2,048 x 4,096 output on an H200) and writes it for a second pass to add;
    on CUDA with Triton one kernel (:func:`_low_rank_add_kernel`) reads ``c`` once, forms the
    product tile by tile in fp32 and writes the sum, rounded once.
    """
    if _triton_takes(c, x, y):
        return _low_rank_add_op(c, x, y)
    return torch.addmm(c, x, y)


def _swiglu_backward(dense, xa, a, gate_up, want_h: bool):
    """The gradient of ``gate_up`` = [gate, up] [N, 2I] through ``silu(gate) * up``, given that of
    its output, ``dense + xa @ a`` [N, I] (``xa`` [N, r] and ``a`` [r, I] may be None), and with
    ``want_h`` the output itself (else an empty tensor), in ``gate_up``'s dtype, maths in fp32.

    On CUDA with Triton: the LoRA term added by :func:`_low_rank_add`, then one pass
    (:func:`_swiglu_backward_kernel`) that reads each element's inputs once and writes both halves
    of the gradient and the output, where the compiled layer's own backward read the inputs once
    for each half (docs/performance.md, attempts 34 and 36). The LoRA term formed inside that
    pass, tile by tile, made it 2.2x slower (177 against 80 us a layer on an H200).
    """
    dh = dense if xa is None else _low_rank_add(dense, xa, a)
    if dh.is_contiguous() and _triton_takes(dh, gate_up):
        return _swiglu_backward_op(dh, gate_up, want_h)
    return _swiglu_backward_torch(dh, None, None, gate_up, want_h)


def _lora_linear(x, proj):
    """:func:`_linear` by :class:`_LoraLinear` where it applies (plain LoRA without dropout on a
    frozen weight without bias), else by :func:`_linear`."""
    weight, bias, lora_a, lora_b, scale, dropout = proj
    if lora_a is not None and bias is None and not dropout and not weight.requires_grad:
        return _LoraLinear.apply(x, weight, lora_a, lora_b, scale)
    return _linear(x, proj)


def _lora_projection(x, weight, lora_a, lora_b, scale):
    """``(x W^T + xa B^T, xa)`` with ``xa = s x A^T`` (None without an adapter), the B product
    added by :func:`_low_rank_add`: the forward pass of :class:`_LoraLinear` and :class:`_GatedDown`."""
    dtype = x.dtype
    out = F.linear(x, weight.to(dtype))
    if lora_a is None:
        return out, None
    xa = F.linear(x, lora_a.to(dtype)) * scale
    shape = out.shape
    out = _low_rank_add(out.reshape(-1, shape[-1]), xa.reshape(-1, xa.shape[-1]), lora_b.to(dtype).t().contiguous())
    return out.reshape(shape), xa


def _adapter_grads(d2, dxa, x2, xa, lora_a, lora_b, need=(True, True)):
    """The gradients of A and B, in their dtypes, from the output gradient ``d2`` [N, out], that of
    ``xa`` (``dxa`` = s d2 B), the input ``x2`` [N, in] and ``xa`` = s x A^T; None where ``need``
    (A's, B's) says it is not wanted."""
    da = (dxa.t() @ x2).to(lora_a.dtype) if need[0] else None
    db = (d2.t() @ xa.reshape(-1, xa.shape[-1])).to(lora_b.dtype) if need[1] else None
    return da, db


class _LoraLinear(torch.autograd.Function):
    """``x @ W^T + s * (x A^T) B^T``: a frozen projection with a plain LoRA adapter (no dropout, no
    bias), whose rank-r terms (the B product forward, the A term of the input gradient backward)
    are added to the frozen product's output by :func:`_low_rank_add`."""

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scale):
        out, xa = _lora_projection(x, weight, lora_a, lora_b, scale)
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
            dx = _low_rank_add(d2 @ weight.to(dtype), dxa, lora_a.to(dtype)).reshape(x.shape)
        return (dx, None, *_adapter_grads(d2, dxa, x2, xa, lora_a, lora_b, ctx.needs_input_grad[2:4]), None)


class _GatedDown(torch.autograd.Function):
    """The MLP's second half, ``down_proj(silu(gate) * up)`` with its LoRA adapter (no dropout),
    from ``gate_up`` = [gate, up] side by side (the output of :func:`_joined`).

    The backward pass adds the LoRA term of the input gradient by :func:`_low_rank_add` and takes
    SiLU's backward in one pass (:func:`_swiglu_backward`); it writes the gradient of ``gate_up``
    whole, as the stacked gate/up product's backward wants it, and ``silu(gate) * up`` again for
    the weight gradients (it is not kept from the forward pass). ``weight`` is trained too where
    it requires a gradient (full fine-tuning).
    """

    @staticmethod
    def forward(ctx, gate_up, weight, lora_a, lora_b, scale):
        gate, up = gate_up.chunk(2, dim=-1)
        out, xa = _lora_projection(F.silu(gate) * up, weight, lora_a, lora_b, scale)
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
        grad, h = _swiglu_backward(dense, dxa, a, gu2, ctx.needs_input_grad[2] or train_weight)
        dw = (d2.t() @ h).to(weight.dtype) if train_weight else None
        da, db = (None, None) if lora_a is None else _adapter_grads(d2, dxa, h, xa, lora_a, lora_b,
                                                                     ctx.needs_input_grad[2:4])
        return grad.reshape(gate_up.shape), dw, da, db, None


@dataclass(frozen=True, eq=False)
class _Wide:
    """Frozen stacked weights [O, I] stored as the first I columns of ``tensor`` [O, I + R], the
    projections' LoRA B blocks in the other R (written before each forward, zero off the blocks)."""
    tensor: torch.Tensor
    rows: tuple  # output rows of each projection
    ranks: tuple  # LoRA rank of each projection


class _ConcatLora(torch.autograd.Function):
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
    def forward(ctx, x, wide, a_cat, scales, rows, ranks, kernels, *bs):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xa = x2 @ a_cat.t()
        xa = torch.cat([part * s for part, s in zip(xa.split(ranks, dim=1), scales)], dim=1)
        y = torch.cat([x2, xa], dim=1) @ wide.to(x.dtype).t()
        ctx.save_for_backward(x2, xa, a_cat, wide)
        ctx.shape, ctx.scales, ctx.rows, ctx.ranks, ctx.kernels = shape, scales, rows, ranks, kernels
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
        dx = None
        if ctx.needs_input_grad[0]:
            dx = _low_rank_add(dxin[:, :inner], da, a_cat) if ctx.kernels else dxin[:, :inner] + da @ a_cat
        dbs = [(g.t() @ part).to(dtype) for g, part, dtype in
               zip(dy2.split(ctx.rows, dim=1), xa.split(ctx.ranks, dim=1), ctx.b_dtypes)]
        return (None if dx is None else dx.reshape(ctx.shape), None, da.t() @ x2, None, None, None, None, *dbs)


class _Recomputed(torch.autograd.Function):
    """Gradient checkpointing of one decoder layer, without torch.utils.checkpoint's hooks.

    The forward pass runs the layer under ``no_grad`` (the compiled layer's inference graph, no
    autograd bookkeeping) and keeps only its input; the backward pass runs it again with autograd
    and differentiates that with :func:`torch.autograd.grad`. ``run(x)`` is the layer; ``params``
    are the parameters and trainable tensors it reads, passed in so that autograd routes their
    gradients (also in the first layer, whose input needs none). Autocast is restored for the
    recomputation; LoRA dropout needs no random state restored, its masks coming from a seed
    (:func:`_with_masks`).
    One backward pass per forward (no ``retain_graph``).
    """

    @staticmethod
    def forward(ctx, run, x, *params):
        ctx.run, ctx.params = run, params
        kind = x.device.type
        ctx.autocast = (kind, torch.get_autocast_dtype(kind), torch.is_autocast_enabled(kind))
        ctx.save_for_backward(x)
        with torch.no_grad():  # detached: one compiled variant whether the input needs a gradient or not
            return run(x.detach())

    @staticmethod
    def backward(ctx, dy):
        if ctx.run is None:
            raise RuntimeError("a recomputed layer's backward pass ran twice (retain_graph is not supported)")
        (x,) = ctx.saved_tensors
        run, params, ctx.run, ctx.params = ctx.run, ctx.params, None, None  # no references past the backward
        need = ctx.needs_input_grad[1:]
        x = x.detach().requires_grad_(True)  # also where unneeded: one compiled variant for every layer
        kind, dtype, enabled = ctx.autocast
        with torch.enable_grad(), torch.autocast(kind, dtype=dtype, enabled=enabled):
            y = run(x)
        wanted = [t for t, n in zip((x, *params), need) if n]
        grads = iter(torch.autograd.grad(y, wanted, dy, allow_unused=True) if wanted else ())
        return (None, *[next(grads) if n else None for n in need])


def _trainable(weights) -> list:
    """The tensors in a layer's weights (:meth:`FastCausalLM._layer_weights`) that need gradients
    or are parameters (whose ``requires_grad`` may be switched on later)."""
    found, seen = [], set()

    def walk(item):
        if isinstance(item, torch.Tensor):
            if (item.requires_grad or isinstance(item, torch.nn.Parameter)) and id(item) not in seen:
                seen.add(id(item))
                found.append(item)
        elif isinstance(item, (tuple, list)):
            for sub in item:
                walk(sub)

    walk(weights)
    return found


def _with_masks(weights, x, seed: int):
    """A layer's weights with each LoRA dropout probability p replaced by (keep mask, p).

    The masks (one per projection, as PEFT draws them) come from a generator seeded with ``seed``,
    so the layer's recomputation draws the same ones, and the compiled layer holds no random op.
    """
    generator = torch.Generator(device=x.device)
    generator.manual_seed(seed)

    def proj(p):
        if not p[5]:
            return p
        shape = (*x.shape[:-1], p[2].shape[1])  # the projection's input: its LoRA A's columns
        keep = torch.empty(shape, dtype=torch.uint8, device=x.device).bernoulli_(1.0 - p[5], generator=generator)
        return (*p[:5], (keep, p[5]))

    ln1, (qkv, qkv_projs), o_proj, ln2, (gate_up, gate_up_projs), down_proj = weights
    qkv_projs = [proj(p) for p in qkv_projs]  # in the layer's order
    o_proj = proj(o_proj)
    gate_up_projs = [proj(p) for p in gate_up_projs]
    return ln1, (qkv, qkv_projs), o_proj, ln2, (gate_up, gate_up_projs), proj(down_proj)


def _rms_norm(x, weight, eps):
    # as LlamaRMSNorm: statistics in fp32, weight applied after casting back
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _attention(q, k, v, meta, shape: _Shape):
    """q, k, v: [B, L, H, D] -> [B, L, H * D] attention inside each document, causal."""
    b, n = q.shape[:2]
    if shape.attention in ("varlen", "flash", "fa4"):
        cu_seqlens, max_len, varlen = meta
        out = varlen(q.reshape(b * n, shape.heads, shape.head_dim), k.reshape(b * n, shape.kv_heads, shape.head_dim),
                     v.reshape(b * n, shape.kv_heads, shape.head_dim), cu_seqlens, max_len, shape)
        return out.reshape(b, n, shape.heads * shape.head_dim)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    gqa = shape.heads != shape.kv_heads
    if shape.attention == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        out = flex_attention(q, k, v, block_mask=meta, scale=shape.scale, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=meta, scale=shape.scale, enable_gqa=gqa)
    return out.transpose(1, 2).reshape(b, n, shape.heads * shape.head_dim)


class _FlashVarlen(torch.autograd.Function):
    """Causal varlen flash attention through aten's own forward and backward ops.

    What ``torch.nn.attention.varlen.varlen_attn`` computes, without its Python custom-op layer
    between the compiled graph and the kernels. q [tokens, heads, d], k/v [tokens, kv_heads, d].
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
    return _FlashVarlen.apply(q, k, v, cu, max_len, shape.scale)


@functools.cache
def _fa4():
    """FlashAttention-4's interface (``flash_attn.cute.interface``, package ``flash-attn-4``) when
    it is installed, ``TUNEMAKE_FA4`` is not ``0`` and the GPU is one it has kernels for (compute
    capability 9.x or 10.x: H100/H200, B200/GB200; not consumer Blackwell, 12.x); else None.
    Decided once per process (``TUNEMAKE_FA4`` is read at the first call)."""
    if os.environ.get("TUNEMAKE_FA4", "1") == "0" or not torch.cuda.is_available():
        return None
    if torch.cuda.get_device_capability()[0] not in (9, 10):
        return None
    try:
        from flash_attn.cute import interface
    except Exception:  # not installed, or its CUDA DSL does not load on this machine
        return None
    return interface


def _fa4_head_dim_ok(head_dim: int) -> bool:
    """Head sizes FlashAttention-4 is used for: 32 to 256 on Hopper, 32 to 128 on Blackwell, a
    multiple of 8. Its Hopper backward pass gave wrong query gradients for heads of 16 (4.0.0b36,
    H200, 2026-12-03); 32 and up matched FlashAttention-2."""
    top = 256 if torch.cuda.get_device_capability()[0] == 9 else 128
    return 32 <= head_dim <= top and head_dim % 8 == 0


def _fa4_failed(exc: Exception) -> RuntimeError:
    # its kernels are compiled at their first call (forward and backward): say how to do without
    return RuntimeError(f"FlashAttention-4 failed ({type(exc).__name__}: {exc}); set TUNEMAKE_FA4=0 to train "
                        "with FlashAttention-2 instead")


# FlashAttention-4's kernels as custom ops: opaque to torch.compile, with shapes it can infer
@torch.library.custom_op("tunemake::fa4_forward", mutates_args=(),
                         schema="(Tensor q, Tensor k, Tensor v, Tensor cu, SymInt max_len, float scale) -> (Tensor, Tensor)")
def _fa4_forward(q, k, v, cu, max_len, scale):
    try:
        result = _fa4()._flash_attn_fwd(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len,
                                        max_seqlen_k=max_len, softmax_scale=scale, causal=True, return_lse=True)
    except Exception as exc:
        raise _fa4_failed(exc) from exc
    return result[0], result[1].contiguous()


@_fa4_forward.register_fake
def _(q, k, v, cu, max_len, scale):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("tunemake::fa4_backward", mutates_args=(),
                         schema="(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu, "
                                "SymInt max_len, float scale) -> (Tensor, Tensor, Tensor)")
def _fa4_backward(dout, q, k, v, out, lse, cu, max_len, scale):
    try:
        dq, dk, dv = _fa4()._flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale=scale, causal=True,
                                            cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len,
                                            max_seqlen_k=max_len)[:3]
    except Exception as exc:
        raise _fa4_failed(exc) from exc
    return dq, dk, dv


@_fa4_backward.register_fake
def _(dout, q, k, v, out, lse, cu, max_len, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class _FA4Varlen(torch.autograd.Function):
    """Causal varlen attention by FlashAttention-4 (:func:`_fa4`); the arguments of :class:`_FlashVarlen`."""

    @staticmethod
    def forward(ctx, q, k, v, cu, max_len, scale):
        out, lse = _fa4_forward(q, k, v, cu, max_len, scale)
        ctx.save_for_backward(q, k, v, out, lse, cu)
        ctx.max_len, ctx.scale = max_len, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu = ctx.saved_tensors
        dq, dk, dv = _fa4_backward(dout.contiguous(), q, k, v, out, lse, cu, ctx.max_len, ctx.scale)
        return dq, dk, dv, None, None, None


def _fa4_function(q, k, v, cu, max_len, shape):
    return _FA4Varlen.apply(q, k, v, cu, max_len, shape.scale)


def _flash_available() -> bool:
    """Whether aten's flash attention ops take the arguments :class:`_FlashVarlen` passes."""
    op = getattr(torch.ops.aten, "_flash_attention_forward", None)
    return op is not None and "window_size_left" in str(op.default._schema)


def _decoder_layer(x, cos, sin, meta, weights, shape: _Shape):
    """One Llama decoder layer; ``x`` is the residual stream [B, L, hidden] in the model's dtype."""
    ln1, qkv, o_proj, ln2, gate_up, down_proj = weights
    b, n, _ = x.shape
    dtype = shape.compute_dtype
    h = _rms_norm(x, ln1, shape.eps).to(dtype)
    q, k, v = _linears(h, qkv, shape.own_kernels)
    q = q.reshape(b, n, shape.heads, shape.head_dim)
    k = k.reshape(b, n, shape.kv_heads, shape.head_dim)
    v = v.reshape(b, n, shape.kv_heads, shape.head_dim)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    q = (q * cos + _rotate_half(q) * sin).to(dtype)
    k = (k * cos + _rotate_half(k) * sin).to(dtype)
    attended = _attention(q, k, v, meta, shape)
    x = x + (_lora_linear(attended, o_proj) if shape.own_kernels else _linear(attended, o_proj))
    h = _rms_norm(x, ln2, shape.eps).to(dtype)
    return x + _mlp(h, gate_up, down_proj, shape.own_kernels)


_compiled_layers = {}


def _compiled(options=None):
    """The decoder layer compiled once per set of inductor ``options`` (None: torch's defaults)."""
    key = tuple(sorted((options or {}).items()))
    if key not in _compiled_layers:
        _compiled_layers[key] = torch.compile(_decoder_layer, options=dict(options) if options else None)
    return _compiled_layers[key]


def _varlen_function():
    """``torch.nn.attention.varlen.varlen_attn`` adapted to its two published signatures, or None."""
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


def _softmax_gradient(logits, targets, n: int):
    """One chunk's summed cross-entropy and its gradient with respect to the logits, divided by
    ``n`` and in the logits' dtype; softmax in fp32. Eager: in place over one fp32 copy of the
    logits (the CPU's path). :func:`_compiled_softmax_gradient` compiles :func:`_softmax_gradient_pure`,
    the same maths without in-place ops."""
    full = logits.float()
    lse = torch.logsumexp(full, dim=-1)
    loss = (lse - full.gather(1, targets[:, None]).squeeze(1)).sum()
    probs = torch.exp(full.sub_(lse[:, None]))
    probs[torch.arange(len(targets), device=targets.device), targets] -= 1.0
    return loss, probs.div_(n).to(logits.dtype)


def _softmax_gradient_pure(logits, targets, n: int):
    """:func:`_softmax_gradient` for compilation: one pass for the log-sum-exp and one that writes
    the gradient, where the eager ops make seven over fp32 logits (about 2.7 GB of memory
    traffic a step for a 32k vocabulary)."""
    full = logits.float()
    lse = torch.logsumexp(full, dim=-1)
    loss = (lse - full.gather(1, targets[:, None]).squeeze(1)).sum()
    probs = torch.exp(full - lse[:, None])
    probs = torch.where(torch.arange(full.shape[1], device=full.device) == targets[:, None], probs - 1.0, probs)
    return loss, (probs / n).to(logits.dtype)


@functools.cache
def _compiled_softmax_gradient():
    """:func:`_softmax_gradient_pure` compiled once, sizes symbolic (a chunk of one row compiles
    once more: torch specializes sizes 0 and 1)."""
    return torch.compile(_softmax_gradient_pure, dynamic=True)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``h @ weight.T`` against ``targets``, chunk by chunk.

    The gradients are computed in the forward pass, so at most one chunk of logits exists at a
    time; logits are formed in the compute dtype and the softmax taken in fp32, as the model's
    forward under autocast followed by ``cross_entropy(logits.float())`` does. With ``compiled``
    the softmax and its gradient are one compiled function (:func:`_compiled_softmax_gradient`).
    """

    @staticmethod
    def forward(ctx, h, weight, targets, dtype, compiled=False):
        n = h.shape[0]
        w = weight.to(dtype)
        hc = h.to(dtype)
        chunk = max(1, LOGIT_CHUNK_ELEMENTS // w.shape[0])
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(hc)
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if weight.requires_grad else None
        softmax_gradient = _compiled_softmax_gradient() if compiled else _softmax_gradient
        for start in range(0, n, chunk):
            hs, ts = hc[start:start + chunk], targets[start:start + chunk]
            loss, probs = softmax_gradient(hs @ w.T, ts, n)
            total += loss
            grad_h[start:start + chunk] = probs @ w
            if grad_w is not None:
                grad_w += (probs.T @ hs).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.input_dtype, ctx.weight_dtype = h.dtype, weight.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = (grad_h * grad_out).to(ctx.input_dtype)
        gw = None if grad_w is None else (grad_w * grad_out).to(ctx.weight_dtype)
        return gh, gw, None, None, None


def _head_weight(head):
    """The output projection's weight (through a PEFT ``modules_to_save`` wrapper too)."""
    if hasattr(head, "modules_to_save") and hasattr(head, "active_adapters"):
        active = [a for a in head.active_adapters if a in head.modules_to_save]
        if active and not head.disable_adapters:
            head = head.modules_to_save[active[0]]
        else:
            head = head.original_module
    if getattr(head, "bias", None) is not None:
        raise ValueError("an output head with a bias")
    return head.weight


def _stack_storage(projs, concat_lora: bool = False):
    """Put frozen, unquantized base weights in one tensor; returns it (None when they can't be).

    With ``concat_lora`` and plain LoRA on every projection (no dropout, no bias), the tensor gets
    room for the B blocks (a :class:`_Wide`; see :class:`_ConcatLora`).
    """
    bases = [getattr(p, "base_layer", p) for p in projs]
    if not all(type(b) is torch.nn.Linear for b in bases):
        return None
    weights = [b.weight for b in bases]
    if any(w.requires_grad for w in weights) or len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1:
        return None
    ranks = _concat_ranks(projs) if concat_lora and not any(b.bias is not None for b in bases) else None
    rows, inner = [w.shape[0] for w in weights], weights[0].shape[1]
    stacked = weights[0].new_zeros(sum(rows), inner + sum(ranks)) if ranks else torch.cat([w.data for w in weights])
    start = 0
    for w in weights:
        if ranks:
            stacked[start:start + w.shape[0], :inner] = w.data
        w.data = stacked[start:start + w.shape[0], :inner]
        start += w.shape[0]
    return _Wide(stacked, tuple(rows), tuple(ranks)) if ranks else stacked


def _b_slots(projs, wide: _Wide):
    """(view of ``wide`` where each projection's B goes, the B parameter)."""
    slots, row, col = [], 0, wide.tensor.shape[1] - sum(wide.ranks)
    for proj, rows, rank in zip(projs, wide.rows, wide.ranks):
        active = next(a for a in proj.active_adapters if a in proj.lora_A)
        slots.append((wide.tensor[row:row + rows, col:col + rank], proj.lora_B[active].weight))
        row, col = row + rows, col + rank
    return slots


if triton is not None:
    @triton.jit
    def _copy_blocks_kernel(table, src0, dst0, ROWS: tl.constexpr, COLS: tl.constexpr):
        # grid: (row blocks, copies); a table row per copy: source, destination, rows, columns,
        # the destination's row stride (the source is contiguous); src0 / dst0 give the dtypes
        entry = table + tl.program_id(1) * 5
        src = tl.load(entry).to(src0.dtype)
        dst = tl.load(entry + 1).to(dst0.dtype)
        rows = tl.load(entry + 2)
        cols = tl.load(entry + 3)
        stride = tl.load(entry + 4)
        r = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]
        c = tl.arange(0, COLS)[None, :]
        live = (r < rows) & (c < cols)
        # addresses from a table carry no alignment, so the accesses are scalar: a few MB a step
        values = tl.load(src + r * cols + c, mask=live)
        tl.store(dst + r * stride + c, values.to(dst0.dtype.element_ty), mask=live)  # downcasts: nearest even


class _BlockCopy:
    """Parameters copied into blocks of other tensors before each forward (the LoRA B blocks of a
    :class:`_Wide`, from :func:`_b_slots`), cast to the destination's dtype.

    On CUDA with Triton it is one kernel launch for every block, which finds them through a table
    of addresses; torch's foreach copy launches one kernel a block (the blocks are strided), about
    2 ms of CPU time a step for a 7B's 160 blocks while the GPU waits at the start of the step.
    The table is built again, and whether the kernel can take the blocks checked again, whenever
    a parameter's storage, dtype, shape or strides change. Elsewhere, or for blocks the kernel
    does not take (2-D with contiguous rows, the sources contiguous, one dtype and one device on
    each side), torch's foreach copy. Autograd's version counters of the destinations' bases are
    bumped as an in-place copy would (what :class:`_ConcatLora`'s in-place check relies on).
    """

    ROWS = 64
    MAX_COPIES = 65535  # the grid's second dimension

    def __init__(self, pairs):
        self.pairs = list(pairs)  # (destination view, source parameter)
        self._bases = list({id(t): t for t in (d if d._base is None else d._base for d, _ in self.pairs)}.values())
        self._key = self._launch = None

    def __bool__(self):
        return bool(self.pairs)

    def _kernel_takes(self) -> bool:
        if triton is None or not self.pairs or len(self.pairs) > self.MAX_COPIES:
            return False
        dsts, srcs = [d for d, _ in self.pairs], [s for _, s in self.pairs]
        return (dsts[0].is_cuda and len({t.device for t in dsts + srcs}) == 1
                and len({d.dtype for d in dsts}) == 1 and len({s.dtype for s in srcs}) == 1
                and all(d.dim() == 2 and d.stride(1) == 1 for d in dsts)
                and all(s.shape == d.shape and s.is_contiguous() for d, s in self.pairs))

    def __call__(self):
        srcs = [s for _, s in self.pairs]
        key = tuple((s.data_ptr(), s.dtype, s.device, s.shape, s.stride()) for s in srcs)
        if key != self._key:
            self._key, self._launch = key, None
            if self._kernel_takes():
                table = torch.tensor([[s.data_ptr(), d.data_ptr(), d.shape[0], d.shape[1], d.stride(0)]
                                      for d, s in self.pairs], dtype=torch.int64).to(srcs[0].device)
                grid = (triton.cdiv(max(d.shape[0] for d, _ in self.pairs), self.ROWS), len(self.pairs))
                cols = triton.next_power_of_2(max(d.shape[1] for d, _ in self.pairs))
                self._launch = (table, grid, cols)
        with torch.no_grad():
            if self._launch is None:
                torch._foreach_copy_([d for d, _ in self.pairs], srcs)
                return
            table, grid, cols = self._launch
            dst0 = self.pairs[0][0]
            with torch.cuda.device(dst0.device):  # Triton launches on the current device
                _copy_blocks_kernel[grid](table, srcs[0], dst0, ROWS=self.ROWS, COLS=cols)
            for base in self._bases:  # written behind autograd's back: say so, as copy_ would
                torch.autograd.graph.increment_version(base)


def _concat_ranks(projs):
    """The LoRA ranks of ``projs`` when each has one active plain adapter without dropout, else None."""
    ranks = []
    for proj in projs:
        active = [a for a in getattr(proj, "active_adapters", []) if a in getattr(proj, "lora_A", {})]
        if len(active) != 1 or _projection_problem(proj):
            return None
        drop = proj.lora_dropout[active[0]]
        if isinstance(drop, torch.nn.Dropout) and drop.p > 0:
            return None
        ranks.append(proj.lora_A[active[0]].weight.shape[0])
    return ranks


class FastCausalLM(torch.nn.Module):
    """Trains ``module`` (a causal LM built by ``build_model``) through the fast path.

    ``forward(input_ids, labels, position_ids)`` returns an object with ``.loss``, as the model's
    own forward does; a row's documents start where ``position_ids`` is 0 (and at the row's start).

    Args:
        module: the (PEFT-wrapped) model; its parameters are trained in place.
        compute_dtype: the autocast dtype (bf16 or fp16; fp32 for the CPU tests).
        checkpoint: recompute each layer in the backward pass (gradient checkpointing); 4-bit
            models always do.
        compile: compile the decoder layer (default: on CUDA).
        compile_options: inductor options for ``torch.compile`` (the benchmark's attempts).
        concat_lora: with ``fuse``, compute stacked projections and their LoRA B products as one
            matrix product (:class:`_ConcatLora`; the frozen weights get R more columns; 2% faster
            on the 7B bench, docs/performance.md attempt 16).
        own_checkpoint: recompute layers through :class:`_Recomputed` (the first forward without
            autograd) rather than ``torch.utils.checkpoint``.
        own_kernels: the MLP's SiLU and down projection by :class:`_GatedDown` (SiLU's backward in
            one pass), the o projection by :class:`_LoraLinear`, and the rank-r terms added by
            :func:`_low_rank_add` (docs/performance.md attempts 34-36), rather than by the
            compiled layer's own ops and cuBLAS.
        attention: "fa4", "flash", "varlen", "flex" or "dense" (default: fa4 on CUDA where
            FlashAttention-4 is installed and has kernels for the GPU (:func:`_fa4`) and the
            head size (:func:`_fa4_head_dim_ok`), else flash
            where torch has it, else varlen, else flex; dense on the CPU). "fa4" runs
            FlashAttention-4 (:class:`_FA4Varlen`), "flash" calls aten's varlen flash
            attention ops directly (:class:`_FlashVarlen`), "varlen" through
            ``torch.nn.attention.varlen``, whose Python layer costs CPU time per call.
    """

    def __init__(self, module, compute_dtype, checkpoint: bool = False, compile: bool | None = None,
                 attention: str | None = None, fuse: bool = True, compile_options: dict | None = None,
                 concat_lora: bool = True, own_checkpoint: bool = True, own_kernels: bool = True):
        super().__init__()
        reason = unsupported(module, None)
        if reason:
            raise ValueError(f"the fast path does not support {reason}")
        self.module = module
        base = _base_model(module)
        # plain attributes, not submodules: the parameters keep their one name under ``module``
        object.__setattr__(self, "_inner", base.model)
        object.__setattr__(self, "_head", base.get_output_embeddings())
        config = base.config
        attn = self._inner.layers[0].self_attn
        heads = config.num_attention_heads
        head_dim = getattr(attn, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        scale = float(getattr(attn, "scaling", head_dim ** -0.5))
        device = next(module.parameters()).device
        self._varlen = _varlen_function() if device.type == "cuda" else None
        fa4_ok = device.type == "cuda" and _fa4() is not None and _fa4_head_dim_ok(head_dim)
        if attention is None:
            varlen_ok = self._varlen is not None and (kv_heads == heads or self._varlen.gqa) and (
                self._varlen.scaled or math.isclose(scale, head_dim ** -0.5))
            attention = ("fa4" if fa4_ok else "flash" if device.type == "cuda" and _flash_available()
                         else "varlen" if varlen_ok else "flex" if device.type == "cuda" else "dense")
        if attention == "fa4" and not fa4_ok:
            raise ValueError(f"attention 'fa4' needs FlashAttention-4 (package flash-attn-4) on a GPU it has kernels "
                             f"for, TUNEMAKE_FA4 not 0, and heads of 32 to 256 (128 on Blackwell); heads here: {head_dim}")
        self._shape = _Shape(heads, kv_heads, head_dim, float(self._inner.layers[0].input_layernorm.variance_epsilon),
                             scale, compute_dtype, attention, own_kernels)
        self._quantized = any(type(getattr(p, "base_layer", p)).__name__ == "Linear4bit"
                              for p in _projections(self._inner.layers[0]))
        self._fp4 = any(type(b).__name__ == "Linear4bit" and b.weight.quant_state.quant_type != "nf4"
                        for b in (getattr(p, "base_layer", p) for p in _projections(self._inner.layers[0])))
        self._checkpoint = checkpoint or self._quantized
        self._compile = device.type == "cuda" if compile is None else compile
        self._compile_loss = self._compile  # the loss's softmax gradient (:func:`_softmax_gradient`)
        self._compile_options = compile_options
        self._own_checkpoint = own_checkpoint
        self._lora_dropout = any(
            isinstance(proj.lora_dropout[a], torch.nn.Dropout) and proj.lora_dropout[a].p > 0
            for layer in self._inner.layers for proj in _projections(layer) if hasattr(proj, "lora_A")
            for a in proj.active_adapters if a in proj.lora_A)
        self._fuse = fuse
        self._weights = {}
        self._trainables = {}
        self._nf4_plans = {}
        # frozen q/k/v (and gate/up) weights moved into one tensor each, the parameters becoming
        # views of it: same values and memory, one matmul instead of three
        self._stacked = {}
        slots = []  # (where in a _Wide, LoRA B parameter): copied before each forward
        if fuse:
            for layer in self._inner.layers:
                attn, mlp = layer.self_attn, layer.mlp
                groups = ((attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj))
                self._stacked[id(layer)] = tuple(_stack_storage(projs, concat_lora) for projs in groups)
                for projs, wide in zip(groups, self._stacked[id(layer)]):
                    if isinstance(wide, _Wide):
                        slots += _b_slots(projs, wide)
        self._lora_b_slots = _BlockCopy(slots)

    @property
    def _dropout(self) -> bool:
        return self._lora_dropout and self.training

    @property
    def attention(self) -> str:
        return self._shape.attention

    def _proj(self, proj):
        lora_a = lora_b = None
        scale, dropout = 1.0, 0.0
        if hasattr(proj, "lora_A"):
            active = [a for a in proj.active_adapters if a in proj.lora_A]
            if active:
                a = active[0]
                lora_a, lora_b = proj.lora_A[a].weight, proj.lora_B[a].weight
                scale = float(proj.scaling[a])
                drop = proj.lora_dropout[a]
                dropout = float(drop.p) if isinstance(drop, torch.nn.Dropout) and self.training else 0.0
            proj = proj.base_layer
        weight = proj.weight
        if type(proj).__name__ == "Linear4bit" and weight.quant_state.quant_type == "nf4":
            weight = NF4.of(weight)
        elif type(proj).__name__ == "Linear4bit":
            import bitsandbytes.functional as bnbf

            weight = bnbf.dequantize_4bit(weight.data, weight.quant_state)
        return weight, proj.bias, lora_a, lora_b, scale, dropout

    def _group(self, projs, stacked):
        if not self._fuse:
            return None, [self._proj(p) for p in projs]
        out = [self._proj(p) for p in projs]
        if isinstance(stacked, _Wide):
            return stacked, out
        if stacked is not None:
            out = _row_blocks(stacked, out, [p[0].shape[0] for p in out])
        elif all(isinstance(p[0], NF4) for p in out):
            stacked = _STACK_DEQUANTIZED  # by _dequantized, before each call of the compiled layer
        return stacked, out

    def _layer_weights(self, layer):
        attn, mlp = layer.self_attn, layer.mlp
        qkv, gate_up = self._stacked.get(id(layer), (None, None))
        return (layer.input_layernorm.weight, self._group((attn.q_proj, attn.k_proj, attn.v_proj), qkv),
                self._proj(attn.o_proj), layer.post_attention_layernorm.weight,
                self._group((mlp.gate_proj, mlp.up_proj), gate_up), self._proj(mlp.down_proj))

    def _cached_weights(self, layer):
        # the parameters are the same objects from step to step: look them up once (PEFT's
        # attribute lookups cost more CPU time than the GPU spends on a small layer)
        key = (id(layer), self.training)
        if key not in self._weights:
            self._weights[key] = self._layer_weights(layer)
        return self._weights[key]

    def _recompute(self, layer, x, cos, sin, meta, seed):
        """``layer`` on ``x``, its activations recomputed in the backward pass."""
        if self._own_checkpoint and not self._fp4:
            key = (id(layer), self.training)
            if key not in self._trainables:
                self._trainables[key] = _trainable(self._cached_weights(layer))
            return _Recomputed.apply(lambda h: self._run_layer(layer, h, cos, sin, meta, seed), x,
                                     *self._trainables[key])
        return torch.utils.checkpoint.checkpoint(self._run_layer, layer, x, cos, sin, meta, seed, use_reentrant=False)

    def _run_layer(self, layer, x, cos, sin, meta, seed):
        """``layer`` on ``x``; ``seed`` draws its LoRA dropout masks (None: it has none)."""
        fn = _compiled(self._compile_options) if self._compile else _decoder_layer
        if self._fp4:  # dequantized by bitsandbytes' own kernel at every call, never kept
            weights = self._layer_weights(layer)
        else:
            weights = self._cached_weights(layer)
            if self._quantized:
                key = (id(layer), self.training)
                if key not in self._nf4_plans:
                    self._nf4_plans[key] = plan(_nf4_groups(weights))
                weights = _dequantized(weights, self._nf4_plans[key], self._shape.compute_dtype)
        if seed is not None:
            weights = _with_masks(weights, x, seed)
        return fn(x, cos, sin, meta, weights, self._shape)

    def _attention_meta(self, position_ids):
        b, n = position_ids.shape
        starts = position_ids == 0
        starts[:, 0] = True
        if self._shape.attention in ("varlen", "flash", "fa4"):
            flat = torch.nonzero(starts.reshape(-1)).squeeze(1)
            cu = torch.cat([flat, flat.new_tensor([b * n])]).to(torch.int32)
            if self._shape.attention == "varlen":
                return cu, n, self._varlen
            # the longest document, not the row: the kernel's grid follows it (1.5x faster on
            # short documents); after a second value the compiled layer takes it as a symbol
            return cu, int(torch.diff(cu).max()), _fa4_function if self._shape.attention == "fa4" else _flash_function
        doc = torch.cumsum(starts, dim=1)
        if self._shape.attention == "flex":
            from torch.nn.attention.flex_attention import create_block_mask

            def same_document_causal(bi, hi, qi, ki):
                return (doc[bi, qi] == doc[bi, ki]) & (qi >= ki)

            return create_block_mask(same_document_causal, b, None, n, n, device=position_ids.device)
        causal = torch.tril(torch.ones(n, n, dtype=torch.bool, device=position_ids.device))
        return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]

    def forward(self, input_ids, labels, position_ids=None, attention_mask=None, **unused):
        """Mean loss over the target tokens (``labels`` shifted by one, -100 ignored).

        ``attention_mask`` is ignored: documents come from ``position_ids``.
        """
        b, n = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(n, device=input_ids.device).expand(b, n)
        padded = -n % LENGTH_MULTIPLE if self._compile else 0
        if padded:
            # padding is a document of its own with no targets: the real tokens see none of it
            input_ids = F.pad(input_ids, (0, padded))
            labels = F.pad(labels, (0, padded), value=IGNORE_INDEX)
            position_ids = torch.cat([position_ids, torch.arange(padded, device=position_ids.device).expand(b, padded)], 1)
            n += padded
        targets = torch.cat([labels[:, 1:], labels.new_full((b, 1), IGNORE_INDEX)], dim=1).reshape(-1)
        keep = torch.nonzero(targets != IGNORE_INDEX).squeeze(1)
        meta = self._attention_meta(position_ids)

        if self._lora_b_slots:  # the B blocks of the concatenated products: this step's values
            self._lora_b_slots()
        x = self.module.get_input_embeddings()(input_ids)
        cos, sin = self._inner.rotary_emb(x, position_ids)
        # LoRA dropout: one seed a forward pass from torch's generator (what seeding makes
        # reproducible), one a layer from it, for masks that the recomputation draws again
        step_seed = int(torch.randint(0, 2**62, ())) if self._dropout else None
        for index, layer in enumerate(self._inner.layers):
            seed = None if step_seed is None else (step_seed + 1_000_003 * (index + 1)) % 2**63
            if self._checkpoint and torch.is_grad_enabled():
                x = self._recompute(layer, x, cos, sin, meta, seed)
            else:
                x = self._run_layer(layer, x, cos, sin, meta, seed)
        x = self._inner.norm(x)
        hidden = x.reshape(b * n, -1).index_select(0, keep)
        loss = _LinearCrossEntropy.apply(hidden, _head_weight(self._head), targets.index_select(0, keep),
                                         self._shape.compute_dtype, self._compile_loss)
        # a transformers output, as the model's own forward returns: DDP's static graph and
        # unused-parameter search find the loss in it
        return CausalLMOutput(loss=loss)
