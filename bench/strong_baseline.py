"""The strong baseline: what a user who cares about speed configures with transformers + PEFT.

Packed rows at batch size 1 handed over as variable-length documents (``cu_seq_lens_q/k`` and
``max_length_q/k``, what TRL's ``DataCollatorWithFlattening`` produces), a varlen attention kernel,
and Liger-Kernel's ``apply_liger_kernel_to_<model>`` (RMSNorm, RoPE, SwiGLU/GeGLU, fused linear
cross-entropy: the one switch TRL, axolotl and LLaMA-Factory offer). Attention is transformers'
``flash_attention_4`` where FlashAttention-4 is installed, else torch's
``torch.nn.attention.varlen.varlen_attn`` registered in transformers' AttentionInterface (the
same FlashAttention kernels; flash-attn 2 has no wheel for the GPU image); for a model with
soft-capped attention (Gemma 2), which ``varlen_attn`` cannot compute, transformers'
``flex_attention`` (its mask keeps the documents of a packed row apart).

Nothing here comes from tunemake: the baseline is what a user would write without it.
CUDA only (Liger's kernels are Triton; varlen attention needs half precision on a GPU).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect

import torch

VARLEN = "torch_varlen"


def unavailable(device) -> str | None:
    """Why the strong baseline cannot run here, or None."""
    if device.type != "cuda":
        return "needs CUDA"
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        return "liger-kernel is not installed"
    if attention_name() is None:
        return "neither FlashAttention-4 nor torch's varlen_attn is installed"
    return None


def attention_name(config=None) -> str | None:
    """``flash_attention_4`` where transformers and FlashAttention-4 both have it, else torch's
    varlen kernel, or flex attention for ``config``'s soft-capped attention."""
    try:
        from transformers.utils import is_flash_attn_4_available

        if is_flash_attn_4_available():
            return "flash_attention_4"
    except ImportError:
        pass
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return None
    return "flex_attention" if getattr(config, "attn_logit_softcapping", None) else VARLEN


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                     max_length_q=None, sliding_window=None, **kwargs):
    """transformers' attention interface over ``varlen_attn``: ``query`` ``(1, heads, T, d)``;
    returns ``((1, T, heads, d), None)``. Causal, a sliding window where the model has one; no
    dropout, no soft-capping (the bench's models have neither)."""
    from torch.nn.attention.varlen import varlen_attn

    # QLoRA's 4-bit products come out in fp32 beside fp32 norms: cast as transformers' flash path does
    dtype = torch.get_autocast_dtype("cuda") if query.dtype == torch.float32 else query.dtype
    q, k, v = (t[0].transpose(0, 1).to(dtype) for t in (query, key, value))  # (T, heads, d)
    groups = q.shape[1] // k.shape[1]
    extra = {}
    if groups > 1:
        if "enable_gqa" in inspect.signature(varlen_attn).parameters:
            extra["enable_gqa"] = True
        else:  # torch 2.11's varlen_attn takes as many key/value heads as query heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    window = (sliding_window - 1 if sliding_window else -1, 0)
    out = varlen_attn(q, k, v, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q, scale=scaling,
                      window_size=window, **extra)
    return out[None], None


@contextlib.contextmanager
def strong(model):
    """Within the block, ``model`` (PEFT-wrapped) runs as the strong baseline; afterwards it is
    the model's own forward again, so the plain baseline and tunemake can be timed in turn.

    Liger patches the model's modules and its modeling module in place; both are put back.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    base = model.get_base_model()
    kind = base.config.model_type
    modeling = importlib.import_module(f"transformers.models.{kind}.modeling_{kind}")
    import liger_kernel.transformers as liger

    saved_modules = {m: dict(m.__dict__) for m in base.modules()}
    saved_modeling = dict(vars(modeling))
    name = attention_name(base.config)
    if name == VARLEN:
        AttentionInterface.register(VARLEN, varlen_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN, flash_attention_mask)  # no mask: the documents say it all
    before = base.config._attn_implementation
    getattr(liger, f"apply_liger_kernel_to_{kind}")(model=base)
    base.set_attn_implementation(name)
    try:
        yield
    finally:
        base.set_attn_implementation(before)
        for module, state in saved_modules.items():
            module.__dict__.clear()
            module.__dict__.update(state)
        for key in set(vars(modeling)) - set(saved_modeling):
            delattr(modeling, key)
        for key, value in saved_modeling.items():
            setattr(modeling, key, value)


def describe(config=None) -> dict:
    """What the strong baseline ran with, for the bench's JSON."""
    import liger_kernel

    version = getattr(liger_kernel, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version

        version = dist_version("liger-kernel")
    return {"attention": attention_name(config), "liger_kernel": version, "torch": torch.__version__}
