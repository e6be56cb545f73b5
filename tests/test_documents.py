"""Packed rows reach the model as their documents (tunemake.train.documents): no O(L²) mask, and a
document computes inside a packed row as it computes alone, for every kind of model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from packed import dense_batch, packed_rows
from tunemake.encode import IGNORE_INDEX
from tunemake.train.batches import make_batch
from tunemake.train.documents import DOCUMENTS, FLAT, ROWS, apart, layout_for
from tunemake.train.documents import make_batch as pieces_batch

SHAPE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
LENGTHS = (7, 12, 9)  # the middle document is the one checked; Gemma 2's window (5) is shorter


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**SHAPE))


def qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(**SHAPE, head_dim=16))


def gemma2():
    """Sliding-window layers (window 5) between global ones, attention logits soft-capped at 1.0
    (low enough that leaving it out changes the logits); eager attention, the exact maths."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(**SHAPE, head_dim=16, sliding_window=5, attn_logit_softcapping=1.0,
                          final_logit_softcapping=30.0, query_pre_attn_scalar=16)
    config._attn_implementation = "eager"
    return Gemma2ForCausalLM(config)


def phi3():
    """An architecture the fast path does not cover."""
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM(Phi3Config(**SHAPE, pad_token_id=0))


def remote_code(offline_hub):
    """The hub fixture's InternLM: remote code that does not declare the attention interface."""
    from hub_fixture import INTERNLM
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(INTERNLM, trust_remote_code=True)


MODELS = {"llama": llama, "qwen3": qwen3, "gemma2": gemma2}


@pytest.fixture(params=[*MODELS, "remote_code"])
def model(request):
    torch.manual_seed(0)
    if request.param == "remote_code":
        return remote_code(request.getfixturevalue("offline_hub")).float()
    return MODELS[request.param]()


def one_row(vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=sum(LENGTHS))
    positions = np.concatenate([np.arange(n) for n in LENGTHS])
    return ids, ids.copy(), positions


def middle_logits(model, batch, layout):
    """The middle document's logits, wherever the layout put it."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    start, end = LENGTHS[0], LENGTHS[0] + LENGTHS[1]
    return logits[0, start:end] if layout == FLAT else logits[1, :LENGTHS[1]]


def logits_and_grads(model, compute):
    model.zero_grad(set_to_none=True)
    logits = compute()
    weights = torch.linspace(-1, 1, logits.numel()).reshape(logits.shape)
    (logits * weights).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_a_document_inside_a_packed_row_computes_as_it_does_alone(model):
    """Logits and every gradient of the middle document of a packed row equal, to about 1e-5 in
    fp32, those of the document fed alone through the model's own attention."""
    layout = layout_for(model, fast=False)
    ids, labels, positions = one_row(model.config.vocab_size)
    batch = pieces_batch([(ids, labels, positions)], 0, layout)
    with apart(model, layout):
        packed, packed_grads = logits_and_grads(model, lambda: middle_logits(model, batch, layout))
    start, end = LENGTHS[0], LENGTHS[0] + LENGTHS[1]
    alone, alone_grads = logits_and_grads(model, lambda: model(input_ids=torch.from_numpy(ids[None, start:end]),
                                                               use_cache=False).logits[0])
    assert torch.allclose(packed, alone, atol=1e-5), (packed - alone).abs().max()
    assert packed_grads.keys() == alone_grads.keys() and packed_grads
    for name, grad in alone_grads.items():
        assert torch.allclose(packed_grads[name], grad, atol=1e-5, rtol=1e-4), name
    # the whole row as one causal sequence gives other logits: the check can tell
    with torch.no_grad():
        leaky = model(input_ids=torch.from_numpy(ids[None]), use_cache=False).logits[0, start:end]
    assert not torch.allclose(leaky, alone, atol=1e-3)


def test_models_go_to_the_layout_their_code_takes(offline_hub):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    assert layout_for(llama(), fast=False) == FLAT
    assert layout_for(get_peft_model(gemma2(), LoraConfig(target_modules=["q_proj"])), fast=False) == FLAT
    assert layout_for(remote_code(offline_hub), fast=False) == DOCUMENTS
    assert layout_for(llama(), fast=True) == ROWS


def test_attention_is_put_back_after_the_block():
    """Generation after training's forward runs on the model's own attention (with its cache and
    padding mask), which the document attention does not serve."""
    model = gemma2()
    ids, labels, positions = one_row(model.config.vocab_size)
    with apart(model, FLAT):
        assert model.config._attn_implementation == "tunemake_documents"
        model(**{k: v for k, v in pieces_batch([(ids, labels, positions)], 0, FLAT).items() if k != "labels"})
    assert model.config._attn_implementation == "eager"
    prompt = torch.from_numpy(ids[None, :6])
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 10)


def test_flat_rows_hold_every_document_once_without_padding():
    rows = packed_rows([[9, 14, 7], [20, 10], [5]])
    flat = make_batch(rows, [0, 1, 2], 0, FLAT)
    assert flat["input_ids"].shape == (1, 65)
    assert flat["cu_seq_lens_q"].tolist() == [0, 9, 23, 30, 50, 60, 65] and flat["max_length_q"] == 20
    starts = flat["cu_seq_lens_q"][:-1].long()
    assert (flat["position_ids"][0, starts] == 0).all() and (flat["labels"][0, starts] == IGNORE_INDEX).all()
    documents = make_batch(rows, [0, 1, 2], 0, DOCUMENTS)
    assert documents["input_ids"].shape == (6, 20)
    assert documents["attention_mask"].sum(1).tolist() == [9, 14, 7, 20, 10, 5]


@pytest.mark.parametrize("layout", [FLAT, DOCUMENTS])
def test_a_batch_of_packed_rows_trains_as_with_the_dense_mask(layout):
    """The loss and gradients of three packed rows (one padded) equal the dense-mask reference's."""
    torch.manual_seed(0)
    model = llama()
    rows = packed_rows([[9, 14, 7], [20, 10], [5]])
    results = []
    for batch, where in ((dense_batch(rows, [0, 1, 2]), ROWS), (make_batch(rows, [0, 1, 2], 0, layout), layout)):
        model.zero_grad(set_to_none=True)
        with apart(model, where):
            loss = model(**batch, use_cache=False).loss
            loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ref_loss, ref_grads), (loss, grads) = results
    assert torch.allclose(loss, ref_loss, atol=1e-6)
    for name, grad in ref_grads.items():
        assert torch.allclose(grads[name], grad, atol=1e-5, rtol=1e-4), name


def lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                 "up_proj", "down_proj"]))


CUDA = torch.device("cuda")


@pytest.mark.parametrize("device,zero_stage,fast,why", [
    (CUDA, None, True, "training through the fast path"),
    (CUDA, 1, True, "training through the fast path"),
    (CUDA, 2, True, "training through the fast path"),
    (CUDA, 3, False, "documents in one flat row, attention tunemake_documents; not the fast path: ZeRO-3 "
                     "partitions the weights"),
    (torch.device("cpu"), None, False, "not the fast path: it runs on CUDA only"),
])
def test_one_function_says_which_way_a_step_goes_and_why(device, zero_stage, fast, why):
    """The fast path where its weights are whole on every process: without DeepSpeed, ZeRO-1 and 2.
    (The device is only named: nothing runs on it.)"""
    from tunemake.train.engine import route

    torch.manual_seed(0)
    way = route(lora(llama()), device, torch.bfloat16, zero_stage)
    assert (way.fast, way.layout) == (fast, ROWS if fast else FLAT)
    assert why in way.why


def test_models_the_fast_path_does_not_take_are_named(offline_hub, monkeypatch):
    from tunemake.train.engine import route

    torch.manual_seed(0)
    assert "not the fast path: it does not support model_type 'phi3' (supported: llama," in route(
        lora(phi3()), CUDA, torch.bfloat16, 2).why
    # (on a GPU with liger-kernel installed, the route's reason is followed by what Liger replaces)
    assert "not the fast path: it does not support fp32 training" in route(lora(llama()), CUDA, None).why
    way = route(remote_code(offline_hub), CUDA, torch.bfloat16)
    assert way.layout == DOCUMENTS and "padded batch" in way.why
    assert route(lora(gemma2()), CUDA, torch.bfloat16).fast
    monkeypatch.setenv("TUNEMAKE_FAST", "0")
    assert "not the fast path: TUNEMAKE_FAST=0" in route(lora(llama()), CUDA, torch.bfloat16).why


def _steps_under(deepspeed: bool) -> dict[str, torch.Tensor]:
    """Three optimizer steps (two micro-batches each) of a LoRA Llama through the fast path, under a
    ZeRO-2 DeepSpeed engine or tunemake's torch engine; the trained weights after them."""
    from tunemake.train.engine import DeepSpeedEngine, TorchEngine, deepspeed_config
    from tunemake.train.fast import FastCausalLM
    from tunemake.train.launch import Dist
    from tunemake.train.spec import Settings

    torch.manual_seed(0)
    model = lora(llama())
    train = Settings(seed=0, batch_size=2, grad_accumulation=2, lr=1e-2, weight_decay=0.0, betas=(0.9, 0.999),
                     max_grad_norm=1.0, precision="fp32", deepspeed="zero2" if deepspeed else None, gpus=None,
                     nodes=1, nproc=1, epochs=1, schedule={}, save_steps=1000)
    stepped = FastCausalLM(model, torch.float32)
    dist = Dist()
    engine = (DeepSpeedEngine(stepped, train, dist, deepspeed_config(train, 1)) if deepspeed
              else TorchEngine(stepped, train, dist, None))
    rows = packed_rows([[9, 14, 7], [20, 10], [5, 6], [30], [4, 4, 4], [12, 3]] * 2)
    for step in range(3):
        for micro in range(2):
            first = (step * 2 + micro) * 2
            engine.forward_backward(make_batch(rows, [first, first + 1], 0, ROWS), 2, boundary=micro == 1)
        engine.step()
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_the_fast_path_under_zero2_trains_as_without_deepspeed(tmp_path):
    """DeepSpeed ZeRO-2 around the fast path (its gradient hooks, flattened weights) trains the
    same weights as torch's AdamW around it. In a subprocess: DeepSpeed sets up torch.distributed."""
    import subprocess
    import sys

    script = ("import sys, torch; sys.path[:0] = ['tests']; import test_documents as t; "
              f"torch.save(t._steps_under(True), {str(tmp_path / 'zero2.pt')!r})")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    zero2 = torch.load(tmp_path / "zero2.pt", weights_only=True)
    plain = _steps_under(False)
    assert zero2.keys() == plain.keys() and plain
    for name, weight in plain.items():
        assert torch.allclose(zero2[name], weight, atol=1e-6), name
    assert all(w.abs().sum() > 0 for n, w in plain.items() if "lora_B" in n)  # lora_B starts at zero: it trained


def test_bf16_deepspeed_skips_the_per_tensor_overflow_check_unless_asked(tmp_path):
    """bf16 needs no loss scale, so DeepSpeed's inf/nan check of every gradient tensor, which costs
    CPU time each step, is off; a config file that sets it keeps its value."""
    import json
    from dataclasses import replace

    from tunemake.train.engine import deepspeed_config
    from tunemake.train.spec import Settings

    train = Settings(seed=0, batch_size=2, grad_accumulation=1, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999),
                     max_grad_norm=1.0, precision="bf16", deepspeed="zero2", gpus=1, nodes=1, nproc=1, epochs=1,
                     schedule={}, save_steps=10)
    assert deepspeed_config(train, 1)["bf16"] == {"enabled": True, "check_grad_overflow": False}
    assert "check_grad_overflow" not in deepspeed_config(replace(train, precision="fp16"), 1)["bf16"]
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto", "check_grad_overflow": True}}))
    assert deepspeed_config(replace(train, deepspeed=str(path)), 1)["bf16"]["check_grad_overflow"] is True


def gemma2_no_softcap():
    """Gemma 2's sliding window (5) without soft-capping: what torch's varlen kernel takes."""
    model = gemma2()
    model.config.attn_logit_softcapping = None
    return model


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("build", [llama, qwen3, gemma2_no_softcap])
def test_on_cuda_a_flat_row_goes_through_the_varlen_kernel_as_documents_alone(build):
    """bf16 on CUDA: one varlen kernel for the row (grouped-query heads, a sliding window), the
    middle document's logits as the document's own alone, to bf16's precision."""
    from tunemake.train import documents

    assert documents._varlen() is not None  # torch >= 2.11: the kernel, not the loop per document
    torch.manual_seed(0)
    model = build().to("cuda", torch.bfloat16)
    ids, labels, positions = one_row(model.config.vocab_size)
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v
             for k, v in pieces_batch([(ids, labels, positions)], 0, FLAT).items()}
    start, end = LENGTHS[0], LENGTHS[0] + LENGTHS[1]
    with torch.no_grad():
        with apart(model, FLAT, torch.bfloat16):
            packed = middle_logits(model, batch, FLAT).float()
        alone = model(input_ids=torch.from_numpy(ids[None, start:end]).cuda(), use_cache=False).logits[0].float()
        leaky = model(input_ids=torch.from_numpy(ids[None]).cuda(), use_cache=False).logits[0, start:end].float()
    error, leak = ((x - alone).abs().max() / alone.abs().max() for x in (packed, leaky))
    assert error < 2e-2 and leak > 4 * error, (error, leak)  # the check can tell attention across documents
