"""GPUs of their own for concurrent local jobs: a job asking for ``gpu=N`` claims N devices.

Snakemake's local executor, given ``--resources gpu=N``, caps how many GPU jobs run at once but
never sets ``CUDA_VISIBLE_DEVICES``, so two one-GPU jobs would both train on device 0.
:func:`claimed_gpus` picks free devices, locks them for as long as the job runs and sets
``CUDA_VISIBLE_DEVICES`` to them; :func:`tunemake.rule_entry.run` does this for every rule script
before calling the stage, so the stage (and any torchrun it starts) only sees its own devices.

Supported:

- Devices to choose from: the ``CUDA_VISIBLE_DEVICES`` the job inherited (indices, ``GPU-`` or
  ``MIG-`` UUIDs, passed through as given), else every GPU ``nvidia-smi -L`` lists (or, without
  nvidia-smi, ``torch.cuda.device_count()`` asked in a child process, so this process never
  initialises CUDA).
- A claim is an ``fcntl.flock`` on one file per device under ``TUNEMAKE_GPU_LOCK_DIR`` (default
  ``/tmp/tunemake-gpus-<uid>``): it holds while this process lives, including while it waits for
  torchrun's workers, and a job that crashes or is killed releases it with its last file descriptor.
  Every Snakemake run of the user on the machine shares the claims, so two runs never share a GPU.
- Free devices are taken first; if too few are free the job waits (saying so in its log and on the
  console) up to ``TUNEMAKE_GPU_WAIT_S`` seconds (default a day), then fails naming who holds them.
  Asking for more GPUs than there are fails at once.
- Under Slurm (``SLURM_JOB_ID`` set) with ``CUDA_VISIBLE_DEVICES`` set, Slurm has already given the
  job its GPUs: nothing is claimed or changed.

Not supported:

- Shell rules and commands outside tunemake's rule scripts claim nothing; a job with ``gpu`` unset
  or 0 (an experiment with ``gpus: null`` uses every visible GPU) claims nothing either.
- One device named two ways (``0`` by one job, its UUID by another) is two claims; so are devices of
  other users when the lock directory is per user (point ``TUNEMAKE_GPU_LOCK_DIR`` at a shared
  directory to include them). A per-job ``/tmp`` (Slurm's tmpfs plugin) needs the same.
- Jobs of one Slurm group job share the allocation's GPUs; ROCm's ``HIP_VISIBLE_DEVICES`` is not set.
- A script that touches CUDA before calling :func:`tunemake.rule_entry.run` keeps the devices it saw.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from tunemake.errors import TunemakeError

logger = logging.getLogger(__name__)

LOCK_DIR_ENV = "TUNEMAKE_GPU_LOCK_DIR"
WAIT_ENV = "TUNEMAKE_GPU_WAIT_S"
DEFAULT_WAIT_S = 24 * 3600
POLL_S = 0.5


class GPUError(TunemakeError):
    """Too few GPUs for a job: more asked for than exist, or none freed in time."""


def default_lock_dir() -> Path:
    # /tmp itself, not TMPDIR: Snakemake's tmpdir resource can give each job its own TMPDIR,
    # and the claims must be the same for every job on the machine.
    return Path(os.environ.get(LOCK_DIR_ENV) or f"/tmp/tunemake-gpus-{os.getuid()}")


def candidate_devices() -> list[str]:
    """The devices a job may claim: the inherited ``CUDA_VISIBLE_DEVICES``, else the machine's GPUs."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [device.strip() for device in visible.split(",") if device.strip()]
    return [str(index) for index in range(_machine_gpu_count())]


def _machine_gpu_count() -> int:
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.TimeoutExpired):
            out = ""
        count = len(re.findall(r"^GPU \d+:", out, flags=re.MULTILINE))
        if count:
            return count
    # torch falls back to initialising CUDA when NVML fails, which would fix this process's
    # devices before CUDA_VISIBLE_DEVICES is set: ask in a child.
    try:
        out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                             capture_output=True, text=True, timeout=300).stdout
        return int(out.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return 0


def wait_limit_s() -> float:
    value = os.environ.get(WAIT_ENV)
    if not value:
        return DEFAULT_WAIT_S
    try:
        return float(value)
    except ValueError:
        raise GPUError(f"{WAIT_ENV}={value!r}: not a number of seconds") from None


@contextmanager
def claimed_gpus(count: int, job: str = "", wait_s: float | None = None,
                 on_wait: Callable[[str], None] | None = None) -> Iterator[str | None]:
    """Claim ``count`` devices for the ``with`` block and set ``CUDA_VISIBLE_DEVICES`` to them.

    Args:
        count (int): GPUs the job asks for; 0 claims nothing.
        job (str): who is claiming, written into the lock files so a waiting job can say who holds
            its devices. Default: none.
        wait_s (float | None): how long to wait for busy devices. Default: ``TUNEMAKE_GPU_WAIT_S``,
            else a day.
        on_wait (Callable[[str], None] | None): also told the message when the job starts waiting
            (the log gets it anyway). Default: none.

    Yields:
        str | None: the new ``CUDA_VISIBLE_DEVICES``, or None where nothing was claimed (no GPUs
        asked for, or Slurm chose them).

    Raises:
        GPUError: more GPUs asked for than there are, or too few freed within ``wait_s``.
    """
    if count <= 0:
        yield None
        return
    if os.environ.get("SLURM_JOB_ID") and os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        logger.info("GPUs: CUDA_VISIBLE_DEVICES=%s, set by Slurm job %s",
                    os.environ["CUDA_VISIBLE_DEVICES"], os.environ["SLURM_JOB_ID"])
        yield None
        return
    devices = candidate_devices()
    source = (f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']}"
              if "CUDA_VISIBLE_DEVICES" in os.environ else "found on this machine")
    if count > len(devices):
        raise GPUError(f"this job asks for {count} GPU{'s' * (count != 1)} but there "
                       f"{'is' if len(devices) == 1 else 'are'} only {len(devices)} ({source})")
    lock_dir = default_lock_dir()
    lock_dir.mkdir(parents=True, exist_ok=True)
    wait_s = wait_limit_s() if wait_s is None else wait_s
    held = _claim(devices, count, lock_dir, job, wait_s, on_wait)
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = ",".join(device for device, _ in held)
    os.environ["CUDA_VISIBLE_DEVICES"] = visible
    logger.info("GPUs: CUDA_VISIBLE_DEVICES=%s, claimed of %s (locks in %s)", visible, source, lock_dir)
    try:
        yield visible
    finally:
        if inherited is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = inherited
        for _, fd in held:
            os.close(fd)


def _claim(devices: list[str], count: int, lock_dir: Path, job: str, wait_s: float,
           on_wait: Callable[[str], None] | None) -> list[tuple[str, int]]:
    """Lock ``count`` of ``devices``, polling until enough are free at once: [(device, fd)]."""
    start = time.monotonic()
    waiting = False
    while True:
        held = []
        for device in devices:
            fd = _try_lock(lock_dir / _lock_name(device))
            if fd is not None:
                held.append((device, fd))
                if len(held) == count:
                    for _, fd in held:
                        _write_holder(fd, job)
                    if waiting:
                        logger.info("GPUs: free after %.0f s", time.monotonic() - start)
                    return held
        # Holding some while waiting for the rest could deadlock two jobs that each hold a part.
        for _, fd in held:
            os.close(fd)
        busy = f"{len(devices) - len(held)} of {len(devices)}"
        if time.monotonic() - start >= wait_s:
            raise GPUError(f"this job asks for {count} GPU{'s' * (count != 1)}, but {busy} stayed busy for "
                           f"{wait_s:.0f} s ({_holders(devices, lock_dir)}); raise {WAIT_ENV} to wait longer, or "
                           f"give Snakemake --resources gpu=N so it starts no more GPU jobs than there are GPUs")
        if not waiting:
            waiting = True
            message = (f"waiting up to {wait_s:.0f} s for {count} free GPU{'s' * (count != 1)}: {busy} busy "
                       f"({_holders(devices, lock_dir)})")
            logger.info("GPUs: %s", message)
            if on_wait:
                on_wait(message)
        time.sleep(POLL_S)


def _lock_name(device: str) -> str:
    # Old-style MIG names (MIG-GPU-<uuid>/1/0) hold slashes.
    return re.sub(r"[^A-Za-z0-9._-]", "_", device) + ".lock"


def _try_lock(path: Path) -> int | None:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:  # another user's lock file in a shared directory: flock needs no write
        fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    return fd


def _write_holder(fd: int, job: str) -> None:
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}{': ' + job if job else ''}\n".encode(), 0)
    except OSError:  # read-only (another user's file): the holder is only named in messages
        pass


def _holders(devices: list[str], lock_dir: Path) -> str:
    """``0: pid 12 on host: rule ...`` for each device whose lock is held (best effort)."""
    found = []
    for device in devices:
        path = lock_dir / _lock_name(device)
        fd = _try_lock(path)
        if fd is not None:
            os.close(fd)
            continue
        try:
            holder = path.read_text().strip() or "unknown"
        except OSError:
            holder = "unknown"
        found.append(f"{device}: {holder}")
    return "; ".join(found) or "freed meanwhile"
