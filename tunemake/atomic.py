"""Artefacts written atomically: to a temporary name beside the target, then renamed into place.

A crash leaves only a ``.tmp-*`` sibling behind, never a half-written file or directory that a
rerun (or Snakemake) would take as finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``target`` when the block succeeds.

    On an exception the temporary directory is removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # mkdtemp makes the directory private (0700); the artefact gets the usual mode for the umask
    os.chmod(tmp, 0o777 & ~_umask())
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator:
    """Open a temporary file that replaces ``target`` when the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{target.name}-", dir=target.parent)
    os.close(fd)
    try:
        if "b" not in mode:
            open_kwargs.setdefault("encoding", "utf-8")
        with open(tmp, mode, **open_kwargs) as handle:
            yield handle
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, target)


def write_json(target: str | os.PathLike, obj, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON to ``target`` atomically, keys sorted for reproducible bytes."""
    with atomic_file(target) as handle:
        json.dump(obj, handle, indent=indent, sort_keys=True, ensure_ascii=False)
        handle.write("\n")
