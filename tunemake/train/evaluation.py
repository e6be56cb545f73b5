"""What the end of every epoch measures: the held-out loss, and greedy answers to the experiment's
``evaluation_inputs`` (XTuner's sample generations)."""

from __future__ import annotations

import numpy as np
import torch

from tunemake.encode import IGNORE_INDEX
from tunemake.train import documents
from tunemake.train.batches import Rows, make_batch, to_device
from tunemake.train.launch import Dist
from tunemake.train.model import fast_path, is_partitioned_model, unwrap


def has_heldout(data_dir: str) -> bool:
    import datasets

    return len(datasets.load_from_disk(data_dir)["heldout"]) > 0


def heldout_batches(rows: int, rank: int, world: int, batch_size: int) -> list[tuple[np.ndarray, bool]]:
    """This rank's held-out batches ``(row indices, counted)``: every rank gets the same number
    (ZeRO-3's forward is collective), a rank out of rows a stand-in batch that is not counted."""
    mine = np.arange(rows)[rank::world]
    starts = range(0, -(-rows // world), batch_size)
    return [(mine[s:s + batch_size], True) if s < len(mine) else (np.zeros(1, dtype=np.int64), False) for s in starts]


@torch.no_grad()
def heldout_loss(model, data_dir: str, batch_size: int, dist: Dist, pad_id: int, amp_dtype) -> float | None:
    """Mean loss per labelled token over the held-out split (sharded over processes), None when
    the split is empty. ``model``: what forwards a batch (the model, DDP, a DeepSpeed engine or the
    fast path, whose model's own forward is used: the fast path returns no logits); every rank
    must call, and runs as many forwards as the others (ZeRO-3's forward is collective). The model
    is left in eval mode."""
    if not has_heldout(data_dir):
        return None
    rows = Rows(data_dir, "heldout")
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    forward = unwrap(model) if fast_path(model) else model
    layout = documents.layout_for(unwrap(model), fast=False)
    for index, counted in heldout_batches(rows.num_rows, dist.rank, dist.world, max(1, batch_size)):
        batch = to_device(make_batch(rows, index, pad_id, layout), dist.device)
        labels = batch.pop("labels")
        with (documents.apart(unwrap(model), layout, amp_dtype),
              torch.autocast(dist.device.type, dtype=amp_dtype, enabled=amp_dtype is not None)):
            logits = forward(**batch, use_cache=False).logits.float()
        targets = labels[:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), targets.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum")
        if counted:
            totals += torch.tensor([losses.item(), float((targets != IGNORE_INDEX).sum())], dtype=torch.float64)
    dist.all_reduce(totals)
    return totals[0].item() / max(1.0, totals[1].item())


@torch.no_grad()
def sample_generations(model, prompts, tokenizer, template, max_new_tokens: int = 48) -> list[dict]:
    """Greedy answers to ``prompts``, each ``{"prompt", "output"}``.

    Prompts and stops are evaluate's and chat's (:func:`tunemake.encode.prompt_ids`,
    :func:`tunemake.encode.generation_stops`): the answer ends at eos or a one-token stop word and
    is cut at a stop word of several tokens. The model is left in eval mode. Under ZeRO-3 every
    rank must call (the forwards are collective); otherwise one suffices.
    """
    from tunemake.encode import answer_text, generation_stops, prompt_ids

    if not prompts:
        return []
    inner = unwrap(model)
    stops = generation_stops(tokenizer, template, getattr(inner.generation_config, "eos_token_id", None))
    inner.eval()
    synced = is_partitioned_model(inner)
    device = next(inner.parameters()).device
    samples = []
    for prompt in prompts:
        _, ids = prompt_ids([{"system": "", "input": prompt, "output": ""}], template, tokenizer)
        input_ids = torch.tensor([ids], device=device)
        out = inner.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=stops.ids or None, pad_token_id=tokenizer.pad_token_id or 0,
                             synced_gpus=synced)
        samples.append({"prompt": prompt, "output": answer_text(out[0, len(ids):].tolist(), tokenizer, stops)})
    return samples
