"""An epoch's artefacts: its fingerprint, its checkpoint and resume state, mid-epoch resume points,
and where a run starts from (the previous epoch, or a resume point with the same fingerprint).

Outputs of epoch n:
- ``epoch_{n}.pth``: trainable weights (LoRA weights only for LoRA/QLoRA), written by rank 0 one
  tensor at a time (:func:`save_gathered`: under ZeRO-3 no process holds them all), counters,
  the fingerprint of what it was trained with, library versions, the epoch's metrics; loads with ``torch.load(path, weights_only=True)``.
- ``epoch_{n}.state/``: what epoch n+1 resumes from: optimizer state (DeepSpeed: its partition
  of the weights too) and RNG states, one file per rank.
- while running, ``epoch_{n}.resume/``: a resume point every ``save_steps`` optimizer steps and
  on SIGTERM / SIGUSR1; a rerun continues from it if its fingerprint matches, and gives the same
  tensors as an uninterrupted run on CPU. Removed when the epoch is done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import zipfile
import zlib
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunemake import paths as layout
from tunemake.atomic import atomic_file, write_json
from tunemake.hub import is_hub_id
from tunemake.templates import template_to_dict
from tunemake.train.engine import Engine
from tunemake.train.launch import Dist
from tunemake.train.model import full_shape, gathered, trainable_params
from tunemake.train.spec import EpochSpec, TrainError
from tunemake.versions import TRAIN_CODE_VERSION

log = logging.getLogger("tunemake.train")

CHECKPOINT_FORMAT = "tunemake.epoch/1"
PRUNED_MARKER = "PRUNED"


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the result (read from metadata: no slow imports)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("tunemake", "torch", "transformers", "peft", "bitsandbytes", "deepspeed", "datasets", "tokenizers"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    return versions


def model_identity(name: str, directory: Path) -> str:
    """A hub model's ``id@commit`` (its cached snapshot directory is named by the commit); for a
    local directory, a digest of its JSON files and of its weights' safetensors headers and sizes."""
    if is_hub_id(name):
        return f"{name}@{directory.name}"
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".bin")):
        digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        if path.suffix == ".json":
            digest.update(path.read_bytes())
        elif path.suffix == ".safetensors":
            with open(path, "rb") as handle:
                digest.update(handle.read(8 + int.from_bytes(handle.read(8), "little")))
    return digest.hexdigest()


def data_identity(data_dir: Path) -> str:
    """A templated dataset's recipe and statistics, which hold the digest of its tokens that the data
    stage recorded; a dataset built before it recorded one is hashed whole."""
    stats = data_dir / "stats.json"
    if stats.is_file() and "digest" in json.loads(stats.read_text()):
        return _hash_files([data_dir / "recipe.json", stats])
    return _hash_files([p for p in data_dir.rglob("*") if p.is_file()])


def _hash_files(paths) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(str(Path(path).name).encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def fingerprint(spec: EpochSpec, previous: str | None) -> dict:
    """What this epoch's result is a function of: config, data, base model, code, previous epoch.

    Cheap on every rank: no weight is read, and a templated dataset is named by the digest its
    data stage recorded (see :func:`model_identity`, :func:`data_identity`).
    """
    parts = {
        "config": hashlib.sha256(json.dumps(spec.identity(), sort_keys=True).encode()).hexdigest(),
        "data": data_identity(Path(spec.data_dir)),
        "base_model": model_identity(spec.base_model.path, Path(spec.base_model.resolved().dir)),
        "code": f"train/{TRAIN_CODE_VERSION}",
        "previous": previous or "",
    }
    parts["fingerprint"] = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]
    return parts

@dataclass
class Start:
    """Where a run of an epoch starts: the trainable weights and optimizer state to load, the step,
    and the counters and running metrics so far."""

    fingerprint: dict
    trainable: dict | None = None  # tensors by name, None: the base model's
    trainable_source: str = ""
    state_dir: Path | None = None  # engine state to load (a resume point's or the previous epoch's)
    step: int = 0
    counters: dict = field(default_factory=lambda: {"global_step": 0, "tokens": 0, "trained_tokens": 0})
    metrics: dict = field(default_factory=lambda: {"loss_sum": 0.0, "loss_count": 0})


def find_start(spec: EpochSpec, dist: Dist) -> Start:
    """The previous epoch's artefacts, overridden by this epoch's resume point when its
    fingerprint and process count match (else it is ignored, with a warning).

    Raises:
        TrainError: the previous epoch's resume state was pruned.
    """
    previous, prev_ckpt = spec.previous, None
    if previous:
        if (Path(previous.state) / PRUNED_MARKER).exists():
            first = first_to_rebuild(spec)
            span = f"epoch {first}" if first == spec.epoch - 1 else f"epochs {first}-{spec.epoch - 1}"
            raise TrainError(
                f"{previous.state}: this resume state was pruned, so epoch {spec.epoch} cannot start from it; "
                f"rebuild {span} first, in one run: snakemake --forcerun {layout.checkpoint(spec.experiment, first)}"
            )
        prev_ckpt = torch.load(previous.pth, map_location="cpu", weights_only=True, mmap=True)
    start = Start(fingerprint(spec, prev_ckpt["fingerprint"] if prev_ckpt else None))
    if prev_ckpt:
        start.trainable, start.trainable_source = prev_ckpt["trainable"], previous.pth
        start.state_dir = Path(previous.state)
        start.counters.update(prev_ckpt["counters"])
    resume_dir = Path(spec.out.resume)
    meta_file = resume_dir / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    if meta.get("fingerprint") == start.fingerprint["fingerprint"] and meta.get("world") == dist.world:
        start.trainable = torch.load(resume_dir / "trainable.pt", map_location="cpu", weights_only=True, mmap=True)
        start.trainable_source, start.state_dir = str(resume_dir), resume_dir
        start.step, start.counters, start.metrics = meta["epoch_step"], meta["counters"], meta["metrics"]
    elif resume_dir.exists() and dist.main:
        log.warning("%s: ignoring a resume point made with another config, data or code", resume_dir)
    return start


def first_to_rebuild(spec: EpochSpec) -> int:
    """The earliest epoch to train again before epoch ``spec.epoch`` can start: its previous
    epoch, and further back while the epoch before that one has its state pruned too (epoch 1
    starts from the base model)."""
    epoch = spec.epoch - 1
    while epoch > 1 and (Path(layout.train_state(spec.experiment, epoch - 1)) / PRUNED_MARKER).exists():
        epoch -= 1
    return epoch


def save_resume_point(resume_dir: Path, engine: Engine, dist: Dist, fp: dict, step: int, counters: dict, metrics: dict) -> None:
    """Every rank writes its optimizer shard into a shared temporary dir; rank 0 publishes it."""
    tmp = _engine_states(resume_dir, engine, dist)
    dist.barrier()
    save_gathered(tmp / "trainable.pt", engine.model, dist)
    if dist.main:
        write_json(tmp / "meta.json", {"fingerprint": fp["fingerprint"], "epoch_step": step, "world": dist.world,
                                       "counters": counters, "metrics": metrics})
        shutil.rmtree(resume_dir, ignore_errors=True)
        os.replace(tmp, resume_dir)
    dist.barrier()


def write_epoch(spec: EpochSpec, engine: Engine, dist: Dist, fp: dict, counters: dict, metrics: dict, steps_per_epoch: int) -> None:
    """Epoch n's checkpoint (``epoch_{n}.pth``) and resume state (``epoch_{n}.state/``), each
    written whole or not at all; every rank must call (its optimizer shard, ZeRO-3's gathers)."""
    out_pth, out_state = Path(spec.out.pth), Path(spec.out.state)
    tmp_state = _engine_states(out_state, engine, dist)
    torch.save({"torch": torch.get_rng_state()}, tmp_state / f"rng.rank{dist.rank}.pt")
    dist.barrier()
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "experiment": spec.experiment,
        "epoch": spec.epoch,
        "method": spec.method.to_dict(),
        "base_model": spec.base_model.path,
        "template": template_to_dict(spec.template),
        "counters": {**counters, "steps_per_epoch": steps_per_epoch},
        "fingerprint": fp["fingerprint"],
        "fingerprint_parts": fp,
        "versions": library_versions(),
        "metrics": metrics,
    }
    save_gathered(out_pth, engine.model, dist, checkpoint)
    if not dist.main:
        return
    write_json(tmp_state / "meta.json", {"fingerprint": fp["fingerprint"], "world": dist.world, "epoch": spec.epoch})
    if out_state.exists():
        shutil.rmtree(out_state)
    os.replace(tmp_state, out_state)


def save_gathered(path: Path, model, dist: Dist, checkpoint: dict | None = None) -> None:
    """``torch.save`` of the model's trainable weights by name (inside ``checkpoint``, as its
    ``"trainable"``, when given) on the main process, holding one weight at a time: the file is
    written with the weights' bytes left out, then each weight, gathered (ZeRO-3) or copied from
    its device, is written into its place, and the archive's checksums set. Every process must call; the file appears whole or not at all."""
    named = trainable_params(model)
    with atomic_file(path, "w+b") if dist.main else nullcontext() as handle:
        offsets = _save_without_data(handle, named, checkpoint) if dist.main else {}
        checksums = {}
        for name, param in named:
            with gathered([param]):
                if dist.main:
                    data = param.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                    handle.seek(offsets[name])
                    handle.write(data)
                    checksums[offsets[name]] = zlib.crc32(data)
        if dist.main:
            _set_checksums(handle, checksums)


def _save_without_data(handle, named, checkpoint: dict | None) -> dict[str, int]:
    """Write what :func:`save_gathered` saves with space left for the weights' bytes; return where
    each one goes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        placeholders = {name: torch.empty(full_shape(p), dtype=p.dtype) for name, p in named}
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save(placeholders if checkpoint is None else {**checkpoint, "trainable": placeholders}, handle)
    handle.flush()
    handle.seek(0)
    with FakeTensorMode():
        saved = torch.load(handle, weights_only=True)
    trainable = saved if checkpoint is None else saved["trainable"]
    return {name: tensor.untyped_storage()._checkpoint_offset for name, tensor in trainable.items()}


def _set_checksums(handle, checksums: dict[int, int]) -> None:
    """Store the CRC-32 of each record whose data starts at a key of ``checksums`` where torch's
    zip archive keeps it: its central directory entry and its data descriptor (after the data)."""
    handle.flush()
    handle.seek(0)
    archive = zipfile.ZipFile(handle)
    entry = archive.start_dir
    for info in archive.infolist():  # in central directory order
        handle.seek(entry)
        name_len, extra_len, comment_len = struct.unpack("<HHH", handle.read(46)[28:34])
        handle.seek(info.header_offset + 26)
        data = info.header_offset + 30 + sum(struct.unpack("<HH", handle.read(4)))
        if data in checksums:
            crc = struct.pack("<I", checksums[data])
            handle.seek(entry + 16)
            handle.write(crc)
            handle.seek(data + info.compress_size)
            signature = handle.read(4) == b"PK\x07\x08"
            handle.seek(data + info.compress_size + 4 * signature)
            handle.write(crc)
        entry += 46 + name_len + extra_len + comment_len
    handle.flush()


def _engine_states(final: Path, engine: Engine, dist: Dist) -> Path:
    """A fresh temporary directory beside ``final`` into which every rank has written its engine
    state (every rank must call)."""
    tmp = final.with_name(final.name + ".tmp")
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    engine.save_state(tmp, dist.rank)
    return tmp


def prune_state(state_dir: str | os.PathLike) -> int:
    """Replace an epoch's resume state with a small stub; return the bytes freed.

    The directory and its timestamps stay, so Snakemake sees nothing to rebuild; only a later
    epoch that must re-run from this state stops, with an error saying to rebuild this epoch.
    """
    state_dir = Path(state_dir)
    if not state_dir.is_dir() or (state_dir / PRUNED_MARKER).exists():
        return 0
    stat = state_dir.stat()
    freed = 0
    for path in state_dir.iterdir():
        if path.name.startswith(".snakemake"):
            continue
        freed += path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    marker = state_dir / PRUNED_MARKER
    marker.write_text("optimizer state pruned by `tunemake prune-state`; rebuild this epoch to extend from it\n")
    os.utime(marker, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.utime(state_dir, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return freed
