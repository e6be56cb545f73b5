"""NF4 dequantization for the fast path: bitsandbytes 4-bit weights back to bf16/fp16, one layer at a time.

:func:`dequantize` gives the same values as ``bitsandbytes.functional.dequantize_4bit`` (bit for
bit), for one weight or several stacked row-wise (q/k/v, gate/up); :func:`plan` and
:func:`dequantize_plan` do a whole layer's weights into one buffer. On CUDA with Triton it is a
hand-written kernel (``_dequantize_kernel``: packed bytes in, value pairs out, 3.1 TB/s on an
H200, 2.6x bitsandbytes' own) launched once for all the weights of a plan, which it finds through
a table of their addresses (the CPU's time per launch is what a QLoRA step waits for on slow
hosts); elsewhere it is written in torch ops (the reference, and the CPU tests). It runs eagerly:
:mod:`tunemake.train.fast` calls it before each call of the compiled layer.

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
    from triton.language.extra import libdevice  # Triton >= 3.0 (torch >= 2.5 ships it)
except Exception:  # no Triton (the CPU), or one without libdevice's rounding ops: the torch ops serve
    triton = None


@dataclass(frozen=True, eq=False)
class NF4:
    """A bitsandbytes NF4 weight as plain tensors, read once per layer by :mod:`tunemake.train.fast`.

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


@dataclass(frozen=True, eq=False)
class Plan:
    """Groups of NF4 weights dequantized together: each group stacked row-wise, all groups in one
    buffer; on CUDA by one kernel launch per run of weights that share block sizes and code
    tables (one for a whole Llama layer), from a table of their addresses built once.

    The plan holds the weights it was built from: their tensors must not move while it is used.
    """

    groups: tuple  # tuple of tuples of NF4
    launches: tuple = ()  # (table, programs, first weight, weights, aligned) per launch; () without the kernel

    def sizes(self) -> list[int]:
        return [sum(w.rows for w in group) * group[0].shape[1] for group in self.groups]


#: packed bytes per program of the kernel (it writes twice as many values)
BYTES_PER_PROGRAM = 1024


def plan(groups) -> Plan:
    """A :class:`Plan` for ``groups`` (lists of NF4 weights, each stacked row-wise).

    Raises:
        ValueError: the weights of a group do not share their column count.
    """
    groups = tuple(tuple(group) for group in groups)
    for group in groups:
        if len({w.shape[1] for w in group}) > 1:
            raise ValueError(f"cannot stack weights of shapes {[w.shape for w in group]}")
    weights = [w for group in groups for w in group]
    if not weights or _kernel is None or not all(_kernel_reads(w) for w in weights):
        return Plan(groups)
    launches, begin, values = [], 0, 0
    for i in range(1, len(weights) + 1):
        if i == len(weights) or not _shareable(weights[begin], weights[i]):
            launches.append(_table(weights[begin:i], begin, values))
            values += sum(w.shape[0] * w.shape[1] for w in weights[begin:i])
            begin = i
    return Plan(groups, tuple(launches))


def dequantize_plan(planned: Plan, dtype: torch.dtype) -> list[torch.Tensor]:
    """The plan's groups dequantized in ``dtype``: one [rows, columns] tensor per group, all views
    of one buffer."""
    if not planned.groups:  # a layer without NF4 weights
        return []
    sizes = planned.sizes()
    if planned.launches:
        flat = _kernel(planned, dtype, sum(sizes))
    else:
        flat = torch.cat([_dequantize_torch(w, dtype).reshape(-1) for group in planned.groups for w in group])
    return [part.view(-1, group[0].shape[1]) for part, group in zip(flat.split(sizes), planned.groups)]


def dequantize(weights: list[NF4], dtype: torch.dtype) -> torch.Tensor:
    """``weights`` dequantized and stacked row-wise in ``dtype``.

    Plans at each call (the addresses table goes to the GPU each time): for the same weights again
    and again, as the fast path does, :func:`plan` once and :func:`dequantize_plan` per call.

    Raises:
        ValueError: the weights do not share their column count.
    """
    return dequantize_plan(plan([weights]), dtype)[0]


def _kernel_reads(w: NF4) -> bool:
    """Whether the CUDA kernel reads ``w`` as stored (bitsandbytes' dtypes for the scales and tables)."""
    floats = [w.code] + ([w.absmax2, w.code2, w.offset] if w.absmax2 is not None else [])
    return (w.packed.is_cuda and w.absmax.dtype == (torch.uint8 if w.absmax2 is not None else torch.float32)
            and all(t.dtype == torch.float32 for t in floats))


def _shareable(a: NF4, b: NF4) -> bool:
    """Whether one kernel launch can dequantize both (the kernel's constants and tables agree)."""
    same = (a.blocksize, a.blocksize2, a.absmax2 is None, a.absmax.dtype, a.packed.device) == \
           (b.blocksize, b.blocksize2, b.absmax2 is None, b.absmax.dtype, b.packed.device)
    return same and torch.equal(a.code, b.code) and (a.code2 is None or torch.equal(a.code2, b.code2))


def _table(run: list[NF4], first: int, values: int):
    """One launch's work (``run``: the weights from the plan's ``first``, whose values start at
    ``values`` in the buffer): per weight its addresses, where its values start, how many values
    and bytes, its first program; and whether every packed weight, start in the buffer and count
    is a multiple of 16 bytes (then the kernel reads and writes 16 bytes at a time)."""
    rows, out, programs, aligned = [], 0, 0, True
    for w in run:
        n_values = w.shape[0] * w.shape[1]
        nested = w.absmax2 is not None
        # without double quantization absmax2 and offset are not read: any address will do
        rows.append([w.packed.data_ptr(), w.absmax.data_ptr(), (w.absmax2 if nested else w.absmax).data_ptr(),
                     (w.offset if nested else w.absmax).data_ptr(), out, n_values, (n_values + 1) // 2, programs])
        # 16 bytes at a time: 32 values, 8 of 2 or 4 bytes in the output
        aligned = aligned and w.packed.data_ptr() % 16 == 0 and (values + out) % 8 == 0 and n_values % 32 == 0
        out += n_values
        programs += -(-((n_values + 1) // 2) // BYTES_PER_PROGRAM)
    table = torch.tensor(rows, dtype=torch.int64, device=run[0].packed.device)
    return table, programs, first, len(run), aligned


def _dequantize_torch(w: NF4, dtype: torch.dtype) -> torch.Tensor:
    n = w.shape[0] * w.shape[1]
    index = torch.stack([w.packed >> 4, w.packed & 15], dim=-1).reshape(-1)[:n].long()  # high nibble first
    absmax = w.absmax
    if w.absmax2 is not None:
        absmax = w.code2[absmax.long()] * w.absmax2.repeat_interleave(w.blocksize2)[: absmax.numel()] + w.offset
    return (w.code[index] * absmax.float().repeat_interleave(w.blocksize)[:n]).view(w.shape).to(dtype)


if triton is not None:
    @triton.jit
    def _dequantize_kernel(table, code, code2, out, WEIGHTS: tl.constexpr, HALF_BLOCK: tl.constexpr,
                           BLOCKS2: tl.constexpr, NESTED: tl.constexpr, BYTES: tl.constexpr,
                           ALIGNED: tl.constexpr):
        # which weight this program works on: the last whose first program is not after it
        pid = tl.program_id(0)
        w = 0
        for k in tl.static_range(1, WEIGHTS):
            w += (pid >= tl.load(table + k * 8 + 7)).to(tl.int32)
        row = table + w * 8
        packed = tl.load(row).to(tl.pointer_type(tl.uint8))
        if NESTED:
            absmax = tl.load(row + 1).to(tl.pointer_type(tl.uint8))
        else:
            absmax = tl.load(row + 1).to(tl.pointer_type(tl.float32))
        absmax2 = tl.load(row + 2).to(tl.pointer_type(tl.float32))
        offset = tl.load(row + 3).to(tl.pointer_type(tl.float32))
        out = out + tl.load(row + 4)
        n_values = tl.load(row + 5)
        n_bytes = tl.load(row + 6)
        if ALIGNED:  # loaded from the table: say what the plan checked, or no access is vectorized
            packed = tl.multiple_of(packed, 16)
            out = tl.multiple_of(out, 16)
            n_values = tl.multiple_of(n_values, 32)
            n_bytes = tl.multiple_of(n_bytes, 16)
        start = (pid - tl.load(row + 7)).to(tl.int64) * BYTES
        i = start + tl.arange(0, BYTES)
        live = i < n_bytes
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

    def _dequantize_cuda(planned: Plan, dtype: torch.dtype, total: int) -> torch.Tensor:
        weights = [w for group in planned.groups for w in group]
        out = torch.empty(total, dtype=dtype, device=weights[0].packed.device)
        start = 0
        with torch.cuda.device(out.device):  # Triton launches on the current device
            for table, programs, first, count, aligned in planned.launches:
                w = weights[first]
                nested = w.absmax2 is not None
                _dequantize_kernel[(programs,)](
                    table, w.code, w.code2 if nested else w.code, out[start:], WEIGHTS=count,
                    HALF_BLOCK=w.blocksize // 2, BLOCKS2=max(w.blocksize2, 1), NESTED=nested,
                    BYTES=BYTES_PER_PROGRAM,
                    ALIGNED=aligned and out.data_ptr() % 16 == 0 and out.element_size() >= 2)
                start += sum(v.shape[0] * v.shape[1] for v in weights[first:first + count])
        return out

    _kernel = _dequantize_cuda
else:
    _kernel = None
