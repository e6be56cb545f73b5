"""NF4 dequantization for the fast path: bitsandbytes 4-bit weights back to bf16/fp16, one layer at a time.

:func:`dequantize` gives the same values as ``bitsandbytes.functional.dequantize_4bit`` (bit for
bit), for one weight or several stacked row-wise (q/k/v, gate/up). On CUDA with Triton it is one
hand-written kernel per weight (``_dequantize_kernel``: packed bytes in, value pairs out, 3.1 TB/s
on an H200, 2.6x bitsandbytes' own); elsewhere it is written in torch ops (the reference, and the
CPU tests). It runs eagerly: :mod:`tunemake.fast` calls it before each call of the compiled layer.

Supported: NF4 with or without double quantization (8-bit block scales), any block size (a last
block may be partial), the packed bytes stored in any dtype (bitsandbytes' ``quant_storage``).
Not here: FP4 (the fast path calls bitsandbytes' own kernel for it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
    from torch._inductor.runtime.triton_helpers import libdevice
except Exception:  # no Triton (the CPU), or one that this torch cannot use: the torch ops serve
    triton = None


@dataclass(frozen=True, eq=False)
class NF4:
    """A bitsandbytes NF4 weight as plain tensors, read once per layer by :mod:`tunemake.fast`.

    ``absmax`` holds the per-block scales: float32, or uint8 codes into ``code2`` with one float
    ``absmax2`` per ``blocksize2`` blocks plus ``offset`` when double-quantized.
    """

    packed: torch.Tensor  # uint8, two 4-bit codes a byte, high nibble first
    absmax: torch.Tensor
    code: torch.Tensor  # the 16 NF4 values
    blocksize: int
    shape: tuple
    absmax2: torch.Tensor | None = None
    code2: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    blocksize2: int = 0

    @classmethod
    def of(cls, weight) -> "NF4":
        """From a ``bitsandbytes.nn.Params4bit`` quantized as NF4."""
        state = weight.quant_state
        nested = {}
        if state.nested:
            nested = dict(absmax2=state.state2.absmax, code2=state.state2.code, offset=state.offset,
                          blocksize2=state.state2.blocksize)
        # the packed bytes, whatever dtype they are stored in (bitsandbytes' ``quant_storage``)
        packed = weight.data.reshape(-1).view(torch.uint8)
        return cls(packed, state.absmax, state.code, state.blocksize, tuple(state.shape), **nested)

    @property
    def rows(self) -> int:
        return self.shape[0]


def dequantize(weights: list[NF4], dtype: torch.dtype) -> torch.Tensor:
    """``weights`` dequantized and stacked row-wise in ``dtype``.

    Raises:
        ValueError: the weights do not share their column count.
    """
    if len({w.shape[1] for w in weights}) > 1:
        raise ValueError(f"cannot stack weights of shapes {[w.shape for w in weights]}")
    if weights[0].packed.is_cuda and _kernel is not None:
        return _kernel(weights, dtype)
    parts = [_dequantize_torch(w, dtype) for w in weights]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _dequantize_torch(w: NF4, dtype: torch.dtype) -> torch.Tensor:
    n = w.shape[0] * w.shape[1]
    index = torch.stack([w.packed >> 4, w.packed & 15], dim=-1).reshape(-1)[:n].long()  # high nibble first
    absmax = w.absmax
    if w.absmax2 is not None:
        absmax = w.code2[absmax.long()] * w.absmax2.repeat_interleave(w.blocksize2)[: absmax.numel()] + w.offset
    return (w.code[index] * absmax.float().repeat_interleave(w.blocksize)[:n]).view(w.shape).to(dtype)


if triton is not None:
    @triton.jit
    def _dequantize_kernel(packed, absmax, absmax2, code2, offset, code, out, n_values,
                           HALF_BLOCK: tl.constexpr, BLOCKS2: tl.constexpr, NESTED: tl.constexpr,
                           BYTES: tl.constexpr):
        start = tl.program_id(0).to(tl.int64) * BYTES
        i = start + tl.arange(0, BYTES)
        live = i < (n_values + 1) // 2
        byte = tl.load(packed + i, mask=live, other=0).to(tl.int32)
        block = i // HALF_BLOCK
        if NESTED:
            q = tl.load(absmax + block, mask=live, other=0).to(tl.int32)
            # multiplied, rounded, then added, as bitsandbytes does: no fused multiply-add
            scale = libdevice.mul_rn(tl.load(code2 + q, mask=live, other=0.0),
                                     tl.load(absmax2 + block // BLOCKS2, mask=live, other=0.0))
            scale = scale + tl.load(offset)
        else:
            scale = tl.load(absmax + block, mask=live, other=0.0)
        high = libdevice.mul_rn(tl.load(code + (byte >> 4), mask=live, other=0.0), scale)
        low = libdevice.mul_rn(tl.load(code + (byte & 15), mask=live, other=0.0), scale)
        j = 2 * start + tl.arange(0, 2 * BYTES)
        tl.store(out + j, tl.interleave(high, low).to(out.dtype.element_ty), mask=j < n_values)

    def _dequantize_cuda(weights: list[NF4], dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty(sum(w.rows for w in weights), weights[0].shape[1], dtype=dtype,
                          device=weights[0].packed.device)
        start, bytes_per_program = 0, 1024
        with torch.cuda.device(out.device):  # Triton launches on the current device
            for w in weights:
                nested = w.absmax2 is not None
                n_values = w.shape[0] * w.shape[1]
                # without double quantization absmax2, code2 and offset are not read: any pointer will do
                _dequantize_kernel[(triton.cdiv((n_values + 1) // 2, bytes_per_program),)](
                    w.packed, w.absmax, w.absmax2 if nested else w.absmax, w.code2 if nested else w.code,
                    w.offset if nested else w.code, w.code, out[start:start + w.rows], n_values,
                    HALF_BLOCK=w.blocksize // 2, BLOCKS2=max(w.blocksize2, 1), NESTED=nested,
                    BYTES=bytes_per_program)
                start += w.rows
        return out

    _kernel = _dequantize_cuda
else:
    _kernel = None
