"""The fast path's Triton kernels, each with the torch ops that serve where it cannot run (the CPU).

:func:`low_rank_add` (``c + x @ y`` for a rank-r ``x``), :func:`swiglu_backward` (SiLU's backward
in one pass) and :class:`BlockCopy` (the LoRA B blocks written into the concatenated weights).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # no Triton (the CPU): the torch ops serve
    triton = None

#: the low-rank and SiLU kernels as custom ops that torch.compile takes whole (torch >= 2.6)
TRITON_OPS = triton is not None and hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")
#: tiles of the low-rank kernel: rows, columns, rank per step (ranks below 16 padded, masked;
#: each rank compiles its own kernel)
TILE_ROWS, TILE_COLS, TILE_RANK = 64, 128, 64

if TRITON_OPS:
    @triton.jit
    def _low_rank_tile(x, y, t, n, rows, cols, RANK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
        # (x @ y)[t, n] in fp32 for x [rows, RANK], y [RANK, cols], both contiguous
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for k0 in tl.static_range(0, RANK, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            xs = tl.load(x + t[:, None] * RANK + k[None, :], mask=(t[:, None] < rows) & (k[None, :] < RANK), other=0.0)
            ys = tl.load(y + k[:, None] * cols + n[None, :], mask=(k[:, None] < RANK) & (n[None, :] < cols), other=0.0)
            acc = tl.dot(xs, ys, acc)
        return acc

    @triton.jit
    def low_rank_add_kernel(c, x, y, out, rows, cols, c_stride, RANK: tl.constexpr, BLOCK_T: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # grid: (row tiles, column tiles); out [rows, cols] = c (row stride c_stride) + x @ y
        t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _low_rank_tile(x, y, t, n, rows, cols, RANK, BLOCK_T, BLOCK_N, BLOCK_K)
        live = (t[:, None] < rows) & (n[None, :] < cols)
        acc += tl.load(c + t[:, None] * c_stride + n[None, :], mask=live).to(tl.float32)
        tl.store(out + t[:, None] * cols + n[None, :], acc.to(out.dtype.element_ty), mask=live)

    @triton.jit
    def swiglu_backward_kernel(dh, gate_up, grad, h, cols, WANT_H: tl.constexpr, BLOCK: tl.constexpr):
        # grid: (rows, column blocks); dh, h: [rows, cols]; gate_up, grad: [rows, 2 cols]
        row = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        live = c < cols
        d = tl.load(dh + row * cols + c, mask=live).to(tl.float32)
        gate = tl.load(gate_up + row * 2 * cols + c, mask=live).to(tl.float32)
        up = tl.load(gate_up + row * 2 * cols + cols + c, mask=live).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = gate * sig
        out = grad.dtype.element_ty
        tl.store(grad + row * 2 * cols + c, (d * up * sig * (1.0 + gate * (1.0 - sig))).to(out), mask=live)
        tl.store(grad + row * 2 * cols + cols + c, (d * silu).to(out), mask=live)
        if WANT_H:
            tl.store(h + row * cols + c, (silu * up).to(out), mask=live)

    def _tiles(rows, cols):
        return triton.cdiv(rows, TILE_ROWS), triton.cdiv(cols, TILE_COLS)

    @torch.library.triton_op("tunemake::low_rank_add", mutates_args=())
    def _low_rank_add_op(c: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        rows, cols = c.shape
        out = torch.empty((rows, cols), dtype=c.dtype, device=c.device)
        torch.library.wrap_triton(low_rank_add_kernel)[_tiles(rows, cols)](
            c, x, y, out, rows, cols, c.stride(0), RANK=x.shape[1],
            BLOCK_T=TILE_ROWS, BLOCK_N=TILE_COLS, BLOCK_K=TILE_RANK)
        return out

    @torch.library.triton_op("tunemake::swiglu_backward", mutates_args=())
    def _swiglu_backward_op(dh: torch.Tensor, gate_up: torch.Tensor, want_h: bool) -> tuple[torch.Tensor, torch.Tensor]:
        rows, cols = dh.shape
        grad = torch.empty_like(gate_up)
        h = torch.empty_like(dh) if want_h else dh.new_empty(0)
        block = 1024
        torch.library.wrap_triton(swiglu_backward_kernel)[(rows, triton.cdiv(cols, block))](
            dh, gate_up, grad, h, cols, WANT_H=want_h, BLOCK=block)
        return grad, h


def _triton_takes(*tensors) -> bool:
    """Whether the Triton kernels take these 2-D operands: Triton and torch >= 2.6, CUDA, one dtype
    (bf16 or fp16), contiguous rows (the first may have a row stride; the others contiguous)."""
    first = tensors[0]
    return (TRITON_OPS and first.is_cuda and first.dtype in (torch.bfloat16, torch.float16)
            and first.stride(1) == 1 and all(t.dtype == first.dtype and t.is_contiguous() for t in tensors[1:]))


def low_rank_add(c, x, y):
    """``c + x @ y`` for a low rank (``x`` [N, r], ``y`` [r, M], ``c`` [N, M]), a new tensor.

    cuBLAS runs ``x @ y`` with its inner dimension of 64-192 at a third of the memory bandwidth
    and writes it for a second pass to add; on CUDA with Triton one kernel
    (:func:`low_rank_add_kernel`) reads ``c`` once, forms the product tile by tile in fp32 and
    writes the sum, rounded once.
    """
    if _triton_takes(c, x, y):
        return _low_rank_add_op(c, x, y)
    return torch.addmm(c, x, y)


def swiglu_backward_torch(dense, xa, a, gate_up, want_h: bool):
    """:func:`swiglu_backward` in torch ops (the CPU, and CUDA without Triton)."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    dh = dense.float() if xa is None else dense.float() + xa.float() @ a.float()
    sig = torch.sigmoid(gate)
    silu = gate * sig
    grad = torch.cat([dh * up * sig * (1.0 + gate * (1.0 - sig)), dh * silu], dim=-1).to(gate_up.dtype)
    return grad, (silu * up).to(gate_up.dtype) if want_h else gate_up.new_empty(0)


def swiglu_backward(dense, xa, a, gate_up, want_h: bool):
    """The gradient of ``gate_up`` = [gate, up] [N, 2I] through ``silu(gate) * up``, given that of
    its output, ``dense + xa @ a`` [N, I] (``xa`` [N, r] and ``a`` [r, I] may be None), and with
    ``want_h`` the output itself (else an empty tensor), in ``gate_up``'s dtype, maths in fp32.

    On CUDA with Triton: the LoRA term added by :func:`low_rank_add`, then one pass
    (:func:`swiglu_backward_kernel`) that reads each element's inputs once and writes both halves
    of the gradient and the output, where a compiled backward reads the inputs once for each
    half. The LoRA term is not formed inside that pass: tile by tile there it made the pass about
    twice as slow.
    """
    dh = dense if xa is None else low_rank_add(dense, xa, a)
    if dh.is_contiguous() and _triton_takes(dh, gate_up):
        return _swiglu_backward_op(dh, gate_up, want_h)
    return swiglu_backward_torch(dh, None, None, gate_up, want_h)


if triton is not None:
    @triton.jit
    def _copy_blocks_kernel(table, src0, dst0, ROWS: tl.constexpr, COLS: tl.constexpr):
        # grid: (row blocks, copies); a table row per copy: source, destination, rows, columns,
        # the destination's row stride (the source is contiguous); src0 / dst0 give the dtypes
        entry = table + tl.program_id(1) * 5
        src = tl.load(entry).to(src0.dtype)
        dst = tl.load(entry + 1).to(dst0.dtype)
        rows = tl.load(entry + 2)
        cols = tl.load(entry + 3)
        stride = tl.load(entry + 4)
        r = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]
        c = tl.arange(0, COLS)[None, :]
        live = (r < rows) & (c < cols)
        # addresses from a table carry no alignment, so the accesses are scalar: a few MB a step
        values = tl.load(src + r * cols + c, mask=live)
        tl.store(dst + r * stride + c, values.to(dst0.dtype.element_ty), mask=live)  # downcasts: nearest even


class BlockCopy:
    """Parameters copied into blocks of other tensors before each forward (the LoRA B blocks of a
    :class:`tunemake.train.fast.lora.Wide`), cast to the destination's dtype.

    On CUDA with Triton it is one kernel launch for every block, which finds them through a table
    of addresses: copies launched one by one (the blocks are strided) cost about 2 ms of CPU time
    a step for a 7B's 160 blocks while the GPU waits at the start of the step. The table is built
    again, and whether the kernel can take the blocks checked again, whenever a parameter's
    storage, dtype, shape or strides change. Elsewhere, or for blocks the kernel does not take
    (2-D with contiguous rows, the sources contiguous, one dtype and one device on each side),
    torch copies each block. The kernel writes behind autograd's back, so the destinations'
    version counters (which views share with their base) are bumped as an in-place copy would
    (what :class:`tunemake.train.fast.lora.ConcatLora`'s in-place check relies on).

    Args:
        pairs: (destination view, source parameter) pairs.
    """

    ROWS = 64
    MAX_COPIES = 65535  # the grid's second dimension

    def __init__(self, pairs):
        self.pairs = list(pairs)
        self._key = self._launch = None

    def __bool__(self):
        return bool(self.pairs)

    def _kernel_takes(self) -> bool:
        if triton is None or not self.pairs or len(self.pairs) > self.MAX_COPIES:
            return False
        dsts, srcs = [d for d, _ in self.pairs], [s for _, s in self.pairs]
        return (dsts[0].is_cuda and len({t.device for t in dsts + srcs}) == 1
                and len({d.dtype for d in dsts}) == 1 and len({s.dtype for s in srcs}) == 1
                and all(d.dim() == 2 and d.stride(1) == 1 for d in dsts)
                and all(s.shape == d.shape and s.is_contiguous() for d, s in self.pairs))

    def __call__(self):
        srcs = [s for _, s in self.pairs]
        key = tuple((s.data_ptr(), s.dtype, s.device, s.shape, s.stride()) for s in srcs)
        if key != self._key:
            self._key, self._launch = key, None
            if self._kernel_takes():
                table = torch.tensor([[s.data_ptr(), d.data_ptr(), d.shape[0], d.shape[1], d.stride(0)]
                                      for d, s in self.pairs], dtype=torch.int64).to(srcs[0].device)
                grid = (triton.cdiv(max(d.shape[0] for d, _ in self.pairs), self.ROWS), len(self.pairs))
                cols = triton.next_power_of_2(max(d.shape[1] for d, _ in self.pairs))
                self._launch = (table, grid, cols)
        with torch.no_grad():
            if self._launch is None:
                for dst, src in self.pairs:
                    dst.copy_(src)
                return
            table, grid, cols = self._launch
            dst0 = self.pairs[0][0]
            with torch.cuda.device(dst0.device):  # Triton launches on the current device
                _copy_blocks_kernel[grid](table, srcs[0], dst0, ROWS=self.ROWS, COLS=cols)
            # written behind autograd's back: say so, as copy_ would
            torch.autograd.graph.increment_version([d for d, _ in self.pairs])
