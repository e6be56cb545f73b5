"""Hub ids: where a model or dataset named by a Hugging Face hub id lives on this machine, and fetching it.

A model ``path:`` that is not a local directory, and a dataset's ``hub:``, name a hub repository,
read from the standard cache (``$HF_HOME/hub``, shared with every other tool) at ``revision``
(a branch, tag or commit; ``main`` by default). Every stage resolves such an id to its snapshot
directory with :func:`model_dir` / :func:`dataset_dir`, which never touch the network; only
:func:`fetch` (the workflow's ``fetch_hub`` job, run on the machine that has internet) and
:func:`config_file` (a model's ``config.json``, read while Snakemake builds the DAG) download.

Errors are one line naming the config key, the id and revision, and what to run: not in the cache
while offline, a gated or private repository, a path that is neither a directory nor a hub id.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from tunemake.errors import TunemakeError

log = logging.getLogger("tunemake.hub")

#: ORG/NAME as the hub spells repository ids.
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_SHA = re.compile(r"[0-9a-f]{40}")

#: Files of a model repository that no stage reads: weights in other frameworks' formats.
OTHER_FORMATS = ("original/*", "*.pth", "*.pt", "*.gguf", "*.onnx", "*.h5", "*.msgpack", "*.ot", "*.tflite",
                 "*.mlmodel")


class HubError(TunemakeError):
    """A hub repository that cannot be read: not cached, gated, missing, or not a hub id at all."""


@dataclass(frozen=True)
class HubRepo:
    """A repository as a config names it.

    Attributes:
        repo_id: ``ORG/NAME``.
        repo_type: ``"model"`` or ``"dataset"``.
        revision: branch, tag or commit; None means ``main``.
        key: the config key that names it (``models.NAME.path``), for messages; None outside a config.
    """

    repo_id: str
    repo_type: str = "model"
    revision: str | None = None
    key: str | None = None

    @property
    def label(self) -> str:
        where = f"{self.key}: " if self.key else ""
        kind = "dataset " if self.repo_type == "dataset" else ""
        return f"{where}{kind}{self.repo_id} at revision {self.revision or 'main'}"

    @property
    def download_command(self) -> str:
        return " ".join(["hf download", self.repo_id, *(["--repo-type dataset"] if self.repo_type == "dataset" else []),
                         *([f"--revision {self.revision}"] if self.revision else [])])


def is_hub_id(path: str | os.PathLike) -> bool:
    """Whether ``path`` can only mean a hub id: no such local path, and shaped ``ORG/NAME``."""
    return not os.path.exists(path) and bool(_REPO_ID.fullmatch(str(path)))


def offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


def model_dir(path: str | os.PathLike, revision: str | None = None, key: str | None = None) -> Path:
    """The directory a model's files are read from: ``path`` itself, or a hub id's cached snapshot.

    Raises:
        HubError: ``path`` is neither a directory nor a hub id, or the hub id is not in the cache.
    """
    if Path(path).is_dir():
        return Path(path)
    return snapshot(_repo(str(path), "model", revision, key))


def dataset_dir(repo_id: str, revision: str | None = None, key: str | None = None) -> Path:
    """A hub dataset's cached snapshot (``datasets.load_dataset`` reads that directory, so the
    revision holds for data as for models); a local directory given as ``hub:`` is used as is."""
    if Path(repo_id).is_dir():
        return Path(repo_id)
    return snapshot(_repo(repo_id, "dataset", revision, key))


def _repo(path: str, repo_type: str, revision: str | None, key: str | None) -> HubRepo:
    if not _REPO_ID.fullmatch(path):
        where = f"{key}: " if key else ""
        raise HubError(f"{where}{path!r} is neither a directory nor a hub id (ORG/NAME)")
    return HubRepo(path, repo_type, revision, key)


def snapshot(repo: HubRepo) -> Path:
    """The cached snapshot of ``repo``, without touching the network.

    Raises:
        HubError: not in the cache (naming the command that fetches it).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo.repo_id, repo_type=repo.repo_type, revision=repo.revision,
                                      local_files_only=True))
    except LocalEntryNotFoundError:
        raise HubError(_not_cached(repo)) from None


def _not_cached(repo: HubRepo) -> str:
    from huggingface_hub import constants

    return (f"{repo.label} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}); fetch it with "
            f"`{repo.download_command}`, or run snakemake where there is internet (its fetch_hub job downloads it)")


def resolve_commit(repo: HubRepo) -> str:
    """The commit ``repo.revision`` points to now: asked of the hub (metadata only) when it can be
    reached, else read from the cache's ``refs/``; a revision that is a commit sha is itself.

    Raises:
        HubError: gated or private, missing, an unknown revision; unreachable and not cached.
    """
    from huggingface_hub import HfApi

    if _SHA.fullmatch(repo.revision or ""):
        return repo.revision
    if not offline():
        try:
            with _hub_errors(repo):
                return HfApi().repo_info(repo.repo_id, repo_type=repo.repo_type, revision=repo.revision).sha
        except HubError:
            raise
        except Exception as exc:  # the network, not the repository: the cache may know
            log.warning("%s: cannot reach the hub (%s); reading the commit from the cache", repo.label, exc)
    return snapshot(repo).name


def fetch(repo: HubRepo) -> Path:
    """Download ``repo`` into the standard cache (progress bars on stderr) and return its snapshot.

    A model's files are those transformers loads: its safetensors weights (``*.bin`` only where it
    has none), configs, tokenizer and code, not copies in other formats (Llama's ``original/``
    holds a second set of weights). A dataset is downloaded whole. Offline (``HF_HUB_OFFLINE=1``),
    a cached snapshot is returned as it is.

    Raises:
        HubError: gated or private, missing, an unknown revision, or offline and not cached.
    """
    from huggingface_hub import HfApi, snapshot_download

    if offline():
        return snapshot(repo)
    with _hub_errors(repo):
        ignore = None
        if repo.repo_type == "model":
            files = HfApi().list_repo_files(repo.repo_id, revision=repo.revision)
            ignore = list(OTHER_FORMATS) + (["*.bin"] if any(f.endswith(".safetensors") for f in files) else [])
        return Path(snapshot_download(repo.repo_id, repo_type=repo.repo_type, revision=repo.revision,
                                      ignore_patterns=ignore))


def config_file(repo: HubRepo) -> Path | None:
    """A hub model's ``config.json``: from the cache, else downloaded (small) unless offline.

    None when the repository has no ``config.json``.

    Raises:
        HubError: offline and not cached, gated or private, missing, an unknown revision.
    """
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import RemoteEntryNotFoundError

    cached = try_to_load_from_cache(repo.repo_id, "config.json", revision=repo.revision)
    if isinstance(cached, str):
        return Path(cached)
    try:
        snapshot(repo)
        return None  # cached, but without a config.json
    except HubError:
        if offline():
            raise
    with _hub_errors(repo):
        try:
            return Path(hf_hub_download(repo.repo_id, "config.json", revision=repo.revision))
        except RemoteEntryNotFoundError:
            return None


class _hub_errors:
    """Turn huggingface_hub's exceptions into one HubError line."""

    def __init__(self, repo: HubRepo):
        self.repo = repo

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None:
            return False
        message = _hub_message(self.repo, exc)
        if message is None:
            return False
        raise HubError(message) from None


def _hub_message(repo: HubRepo, exc: BaseException) -> str | None:
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    login = "log in with `hf auth login` or set HF_TOKEN"
    if isinstance(exc, GatedRepoError):
        return f"{repo.label} is gated: accept its terms on huggingface.co/{repo.repo_id}, then {login}"
    if isinstance(exc, RepositoryNotFoundError):
        return f"{repo.label}: no such repository on the hub, or it is private ({login})"
    if isinstance(exc, RevisionNotFoundError):
        return f"{repo.label}: the repository has no revision {repo.revision!r}"
    if isinstance(exc, LocalEntryNotFoundError):
        return _not_cached(repo)
    if isinstance(exc, HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            return f"{repo.label}: access refused (HTTP {status}); {login}"
        return f"{repo.label}: the hub answered {exc}"
    return None


def remote_code_error(exc: BaseException) -> bool:
    """Whether ``exc`` was raised inside a model's own code (transformers' dynamic modules)."""
    tb = exc.__traceback__
    while tb is not None:
        if "transformers_modules" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def own_code_failed(name: str, exc: BaseException) -> HubError:
    """The one line for a model whose own code does not run under the installed transformers."""
    import transformers

    return HubError(f"{name}: the model's own code (trust_remote_code) failed under transformers "
                    f"{transformers.__version__}: {type(exc).__name__}: {exc}")


def load_pretrained(loader, directory: str | os.PathLike, name: str | None = None, **kwargs):
    """``loader.from_pretrained(directory, **kwargs)`` with a model's own code failing in one line.

    ``name`` is what messages call the model (its hub id or config path). Code that needs
    ``trust_remote_code`` without it, and code that does not import under the installed
    transformers (InternLM2's, say), become a :class:`HubError`.
    """
    name = name or str(directory)
    try:
        return loader.from_pretrained(str(directory), **kwargs)
    except Exception as exc:
        if remote_code_error(exc):
            raise own_code_failed(name, exc) from None
        if "trust_remote_code" in str(exc) and not kwargs.get("trust_remote_code"):
            raise HubError(f"{name}: the model ships its own code; set `trust_remote_code: true` in its "
                           "models: entry (or pass --trust-remote-code) if you trust it") from None
        raise


def fetch_receipt(repo_id: str, repo_type: str, revision: str | None, out: str | os.PathLike) -> dict:
    """The ``fetch_hub`` job: download a repository into the cache and write ``out``, a small JSON
    receipt (id, revision, the commit it resolved to, the snapshot directory) that the jobs reading
    the repository take as input, so they run after the download, on any node.

    Raises:
        HubError: see :func:`fetch`; a model snapshot without weights.
    """
    from tunemake.atomic import write_json

    repo = HubRepo(repo_id, repo_type, revision)
    directory = fetch(repo)
    if repo_type == "model":
        _check_weights(repo, directory)
    receipt = {"repo_id": repo_id, "repo_type": repo_type, "revision": revision or "main",
               "commit": directory.name, "snapshot": str(directory)}
    write_json(out, receipt)
    log.info("%s: %s", repo.label, directory)
    return receipt


def _check_weights(repo: HubRepo, directory: Path) -> None:
    """A cached model snapshot holds its config and every weight file (a partial download does not)."""
    import json

    index = next(iter(sorted(directory.glob("*.index.json"))), None)
    if index is not None:
        shards = set(json.loads(index.read_text())["weight_map"].values())
        missing = sorted(s for s in shards if not (directory / s).is_file())
    else:
        weights = [*directory.glob("*.safetensors"), *directory.glob("*.bin")]
        missing = [] if weights else ["*.safetensors"]
    if not (directory / "config.json").is_file():
        missing.insert(0, "config.json")
    if missing:
        raise HubError(f"{repo.label}: the cached snapshot {directory} lacks {', '.join(missing)}; "
                       f"fetch it whole with `{repo.download_command}`")


def check_config(config: dict, origin="config") -> None:
    """What the DAG needs from the hub, at parse time: for every model the experiments start from,
    its ``config.json`` (for the resource estimates; fetched now when online, small) and that it
    may run its own code; offline, that every hub dataset is cached.

    Args:
        config: a config resolved by :func:`tunemake.config.load_config`.
        origin: the config file's name, or the map from key paths to the files that set them
            (:func:`tunemake.config.read_config_files`); every message starts with the file.

    Raises:
        HubError: the first problem, as ``FILE: models.NAME.path: ...``.
    """
    import json

    from tunemake.config import origin_of, read_revision

    experiments = config["experiments"].values()
    for name in sorted({exp["root_model"] for exp in experiments}):
        model = config["models"][name]
        if "demo" in model:
            continue
        where = origin_of(origin, ("models", name))
        path = Path(model["path"])
        try:
            cfg = path / "config.json" if path.is_dir() else config_file(
                _repo(model["path"], "model", read_revision(model), f"models.{name}.path"))
        except HubError as exc:
            raise HubError(f"{where}: {exc}") from None
        if cfg is not None and cfg.is_file() and json.loads(cfg.read_text()).get("auto_map") \
                and not model["trust_remote_code"]:
            raise HubError(f"{where}: models.{name}.trust_remote_code: {model['path']} ships its own model code "
                           "(auto_map in its config.json); set `trust_remote_code: true` if you trust it")
    if offline():
        for name in sorted({d for exp in experiments for d in exp["datasets"]}):
            dataset = config["datasets"][name]
            if "hub" in dataset:
                try:
                    dataset_dir(dataset["hub"], read_revision(dataset), f"datasets.{name}.hub")
                except HubError as exc:
                    raise HubError(f"{origin_of(origin, ('datasets', name))}: {exc}") from None
