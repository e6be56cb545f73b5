"""``tunemake.lock``: the commit every hub model and dataset of a config resolved to, so that a rerun
months later, or on another machine, reads the same bytes.

The lock maps a repository, keyed by its id and the revision the config asks for, to a commit sha.
Meant to be committed beside the config, like ``poetry.lock`` or ``dvc.lock``:

```yaml
models:
  meta-llama/Meta-Llama-3-8B-Instruct@main: 54bb11363d03e539735f5848de253ba82f4abef9
datasets:
  timdettmers/openassistant-guanaco@main: 3dd9d10ba6b06c21aeb202e0e0907d25ec2459e4
```

The workflow resolves what the lock lacks when it is parsed (the hub when reachable, else the
cache's ``refs/``) and writes the lock when it starts to run (never in a dry run); jobs only read
it. ``tunemake lock --update`` moves entries. Pinned commits go into the config
(:func:`pin`), so they reach exactly the stages that read the repository.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from tunemake.errors import ConfigError
from tunemake.hub import HubError, HubRepo, is_hub_id, resolve_commit

LOCK_FILE = "tunemake.lock"

_HEADER = ("# tunemake.lock: the commit each hub model and dataset of the config resolved to.\n"
           "# Commit it with the config; `tunemake lock --update` moves entries, and the next run\n"
           "# rebuilds what depends on them.\n")
_SECTIONS = {"model": "models", "dataset": "datasets"}


@dataclass(frozen=True)
class Entry:
    """One hub repository a config reads, and the config keys that name it."""

    repo_type: str
    repo_id: str
    revision: str  # as asked for: a branch, tag or commit; "main" when the config names none
    keys: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.repo_id}@{self.revision}"

    def repo(self) -> HubRepo:
        field = "path" if self.repo_type == "model" else "hub"
        return HubRepo(self.repo_id, self.repo_type, self.revision, f"{self.keys[0]}.{field}")


def entries(config: dict) -> list[Entry]:
    """The hub models and datasets the experiments of a resolved config read, in a stable order."""
    found: dict[tuple[str, str, str], list[str]] = {}
    for exp in config["experiments"].values():
        model = config["models"][exp["root_model"]]
        if "demo" not in model and is_hub_id(model["path"]):
            found.setdefault(("model", model["path"], model.get("revision") or "main"), []).append(
                f"models.{exp['root_model']}")
        for name in exp["datasets"]:
            dataset = config["datasets"][name]
            if "hub" in dataset and is_hub_id(dataset["hub"]):
                found.setdefault(("dataset", dataset["hub"], dataset.get("revision") or "main"), []).append(
                    f"datasets.{name}")
    return [Entry(*key, keys=tuple(sorted(set(keys)))) for key, keys in sorted(found.items())]


def read_lock(path: str | os.PathLike = LOCK_FILE) -> dict[tuple[str, str], str]:
    """``{(repo_type, "id@revision"): sha}``; empty when there is no lock file.

    Raises:
        ConfigError: a lock file that is not what :func:`write_lock` writes.
    """
    path = Path(path)
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return {(kind, name): str(sha) for kind, section in _SECTIONS.items()
                for name, sha in (data.get(section) or {}).items()}
    except (yaml.YAMLError, AttributeError) as exc:
        raise ConfigError(f"{path}: not a tunemake lock file ({exc}); delete it to resolve every entry again") from None


def write_lock(locked: dict[tuple[str, str], str], path: str | os.PathLike = LOCK_FILE) -> None:
    """Write the lock atomically, sections and entries sorted (a stable diff under version control)."""
    from tunemake.atomic import atomic_file

    data = {section: {name: sha for (k, name), sha in sorted(locked.items()) if k == kind}
            for kind, section in _SECTIONS.items()}
    with atomic_file(path) as handle:
        handle.write(_HEADER + yaml.safe_dump({k: v for k, v in data.items() if v}, sort_keys=True))


def resolve(config: dict, locked: dict[tuple[str, str], str], *, may_resolve: bool,
            update: set[str] | None = None, origin="config") -> dict[tuple[str, str], str]:
    """The lock for ``config``: ``locked`` plus a commit for every entry it lacks.

    Args:
        config: a resolved config.
        locked: what :func:`read_lock` returned.
        may_resolve: whether entries the lock lacks may be resolved (the main Snakemake process,
            the CLI); a cluster job only reads the lock.
        update: config keys (``models.NAME``, ``datasets.NAME``) whose entries are resolved again.
        origin: the config file, or the map of key paths to files, that messages start with.

    Raises:
        ConfigError: an entry missing where it may not be resolved, or an unknown key in ``update``.
        HubError: a commit that cannot be resolved (offline and not cached...).
    """
    wanted = entries(config)
    unknown = sorted((update or set()) - {key for entry in wanted for key in entry.keys})
    if unknown:
        raise ConfigError(f"{', '.join(unknown)}: not a hub model or dataset the experiments read; "
                          f"locked: {', '.join(key for e in wanted for key in e.keys) or 'none'}")
    result = dict(locked)
    for entry in wanted:
        key = (entry.repo_type, entry.name)
        if key in result and not (update and update & set(entry.keys)):
            continue
        if not may_resolve:
            raise ConfigError(f"{LOCK_FILE}: no entry for {entry.name} ({', '.join(entry.keys)}); run snakemake "
                              "(not a dry run) on the machine that submits the jobs, which writes it")
        try:
            result[key] = resolve_commit(entry.repo())
        except HubError as exc:
            from tunemake.config import origin_of

            raise HubError(f"{origin_of(origin, tuple(entry.keys[0].split('.', 1)))}: {exc}") from None
    return result


def load_pinned(source, *, may_resolve: bool, lock_file: str | os.PathLike = LOCK_FILE, **kwargs) -> dict:
    """:func:`tunemake.config.load_config` (``kwargs`` passed on), with every hub revision pinned by
    ``lock_file``; entries it lacks are resolved (not written) where ``may_resolve``, else an error."""
    from tunemake.config import load_config

    config = load_config(source, **kwargs)
    origin = kwargs.get("origin") or (str(source) if isinstance(source, (str, os.PathLike)) else "config")
    pin(config, resolve(config, read_lock(lock_file), may_resolve=may_resolve, origin=origin))
    return config


def pin(config: dict, locked: dict[tuple[str, str], str]) -> None:
    """Give every hub model and dataset of ``config`` its locked ``commit``, in place, and re-derive
    the experiments' data recipes, so that the commit reaches the stages that read the repository."""
    from tunemake.config import data_recipe, recipe_key

    for entry in entries(config):
        sha = locked.get((entry.repo_type, entry.name))
        for key in entry.keys:
            section, name = key.split(".", 1)
            if sha:
                config[section][name]["commit"] = sha
    for exp in config["experiments"].values():
        exp["data_recipe"] = data_recipe(exp, config)
        exp["data_key"] = recipe_key(exp["data_recipe"])
