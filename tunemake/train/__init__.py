"""The train stage: one epoch of one experiment, started from the previous epoch's artefacts.

:func:`launch` (the rule's entry point) runs the epoch in this process, or starts one process per
GPU (``nproc`` on the CPU, over gloo) with torchrun, each running :func:`train_epoch`. Supported:
full fine-tuning, LoRA and QLoRA (bitsandbytes 4-bit NF4 / 8-bit), plain DDP, AdamW with the
schedules in ``tunemake.schedule``, gradient accumulation and clipping, packed rows with attention
kept inside each document, mid-epoch resume points, and DeepSpeed ZeRO 1/2/3 (+ offload). On CUDA,
without DeepSpeed, the step runs through ``tunemake.train.fast`` (varlen attention over packed
documents, compiled layers, a loss that never holds the full logits) when it supports the model,
and AdamW is torch's fused kernel; elsewhere the model's own forward with a dense block-diagonal
mask. Not supported: pipeline or tensor parallelism.

The parts, in the order an epoch uses them:
- :mod:`~tunemake.train.spec`: the typed specification, built from the resolved config;
- :mod:`~tunemake.train.launch`: processes, ranks and devices;
- :mod:`~tunemake.train.checkpoint`: fingerprint, where a run starts, what an epoch writes;
- :mod:`~tunemake.train.batches`: each rank's micro-batches of packed rows;
- :mod:`~tunemake.train.model`: the base model with the method applied;
- :mod:`~tunemake.train.engine`: DDP or DeepSpeed behind one interface;
- :mod:`~tunemake.train.loop`: the epoch loop; :mod:`~tunemake.train.evaluation` and
  :mod:`~tunemake.train.metrics`: what it measures and reports.
"""

from tunemake.train.checkpoint import prune_state
from tunemake.train.launch import launch
from tunemake.train.loop import RESUME_EXIT_CODE, train_epoch
from tunemake.train.spec import EpochSpec, TrainError

__all__ = ["RESUME_EXIT_CODE", "EpochSpec", "TrainError", "launch", "prune_state", "train_epoch"]
