"""Running the repo's Snakefile from tests: in a work dir, with that dir's config.yaml."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def snakemake(workdir: Path, *args: str, check: bool = True, target: str = "datasets",
              configfiles: tuple[str, ...] = ("config.yaml",)) -> subprocess.CompletedProcess:
    """Run Snakemake on ``target`` in ``workdir`` (the data targets by default) with ``configfiles``
    (in ``workdir``) as ``--configfile``."""
    cmd = [
        sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
        "--configfile", *(str(workdir / name) for name in configfiles), "--cores", "2", target, *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def planned_jobs(workdir: Path, target: str = "datasets", configfiles: tuple[str, ...] = ("config.yaml",)) -> dict[str, int]:
    """Rule -> job count of what a dry run would execute ({} when nothing is to be done)."""
    out = snakemake(workdir, "-n", "--quiet", "rules", target=target, configfiles=configfiles).stdout
    jobs = {}
    for line in out.splitlines():
        match = re.match(r"^\s*([A-Za-z_]\w*)\s+(\d+)\s*$", line)
        if match and match.group(1) not in ("total", "job"):
            jobs[match.group(1)] = int(match.group(2))
    return jobs


def write_config(workdir: Path, config: dict) -> None:
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def artefact_digests(work: Path) -> dict[str, str]:
    """sha256 of every tokenizer, base-weight, adapter and merged-model file under ``work``."""
    found = {}
    for pattern in ("models/tiny/tokenizer*", "models/tiny/chat_template.jinja", "models/tiny/*.safetensors",
                    "adapters/**/*", "merges/**/*"):
        for path in sorted(work.glob(pattern)):
            if path.is_file():
                found[str(path.relative_to(work))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found
