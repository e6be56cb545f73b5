"""A tiny Llama turned into a chain: its greedy answer is a fixed token sequence, for stop tests."""

from __future__ import annotations

import torch


def make_chain(model, order: list[int]) -> None:
    """Make ``order[i + 1]`` the greedy successor of ``order[i]`` in ``model``, in place.

    Every layer's output projections are zeroed, so the last hidden state is the embedding of the
    last token; the chain's embeddings are one-hot and the output head maps each to its successor.
    """
    assert len(set(order)) == len(order)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        head.zero_()
        for i, token in enumerate(order):
            embed[token] = torch.nn.functional.one_hot(torch.tensor(i), embed.shape[1]).float()
            if i + 1 < len(order):
                head[order[i + 1]] = 10.0 * embed[token]
