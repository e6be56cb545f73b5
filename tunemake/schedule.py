"""Learning-rate schedules over a whole experiment, and what each epoch's schedule depends on.

``cosine`` (XTuner's): linear warm-up over the first ``warmup_ratio`` of all steps from a factor of
1e-5, then cosine to ``min_lr_ratio`` over the rest. Every step's lr depends on the total number of
epochs, so adding epochs re-runs the whole chain.

``constant``: warm-up, then flat. ``wsd`` (warm-up, stable, decay): warm-up, flat, then a linear
decay to ``min_lr_ratio`` over the last ``decay_epochs``. With these two the warm-up is counted in
steps (``warmup_steps``, or ``warmup_ratio`` of one epoch), so an epoch outside the decay window
does not depend on the total, and raising the epoch count reuses it.
"""

from __future__ import annotations

import math

WARMUP_START_FACTOR = 1e-5  # XTuner's LinearLR start_factor


def warmup_steps(schedule: dict, steps_per_epoch: int, epochs: int) -> int:
    if schedule.get("warmup_steps") is not None:
        return int(schedule["warmup_steps"])
    span = steps_per_epoch * epochs if schedule["type"] == "cosine" else steps_per_epoch
    return math.ceil(schedule["warmup_ratio"] * span)


def lr_factor(step: int, schedule: dict, steps_per_epoch: int, epochs: int) -> float:
    """The multiplier of the base lr at optimizer step ``step`` (0-based, over the experiment)."""
    total = steps_per_epoch * epochs
    warm = warmup_steps(schedule, steps_per_epoch, epochs)
    floor = schedule.get("min_lr_ratio", 0.0)
    if step < warm:
        return WARMUP_START_FACTOR + (1 - WARMUP_START_FACTOR) * step / warm
    kind = schedule["type"]
    if kind == "constant":
        return 1.0
    if kind == "cosine":
        span = max(1, total - warm)
        progress = min(1.0, (step - warm) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if kind == "wsd":
        decay_steps = steps_per_epoch * min(schedule["decay_epochs"], epochs)
        decay_start = max(warm, total - decay_steps)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start + 1) / max(1, total - decay_start))
        return 1.0 - (1.0 - floor) * progress
    raise ValueError(f"unknown schedule type {kind!r}")


def epoch_schedule_identity(schedule: dict, epoch: int, epochs: int) -> dict:
    """What epoch ``epoch``'s learning rates depend on, as plain data (a Snakemake param).

    Two configs with equal identities give the same lr at every step of that epoch (for the same
    steps per epoch, which the data fixes), so Snakemake re-runs the epoch only when it changes.
    """
    identity = {k: schedule.get(k) for k in ("type", "warmup_ratio", "warmup_steps", "min_lr_ratio")}
    kind = schedule["type"]
    if kind == "cosine":
        identity["epochs"] = epochs
    elif kind == "wsd":
        identity["decay_epochs"] = schedule["decay_epochs"]
        in_decay = epoch > epochs - schedule["decay_epochs"]
        identity["phase"] = "decay" if in_decay else "stable"
        if in_decay:
            identity["epochs"] = epochs
    return identity
