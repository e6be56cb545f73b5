"""A decoder layer's weights as the compiled layer reads them, gathered once from the PEFT modules.

:class:`Projection` (one linear layer), :class:`Group` (projections of one input: q/k/v, gate/up,
their frozen weights stacked into one tensor), :class:`LayerWeights` (a whole layer); the stacking
(:func:`stack_storage`), NF4 dequantization per call (:func:`dequantized`) and LoRA dropout masks
(:func:`with_masks`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from tunemake.nf4 import NF4, dequantize_plan

from .lora import Wide
from .support import active_adapters, projection_problem


class Projection(NamedTuple):
    """One linear layer: ``x W^T + b + scale * B(A(dropout(x)))``."""
    weight: object  # a tensor, or an :class:`tunemake.nf4.NF4` until :func:`dequantized`
    bias: torch.Tensor | None
    lora_a: torch.Tensor | None
    lora_b: torch.Tensor | None
    scale: float
    dropout: object  # LoRA dropout's p (0.0: none), or (keep mask, p) from :func:`with_masks`


class Group(NamedTuple):
    """Projections of one input (q/k/v, gate/up) and their frozen weights stacked, or None."""
    stacked: object  # None, a tensor, a :class:`tunemake.train.fast.lora.Wide` or :data:`STACK_DEQUANTIZED`
    projs: list  # of Projection


class LayerWeights(NamedTuple):
    """What the compiled decoder layer reads besides its input."""
    input_norm: torch.Tensor
    qkv: Group
    o_proj: Projection
    post_norm: torch.Tensor
    gate_up: Group
    down_proj: Projection
    qk_norm: tuple | None = None  # Qwen3's RMSNorm weights of the query and key heads, or None
    pre_mlp_norm: torch.Tensor | None = None  # Gemma's norm before the MLP (``post_norm`` follows attention)
    post_mlp_norm: torch.Tensor | None = None  # Gemma's norm after the MLP


#: what :func:`group` puts in place of a stacked weight for NF4 projections that
#: :func:`dequantized` dequantizes into one tensor
STACK_DEQUANTIZED = "stack the dequantized weights"


def projection(proj, training: bool) -> Projection:
    """``proj`` (a linear module, PEFT-wrapped or not) as a :class:`Projection`; LoRA dropout only
    while ``training``; NF4 weights as :class:`tunemake.nf4.NF4`, FP4 ones dequantized here."""
    lora_a = lora_b = None
    scale, dropout = 1.0, 0.0
    if hasattr(proj, "lora_A"):
        active = active_adapters(proj)
        if active:
            a = active[0]
            lora_a, lora_b = proj.lora_A[a].weight, proj.lora_B[a].weight
            scale = float(proj.scaling[a])
            drop = proj.lora_dropout[a]
            dropout = float(drop.p) if isinstance(drop, torch.nn.Dropout) and training else 0.0
        proj = proj.base_layer
    weight = proj.weight
    if type(proj).__name__ == "Linear4bit" and weight.quant_state.quant_type == "nf4":
        weight = NF4.of(weight)
    elif type(proj).__name__ == "Linear4bit":
        import bitsandbytes.functional as bnbf

        weight = bnbf.dequantize_4bit(weight.data, weight.quant_state)
    return Projection(weight, proj.bias, lora_a, lora_b, scale, dropout)


def group(projs, stacked, training: bool) -> Group:
    """``projs`` as a :class:`Group` over ``stacked`` (from :func:`stack_storage`)."""
    out = [projection(p, training) for p in projs]
    if isinstance(stacked, Wide):
        return Group(stacked, out)
    if stacked is not None:
        out = row_blocks(stacked, out, [p.weight.shape[0] for p in out])
    elif all(isinstance(p.weight, NF4) for p in out):
        stacked = STACK_DEQUANTIZED  # by dequantized(), before each call of the compiled layer
    return Group(stacked, out)


def layer_weights(layer, stacked, training: bool) -> LayerWeights:
    """A decoder layer's weights; ``stacked``: its (q/k/v, gate/up) from :func:`stack_storage`."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv, gate_up = stacked
    qk_norm = (attn.q_norm.weight, attn.k_norm.weight) if hasattr(attn, "q_norm") else None
    gemma = hasattr(layer, "pre_feedforward_layernorm")
    return LayerWeights(layer.input_layernorm.weight, group((attn.q_proj, attn.k_proj, attn.v_proj), qkv, training),
                        projection(attn.o_proj, training), layer.post_attention_layernorm.weight,
                        group((mlp.gate_proj, mlp.up_proj), gate_up, training), projection(mlp.down_proj, training),
                        qk_norm, layer.pre_feedforward_layernorm.weight if gemma else None,
                        layer.post_feedforward_layernorm.weight if gemma else None)


def row_blocks(stacked, projs, rows) -> list:
    """``projs`` with their weights replaced by consecutive blocks of ``rows`` rows of ``stacked``."""
    out, start = [], 0
    for proj, n in zip(projs, rows):
        out.append(proj._replace(weight=stacked[start:start + n]))
        start += n
    return out


def nf4_groups(weights: LayerWeights) -> list:
    """A layer's NF4 weights in the order :func:`dequantized` fills them in: a stacked group
    whole, the other weights one by one (the groups of a :func:`tunemake.nf4.plan`)."""
    def of_group(g):
        if g.stacked is STACK_DEQUANTIZED:
            return [[p.weight for p in g.projs]]
        return [[p.weight] for p in g.projs if isinstance(p.weight, NF4)]

    def of_single(proj):
        return [[proj.weight]] if isinstance(proj.weight, NF4) else []

    return of_group(weights.qkv) + of_single(weights.o_proj) + of_group(weights.gate_up) + of_single(weights.down_proj)


def dequantized(weights: LayerWeights, planned, dtype) -> LayerWeights:
    """A layer's weights with the NF4 ones dequantized.

    Done outside the compiled layer, by :func:`tunemake.nf4.dequantize_plan` (``planned`` from
    :func:`nf4_groups`; one Triton kernel launch a layer on CUDA), inside the layer's
    recomputation, so that no dequantized weight outlives it.
    """
    values = iter(dequantize_plan(planned, dtype))

    def single(proj):
        return proj._replace(weight=next(values)) if isinstance(proj.weight, NF4) else proj

    def of_group(g):
        if g.stacked is not STACK_DEQUANTIZED:
            return Group(g.stacked, [single(p) for p in g.projs])
        stacked = next(values)
        return Group(stacked, row_blocks(stacked, g.projs, [p.weight.rows for p in g.projs]))

    qkv = of_group(weights.qkv)  # in nf4_groups' order
    o_proj = single(weights.o_proj)
    gate_up = of_group(weights.gate_up)
    return weights._replace(qkv=qkv, o_proj=o_proj, gate_up=gate_up, down_proj=single(weights.down_proj))


def with_masks(weights: LayerWeights, x, seed: int) -> LayerWeights:
    """A layer's weights with each LoRA dropout probability p replaced by (keep mask, p).

    The masks (one per projection, as PEFT draws them) come from a generator seeded with ``seed``,
    so the layer's recomputation draws the same ones, and the compiled layer holds no random op.
    """
    generator = torch.Generator(device=x.device)
    generator.manual_seed(seed)

    def masked(p):
        if not p.dropout:
            return p
        shape = (*x.shape[:-1], p.lora_a.shape[1])  # the projection's input: its LoRA A's columns
        keep = torch.empty(shape, dtype=torch.uint8, device=x.device).bernoulli_(1.0 - p.dropout, generator=generator)
        return p._replace(dropout=(keep, p.dropout))

    qkv = Group(weights.qkv.stacked, [masked(p) for p in weights.qkv.projs])  # in the layer's order
    o_proj = masked(weights.o_proj)
    gate_up = Group(weights.gate_up.stacked, [masked(p) for p in weights.gate_up.projs])
    return weights._replace(qkv=qkv, o_proj=o_proj, gate_up=gate_up, down_proj=masked(weights.down_proj))


def trainable(weights: LayerWeights) -> list:
    """The tensors in a layer's weights that need gradients or are parameters (whose
    ``requires_grad`` may be switched on later)."""
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


def concat_ranks(projs) -> list | None:
    """The LoRA ranks of ``projs`` when each has one active plain adapter without dropout, else None."""
    ranks = []
    for proj in projs:
        active = active_adapters(proj)
        if len(active) != 1 or projection_problem(proj):
            return None
        drop = proj.lora_dropout[active[0]]
        if isinstance(drop, torch.nn.Dropout) and drop.p > 0:
            return None
        ranks.append(proj.lora_A[active[0]].weight.shape[0])
    return ranks


def stack_storage(projs):
    """Put the frozen, unquantized base weights of ``projs`` in one tensor; returns it (None when
    they can't be). The parameters become views of it: same values and memory, one matrix product
    instead of three.

    With plain LoRA on every projection (no dropout, no bias) the tensor gets room for the B
    blocks (a :class:`tunemake.train.fast.lora.Wide`; see :class:`tunemake.train.fast.lora.ConcatLora`).
    """
    bases = [getattr(p, "base_layer", p) for p in projs]
    if not all(type(b) is torch.nn.Linear for b in bases):
        return None
    weights = [b.weight for b in bases]
    if any(w.requires_grad for w in weights) or len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1:
        return None
    ranks = None if any(b.bias is not None for b in bases) else concat_ranks(projs)
    rows, inner = [w.shape[0] for w in weights], weights[0].shape[1]
    stacked = weights[0].new_zeros(sum(rows), inner + sum(ranks)) if ranks else torch.cat([w.data for w in weights])
    start = 0
    for w in weights:
        if ranks:
            stacked[start:start + w.shape[0], :inner] = w.data
        w.data = stacked[start:start + w.shape[0], :inner]
        start += w.shape[0]
    return Wide(stacked, tuple(rows), tuple(ranks)) if ranks else stacked


def b_slots(projs, wide: Wide) -> list:
    """(view of ``wide`` where each projection's B goes, the B parameter)."""
    slots, row, col = [], 0, wide.tensor.shape[1] - sum(wide.ranks)
    for proj, rows, rank in zip(projs, wide.rows, wide.ranks):
        active = active_adapters(proj)[0]
        slots.append((wide.tensor[row:row + rows, col:col + rank], proj.lora_B[active].weight))
        row, col = row + rows, col + rank
    return slots


def head_weight(head):
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
