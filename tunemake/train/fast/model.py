""":class:`FastCausalLM`: the model's training forward through the fast path's layers and loss."""

from __future__ import annotations

import dataclasses
import inspect

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutput

from tunemake.encode import IGNORE_INDEX
from tunemake.nf4 import plan

from .attention import choose as choose_attention
from .attention import metadata as attention_metadata
from .kernels import BlockCopy
from .layer import Recomputed, Shape, compiled_layer, decoder_layer
from .lora import Wide
from .loss import LinearCrossEntropy
from .support import GEMMA, base_model, is_4bit, norm_eps, projections, unsupported
from .weights import b_slots, dequantized, head_weight, layer_weights, nf4_groups, stack_storage, trainable, with_masks

#: rows are padded to a multiple of this where the layer is compiled, so a run compiles for a few lengths only
LENGTH_MULTIPLE = 128


class FastCausalLM(torch.nn.Module):
    """Trains ``module`` (a causal LM built by ``build_model``) through the fast path.

    ``forward(input_ids, labels, position_ids)`` returns an object with ``.loss``, as the model's
    own forward does; a row's documents start where ``position_ids`` is 0 (and at the row's start).
    What runs follows from the model and the device, nothing else: on CUDA the layer is compiled
    and attention is the fastest varlen backend available (:func:`tunemake.train.fast.attention.choose`,
    logged through :attr:`attention`); on the CPU (the tests) the same maths runs eagerly with a
    dense mask.

    Args:
        module: the (PEFT-wrapped) model; its parameters are trained in place.
        compute_dtype: the autocast dtype (bf16 or fp16; fp32 for the CPU tests).
        checkpoint: recompute each layer in the backward pass (gradient checkpointing); 4-bit
            models always do.

    Raises:
        ValueError: for a model :func:`tunemake.train.fast.unsupported` refuses.
    """

    def __init__(self, module, compute_dtype, checkpoint: bool = False):
        super().__init__()
        reason = unsupported(module, None)
        if reason:
            raise ValueError(f"the fast path does not support {reason}")
        self.module = module
        base = base_model(module)
        # plain attributes, not submodules: the parameters keep their one name under ``module``
        object.__setattr__(self, "_inner", base.model)
        object.__setattr__(self, "_head", base.get_output_embeddings())
        first = self._inner.layers[0]
        device = next(module.parameters()).device
        self._arch = architecture(base, compute_dtype, device)
        self._quantized = any(is_4bit(p) for p in projections(first))
        self._fp4 = any(is_4bit(p) and getattr(p, "base_layer", p).weight.quant_state.quant_type != "nf4"
                        for p in projections(first))
        self._checkpoint = checkpoint or self._quantized
        self._compile = device.type == "cuda"
        self._lora_dropout = any(
            isinstance(proj.lora_dropout[a], torch.nn.Dropout) and proj.lora_dropout[a].p > 0
            for layer in self._inner.layers for proj in projections(layer) if hasattr(proj, "lora_A")
            for a in proj.active_adapters if a in proj.lora_A)
        self._weights = {}
        self._trainables = {}
        self._nf4_plans = {}
        # frozen q/k/v (and gate/up) weights moved into one tensor each (the LoRA B blocks beside
        # them where the group is plain LoRA), the parameters becoming views of it
        self._stacked = {}
        slots = []  # (where in a Wide, LoRA B parameter): copied before each forward
        for layer in self._inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            groups = ((attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj))
            self._stacked[id(layer)] = tuple(stack_storage(projs) for projs in groups)
            for projs, wide in zip(groups, self._stacked[id(layer)]):
                if isinstance(wide, Wide):
                    slots += b_slots(projs, wide)
        self._lora_b_slots = BlockCopy(slots)

    @property
    def _dropout(self) -> bool:
        return self._lora_dropout and self.training

    @property
    def attention(self) -> str:
        """The attention backend: "fa4", "flash", "varlen", "flex" or "dense"."""
        return self._arch.shape.attention

    def _layer_weights(self, layer):
        return layer_weights(layer, self._stacked[id(layer)], self.training)

    def _cached_weights(self, layer):
        # the parameters are the same objects from step to step: look them up once (PEFT's
        # attribute lookups cost more CPU time than the GPU spends on a small layer)
        key = (id(layer), self.training)
        if key not in self._weights:
            self._weights[key] = self._layer_weights(layer)
        return self._weights[key]

    def _recompute(self, layer, x, cos, sin, meta, seed):
        """``layer`` on ``x``, its activations recomputed in the backward pass."""
        if self._fp4:  # weights dequantized afresh at each call: torch's checkpoint finds what to route
            return torch.utils.checkpoint.checkpoint(self._run_layer, layer, x, cos, sin, meta, seed,
                                                     use_reentrant=False)
        key = (id(layer), self.training)
        if key not in self._trainables:
            self._trainables[key] = trainable(self._cached_weights(layer))
        return Recomputed.apply(lambda h: self._run_layer(layer, h, cos, sin, meta, seed), x, *self._trainables[key])

    def _run_layer(self, layer, x, cos, sin, meta, seed):
        """``layer`` on ``x``; ``seed`` draws its LoRA dropout masks (None: it has none)."""
        fn = compiled_layer() if self._compile else decoder_layer
        if self._fp4:  # dequantized by bitsandbytes' own kernel at every call, never kept
            weights = self._layer_weights(layer)
        else:
            weights = self._cached_weights(layer)
            if self._quantized:
                key = (id(layer), self.training)
                if key not in self._nf4_plans:
                    self._nf4_plans[key] = plan(nf4_groups(weights))
                weights = dequantized(weights, self._nf4_plans[key], self._arch.shape.compute_dtype)
        if seed is not None:
            weights = with_masks(weights, x, seed)
        return fn(x, cos, sin, meta, weights, self._arch.layer_shapes[id(layer)])

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
        # what attention reads, for each sliding window the layers have (None: none)
        windows = {shape.window for shape in self._arch.layer_shapes.values()}
        metas = {window: attention_metadata(position_ids, self._arch.shape.attention, window) for window in windows}

        if self._lora_b_slots:  # the B blocks of the concatenated products: this step's values
            self._lora_b_slots()
        x = self.module.get_input_embeddings()(input_ids)
        if self._arch.embed_scale:  # rounded to the embeddings' dtype first, as Gemma does
            x = x * torch.tensor(self._arch.embed_scale, dtype=x.dtype)
        rotary = {key: self._inner.rotary_emb(x, position_ids, *([key] if key else []))
                  for key in set(self._arch.rotary_keys.values())}
        # LoRA dropout: one seed a forward pass from torch's generator (what seeding makes
        # reproducible), one a layer from it, for masks that the recomputation draws again
        step_seed = int(torch.randint(0, 2**62, ())) if self._dropout else None
        for index, layer in enumerate(self._inner.layers):
            seed = None if step_seed is None else (step_seed + 1_000_003 * (index + 1)) % 2**63
            meta = metas[self._arch.layer_shapes[id(layer)].window]
            cos, sin = rotary[self._arch.rotary_keys[id(layer)]]
            if self._checkpoint and torch.is_grad_enabled():
                x = self._recompute(layer, x, cos, sin, meta, seed)
            else:
                x = self._run_layer(layer, x, cos, sin, meta, seed)
        x = self._inner.norm(x)
        hidden = x.reshape(b * n, -1).index_select(0, keep)
        loss = LinearCrossEntropy.apply(hidden, head_weight(self._head), targets.index_select(0, keep),
                                        self._arch.shape.compute_dtype, self._compile, self._arch.logit_softcap)
        # a transformers output, as the model's own forward returns: DDP's static graph and
        # unused-parameter search find the loss in it
        return CausalLMOutput(loss=loss)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What the forward pass needs of the model beyond its weights."""

    shape: Shape  # what every layer shares
    layer_shapes: dict  # id(layer) -> its Shape: its sliding window, if any (Gemma 2 alternates)
    rotary_keys: dict  # id(layer) -> the layer type whose rotary embedding it takes (Gemma 3), or None
    embed_scale: float | None  # Gemma's sqrt(hidden), where the embedding module does not apply it
    logit_softcap: float | None  # Gemma 2's soft-cap of the final logits


def architecture(base, compute_dtype, device) -> Architecture:
    """The shapes, windows, rotary keys and Gemma's scalings of ``base`` (the unwrapped model)."""
    config, inner = base.config, base.model
    first = inner.layers[0]
    heads = config.num_attention_heads
    head_dim = getattr(first.self_attn, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    scale = float(getattr(first.self_attn, "scaling", head_dim ** -0.5))
    gemma = config.model_type in GEMMA
    softcap = getattr(config, "attn_logit_softcapping", None) if gemma else None
    windows = [getattr(layer.self_attn, "sliding_window", None) if gemma else None for layer in inner.layers]
    attention = choose_attention(device, heads, kv_heads, head_dim, scale, bool(softcap or any(windows)))
    shape = Shape(heads, kv_heads, head_dim, norm_eps(first.input_layernorm), scale, compute_dtype, attention,
                  gemma, softcap)
    # Gemma 3's rotary module computes each layer type's own (its sliding layers have another base)
    per_type = "layer_type" in inspect.signature(inner.rotary_emb.forward).parameters
    # Gemma scales its embeddings by sqrt(hidden): in the model's forward in older transformers,
    # inside the embedding module (``embed_scale``) in newer ones
    scaled_inside = hasattr(base.get_input_embeddings(), "embed_scale")
    return Architecture(
        shape=shape,
        layer_shapes={id(layer): dataclasses.replace(shape, window=window)
                      for layer, window in zip(inner.layers, windows)},
        rotary_keys={id(layer): config.layer_types[i] if per_type else None for i, layer in enumerate(inner.layers)},
        embed_scale=config.hidden_size ** 0.5 if gemma and not scaled_inside else None,
        logit_softcap=getattr(config, "final_logit_softcapping", None) if gemma else None,
    )
