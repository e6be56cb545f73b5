"""The cross-entropy from the last hidden state, chunk by chunk, so the full logits are never held.

:class:`LinearCrossEntropy` computes the loss and its gradient in the forward pass; on CUDA a
chunk's softmax and its gradient are one compiled function (:func:`compiled_softmax_gradient`).
"""

from __future__ import annotations

import functools

import torch

#: logits held at a time by the loss, in elements (256 MiB in fp32)
LOGIT_CHUNK_ELEMENTS = 1 << 26


def softmax_gradient(logits, targets, n: int, softcap: float | None = None):
    """One chunk's summed cross-entropy and its gradient with respect to the logits, divided by
    ``n`` and in the logits' dtype; softmax in fp32. Eager: in place over one fp32 copy of the
    logits (the CPU's path). :func:`compiled_softmax_gradient` compiles :func:`softmax_gradient_pure`,
    the same maths without in-place ops. ``softcap``: the logits are ``softcap * tanh(logits /
    softcap)`` first (Gemma 2's final soft-capping)."""
    if softcap:
        return softmax_gradient_pure(logits, targets, n, softcap)
    full = logits.float()
    lse = torch.logsumexp(full, dim=-1)
    loss = (lse - full.gather(1, targets[:, None]).squeeze(1)).sum()
    probs = torch.exp(full.sub_(lse[:, None]))
    probs[torch.arange(len(targets), device=targets.device), targets] -= 1.0
    return loss, probs.div_(n).to(logits.dtype)


def softmax_gradient_pure(logits, targets, n: int, softcap: float | None = None):
    """:func:`softmax_gradient` for compilation: one pass for the log-sum-exp and one that writes
    the gradient, where the eager ops make seven over fp32 logits (about 2.7 GB of memory
    traffic a step for a 32k vocabulary)."""
    full = logits.float()
    if softcap:
        capped = torch.tanh(full / softcap)
        full = capped * softcap
    lse = torch.logsumexp(full, dim=-1)
    loss = (lse - full.gather(1, targets[:, None]).squeeze(1)).sum()
    probs = torch.exp(full - lse[:, None])
    probs = torch.where(torch.arange(full.shape[1], device=full.device) == targets[:, None], probs - 1.0, probs)
    if softcap:  # through the cap: d(c tanh(z / c)) / dz = 1 - tanh(z / c)^2
        probs = probs * (1.0 - capped * capped)
    return loss, (probs / n).to(logits.dtype)


@functools.cache
def compiled_softmax_gradient():
    """:func:`softmax_gradient_pure` compiled once, sizes symbolic (a chunk of one row compiles
    once more: torch specializes sizes 0 and 1)."""
    return torch.compile(softmax_gradient_pure, dynamic=True)


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``h @ weight.T`` against ``targets``, chunk by chunk.

    The gradients are computed in the forward pass, so at most one chunk of logits exists at a
    time; logits are formed in the compute dtype and the softmax taken in fp32, as the model's
    forward under autocast followed by ``cross_entropy(logits.float())`` does. With ``compiled``
    the softmax and its gradient are one compiled function (:func:`compiled_softmax_gradient`).
    ``softcap``: the logits soft-capped first (Gemma 2).
    """

    @staticmethod
    def forward(ctx, h, weight, targets, dtype, compiled=False, softcap=None):
        n = h.shape[0]
        w = weight.to(dtype)
        hc = h.to(dtype)
        chunk = max(1, LOGIT_CHUNK_ELEMENTS // w.shape[0])
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(hc)
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if weight.requires_grad else None
        gradient = compiled_softmax_gradient() if compiled else softmax_gradient
        for start in range(0, n, chunk):
            hs, ts = hc[start:start + chunk], targets[start:start + chunk]
            loss, probs = gradient(hs @ w.T, ts, n, softcap)
            total += loss
            grad_h[start:start + chunk] = probs @ w
            if grad_w is not None:
                grad_w += (probs.T @ hs).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.input_dtype, ctx.weight_dtype = h.dtype, weight.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = (grad_h * grad_out).to(ctx.input_dtype)
        gw = None if grad_w is None else (grad_w * grad_out).to(ctx.weight_dtype)
        return gh, gw, None, None, None, None
