"""Run a stage's entry point from a Snakemake ``script:`` with the rule's log and a clean error.

The rule's log gets everything the stage prints (progress bars, logging); a
:class:`~tunemake.errors.TunemakeError` is also printed to the console, without a traceback, so
the user sees which file, line or key to fix, and the job fails with a non-zero exit. A job that
asks for GPUs (``resources: gpu=N``) runs with N devices of its own (:mod:`tunemake.gpus`).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from tunemake.errors import TunemakeError
from tunemake.gpus import claimed_gpus


#: Warnings a user cannot act on: bitsandbytes' CPU backend tries, on import, to fetch a kernel
#: from the hub (through ``kernels``, which warns of its trust check), and warns when it may not;
#: its own fallback then serves.
QUIET_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub")


def setup_logging(fmt: str, force: bool = False) -> None:
    """INFO and above to stderr in ``fmt``, without :data:`QUIET_LOGGERS`' warnings (the rules'
    entry and the ``tunemake`` command share it); ``force``: replace handlers already set up."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=fmt, force=force)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def run(smk, entry: Callable, **kwargs):
    """Call ``entry(**kwargs)`` with stdout/stderr going to the rule's log (when it has one).

    A job asking for ``gpu`` runs with that many devices claimed for it in ``CUDA_VISIBLE_DEVICES``
    (unless Slurm set them); a script must not touch CUDA before calling this.
    """
    console = os.fdopen(os.dup(2), "w")
    if smk.log:
        os.makedirs(os.path.dirname(smk.log[0]) or ".", exist_ok=True)
        log_fd = os.open(smk.log[0], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
    setup_logging("%(asctime)s %(name)s: %(message)s", force=True)  # to the log now behind stderr
    job = _job_name(smk)

    def tell_console(message: str) -> None:  # a job waiting on busy GPUs says so where the user looks
        print(f"{job}: {message}\n(log: {smk.log[0]})", file=console, flush=True)

    try:
        with claimed_gpus(_gpus_asked(smk), job=job, on_wait=tell_console if smk.log else None):
            return entry(**kwargs)
    except TunemakeError as exc:
        message = f"error: {exc}"
        print(message, file=sys.stderr, flush=True)
        if smk.log:
            print(f"{message}\n(log: {smk.log[0]})", file=console, flush=True)
        sys.exit(1)


def _gpus_asked(smk) -> int:
    resources = getattr(smk, "resources", None)
    gpus = resources.get("gpu") if resources is not None else None
    return int(gpus or 0)


def _job_name(smk) -> str:
    wildcards = ", ".join(f"{key}={value}" for key, value in getattr(smk, "wildcards", {}).items())
    return f"rule {getattr(smk, 'rule', '?')}" + (f" ({wildcards})" if wildcards else "")
