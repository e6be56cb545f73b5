"""The fast path (tunemake.train.fast) computes the model's own loss and gradients, on packed rows.

Tiny Llamas built in memory; the reference is the model's forward with a dense block-diagonal
mask (tests/packed.py). The compiled / varlen path is checked on CUDA only.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tunemake.train.fast import FastCausalLM, unsupported
from packed import dense_batch, packed_rows
from tunemake.train import documents
from tunemake.train.batches import make_batch
from tunemake.train.engine import step_model
from tunemake.train.launch import Dist
from tunemake.train.model import fast_path

CONFIG = {"vocab_size": 97, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}


def tiny_llama(seed: int = 0, dtype=torch.float32, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**CONFIG, **overrides})
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).to(dtype)


def with_lora(model, dropout: float = 0.0, modules_to_save=None, **options):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                        modules_to_save=modules_to_save, **options)
    model = get_peft_model(model, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # zero at init: make the A gradients non-trivial
                p.normal_(0, 0.05)
    return model


def loss_and_grads(model, batch, autocast=None):
    model.zero_grad(set_to_none=True)
    device = batch["input_ids"].device.type
    with torch.autocast(device, dtype=autocast or torch.float32, enabled=autocast is not None):
        loss = model(**batch, use_cache=False).loss
    loss.backward()
    net = getattr(model, "module", model) if isinstance(model, FastCausalLM) else model
    grads = {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def relative_errors(ref, other) -> dict[str, float]:
    """The relative error of ``other``'s loss and of each of its gradients against ``ref``'s."""
    (loss_ref, grads_ref), (loss, grads) = ref, other
    assert grads_ref.keys() == grads.keys()
    errors = {"loss": abs(loss.item() - loss_ref.item()) / abs(loss_ref.item())}
    for name, g in grads_ref.items():
        errors[name] = ((grads[name].float() - g.float()).norm() / g.float().norm().clamp_min(1e-12)).item()
    return errors


def assert_close(ref, fast, rtol):
    for name, err in relative_errors(ref, fast).items():
        assert err <= rtol, f"{name}: relative error {err:.2e}"


ROWS = [[9, 14, 7], [20, 10], [5]]  # packed documents; the last row is padded


@pytest.mark.parametrize("method", ["lora", "lora_bias", "full", "lora_head"])
def test_fast_path_equals_reference_fp32(method):
    """LoRA (the B blocks beside the frozen weights), LoRA over projections with biases (as Qwen2's
    q/k/v: stacked weights without the B blocks, one A product a group), full fine-tuning, LoRA with
    trainable embeddings and head: the model's own loss and gradients."""
    model = tiny_llama(attention_bias=method == "lora_bias")
    if method in ("lora", "lora_bias"):
        model = with_lora(model)
    elif method == "lora_head":
        model = with_lora(model, modules_to_save=["lm_head", "embed_tokens"])
    rows = packed_rows(ROWS)
    ref = loss_and_grads(model, dense_batch(rows, [0, 1, 2]))
    fast = FastCausalLM(model, torch.float32)
    got = loss_and_grads(fast, make_batch(rows, [0, 1, 2], 0, documents.ROWS))
    assert_close(ref, got, rtol=1e-4)


@pytest.mark.parametrize("frozen", ["lora_A", "lora_B"])
def test_frozen_adapter_halves_get_no_gradient(frozen):
    """With one half of every adapter frozen, the fast path gives the other half the model's own
    gradients and the frozen half none (its kernels skip what is not wanted)."""
    model = with_lora(tiny_llama())
    for name, p in model.named_parameters():
        if frozen in name:
            p.requires_grad_(False)
    rows = packed_rows(ROWS)
    ref = loss_and_grads(model, dense_batch(rows, [0, 1, 2]))
    fast = FastCausalLM(model, torch.float32)
    got = loss_and_grads(fast, make_batch(rows, [0, 1, 2], 0, documents.ROWS))
    assert got[1] and not any(frozen in name for name in got[1])
    assert_close(ref, got, rtol=1e-4)
    assert all(p.grad is None for name, p in model.named_parameters() if frozen in name)


def tiny_qwen3(seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(**CONFIG, head_dim=24)  # heads wider than hidden / heads, as Qwen3-8B's
    config._attn_implementation = "sdpa"
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():  # norms of ones would hide a query/key norm applied wrongly
        for name, p in model.named_parameters():
            if "q_norm" in name or "k_norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fast_path_equals_reference_for_qwen3(method):
    """Qwen3 (each query and key head RMS-normalized before the rotation): the model's own loss and
    every gradient, the norms' too when they train."""
    model = tiny_qwen3()
    if method == "lora":
        model = with_lora(model)
    rows = packed_rows(ROWS)
    ref = loss_and_grads(model, dense_batch(rows, [0, 1, 2]))
    got = loss_and_grads(FastCausalLM(model, torch.float32), make_batch(rows, [0, 1, 2], 0, documents.ROWS))
    assert method == "lora" or any("q_norm" in name for name in got[1])
    assert_close(ref, got, rtol=1e-4)


def gemma_weights(model, qk_scale: float = 1.0):
    """``model`` with its norms' weights away from zero (Gemma's (1 + weight) would hide a norm
    applied as Llama's) and its query/key projections scaled by ``qk_scale``."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 0.5)
            if "q_proj" in name or "k_proj" in name:
                p.mul_(qk_scale)
    return model


def tiny_gemma2(seed: int = 0, attn_softcap: float | None = 1.0, final_softcap: float | None = 0.5):
    """Gemma 2 with every feature the fast path computes mattering: a sliding window (5) shorter
    than the documents, attention and final logits soft-capped low enough to change them, a
    query scale other than 1/sqrt(head_dim), GQA, norms of (1 + weight) away from zero."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    config = Gemma2Config(**CONFIG, head_dim=16, sliding_window=5, attn_logit_softcapping=attn_softcap,
                          final_logit_softcapping=final_softcap, query_pre_attn_scalar=24)
    config._attn_implementation = "eager"
    return gemma_weights(Gemma2ForCausalLM(config), qk_scale=10.0)  # attention logits of a few units: the cap bites


def tiny_gemma3(seed: int = 0):
    """Gemma 3 (text): query/key norms of (1 + weight), a sliding window (5) shorter than the
    documents on every layer but the last, whose rotary base differs from the sliding layers'."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(**{**CONFIG, "num_hidden_layers": 3}, head_dim=16, sliding_window=5,
                              query_pre_attn_scalar=24, layer_types=["sliding_attention"] * 2 + ["full_attention"],
                              rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                                               "full_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    config._attn_implementation = "eager"
    return gemma_weights(Gemma3ForCausalLM(config))


@pytest.mark.parametrize("build,method", [(tiny_gemma2, "lora"), (tiny_gemma2, "full"), (tiny_gemma3, "lora"),
                                          (tiny_gemma3, "full")])
def test_fast_path_equals_reference_for_gemma(build, method):
    """Gemma 2 and 3 on the fast path: the loss and every gradient of the model's own forward (its
    documents apart, tunemake.train.documents, itself checked against each document alone)."""
    model = build()
    if method == "lora":
        model = with_lora(model)
    assert unsupported(model, torch.bfloat16) is None
    rows = packed_rows(ROWS)
    with documents.apart(model, documents.FLAT):
        ref = loss_and_grads(model, make_batch(rows, [0, 1, 2], 0, documents.FLAT))
    got = loss_and_grads(FastCausalLM(model, torch.float32), make_batch(rows, [0, 1, 2], 0, documents.ROWS))
    assert method == "lora" or any("pre_feedforward_layernorm" in name for name in got[1])
    assert_close(ref, got, rtol=1e-4)


# ranks and scales that differ between the projections of one product (PEFT's rank / alpha patterns)
MIXED = {"rank_pattern": {"k_proj": 4, "up_proj": 16}, "alpha_pattern": {"v_proj": 4, "gate_proj": 32}}


@pytest.mark.parametrize("checkpoint,options", [(False, {}), (True, {}), (False, MIXED), (False, {"use_rslora": True})])
def test_concatenated_lora_products_equal_reference(checkpoint, options):
    """q/k/v and gate/up with their LoRA B blocks in one product: same loss and gradients, also
    after an update (the B blocks are rewritten before each forward)."""
    model = with_lora(tiny_llama(), **options)
    reference = copy.deepcopy(model)
    fast = FastCausalLM(model, torch.float32, checkpoint=checkpoint)
    assert len(fast._lora_b_slots.pairs) == 2 * 5  # two layers, q/k/v and gate/up in each
    rows = packed_rows(ROWS)
    for _ in range(2):
        ref = loss_and_grads(reference, dense_batch(rows, [0, 1, 2]))
        got = loss_and_grads(fast, make_batch(rows, [0, 1, 2], 0, documents.ROWS))
        assert_close(ref, got, rtol=1e-4)
        with torch.no_grad():
            for net in (reference, model):
                for p in net.parameters():
                    if p.grad is not None:
                        p -= 0.5 * p.grad


def test_resources_count_what_the_concatenated_products_add():
    """tunemake.resources' estimate of the columns the concatenated products add beside the
    frozen weights equals what the fast path allocates (here with grouped-query attention)."""
    from tunemake.resources import concat_lora_columns, shape_from_config

    fast = FastCausalLM(with_lora(tiny_llama()), torch.float32)
    wides = [w for stacks in fast._stacked.values() for w in stacks]
    added = sum(w.tensor.numel() - sum(w.rows) * (w.tensor.shape[1] - sum(w.ranks)) for w in wides)
    method = {"r": 8, "dropout": 0.0, "target_modules": "all-linear"}
    assert added == concat_lora_columns(shape_from_config(CONFIG, "test"), method) > 0


def test_concatenated_lora_under_bf16_autocast():
    """bf16 frozen weights with fp32 adapters, as build_model keeps them: the concatenated products
    (B blocks rounded to bf16 beside the frozen weights) give the model's own loss and gradients
    within bf16 rounding, and fp32 gradients."""
    model = with_lora(tiny_llama(dtype=torch.bfloat16))
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()  # adapters in fp32, as build_model keeps them
    rows = packed_rows(ROWS)
    ref = loss_and_grads(copy.deepcopy(model), dense_batch(rows, [0, 1, 2]), autocast=torch.bfloat16)
    fast = FastCausalLM(model, torch.bfloat16)
    assert fast._lora_b_slots
    got = loss_and_grads(fast, make_batch(rows, [0, 1, 2], 0, documents.ROWS), autocast=torch.bfloat16)
    assert all(g.dtype == torch.float32 for g in got[1].values())
    assert_close(ref, got, rtol=3e-2)


def test_compiled_loss_gradient_matches_eager():
    """The cross-entropy's softmax and gradient as one compiled function (as on CUDA) give the
    eager ops' loss and gradient, for chunks of two sizes, the second without compiling again."""
    from tunemake.train.fast.loss import compiled_softmax_gradient, softmax_gradient

    gen = torch.Generator().manual_seed(0)
    for step, (rows, total) in enumerate(((300, 500), (170, 900))):
        logits = (torch.randn(rows, 1000, generator=gen) * 4).to(torch.bfloat16)
        targets = torch.randint(0, 1000, (rows,), generator=gen)
        loss, grad = softmax_gradient(logits, targets, total)
        with torch.compiler.set_stance("fail_on_recompile" if step else "default"):
            compiled_loss, compiled_grad = compiled_softmax_gradient()(logits, targets, total)
        assert grad.dtype == compiled_grad.dtype == torch.bfloat16
        torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=0)
        torch.testing.assert_close(compiled_grad.float(), grad.float(), rtol=8e-3, atol=1e-7)  # a bf16 ulp
        assert torch.allclose(grad.float().sum(1), torch.zeros(rows), atol=1e-4)  # softmax minus one-hot


def test_documents_do_not_see_each_other():
    """A document's loss does not change when another document of the row changes."""
    model = with_lora(tiny_llama())
    fast = FastCausalLM(model, torch.float32)
    batch = make_batch(packed_rows([[12, 12]]), [0], 0, documents.ROWS)
    batch["labels"][0, 11:] = -100  # targets in the first document only
    other = {k: v.clone() for k, v in batch.items()}
    other["input_ids"][0, 12:] = (other["input_ids"][0, 12:] + 5) % 97
    with torch.no_grad():
        assert torch.allclose(fast(**batch).loss, fast(**other).loss, rtol=1e-6)


def test_bf16_autocast_close_to_reference():
    model = with_lora(tiny_llama())
    rows = packed_rows(ROWS)
    ref = loss_and_grads(model, dense_batch(rows, [0, 1, 2]), autocast=torch.bfloat16)
    fast = FastCausalLM(model, torch.bfloat16)
    got = loss_and_grads(fast, make_batch(rows, [0, 1, 2], 0, documents.ROWS), autocast=torch.bfloat16)
    assert_close(ref, got, rtol=3e-2)


@pytest.mark.parametrize("method,autocast", [("lora", None), ("full", None), ("lora_dropout", None),
                                             ("lora", torch.bfloat16)])
def test_checkpointing_gives_the_same_gradients(method, autocast, monkeypatch):
    """Recomputed layers give the gradients of the plain pass, through tunemake's own recomputation
    (full fine-tuning too, where the first layer's input needs its gradient; LoRA dropout, whose
    masks the recomputation draws again from their seed; under autocast), not torch's checkpoint."""
    from tunemake.train.fast.layer import Recomputed

    model = tiny_llama() if method == "full" else with_lora(tiny_llama(), dropout=0.1 if method == "lora_dropout" else 0.0)
    model.train()
    batch = make_batch(packed_rows(ROWS), [0, 1, 2], 0, documents.ROWS)
    torch.manual_seed(3)
    dtype = autocast or torch.float32
    plain = loss_and_grads(FastCausalLM(model, dtype), batch, autocast)
    calls = {"own": 0, "torch": 0}
    own_apply, torch_checkpoint = Recomputed.apply, torch.utils.checkpoint.checkpoint

    def counted(kind, fn):
        def call(*args, **kwargs):
            calls[kind] += 1
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(Recomputed, "apply", counted("own", own_apply))
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counted("torch", torch_checkpoint))
    torch.manual_seed(3)
    fast = FastCausalLM(model, dtype, checkpoint=True)
    recomputed = loss_and_grads(fast, batch, autocast)
    assert_close(plain, recomputed, rtol=1e-6 if autocast is None else 1e-2)
    layers = CONFIG["num_hidden_layers"]
    assert calls == {"own": layers, "torch": 0}


def test_lora_dropout_masks_follow_the_seed():
    """Each projection gets its own mask, dropping about p of its inputs; a seed gives the same
    masks again (what a recomputed layer relies on), torch's seed a different run."""
    from tunemake.train.fast.weights import with_masks

    model = with_lora(tiny_llama(head_dim=32), dropout=0.25)  # o_proj's input: 4 heads x 32, not the hidden 64
    model.train()
    fast = FastCausalLM(model, torch.float32)
    weights = fast._cached_weights(fast._inner.layers[0])
    x = torch.zeros(2, 300, CONFIG["hidden_size"])

    def masks(seed):
        masked = with_masks(weights, x, seed)
        projs = (*masked.qkv.projs, masked.o_proj, *masked.gate_up.projs, masked.down_proj)
        return [p.dropout[0] for p in projs]

    first = masks(7)
    assert [m.shape[-1] for m in first] == [64, 64, 64, 128, 64, 64, CONFIG["intermediate_size"]]
    assert all(torch.equal(a, b) for a, b in zip(first, masks(7)))
    assert not torch.equal(first[0], first[1])  # q and k draw their own
    assert not torch.equal(first[0], masks(8)[0])
    dropped = 1 - torch.cat([m.reshape(-1) for m in first]).float().mean().item()
    assert abs(dropped - 0.25) < 0.02
    batch = make_batch(packed_rows(ROWS), [0, 1, 2], 0, documents.ROWS)
    runs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        runs.append(loss_and_grads(fast, batch))
    assert_close(runs[0], runs[1], rtol=0)
    name = next(n for n in runs[0][1] if "lora_A" in n)
    assert not torch.equal(runs[0][1][name], runs[2][1][name])


def test_recomputation_follows_parameters_unfrozen_later():
    """A parameter switched to trainable after the first step gets its gradient through the
    recomputed layers, as through the plain ones."""
    model = with_lora(tiny_llama())
    batch = make_batch(packed_rows(ROWS), [0, 1, 2], 0, documents.ROWS)
    recomputing = FastCausalLM(model, torch.float32, checkpoint=True)
    loss_and_grads(recomputing, batch)
    norm = model.base_model.model.model.layers[0].input_layernorm.weight
    norm.requires_grad_(True)
    plain = loss_and_grads(FastCausalLM(model, torch.float32), batch)
    recomputed = loss_and_grads(recomputing, batch)
    assert any("input_layernorm" in name for name in recomputed[1])
    assert_close(plain, recomputed, rtol=1e-6)


def test_recomputed_layers_refuse_a_second_backward():
    model = with_lora(tiny_llama())
    batch = make_batch(packed_rows(ROWS), [0, 1, 2], 0, documents.ROWS)
    loss = FastCausalLM(model, torch.float32, checkpoint=True)(**batch).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="ran twice"):
        loss.backward()


@pytest.mark.parametrize("build", [tiny_llama, tiny_gemma2])
def test_flex_attention_eager_matches_dense(monkeypatch, build):
    """Flex attention (the CUDA fallback where torch has no varlen attention, and Gemma 2's on
    CUDA: soft-capping as a score modification, sliding windows in the block mask) with its block
    mask per document equals the dense mask, run eagerly on the CPU."""
    import tunemake.train.fast.model as fast_model

    model = with_lora(build())
    batch = make_batch(packed_rows(ROWS), [0, 1, 2], 0, documents.ROWS)
    dense = loss_and_grads(FastCausalLM(model, torch.float32), batch)
    monkeypatch.setattr(fast_model, "choose_attention", lambda *args: "flex")
    try:
        flex = loss_and_grads(FastCausalLM(model, torch.float32), batch)
    except (RuntimeError, NotImplementedError) as exc:  # flex attention's eager path on this CPU build
        pytest.skip(f"flex attention does not run eagerly here: {exc}")
    assert_close(dense, flex, rtol=1e-4)


def test_lora_dropout_keeps_first_loss():
    """With dropout on the LoRA inputs the loss still matches at B = 0 (PEFT's init): same maths."""
    model = with_lora(tiny_llama(), dropout=0.1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.zero_()
    rows = packed_rows(ROWS)
    model.train()
    ref = loss_and_grads(model, dense_batch(rows, [0, 1, 2]))[0]
    got = loss_and_grads(FastCausalLM(model, torch.float32),
                         make_batch(rows, [0, 1, 2], 0, documents.ROWS))[0]
    assert abs(got.item() - ref.item()) <= 1e-5 * ref.item()


def test_cpu_falls_back_to_the_models_forward():
    model = with_lora(tiny_llama())
    stepped = step_model(model, Dist(), torch.bfloat16)
    assert stepped is model and fast_path(stepped) is None


def test_unsupported_models_are_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    assert "gpt2" in unsupported(gpt2)
    assert unsupported(with_lora(tiny_llama()), torch.float32) == "fp32 training"
    assert unsupported(with_lora(tiny_llama()), torch.bfloat16) is None
    with pytest.raises(ValueError, match="does not support"):
        FastCausalLM(gpt2, torch.bfloat16)


def nf4_weight(w, nested: bool, blocksize: int = 64, storage=torch.uint8):
    """``w`` quantized by bitsandbytes: (tunemake's NF4 view of it, bitsandbytes' own dequantization)."""
    import bitsandbytes.functional as bnbf

    from tunemake.nf4 import NF4

    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type="nf4",
                                       quant_storage=storage)
    param = torch.nn.Parameter(packed, requires_grad=False)
    param.quant_state = state
    return NF4.of(param), bnbf.dequantize_4bit(packed, state).to(w.dtype)


def test_nf4_dequantization_matches_bitsandbytes():
    pytest.importorskip("bitsandbytes")
    from tunemake.nf4 import dequantize

    torch.manual_seed(0)
    cases = [(torch.randn(96, 64, dtype=torch.bfloat16), nested, torch.uint8) for nested in (True, False)]
    cases.append((torch.randn(256, 320, dtype=torch.bfloat16) * 3, True, torch.uint8))  # 5 groups of block scales
    cases.append((torch.randn(96, 64, dtype=torch.bfloat16), True, torch.bfloat16))  # bytes stored as bf16
    cases.append((torch.randn(3, 21, dtype=torch.bfloat16), True, torch.uint8))  # 63 values, part of a block
    for w, nested, storage in cases:
        weight, expected = nf4_weight(w, nested, storage=storage)
        assert torch.equal(dequantize([weight], torch.bfloat16), expected)
    with pytest.raises(ValueError, match="cannot stack"):
        dequantize([nf4_weight(w, True)[0] for w in (torch.randn(4, 64), torch.randn(4, 128))], torch.bfloat16)


def test_nf4_plan_of_no_weights_is_empty():
    """A layer without NF4 weights (modules left unquantized) plans nothing and gets nothing."""
    from tunemake.nf4 import dequantize_plan, plan

    assert dequantize_plan(plan([]), torch.bfloat16) == []


def test_nf4_plan_gives_each_group_stacked():
    """A layer's groups (stacked or alone, of different widths) from one plan, as bitsandbytes gives them."""
    pytest.importorskip("bitsandbytes")
    from tunemake.nf4 import dequantize_plan, plan

    torch.manual_seed(0)
    shapes = [[(8, 64), (4, 64), (4, 64)], [(8, 64)], [(6, 128), (6, 128)], [(3, 21)]]
    pairs = [[nf4_weight(torch.randn(*shape, dtype=torch.bfloat16), True) for shape in group] for group in shapes]
    got = dequantize_plan(plan([[w for w, _ in group] for group in pairs]), torch.bfloat16)
    assert [tuple(g.shape) for g in got] == [(16, 64), (8, 64), (12, 128), (3, 21)]
    for values, group in zip(got, pairs):
        assert torch.equal(values, torch.cat([expected for _, expected in group]))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("nested,blocksize,dtype,storage", [
    (True, 64, torch.bfloat16, torch.uint8), (False, 64, torch.bfloat16, torch.uint8),
    (True, 128, torch.float16, torch.uint8), (True, 64, torch.bfloat16, torch.bfloat16)])
def test_nf4_kernel_matches_bitsandbytes(nested, blocksize, dtype, storage):
    """The Triton kernel, stacked weights of different heights and an odd number of values included,
    against bitsandbytes' own CUDA dequantization, bit for bit."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("triton")
    from tunemake.nf4 import _kernel, dequantize, dequantize_plan, plan

    assert _kernel is not None
    torch.manual_seed(0)
    weights, expected = [], []
    for rows in (320, 64, 1000):  # 1000 x 192 / 2 bytes: the last program of the kernel is partial
        weight, values = nf4_weight((torch.randn(rows, 192, device="cuda") * 2).to(dtype), nested, blocksize, storage)
        weights.append(weight)
        expected.append(values)
    assert torch.equal(dequantize(weights[:1], dtype), expected[0])
    assert torch.equal(dequantize(weights, dtype), torch.cat(expected))
    assert plan([weights]).launches[0][-1]  # whole 16-byte accesses
    odd, odd_values = nf4_weight(torch.randn(3, 21, device="cuda").to(dtype), nested, blocksize, storage)
    assert torch.equal(dequantize([odd], dtype), odd_values)
    # a layer's worth in one launch: the odd weight between two groups shifts the next one's start
    wide, wide_values = nf4_weight((torch.randn(40, 256, device="cuda")).to(dtype), nested, blocksize, storage)
    planned = plan([weights[:2], [odd], [weights[2]], [wide]])
    assert len(planned.launches) == 1 and not planned.launches[0][-1]  # the odd one: value by value
    got = dequantize_plan(planned, dtype)
    for values, want in zip(got, [torch.cat(expected[:2]), odd_values, expected[2], wide_values]):
        assert torch.equal(values, want)
    unshared, unshared_values = nf4_weight(torch.randn(8, 192, device="cuda").to(dtype), not nested, blocksize, storage)
    planned = plan([[weights[0], unshared]])  # double quantization and not: two launches
    assert len(planned.launches) == 2
    assert torch.equal(dequantize_plan(planned, dtype)[0], torch.cat([expected[0], unshared_values]))


@cuda
def test_block_copy_kernel_equals_torch_copies():
    """The LoRA B blocks written into the concatenated products' weights by one Triton launch:
    the same bits as torch's copies (fp32 rounded to bf16 to nearest even), for blocks of several
    row counts and ranks, again after a parameter's storage moved (the address table rebuilt),
    with autograd told of the write; blocks the kernel does not take (sources of mixed dtypes)
    fall back to torch's copies."""
    from tunemake.train.fast.kernels import BlockCopy

    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(4096, 64), (1024, 16), (11008, 64), (70, 12), (3, 5)]
    wide = torch.zeros(sum(r for r, _ in shapes), 300 + sum(c for _, c in shapes), dtype=torch.bfloat16, device="cuda")
    pairs, row, col = [], 0, 300
    for rows, cols in shapes:
        source = torch.nn.Parameter(torch.randn(rows, cols, device="cuda", generator=gen) * 3)
        pairs.append((wide[row:row + rows, col:col + cols], source))
        row, col = row + rows, col + cols
    copy = BlockCopy(pairs)

    def expected():
        out = torch.zeros_like(wide)
        row, col = 0, 300
        for _, source in pairs:
            out[row:row + source.shape[0], col:col + source.shape[1]] = source
            row, col = row + source.shape[0], col + source.shape[1]
        return out

    for step in range(3):
        version = wide._version
        copy()
        assert (copy._launch is not None) == (step < 2)  # the kernel, until the dtypes are mixed
        assert wide._version > version
        assert torch.equal(wide.view(torch.int16), expected().view(torch.int16))
        with torch.no_grad():
            if step == 0:  # an update in place, then one that moves a parameter's storage
                pairs[0][1].mul_(-0.5)
                pairs[2][1].data = torch.randn(11008, 64, device="cuda", generator=gen)
            else:  # one source in bf16: no longer one dtype
                pairs[1][1].data = pairs[1][1].data.to(torch.bfloat16) * 2


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_swiglu_backward_kernel_matches_torch(dtype):
    """SiLU's backward in one Triton pass, its input gradient with the LoRA term added by
    ``low_rank_add``: the gradient of [gate, up] and silu(gate) * up as the torch ops give them,
    within bf16/fp16 rounding of the fp32 maths, and the same bits but for Triton's sigmoid where
    the torch ops start from the same rounded input gradient; with and without the LoRA term and
    the output, for sizes and ranks that are no multiple of the kernels' tiles."""
    from tunemake.train.fast.kernels import swiglu_backward, swiglu_backward_torch

    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape, scale=3.0):
        return (torch.randn(*shape, device="cuda", generator=gen) * scale).to(dtype)

    for rows, cols, rank in ((37, 2752, 64), (130, 300, 8), (64, 256, 192)):
        dense, gate_up = rand(rows, cols), rand(rows, 2 * cols)
        xa, a = rand(rows, rank, scale=0.5), rand(rank, cols, scale=0.5)
        for lora, want_h in (((xa, a), True), ((None, None), False), ((None, None), True)):
            grad, h = swiglu_backward(dense, *lora, gate_up, want_h)
            grad_ref, h_ref = swiglu_backward_torch(dense, *lora, gate_up, want_h)  # all in fp32
            assert grad.shape == gate_up.shape and grad.dtype == dtype
            torch.testing.assert_close(grad, grad_ref, rtol=2 ** -6, atol=5e-2)
            assert h.shape == h_ref.shape == ((rows, cols) if want_h else (0,))
            torch.testing.assert_close(h, h_ref, rtol=2 ** -7, atol=1e-3)
            # the input gradient rounded once, as the kernels do: then mostly the same bits
            rounded = dense if lora[0] is None else torch.addmm(dense.float(), xa.float(), a.float()).to(dtype)
            same_start, _ = swiglu_backward_torch(rounded, None, None, gate_up, want_h)
            assert (grad.float() - same_start.float()).abs().gt(0).float().mean() < 0.02


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_rank_add_kernel_matches_addmm(dtype):
    """``c + x @ y`` for a low rank by one Triton kernel: torch's ``addmm`` in fp32, rounded once,
    for ``c`` with a row stride of its own (a slice of a wider tensor, as the concatenated
    products' backward passes it), ranks below the kernel's 16 and above its step of 64."""
    from tunemake.train.fast.kernels import low_rank_add

    gen = torch.Generator(device="cuda").manual_seed(0)
    for rows, cols, rank in ((2048, 4096, 192), (37, 300, 8), (130, 1000, 64)):
        wide = torch.randn(rows, cols + 70, device="cuda", generator=gen).to(dtype)
        c = wide[:, :cols]
        x = torch.randn(rows, rank, device="cuda", generator=gen).to(dtype)
        y = torch.randn(rank, cols, device="cuda", generator=gen).to(dtype)
        out = low_rank_add(c, x, y)
        assert out.shape == (rows, cols) and out.dtype == dtype and out.is_contiguous()
        expected = torch.addmm(c.float(), x.float(), y.float())
        torch.testing.assert_close(out.float(), expected, rtol=2 ** -7, atol=1e-2 * rank ** 0.5)


def fall_back_to(monkeypatch, backend: str):
    """Make tunemake.train.fast.attention.choose meet a machine without the backends it prefers to ``backend``."""
    from tunemake.train.fast import attention

    preferred = {"fa4": "fa4", "flash": "flash_available", "varlen": "varlen_function"}
    order = [*preferred, "flex"]
    for name in order[:order.index(backend)]:
        monkeypatch.setattr(attention, preferred[name], lambda: None)


def cuda_lora_model(kv_heads: int, **overrides):
    """A tiny bf16 Llama with fp32 LoRA adapters on CUDA, as build_model makes it."""
    model = with_lora(tiny_llama(dtype=torch.bfloat16, num_key_value_heads=kv_heads, **overrides)).cuda()
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def assert_close_on_cuda_batches(model, fast):
    """The fast path's loss and every gradient against the model's own forward under bf16 autocast,
    on three batches whose longest documents differ (the varlen kernels' ``max_len`` follows it)."""
    for rows in (ROWS, [[30, 5], [12, 12, 3]], [[60], [4, 4]]):
        batch = {k: v.cuda() for k, v in dense_batch(packed_rows(rows), range(len(rows))).items()}
        ref = loss_and_grads(model, batch, autocast=torch.bfloat16)
        lean = {k: v for k, v in batch.items() if k != "attention_mask"}
        got = loss_and_grads(fast, lean, autocast=torch.bfloat16)
        assert_close(ref, got, rtol=3e-2)


@cuda
@pytest.mark.parametrize("backend,kv_heads,head_dim", [("default", 4, 16), ("default", 2, 16), ("flash", 2, 32),
                                                       ("fa4", 2, 32), ("flex", 4, 16)])
def test_compiled_cuda_path_close_to_reference(backend, kv_heads, head_dim, monkeypatch):
    """The compiled path on CUDA against the model's own forward, with the attention backend the
    machine gives it: by default aten's flash attention for heads of 16 (too small for
    FlashAttention-4), FlashAttention-4 for heads of 32 where it is installed; aten's flash
    attention and flex attention where the backends before them are missing."""
    from tunemake.train.fast import attention

    if backend == "fa4" and attention.fa4() is None:
        pytest.skip("FlashAttention-4 is not installed or has no kernels for this GPU")
    if backend in ("default", "flash") and not attention.flash_available():
        pytest.skip("torch's flash attention ops take other arguments here")
    if backend in ("flash", "flex"):
        fall_back_to(monkeypatch, backend)
    model = cuda_lora_model(kv_heads, hidden_size=4 * head_dim)
    fast = FastCausalLM(model, torch.bfloat16)
    if backend == "default":
        assert not attention.fa4_head_dim_ok(head_dim)
    assert fast.attention == ("flash" if backend == "default" else backend)
    assert_close_on_cuda_batches(model, fast)


@cuda
def test_compiled_cuda_path_close_to_reference_for_qwen3():
    """Qwen3's query/key head norms in the compiled layer, LoRA under bf16 autocast."""
    model = with_lora(tiny_qwen3()).cuda()
    assert_close_on_cuda_batches(model, FastCausalLM(model, torch.bfloat16))


@cuda
@pytest.mark.parametrize("build", [tiny_gemma2, tiny_gemma3])
def test_compiled_cuda_path_close_to_reference_for_gemma(build):
    """Gemma 2 and 3 in the compiled layer (flex attention with soft-capping and sliding windows),
    LoRA under bf16 autocast: its loss and gradients are as close to the exact (fp32) maths as the
    model's own forward under the same autocast. bf16 alone puts both 3-7% off on some tensor of
    these tiny random models (soft-capped), so the two bf16 runs are not compared with each other."""
    model = with_lora(build()).cuda()
    fast = FastCausalLM(model, torch.bfloat16)
    assert fast.attention == "flex"
    for rows in (ROWS, [[30, 5], [12, 12, 3]]):
        packed = packed_rows(rows)
        flat = {k: v.cuda() if isinstance(v, torch.Tensor) else v
                for k, v in make_batch(packed, range(len(rows)), 0, documents.FLAT).items()}
        with documents.apart(model, documents.FLAT, torch.float32):
            exact = loss_and_grads(model, flat)
        with documents.apart(model, documents.FLAT, torch.bfloat16):
            own = loss_and_grads(model, flat, autocast=torch.bfloat16)
        lean = {k: v.cuda() for k, v in make_batch(packed, range(len(rows)), 0, documents.ROWS).items()}
        own_error = max(relative_errors(exact, own).values())
        assert_close(exact, loss_and_grads(fast, lean, autocast=torch.bfloat16), rtol=1.25 * own_error)


@cuda
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_public_varlen_attention_equals_reference(kv_heads, monkeypatch):
    """Where aten's private flash attention ops are missing (and FlashAttention-4 is not installed)
    the compiled path runs torch's public ``torch.nn.attention.varlen.varlen_attn``: its loss and
    every gradient equal the model's own forward within bf16 rounding, with grouped-query attention
    too where that torch's ``varlen_attn`` takes it."""
    from tunemake.train.fast import attention

    varlen = attention.varlen_function()
    if varlen is None:
        pytest.skip("torch has no torch.nn.attention.varlen here")
    if kv_heads != 4 and not varlen.gqa:
        pytest.skip("this torch's varlen_attn has no enable_gqa")
    fall_back_to(monkeypatch, "varlen")
    model = cuda_lora_model(kv_heads)
    fast = FastCausalLM(model, torch.bfloat16)
    assert fast.attention == "varlen"
    assert_close_on_cuda_batches(model, fast)


def test_fa4_failure_says_how_to_do_without(monkeypatch):
    """FlashAttention-4 compiles its kernels at the first call; when that fails the error says how
    to train without it."""
    import types

    from tunemake.train.fast import attention

    def broken(*args, **kwargs):
        raise ValueError("no kernel for this GPU")

    monkeypatch.setattr(attention, "fa4", lambda: types.SimpleNamespace(_flash_attn_fwd=broken, _flash_attn_bwd=broken))
    q = torch.zeros(4, 2, 32)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="no kernel for this GPU.*TUNEMAKE_FA4=0"):
        attention.fa4_forward(q, q, q, cu, 4, 0.1)
    with pytest.raises(RuntimeError, match="no kernel for this GPU.*TUNEMAKE_FA4=0"):
        attention.fa4_backward(q, q, q, q, q, torch.zeros(2, 4), cu, 4, 0.1)


def test_cpu_picks_dense_attention_without_compiling():
    """On the CPU the fast path decides by itself: dense attention, no compilation, no padding."""
    fast = FastCausalLM(with_lora(tiny_llama()), torch.float32)
    assert fast.attention == "dense" and not fast._compile


@cuda
@pytest.mark.parametrize("kv_heads", [32, 8])
def test_fa4_attention_matches_flash_attention(kv_heads):
    """FlashAttention-4 against aten's FlashAttention-2 on the bench's shapes (heads of 128, packed
    documents of 1 to 1,024 tokens): the same outputs and q/k/v gradients to bf16 rounding."""
    from tunemake.train.fast.attention import FA4Varlen, FlashVarlen, fa4, flash_available

    if fa4() is None or not flash_available():
        pytest.skip("needs FlashAttention-4 (package flash-attn-4) and torch's flash attention ops")
    lengths = [1, 1024, 130, 7, 600, 286]
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    tokens = sum(lengths)
    q = torch.randn(tokens, 32, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(tokens, kv_heads, 128, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    grad = torch.randn(tokens, 32, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    results = []
    for function in (FlashVarlen, FA4Varlen):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = function.apply(*leaves, cu, max(lengths), 128 ** -0.5)
        out.backward(grad)
        results.append([out.float(), *(t.grad.float() for t in leaves)])
    for ref, got in zip(*results):
        assert (ref - got).abs().max().item() < 0.05 * ref.abs().max().item()
        assert (ref - got).norm().item() < 1e-2 * ref.norm().item()


@cuda
def test_compiled_recomputation_draws_the_same_dropout_masks():
    """LoRA dropout on CUDA, compiled: the recomputed layers apply the masks their first pass drew,
    so checkpointing gives the loss and gradients of the plain pass (a mask drawn afresh in the
    recomputation would not)."""
    model = with_lora(tiny_llama(dtype=torch.bfloat16), dropout=0.1).cuda()
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    batch = {k: v.cuda() for k, v in make_batch(packed_rows(ROWS), [0, 1, 2], 0, documents.ROWS).items()}
    runs = []
    for checkpoint in (False, True):
        torch.manual_seed(5)
        runs.append(loss_and_grads(FastCausalLM(model, torch.bfloat16, checkpoint=checkpoint), batch,
                                   autocast=torch.bfloat16))
    # bf16: the first pass runs the compiled inference graph, the recomputation the training one
    # (1.2% apart on the H200); masks drawn afresh put the gradients about 50% apart
    assert_close(runs[0], runs[1], rtol=3e-2)


def qlora_tiny(device: str):
    """A tiny Llama with NF4 (double-quantized) base weights and LoRA, as build_model makes for QLoRA."""
    import bitsandbytes as bnb
    from peft import prepare_model_for_kbit_training

    from tunemake.train.model import _disable_bnb_cpu_repacking

    # bitsandbytes' CPU kernels want in_features a multiple of 64
    model = tiny_llama(dtype=torch.bfloat16, intermediate_size=128).to(device)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and child is not model.lm_head:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=torch.bfloat16,
                                      quant_type="nf4", device="cpu")
                q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
                setattr(parent, name, q.to(device))
    model.is_loaded_in_4bit = True
    model = with_lora(prepare_model_for_kbit_training(copy.deepcopy(model), use_gradient_checkpointing=False))
    _disable_bnb_cpu_repacking(model)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_qlora_path_close_to_reference(device):
    """NF4 weights dequantized per layer (tunemake.nf4; its Triton kernel on CUDA), the layer
    recomputed in the backward pass, against bitsandbytes' own layers."""
    pytest.importorskip("bitsandbytes")
    model = qlora_tiny(device)
    batch = {k: v.to(device) for k, v in dense_batch(packed_rows(ROWS), [0, 1, 2]).items()}
    ref = loss_and_grads(model, batch, autocast=torch.bfloat16)
    fast = FastCausalLM(model, torch.bfloat16)
    assert fast._checkpoint
    got = loss_and_grads(fast, {k: v for k, v in batch.items() if k != "attention_mask"}, autocast=torch.bfloat16)
    assert_close(ref, got, rtol=3e-2)
