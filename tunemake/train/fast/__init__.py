"""The train stage's fast path on CUDA: the decoder's forward written out for LoRA / QLoRA / full training.

:class:`FastCausalLM` wraps the model :func:`tunemake.train.model.build_model` made and returns the
same loss, from the same weights and gradients into the same parameters, as the model's own
forward under autocast; it only computes it with fewer passes over memory:

- ``attention``: attention over packed documents by varlen flash attention (FlashAttention-4
  where installed, else aten's FlashAttention-2), so no dense mask and no attention across
  documents;
- ``layer``: each decoder layer compiled once with ``torch.compile`` and run for every layer;
  gradient checkpointing whose first pass runs without autograd (:class:`layer.Recomputed`);
- ``weights``: frozen q/k/v and gate/up weights stacked, one matrix product per group; LoRA
  dropout masks drawn outside the compiled layer from a seed per layer call, so that a recomputed
  layer draws the same ones; QLoRA's 4-bit weights dequantized per layer by :mod:`tunemake.nf4`
  and never kept;
- ``lora``: with LoRA (no dropout) the adapters' B blocks beside the frozen weights, so base and
  LoRA outputs come from one product (:class:`lora.ConcatLora`); the MLP's SiLU and down
  projection as one function (:class:`lora.GatedDown`);
- ``kernels``: the Triton kernels those use (rank-r terms added in one pass, SiLU's backward in
  one pass, the B blocks copied in one launch), with torch ops where Triton cannot run;
- ``loss``: the cross-entropy computed chunk by chunk from the last hidden state, gradient
  included, so the full logits are never held.

Supported: Llama-architecture decoders (``model_type`` llama, mistral without sliding window,
qwen2 without sliding window, qwen3 with its query/key norms), SiLU MLP; Gemma 2 and Gemma 3's
text model (norms of (1 + weight) after attention and the MLP too, GeGLU, scaled embeddings,
Gemma 2's soft-capped attention and final logits, sliding-window layers with Gemma 3's own
rotary base, Gemma 3's query/key norms: attention by flex attention on CUDA); q/k/v biases,
grouped-query attention, rope scaling (the
model's own rotary module is used), plain LoRA adapters (one active adapter, any dropout, rsLoRA
scaling), NF4/FP4 bitsandbytes base weights, full fine-tuning, trainable embeddings / head
(``modules_to_save``), bf16 or fp16 autocast, DDP. Not supported (:func:`unsupported` says why
and the train stage runs the model's own forward instead): DoRA and other LoRA variants, 8-bit
base weights, sliding-window attention outside Gemma 2, attention dropout, other architectures,
fp32 training, ZeRO-3.
On the CPU the same code runs without compilation and with a dense mask, for the tests.
"""

from .model import LENGTH_MULTIPLE, FastCausalLM
from .support import ARCHITECTURES, unsupported

__all__ = ["ARCHITECTURES", "LENGTH_MULTIPLE", "FastCausalLM", "unsupported"]
