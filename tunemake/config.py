"""The config: schema validation with defaults, cross-references, and the resolved experiment table.

``load_config`` is the one place that reads ``config.yaml``; the Snakefile, the CLI and the tests all
call it and get the same resolved experiments, each with the recipe (and its hash) of its data.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from tunemake.errors import ConfigError, TunemakeError
from tunemake.templates import HF, get_template
from tunemake.versions import DATA_CODE_VERSION

SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "config.schema.yaml"

#: Methods usable by name without a ``methods:`` entry, with XTuner's defaults.
BUILTIN_METHODS = {"full": {"type": "full"}, "lora": {"type": "lora"}, "qlora": {"type": "qlora"}}

#: DeepSpeed configs tunemake ships, by XTuner's names without the ``deepspeed_`` prefix.
DEEPSPEED_CONFIGS = ("zero1", "zero2", "zero2_offload", "zero3", "zero3_offload")

GLOB_CHARS = set("*?[")


def load_schema() -> dict:
    with open(SCHEMA_PATH, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def read_config_file(path: str | os.PathLike) -> dict:
    """Read a YAML config file, naming the file and line of a syntax error."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of models, datasets, experiments")
    return data


def load_config(source: str | os.PathLike | dict, origin: str | None = None) -> dict:
    """Validate a config, fill in its defaults and resolve every experiment.

    Args:
        source: a YAML file path, or an already-parsed config (Snakemake's ``config``).
        origin: the file name used in error messages (defaults to ``source`` when it is a path).

    Returns:
        The config with defaults filled in, ``methods`` including the built-in ``full`` / ``lora`` /
        ``qlora``, and ``experiments`` turned into a dict ``name -> resolved experiment`` (see
        :func:`resolve_experiment` for its keys), in config order.

    Raises:
        ConfigError: a value of the wrong type or range, an unknown reference, a duplicate or
            cyclic experiment; the message names the key.
    """
    if isinstance(source, dict):
        raw = copy.deepcopy(source)
        origin = origin or "config"
    else:
        origin = origin or str(source)
        raw = read_config_file(source)
    schema = load_schema()
    fill_defaults(raw, schema, schema)
    validate_against_schema(raw, schema, origin)

    config = raw
    methods = {name: dict(m) for name, m in BUILTIN_METHODS.items()}
    methods.update(config.get("methods", {}))
    for name, method in methods.items():
        fill_defaults(method, schema["$defs"]["method"], schema)
        if method.get("gradient_checkpointing") is None:
            method["gradient_checkpointing"] = method["type"] == "qlora"
    config["methods"] = methods

    for name, fields in config.get("templates", {}).items():
        get_template(name, config["templates"])  # checks placeholders

    experiments: dict[str, dict] = {}
    for index, exp in enumerate(config["experiments"]):
        key = f"{origin}: experiments[{index}]"
        exp = dict(exp)
        exp["datasets"] = [exp["datasets"]] if isinstance(exp["datasets"], str) else list(exp["datasets"])
        exp["_key"] = key
        exp.setdefault("name", None)  # derived below, once upstream names are known
        experiments[f"#{index}"] = exp
    config["experiments"] = _name_experiments(experiments, config, origin)
    for exp in config["experiments"].values():
        resolve_experiment(exp, config, origin)
    return config


def fill_defaults(data: Any, schema: dict, root: dict) -> None:
    """Fill JSON-schema ``default`` values into ``data`` in place, following ``$ref``.

    Unlike Snakemake's ``validate(set_default=True)``, this also descends into
    ``additionalProperties`` (our maps of named models, datasets, ...) and array items.
    """
    schema = _deref(schema, root)
    if isinstance(data, dict):
        for key, sub in schema.get("properties", {}).items():
            sub = _deref(sub, root)
            if key not in data and "default" in sub:
                data[key] = copy.deepcopy(sub["default"])
            if key in data:
                fill_defaults(data[key], sub, root)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in data:
                if key not in schema.get("properties", {}):
                    fill_defaults(data[key], extra, root)
    elif isinstance(data, list) and isinstance(schema.get("items"), dict):
        for item in data:
            fill_defaults(item, schema["items"], root)


def _deref(schema: dict, root: dict) -> dict:
    while "$ref" in schema:
        node: Any = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        schema = node
    return schema


def validate_against_schema(data: dict, schema: dict, origin: str) -> None:
    """Raise one ConfigError for the most relevant schema violation, naming its key path."""
    import jsonschema
    from jsonschema.exceptions import best_match

    validator = jsonschema.Draft202012Validator(schema)
    error = best_match(validator.iter_errors(data))
    if error is None:
        return
    # A oneOf failure is best explained by the branch that got furthest.
    while error.context:
        error = best_match(error.context)
    path = _key_path(error.absolute_path)
    message = error.message
    if error.validator == "additionalProperties":
        message = message.replace("Additional properties are not allowed", "unknown key")
    raise ConfigError(f"{origin}: {path or '(top level)'}: {message}")


def _key_path(parts) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _name_experiments(indexed: dict[str, dict], config: dict, origin: str) -> dict[str, dict]:
    """Give every experiment its name (XTuner's ``{model}_{method}_{datasets}`` by default).

    A chained experiment's default name starts with its upstream experiment's name, so names are
    settled in rounds until every upstream is known.
    """
    names: dict[str, str] = {}  # index -> name
    pending = dict(indexed)
    while pending:
        progressed = False
        for index, exp in list(pending.items()):
            model = exp["model"]
            name = exp["name"]
            if name is None and isinstance(model, dict):
                if model["experiment"] not in names.values():
                    continue
                name = f"{model['experiment']}_{exp['method']}_{'+'.join(exp['datasets'])}"
            elif name is None:
                name = f"{model}_{exp['method']}_{'+'.join(exp['datasets'])}"
            if name in names.values():
                raise ConfigError(
                    f"{exp['_key']}: experiment name {name!r} is used twice; "
                    "give one of them a distinct `name:`"
                )
            exp["name"] = names[index] = name
            del pending[index]
            progressed = True
        if not progressed:
            exp = next(iter(pending.values()))
            raise ConfigError(
                f"{exp['_key']}.model.experiment: unknown experiment {exp['model']['experiment']!r}"
            )
    return {exp["name"]: exp for exp in indexed.values()}


SIZE_EXAMPLES = '2GB (2*10^9 bytes), 500MB, 100KB, 1GiB (2^30 bytes), 512MiB, or a number of bytes'


def parse_size(size: int | str) -> int:
    """A shard size in bytes, read as transformers reads ``max_shard_size``.

    ``"2GB"`` is 2*10^9 bytes, ``"1GiB"`` 2^30; KB/MB/GB and KiB/MiB/GiB, any case; a lowercase
    ``b`` after K/M/G means bits (``"8Mb"`` = 10^6 bytes); a bare number is bytes.

    Raises:
        TunemakeError: anything else, or a size below one byte.
    """
    value = None
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    elif isinstance(size, str):
        text = size.strip()
        match = re.fullmatch(r"(\d+)\s*(?:([KkMmGg])([Ii]?)([Bb]))?", text)
        if match:
            number, prefix, binary, unit = match.groups()
            value = int(number)
            if prefix:
                power = "KMG".index(prefix.upper()) + 1
                value *= 2 ** (10 * power) if binary else 10 ** (3 * power)
                if unit == "b" and not binary:
                    value //= 8
    if value is None or value < 1:
        raise TunemakeError(f"max_shard_size: cannot read {size!r} as a size; write e.g. {SIZE_EXAMPLES}")
    return value


def resolve_experiment(exp: dict, config: dict, origin: str) -> None:
    """Check an experiment's references and add its resolved fields, in place.

    Adds ``root_model`` (the config model its chain starts from), ``upstream`` (the experiment it
    continues, or None), ``template`` (resolved name), ``method_config``, ``data_recipe`` and
    ``data_key`` (the hash naming its templated dataset).
    """
    key = exp["_key"]
    model = exp["model"]
    if isinstance(model, dict):
        upstream = model["experiment"]
        if upstream not in config["experiments"]:
            raise ConfigError(f"{key}.model.experiment: unknown experiment {upstream!r}")
        exp["upstream"] = upstream
        exp["root_model"] = _root_model(upstream, config, key)
    else:
        if model not in config["models"]:
            raise ConfigError(
                f"{key}.model: unknown model {model!r}; defined models: {', '.join(config['models'])}"
            )
        exp["upstream"] = None
        exp["root_model"] = model
    for index, name in enumerate(exp["datasets"]):
        if name not in config["datasets"]:
            raise ConfigError(
                f"{key}.datasets[{index}]: unknown dataset {name!r}; "
                f"defined datasets: {', '.join(config['datasets'])}"
            )
    if exp["method"] not in config["methods"]:
        raise ConfigError(
            f"{key}.method: unknown method {exp['method']!r}; known methods: {', '.join(config['methods'])}"
        )
    exp["method_config"] = config["methods"][exp["method"]]
    root = config["models"][exp["root_model"]]
    exp["template"] = exp.get("template") or root["template"]
    try:
        get_template(exp["template"], config.get("templates"))
    except ConfigError as exc:
        raise ConfigError(f"{key}.template: {exc}") from None
    try:
        parse_size(exp["max_shard_size"])
    except TunemakeError as exc:
        raise ConfigError(f"{key}.{exc}") from None
    deepspeed = exp.get("deepspeed")
    if deepspeed and deepspeed not in DEEPSPEED_CONFIGS and not deepspeed.endswith(".json"):
        raise ConfigError(
            f"{key}.deepspeed: {deepspeed!r} is neither a ZeRO config name "
            f"({', '.join(DEEPSPEED_CONFIGS)}) nor a .json file"
        )
    for name in exp["datasets"]:
        dataset = config["datasets"][name]
        if dataset["format"] == "custom" and "fields" not in dataset:
            dataset["fields"] = {"input": "input", "output": "output", "system": None}
    exp["data_recipe"] = data_recipe(exp, config)
    exp["data_key"] = recipe_key(exp["data_recipe"])


def _root_model(experiment: str, config: dict, key: str) -> str:
    seen = set()
    while True:
        if experiment in seen:
            raise ConfigError(f"{key}.model: experiments chain into a cycle through {experiment!r}")
        seen.add(experiment)
        model = config["experiments"][experiment]["model"]
        if not isinstance(model, dict):
            if model not in config["models"]:
                raise ConfigError(f"{key}.model: unknown model {model!r} at the root of the chain")
            return model
        experiment = model["experiment"]
        if experiment not in config["experiments"]:
            raise ConfigError(f"{key}.model: unknown experiment {experiment!r} in the chain")


def data_recipe(exp: dict, config: dict) -> dict:
    """Everything an experiment's templated dataset depends on, besides file contents.

    Training seed, lr, method and epochs are deliberately absent, so experiments differing only in
    those share one build. The tokenizer is named by its root model: a chained experiment's data
    never depends on its base's weights.
    """
    root = config["models"][exp["root_model"]]
    template = exp["template"]
    if template == HF:
        template_recipe: dict = {"name": HF}
    else:
        t = get_template(template, config.get("templates"))
        template_recipe = {
            "name": t.name, "system": t.system, "instruction": t.instruction, "suffix": t.suffix,
            "suffix_as_eos": t.suffix_as_eos, "sep": t.sep,
        }
    datasets = []
    for name in exp["datasets"]:
        d = dict(config["datasets"][name])
        if "path" in d:
            d["path"] = [d["path"]] if isinstance(d["path"], str) else list(d["path"])
        datasets.append({"name": name, **d})
    return {
        "code_version": DATA_CODE_VERSION,
        "tokenizer": {
            "path": root["path"], "revision": root.get("revision"),
            "trust_remote_code": root.get("trust_remote_code", False),
        },
        "template": template_recipe,
        "datasets": datasets,
        "max_length": exp["max_length"],
        "packing": exp["packing"],
        "data_seed": exp["data_seed"],
    }


def recipe_key(recipe: dict) -> str:
    """A short, stable hash of a recipe (canonical JSON)."""
    blob = json.dumps(recipe, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def expand_sources(dataset: dict, name: str) -> list[str]:
    """The local files a dataset reads, globs expanded (sorted); [] for a hub dataset.

    A path without glob characters is returned as is, even if it does not exist yet: another rule
    may build it (the demo's data is a build output).

    Raises:
        ConfigError: a glob matches no file.
    """
    if "path" not in dataset:
        return []
    paths = [dataset["path"]] if isinstance(dataset["path"], str) else dataset["path"]
    files: list[str] = []
    for pattern in paths:
        if GLOB_CHARS & set(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise ConfigError(f"datasets.{name}.path: {pattern!r} matches no file")
            files.extend(matches)
        else:
            files.append(pattern)
    return files


def local_model_dir(path: str | os.PathLike, revision: str | None = None) -> Path | None:
    """Where a model's files are on this machine: ``path`` itself when it is a directory, else a
    hub id's snapshot (at ``revision``) in the local Hugging Face cache; None when neither.

    Training downloads a hub model into that cache, so later stages find it there offline.
    """
    directory = Path(path)
    if directory.is_dir():
        return directory
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(str(path), revision=revision, local_files_only=True))
        except Exception:
            return None
    return None


def is_local_model(model: dict) -> bool:
    """A model is read from disk when it is built by the demo or its path exists locally."""
    return "demo" in model or os.path.exists(model["path"])


#: Experiment keys that change what training computes (the rest only change logging).
TRAIN_KEYS = ("seed", "batch_size", "grad_accumulation", "lr", "weight_decay", "betas", "max_grad_norm",
              "precision", "deepspeed", "gpus", "nodes", "nproc")


def epoch_identity(exp: dict, epoch: int, config: dict) -> dict:
    """Everything epoch ``epoch``'s result depends on besides its input files (a Snakemake param).

    The total epoch count enters only where the schedule makes the epoch depend on it (see
    ``tunemake.schedule.epoch_schedule_identity``), so raising ``epochs`` re-runs only what it
    really changes.
    """
    from tunemake.schedule import epoch_schedule_identity
    from tunemake.versions import TRAIN_CODE_VERSION

    return {
        "code_version": TRAIN_CODE_VERSION,
        "method": exp["method_config"],
        "train": {key: exp[key] for key in TRAIN_KEYS},
        "schedule": epoch_schedule_identity(exp["schedule"], epoch, exp["epochs"]),
        "data_key": exp["data_key"],
        "base_model": base_model_of(exp, config),
    }


def base_model_of(exp: dict, config: dict) -> dict:
    """The model an experiment trains on: a config model, or (chained) its upstream's final merge."""
    if exp["upstream"]:
        from tunemake.paths import final_merge

        upstream = config["experiments"][exp["upstream"]]
        root = config["models"][exp["root_model"]]
        return {"path": final_merge(upstream["name"], upstream["epochs"]), "revision": None,
                "dtype": root["dtype"], "trust_remote_code": root["trust_remote_code"]}
    model = config["models"][exp["model"]]
    return {"path": model["path"], "revision": model.get("revision"), "dtype": model["dtype"],
            "trust_remote_code": model["trust_remote_code"]}


def train_spec(exp: dict, epoch: int, config: dict, threads: int = 1) -> dict:
    """The full specification ``tunemake.train.train_epoch`` runs (paths included)."""
    from tunemake import paths
    from tunemake.templates import get_template, template_to_dict

    template = get_template(exp["template"], config.get("templates"))
    root = config["models"][exp["root_model"]]
    fmt = dict(experiment=exp["name"], epoch=epoch)
    previous = None
    if epoch > 1:
        previous = {"pth": paths.checkpoint(exp["name"], epoch - 1), "state": paths.train_state(exp["name"], epoch - 1)}
    return {
        "experiment": exp["name"],
        "epoch": epoch,
        "method": exp["method_config"],
        "train": {**{key: exp[key] for key in TRAIN_KEYS}, "epochs": exp["epochs"], "schedule": exp["schedule"],
                  "save_steps": exp["save_steps"], "evaluation_inputs": exp["evaluation_inputs"]},
        "base_model": base_model_of(exp, config),
        "tokenizer_path": root["path"],
        "tokenizer_revision": root.get("revision"),
        "template": template_to_dict(template),
        "data_dir": paths.templated_dataset(exp["data_key"]),
        "previous": previous,
        "out": {"pth": paths.CHECKPOINT.format(**fmt), "state": paths.TRAIN_STATE.format(**fmt),
                "resume": paths.RESUME_POINT.format(**fmt)},
        "log_dir": paths.TRAIN_LOG_DIR.format(experiment=exp["name"]),
        "threads": threads,
    }
