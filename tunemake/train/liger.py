"""Liger-Kernel for a model the fast path does not run.

Where a model trains through its own forward on CUDA (an architecture the fast path does not
cover, ZeRO-3, ``TUNEMAKE_FAST=0``), Liger-Kernel's Triton kernels replace its RMSNorm, rotary
embedding, SwiGLU/GeGLU MLP and loss, the one switch TRL, axolotl and LLaMA-Factory offer. Picked
automatically when ``liger-kernel`` is installed (``pip install 'tunemake[gpu]'``) and Liger
knows the model's ``model_type``; ``TUNEMAKE_LIGER=0`` turns it off. The fast path's own layers
already fuse these parts, so a model on the fast path is left alone.

The loss is the fused linear cross-entropy (no logits held) except under ZeRO-3, where it would
read the output head's weight outside the head's forward, before ZeRO-3 has gathered it: there
the model's own loss runs (Liger's plain cross-entropy would replace torch's for the whole
process). Liger patches the model in place and its transformers modeling module for the process,
which trains one model.
"""

from __future__ import annotations

import inspect
import os

import torch


def plan(model, device: torch.device, zero_stage: int | None = None) -> dict | None:
    """The keyword arguments of Liger's ``apply_liger_kernel_to_<model_type>`` for ``model``
    (PEFT-wrapped or not) training through its own forward on ``device``, or None where Liger
    does not apply (not CUDA, ``TUNEMAKE_LIGER=0``, liger-kernel missing, an architecture it does not know)."""
    if device.type != "cuda" or os.environ.get("TUNEMAKE_LIGER", "1") == "0":
        return None
    apply = _apply_function(_base(model).config.model_type)
    if apply is None:
        return None
    wanted = {"rope": True, "rms_norm": True, "swiglu": True, "geglu": True,
              "fused_linear_cross_entropy": zero_stage != 3, "cross_entropy": False}
    params = inspect.signature(apply).parameters
    return {key: value for key, value in wanted.items() if key in params}


def apply(model, kwargs: dict) -> None:
    """Apply Liger to ``model`` (PEFT-wrapped or not) with ``kwargs`` from :func:`plan`."""
    base = _base(model)
    _apply_function(base.config.model_type)(model=base, **kwargs)


def describe(kwargs: dict) -> str:
    """What :func:`plan`'s ``kwargs`` replace, for the train stage's log."""
    names = {"rms_norm": "RMSNorm", "rope": "RoPE", "swiglu": "SwiGLU", "geglu": "GeGLU",
             "fused_linear_cross_entropy": "fused linear cross-entropy", "cross_entropy": "cross-entropy"}
    return "Liger-Kernel for " + ", ".join(names[key] for key, on in kwargs.items() if on)


def _apply_function(model_type: str):
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:  # not installed, or without Triton
        return None
    return MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model
