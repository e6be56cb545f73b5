"""Liger-Kernel on the models the fast path does not run (tunemake.train.liger): on CUDA, the loss
and the LoRA gradients of the model's own forward, in bf16. Skipped without CUDA and liger-kernel."""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch

from test_documents import MODELS, lora, one_row, phi3
from tunemake.train import liger
from tunemake.train.documents import FLAT, apart
from tunemake.train.documents import make_batch as pieces_batch


def _liger_installed() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        return False
    return True


pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not _liger_installed(),
                                reason="needs CUDA and liger-kernel")
CUDA = torch.device("cuda")


@contextlib.contextmanager
def modeling_restored(model_type: str):
    """Liger patches the modeling module for the process: put it back for the next test."""
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    saved = dict(vars(module))
    try:
        yield
    finally:
        for key in set(vars(module)) - set(saved):
            delattr(module, key)
        for key, value in saved.items():
            setattr(module, key, value)


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    with apart(model, FLAT, torch.bfloat16), torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(**batch, use_cache=False).loss
        loss.backward()
    return loss.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("zero_stage", [None, 3])
@pytest.mark.parametrize("name", list(MODELS))
def test_liger_trains_as_the_models_own_forward(name, zero_stage):
    torch.manual_seed(0)
    model = lora(MODELS[name]().to(CUDA, torch.bfloat16))
    ids, labels, positions = one_row(model.config.vocab_size)
    batch = {k: v.to(CUDA) if isinstance(v, torch.Tensor) else v
             for k, v in pieces_batch([(ids, labels, positions)], 0, FLAT).items()}
    ref_loss, ref_grads = loss_and_grads(model, batch)
    kwargs = liger.plan(model, CUDA, zero_stage)
    assert kwargs["fused_linear_cross_entropy"] is (zero_stage != 3) and kwargs["rms_norm"]
    with modeling_restored(model.config.model_type):
        liger.apply(model, kwargs)
        assert model.get_base_model().model.norm._get_name() == "LigerRMSNorm"
        loss, grads = loss_and_grads(model, batch)
    assert abs(loss - ref_loss) / ref_loss < 1e-2, (loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and grads
    for key, ref in ref_grads.items():
        error = (grads[key] - ref).norm() / ref.norm().clamp_min(1e-12)
        assert error < 0.05, (key, float(error))


def test_the_route_names_liger_and_leaves_the_fast_path_alone(monkeypatch):
    from tunemake.train.engine import route

    torch.manual_seed(0)
    way = route(lora(phi3()), CUDA, torch.bfloat16, 2)  # an architecture the fast path does not cover
    assert way.liger and way.why.endswith("Liger-Kernel for RoPE, RMSNorm, SwiGLU, fused linear cross-entropy")
    way = route(lora(MODELS["gemma2"]()), CUDA, torch.bfloat16, 3)  # under ZeRO-3, the model's own loss
    assert way.why.endswith("Liger-Kernel for RoPE, RMSNorm, GeGLU")
    assert route(lora(MODELS["llama"]()), CUDA, torch.bfloat16).liger is None  # the fast path
    monkeypatch.setenv("TUNEMAKE_LIGER", "0")
    assert route(lora(phi3()), CUDA, torch.bfloat16, 2).liger is None
