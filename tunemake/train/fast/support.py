"""What the fast path supports: :func:`unsupported` names what keeps a model on its own forward.

The train stage asks it before wrapping a model in :class:`tunemake.train.fast.FastCausalLM`.
"""

from __future__ import annotations

import torch

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")
#: architectures whose layers are Gemma's: RMSNorm of (1 + weight), a norm after attention and
#: after the MLP, GeGLU, embeddings scaled by sqrt(hidden), soft-capping (Gemma 2), sliding-window
#: layers (with their own rotary base in Gemma 3), query/key norms (Gemma 3)
GEMMA = ("gemma2", "gemma3_text")


def base_model(model):
    """The transformers model inside a PEFT wrapper (or ``model`` itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def unsupported(model, compute_dtype=torch.bfloat16) -> str | None:
    """Why the train stage should not use the fast path for ``model`` (None when it can).

    Args:
        model: the (PEFT-wrapped) causal LM ``build_model`` made.
        compute_dtype: the autocast dtype (None without autocast): fp32 training keeps the
            model's own forward (varlen flash attention has no fp32 kernel); pass None to check
            the model alone.
    """
    if compute_dtype is not None and compute_dtype not in (torch.bfloat16, torch.float16):
        return "fp32 training"
    base = base_model(model)
    config = base.config
    if config.model_type not in ARCHITECTURES:
        return f"model_type {config.model_type!r} (supported: {', '.join(ARCHITECTURES)})"
    if config.model_type in GEMMA:
        if getattr(config, "hidden_activation", None) != "gelu_pytorch_tanh":
            return f"hidden_activation {getattr(config, 'hidden_activation', None)!r}"
    else:
        if getattr(config, "hidden_act", "silu") != "silu":
            return f"hidden_act {config.hidden_act!r}"
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
            return "sliding-window attention"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp > 1"
    inner = getattr(base, "model", None)
    if inner is None or not all(hasattr(inner, name) for name in ("layers", "norm", "rotary_emb", "embed_tokens")):
        return "not a Llama-style module tree"
    first = inner.layers[0]
    if hasattr(first.self_attn, "q_norm") and norm_eps(first.self_attn.q_norm) != norm_eps(first.input_layernorm):
        return "query/key norms with another epsilon than the layers'"
    if getattr(first.self_attn, "attention_dropout", 0.0):
        return "attention dropout"
    for layer in inner.layers:
        for proj in projections(layer):
            reason = projection_problem(proj)
            if reason:
                return reason
    return None


def norm_eps(norm) -> float:
    """An RMSNorm module's epsilon (Llama's ``variance_epsilon``, Gemma's ``eps``)."""
    eps = getattr(norm, "variance_epsilon", None)
    return float(norm.eps if eps is None else eps)


def projections(layer) -> tuple:
    """A decoder layer's seven linear modules, q/k/v, o, gate, up, down."""
    attn, mlp = layer.self_attn, layer.mlp
    return (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)


def active_adapters(proj) -> list:
    """The names of the LoRA adapters active on ``proj`` (none for a plain linear layer)."""
    return [a for a in getattr(proj, "active_adapters", []) if a in getattr(proj, "lora_A", {})]


def projection_problem(proj) -> str | None:
    """What the fast path cannot compute in ``proj`` (a linear module, PEFT-wrapped or not), or None."""
    base = proj
    if hasattr(proj, "lora_A"):
        adapters = active_adapters(proj)
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


def is_4bit(proj) -> bool:
    """Whether ``proj``'s frozen weight is a bitsandbytes 4-bit one."""
    return type(getattr(proj, "base_layer", proj)).__name__ == "Linear4bit"
