"""One decoder layer written out (:func:`decoder_layer`): Llama's (Mistral's, Qwen2's, Qwen3's with
its query/key norms) or Gemma 2's and 3's; compiled once and run for every layer, and its recomputation
in the backward pass (:class:`Recomputed`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import attend
from .lora import ConcatLora, GatedDown, LoraLinear, Wide
from .weights import Group, LayerWeights, Projection


@dataclass(frozen=True)
class Shape:
    """A model's sizes and settings that the compiled layer is specialized on."""
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    scale: float
    compute_dtype: torch.dtype
    attention: str  # a backend of tunemake.train.fast.attention: "fa4", "flash", "varlen", "flex" or "dense"
    gemma: bool = False  # Gemma's layer: norms of (1 + weight) in fp32, one after attention and the MLP, GeGLU
    softcap: float | None = None  # attention logits soft-capped: softcap * tanh(logit / softcap)
    window: int | None = None  # a query sees the keys less than this many positions back (sliding-window layers)


def dropped(x, dropout):
    """``x`` through LoRA dropout: ``dropout`` is 0 (none) or (keep mask, p) from
    :func:`tunemake.train.fast.weights.with_masks`."""
    if not dropout:
        return x
    keep, p = dropout
    return x * keep.to(x.dtype) * (1.0 / (1.0 - p))


def linear(x, proj: Projection):
    """``x @ W.T + b + scale * B(A(dropout(x)))`` in the compute dtype (4-bit weights dequantized
    by :func:`tunemake.train.fast.weights.dequantized`)."""
    dtype = x.dtype
    y = F.linear(x, proj.weight.to(dtype), None if proj.bias is None else proj.bias.to(dtype))
    if proj.lora_a is not None:
        y = y + F.linear(F.linear(dropped(x, proj.dropout), proj.lora_a.to(dtype)), proj.lora_b.to(dtype)) * proj.scale
    return y


def lora_linear(x, proj: Projection):
    """:func:`linear` by :class:`tunemake.train.fast.lora.LoraLinear` where it applies (plain LoRA
    without dropout on a frozen weight without bias), else by :func:`linear`."""
    if proj.lora_a is not None and proj.bias is None and not proj.dropout and not proj.weight.requires_grad:
        return LoraLinear.apply(x, proj.weight, proj.lora_a, proj.lora_b, proj.scale)
    return linear(x, proj)


def wide_product(x, wide: Wide, projs):
    """The outputs of the projections ``projs`` stacked in ``wide``, side by side."""
    a_cat = torch.cat([p.lora_a.to(x.dtype) for p in projs])
    return ConcatLora.apply(x, wide.tensor, a_cat, tuple(p.scale for p in projs), wide.rows, wide.ranks,
                            *[p.lora_b for p in projs])


def linears(x, group: Group) -> list:
    """The outputs of a group's projections of one input.

    With a stacked weight the base projections are one matmul; without dropout (which PEFT draws
    per adapter) the LoRA A projections are one matmul too.
    """
    stacked, projs = group
    dtype = x.dtype
    if stacked is None:
        return [linear(x, proj) for proj in projs]
    if isinstance(stacked, Wide):
        return list(wide_product(x, stacked, projs).split(stacked.rows, dim=-1))
    bias = None if projs[0].bias is None else torch.cat([p.bias.to(dtype) for p in projs])
    ys = list(F.linear(x, stacked.to(dtype), bias).split([p.weight.shape[0] for p in projs], dim=-1))
    if all(p.lora_a is not None for p in projs) and not any(p.dropout for p in projs):
        xa = F.linear(x, torch.cat([p.lora_a.to(dtype) for p in projs])).split([p.lora_a.shape[0] for p in projs], dim=-1)
        return [y + F.linear(a, p.lora_b.to(dtype)) * p.scale for y, a, p in zip(ys, xa, projs)]
    for i, p in enumerate(projs):
        if p.lora_a is not None:
            ys[i] = ys[i] + F.linear(F.linear(dropped(x, p.dropout), p.lora_a.to(dtype)), p.lora_b.to(dtype)) * p.scale
    return ys


def joined(x, group: Group):
    """:func:`linears`' outputs as one tensor [..., sum of the rows] (gate and up side by side):
    the product's own output where the group is a :class:`tunemake.train.fast.lora.Wide`, else a
    concatenation."""
    if isinstance(group.stacked, Wide):
        return wide_product(x, *group)
    return torch.cat(linears(x, group), dim=-1)


def mlp(h, gate_up: Group, down_proj: Projection, gelu: bool = False):
    """The MLP on ``h``, SiLU-gated (or GeGLU with tanh's GELU, Gemma's): by
    :class:`tunemake.train.fast.lora.GatedDown` where SiLU's down projection has no bias and no LoRA
    dropout, else by :func:`linears` and :func:`linear`."""
    if not gelu and down_proj.bias is None and not down_proj.dropout:
        return GatedDown.apply(joined(h, gate_up), down_proj.weight, down_proj.lora_a, down_proj.lora_b, down_proj.scale)
    gate, up = linears(h, gate_up)
    return linear((F.gelu(gate, approximate="tanh") if gelu else F.silu(gate)) * up, down_proj)


def rms_norm(x, weight, eps):
    # as LlamaRMSNorm: statistics in fp32, weight applied after casting back
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def gemma_norm(x, weight, eps):
    # as Gemma2RMSNorm: (1 + weight) applied in fp32, then cast back
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + weight.float())).to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def decoder_layer(x, cos, sin, meta, weights: LayerWeights, shape: Shape):
    """One decoder layer; ``x`` is the residual stream [B, L, hidden] in the model's dtype,
    ``meta`` what :func:`tunemake.train.fast.attention.metadata` made for the step."""
    b, n, _ = x.shape
    dtype = shape.compute_dtype
    norm = gemma_norm if shape.gemma else rms_norm
    h = norm(x, weights.input_norm, shape.eps).to(dtype)
    q, k, v = linears(h, weights.qkv)
    q = q.reshape(b, n, shape.heads, shape.head_dim)
    k = k.reshape(b, n, shape.kv_heads, shape.head_dim)
    v = v.reshape(b, n, shape.kv_heads, shape.head_dim)
    if weights.qk_norm is not None:  # Qwen3, Gemma 3: each head normalized before the rotation
        q, k = norm(q, weights.qk_norm[0], shape.eps), norm(k, weights.qk_norm[1], shape.eps)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    q = (q * cos + rotate_half(q) * sin).to(dtype)
    k = (k * cos + rotate_half(k) * sin).to(dtype)
    attended = lora_linear(attend(q, k, v, meta, shape), weights.o_proj)
    if shape.gemma:  # a norm after attention and after the MLP, before each joins the residual
        x = x + gemma_norm(attended, weights.post_norm, shape.eps)
        h = gemma_norm(x, weights.pre_mlp_norm, shape.eps).to(dtype)
        return x + gemma_norm(mlp(h, weights.gate_up, weights.down_proj, gelu=True), weights.post_mlp_norm, shape.eps)
    x = x + attended
    h = rms_norm(x, weights.post_norm, shape.eps).to(dtype)
    return x + mlp(h, weights.gate_up, weights.down_proj)


@functools.cache
def compiled_layer():
    """:func:`decoder_layer` compiled once per process (norms, rotary, SiLU, LoRA casts fused)."""
    return torch.compile(decoder_layer)


class Recomputed(torch.autograd.Function):
    """Gradient checkpointing of one decoder layer, without torch.utils.checkpoint's hooks.

    The forward pass runs the layer under ``no_grad`` (the compiled layer's inference graph, no
    autograd bookkeeping) and keeps only its input; the backward pass runs it again with autograd
    and differentiates that with :func:`torch.autograd.grad`. ``run(x)`` is the layer; ``params``
    are the parameters and trainable tensors it reads, passed in so that autograd routes their
    gradients (also in the first layer, whose input needs none). Autocast is restored for the
    recomputation; LoRA dropout needs no random state restored, its masks coming from a seed
    (:func:`tunemake.train.fast.weights.with_masks`).
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
