"""The config: schema validation with defaults, cross-references, and the resolved experiment table.

``load_config`` is the one place that reads ``config.yaml``; the Snakefile, the CLI and the tests all
call it and get the same resolved experiments, each with the recipe (and its hash) of its data.
"""

from __future__ import annotations

import copy
import functools
import glob
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from tunemake.errors import ConfigError, TunemakeError
from tunemake.templates import HF, get_template
from tunemake.toolforms import TOOL_TEMPLATES
from tunemake.versions import DATA_CODE_VERSION

SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "config.schema.yaml"

#: Methods usable by name without a ``methods:`` entry, with XTuner's defaults.
BUILTIN_METHODS = {"full": {"type": "full"}, "lora": {"type": "lora"}, "qlora": {"type": "qlora"}}

#: The dtypes a model is loaded, converted or merged in, by the name a config and torch give them
#: (``getattr(torch, name)``), with their bytes per value.
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}

#: Gathered parameters ZeRO-3 keeps alive between uses in the presets (DeepSpeed's default is 1e9:
#: 2 GB in bf16, several layers of a 70B model): about one layer of a 70B model, so that training
#: stays partitioned.
ZERO3_LIVE_PARAMETERS = 300_000_000
_ZERO3_LIVE = {"stage3_max_live_parameters": ZERO3_LIVE_PARAMETERS, "stage3_max_reuse_distance": ZERO3_LIVE_PARAMETERS}
#: DeepSpeed configs tunemake ships, by XTuner's names without the ``deepspeed_`` prefix: XTuner's
#: ZeRO configs (xtuner/configs/deepspeed/), ZeRO-3's live parameters capped, the batch fields
#: left to ``tunemake.train`` to fill.
DEEPSPEED_PRESETS = {
    "zero1": {"zero_optimization": {"stage": 1}},
    "zero2": {"zero_optimization": {"stage": 2, "overlap_comm": True}},
    "zero2_offload": {"zero_optimization": {"stage": 2, "overlap_comm": True,
                                            "offload_optimizer": {"device": "cpu", "pin_memory": True}}},
    "zero3": {"zero_optimization": {"stage": 3, "overlap_comm": True, **_ZERO3_LIVE,
                                    "stage3_gather_16bit_weights_on_model_save": True}},
    "zero3_offload": {"zero_optimization": {"stage": 3, "overlap_comm": True, **_ZERO3_LIVE,
                                            "offload_optimizer": {"device": "cpu", "pin_memory": True},
                                            "offload_param": {"device": "cpu", "pin_memory": True},
                                            "stage3_gather_16bit_weights_on_model_save": True}},
}

GLOB_CHARS = set("*?[")


def load_schema() -> dict:
    with open(SCHEMA_PATH, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


class _KeyWrittenTwice(Exception):
    """Raised inside the YAML loader, which does not know the file's name."""

    def __init__(self, key, first: int, second: int):
        super().__init__()
        self.key, self.first, self.second = key, first, second


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader refusing a key written twice in one mapping, where PyYAML (and so
    Snakemake) silently keeps the later value. ``<<`` merges may still override keys."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            lines: dict = {}  # key -> the line it was first written on
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in lines:
                        raise _KeyWrittenTwice(key, lines[key], line)
                    lines[key] = line
                except TypeError:  # an unhashable key: SafeLoader says so below
                    continue
        return super().construct_mapping(node, deep=deep)


def read_config_file(path: str | os.PathLike) -> dict:
    """Read a YAML (or JSON) config file, naming the file and line of a syntax error.

    Raises:
        ConfigError: a missing file, invalid YAML, a key written twice in one mapping (naming the
            key and both lines), or a file that is not a mapping.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except _KeyWrittenTwice as exc:
        lines = f"line {exc.first}" if exc.first == exc.second else f"lines {exc.first} and {exc.second}"
        raise ConfigError(f"{path}:{exc.second}: key {exc.key!r} is written twice, on {lines}; keep one") from None
    except yaml.YAMLError as exc:
        data = _read_json(text, path)  # JSON that YAML refuses (tabs), which Snakemake reads as JSON
        if data is None:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise ConfigError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of models, datasets, experiments")
    return data


def _read_json(text: str, path) -> Any:
    """``text`` as JSON, None if it is not JSON; a key written twice in one object is an error."""

    def unique(pairs):
        keys = [key for key, _ in pairs]
        for key in keys:
            if keys.count(key) > 1:
                raise ConfigError(f"{path}: key {key!r} is written twice in one object; keep one")
        return dict(pairs)

    try:
        return json.loads(text, object_pairs_hook=unique)
    except json.JSONDecodeError:
        return None


def read_config_files(paths: Sequence[str | os.PathLike]) -> tuple[dict, dict[tuple, str]]:
    """Read config files and merge them as Snakemake merges ``--configfile FILE ...``.

    Returns:
        The merged config, and which file set each key path (see :func:`merge_config`); the
        empty path ``()`` is the last file.

    Raises:
        ConfigError: as :func:`read_config_file`, naming the file.
    """
    config: dict = {}
    origins: dict[tuple, str] = {}
    for path in paths:
        merge_config(config, read_config_file(path), origins, str(path))
        origins[()] = str(path)
    return config, origins


def merge_config(config: dict, update: Mapping, origins: dict[tuple, str], origin: str, prefix: tuple = ()) -> None:
    """Merge ``update`` into ``config`` in place as ``snakemake.utils.update_config`` does (a
    mapping updates a mapping key by key; anything else, a list included, replaces the value),
    noting in ``origins`` that ``origin`` set each key path it writes. A list's items have no key
    path of their own: they share the list's origin."""
    for key, value in update.items():
        path = (*prefix, key)
        if not isinstance(value, Mapping):  # replaced, with everything below it
            for old in [p for p in origins if len(p) > len(path) and p[:len(path)] == path]:
                del origins[old]
        origins[path] = origin
        if isinstance(value, Mapping):
            if not isinstance(config.get(key), dict):
                config[key] = {}
            merge_config(config[key], value, origins, origin, path)
        else:
            config[key] = value


def origin_of(origin: str | Mapping[tuple, str], path: Sequence) -> str:
    """The file that set key path ``path``, or the nearest key above it that a file set.

    Args:
        origin: one name for every key, or what :func:`read_config_files` returns beside the config.
        path: keys and list indices, e.g. ``("experiments", 0, "lr")``.
    """
    if isinstance(origin, str):
        return origin
    path = tuple(path)
    while path and path not in origin:
        path = path[:-1]
    return origin.get(path, "config")


def load_config(source: str | os.PathLike | Sequence[str | os.PathLike] | dict,
                origin: str | Mapping[tuple, str] | None = None, *, check_files: bool = True) -> dict:
    """Validate a config, fill in its defaults and resolve every experiment.

    Numbers are given the type the schema wants first (:func:`normalise_numbers`): ``lr: 2e-4``,
    a string to YAML 1.1, is 0.0002; ``weight_decay: 0`` is 0.0.

    Args:
        source: a YAML file path; several, merged as Snakemake merges ``--configfile``s; or an
            already-parsed config (Snakemake's ``config``).
        origin: what error messages name as the config's file: one name, or which file set each
            key path (as :func:`read_config_files` returns it). Defaults to the file that set the
            key when ``source`` is read here, else ``config``.
        check_files: expand every dataset's globs now and check its local files (a glob that
            matches nothing, an empty file). False reads only the config itself, for commands
            that do not read the data.

    Returns:
        The config with defaults filled in, ``methods`` including the built-in ``full`` / ``lora`` /
        ``qlora``, ``experiments`` turned into a dict ``name -> resolved experiment`` (see
        :func:`resolve_experiment` for its keys), in config order, and with ``check_files``,
        ``source_files``: dataset name -> its local files, globs expanded (as :func:`expand_sources`).

    Raises:
        ConfigError: a value of the wrong type or range, an unknown reference, a duplicate or
            cyclic experiment, a glob that matches nothing, an empty data file; the message starts
            with the file that set the key, then names the key.
    """
    if isinstance(source, dict):
        raw = copy.deepcopy(source)
        origin = origin or "config"
    else:
        raw, file_origins = read_config_files([source] if isinstance(source, (str, os.PathLike)) else source)
        origin = origin or file_origins
    where = functools.partial(origin_of, origin)
    schema = load_schema()
    fill_defaults(raw, schema, schema)
    normalise_numbers(raw, schema, schema)
    validate_against_schema(raw, schema, origin)

    config = raw
    methods = {name: dict(m) for name, m in BUILTIN_METHODS.items()}
    methods.update(config.get("methods", {}))
    for name, method in methods.items():
        fill_defaults(method, schema["$defs"]["method"], schema)
        normalise_numbers(method, schema["$defs"]["method"], schema)  # the built-in ones' defaults
        if method.get("gradient_checkpointing") is None:
            method["gradient_checkpointing"] = method["type"] == "qlora"
    config["methods"] = methods

    for name in config.get("templates", {}):
        try:
            get_template(name, config["templates"])  # checks placeholders
        except ConfigError as exc:
            raise ConfigError(f"{where(('templates', name))}: {exc}") from None

    for name, dataset in config["datasets"].items():
        _check_fields(dataset, f"{where(('datasets', name, 'fields'))}: datasets.{name}.fields")

    experiments: dict[str, dict] = {}
    for index, exp in enumerate(config["experiments"]):
        key = f"{where(('experiments', index))}: experiments[{index}]"
        exp = dict(exp)
        exp["datasets"] = [exp["datasets"]] if isinstance(exp["datasets"], str) else list(exp["datasets"])
        exp["_key"] = key
        exp.setdefault("name", None)  # derived below, once upstream names are known
        experiments[f"#{index}"] = exp
    config["experiments"] = _name_experiments(experiments, config, origin)
    for exp in config["experiments"].values():
        resolve_experiment(exp, config, origin)
    if check_files:
        config["source_files"] = {name: expand_sources(dataset, name, where(("datasets", name, "path")))
                                  for name, dataset in config["datasets"].items()}
        check_tool_templates(config)
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


#: A number written as a string: what YAML 1.1 leaves a string (``2e-4``, ``1e3``: no dot, or no
#: sign in the exponent) and what a user quotes. No ``nan``, ``inf`` or ``1_000``.
NUMERIC_STRING = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def normalise_numbers(data: Any, schema: dict | None = None, root: dict | None = None) -> Any:
    """Give every number the type its schema wants, in place, following ``$ref`` and ``oneOf``.

    Where the schema wants a number and not a string, a numeric string becomes the number
    (``lr: 2e-4``, which YAML 1.1 reads as a string). Then a ``number`` is a float and an
    ``integer`` an int: ``weight_decay: 0``, ``0.0`` and ``"0"`` are all ``0.0``, ``epochs: 2`` and
    ``2.0`` both ``2``, so one value has one spelling (Snakemake compares params by their
    ``repr``). What does not fit is left as it is, for schema validation to name the key.

    Args:
        data: a config, or a part of one.
        schema: its schema; default the config's.
        root: the schema ``$ref`` starts from; default ``schema``.

    Returns:
        ``data`` with its numbers converted (a mapping or list is converted in place).
    """
    if schema is None:
        schema = load_schema()
    root = root or schema
    alternatives = _alternatives(schema, root)
    if isinstance(data, dict):
        for key in data:
            sub = next((a["properties"][key] for a in alternatives if key in a.get("properties", {})), None)
            if sub is None:
                sub = next((a["additionalProperties"] for a in alternatives
                            if isinstance(a.get("additionalProperties"), dict)), None)
            if sub is not None:
                data[key] = normalise_numbers(data[key], sub, root)
        return data
    if isinstance(data, list):
        items = next((a["items"] for a in alternatives if isinstance(a.get("items"), dict)), None)
        if items is not None:
            data[:] = [normalise_numbers(item, items, root) for item in data]
        return data
    types = set()
    for alternative in alternatives:
        kind = alternative.get("type", [])
        types.update([kind] if isinstance(kind, str) else kind)
    return _schema_number(data, types)


def _schema_number(value: Any, types: set[str]) -> Any:
    """``value`` as the number a schema node of ``types`` wants; else unchanged, for validation
    to refuse (or accept, where it is no number the node wants)."""
    if isinstance(value, bool) or not {"number", "integer"} & types:
        return value
    number = value
    if isinstance(value, str):
        if "string" in types or not NUMERIC_STRING.fullmatch(value):
            return value
        number = int(value) if value.lstrip("+-").isdigit() else float(value)
    if not isinstance(number, (int, float)):
        return value
    if "number" in types:
        try:
            number = float(number)
        except OverflowError:  # an int beyond any float
            return value
        return number if math.isfinite(number) else value
    if isinstance(number, float):
        return int(number) if number.is_integer() else value
    return number


def _alternatives(schema: dict, root: dict) -> list[dict]:
    """``schema`` and the branches of its ``oneOf`` / ``anyOf`` / ``allOf``, dereferenced."""
    schema = _deref(schema, root)
    found = [schema]
    for keyword in ("oneOf", "anyOf", "allOf"):
        for branch in schema.get(keyword, []):
            found.extend(_alternatives(branch, root))
    return found


#: Types a Snakemake param may hold: Snakemake 9 compares the ``repr`` of params of builtin types
#: and silently leaves any other type out of the comparison.
_PARAM_SCALARS = (str, int, float, bool, type(None))


def canonical(value: Any) -> Any:
    """``value`` as a Snakemake param: plain builtin data in one spelling.

    Snakemake reruns a job when the ``repr`` of one of its params changes, and a dict's ``repr``
    follows its insertion order: a config written in another key order, or a default written
    out, would rerun everything. Here mappings become dicts with sorted keys, tuples lists, sets
    sorted lists, paths strings, all the way down; numbers keep their type (the config's are
    settled by :func:`normalise_numbers`).

    Raises:
        TypeError: a value of another type, which Snakemake would silently not compare.
    """
    if isinstance(value, _PARAM_SCALARS):
        return value
    if isinstance(value, Mapping):
        return {key: canonical(value[key]) for key in sorted(value, key=str)}
    if isinstance(value, (list, tuple)):
        return [canonical(item) for item in value]
    if isinstance(value, (set, frozenset)):
        return sorted((canonical(item) for item in value), key=repr)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} {value!r} cannot be a Snakemake param; use builtin types")


def _deref(schema: dict, root: dict) -> dict:
    while "$ref" in schema:
        node: Any = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        schema = node
    return schema


def validate_against_schema(data: dict, schema: dict, origin: str | Mapping[tuple, str]) -> None:
    """Raise one ConfigError for the most relevant schema violation, naming the file that set
    the key (``origin``, as :func:`origin_of` reads it) and its key path."""
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
    keys = tuple(error.absolute_path)
    message = error.message
    if error.validator == "additionalProperties":
        message = message.replace("Additional properties are not allowed", "unknown key")
        unknown = [key for key in error.instance if key not in error.schema.get("properties", {})]
        keys += tuple(unknown[:1])  # the file that wrote the unknown key, not the one that wrote its parent
    raise ConfigError(f"{origin_of(origin, keys)}: {path or '(top level)'}: {message}")


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
    for exp in indexed.values():  # found here: a default name built from a typo hides it downstream
        if isinstance(exp["model"], str) and exp["model"] not in config["models"]:
            raise ConfigError(f"{exp['_key']}.model: unknown model {exp['model']!r}; "
                              f"defined models: {', '.join(config['models'])}")
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
    else:  # a known model: :func:`_name_experiments` checked
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
    if deepspeed and deepspeed not in DEEPSPEED_PRESETS and not deepspeed.endswith(".json"):
        raise ConfigError(
            f"{key}.deepspeed: {deepspeed!r} is neither a ZeRO config name "
            f"({', '.join(DEEPSPEED_PRESETS)}) nor a .json file"
        )
    if exp["method_config"]["type"] == "qlora" and zero_stage(deepspeed) == 3:
        raise ConfigError(f"{key}.deepspeed: {QLORA_ZERO3}")
    template = get_template(exp["template"], config.get("templates"))
    for name in exp["datasets"]:
        dataset = config["datasets"][name]
        if dataset["format"] == "custom" and "fields" not in dataset:
            dataset["fields"] = {"input": "input", "output": "output", "system": None}
        if dataset["format"] in TOOL_FORMATS and not writes_tools(template):
            raise ConfigError(_no_tool_form(key, name, f"format {dataset['format']}", template))
    exp["data_recipe"] = data_recipe(exp, config)
    exp["data_key"] = recipe_key(exp["data_recipe"])


QLORA_ZERO3 = "ZeRO-3 is not supported with QLoRA (4/8-bit weights, which it cannot partition); use zero2"


def zero_stage(deepspeed: str | None) -> int | None:
    """The ZeRO stage of a preset name or of a DeepSpeed JSON file that exists (None otherwise)."""
    if not deepspeed:
        return None
    if deepspeed in DEEPSPEED_PRESETS:
        return DEEPSPEED_PRESETS[deepspeed]["zero_optimization"]["stage"]
    try:
        return json.loads(Path(deepspeed).read_text()).get("zero_optimization", {}).get("stage")
    except (OSError, ValueError, AttributeError):
        return None  # the train stage reports an unreadable file


#: The formats whose records call tools. Records of other formats may too: the config looks at the
#: first records of each local file (:func:`check_tool_templates`), the data job at every record.
TOOL_FORMATS = ("moss_sft",)


def writes_tools(template) -> bool:
    return template == HF or bool(template.tool_form)


def _no_tool_form(key: str, dataset: str, why: str, template) -> str:
    return (f"{key}.template: dataset {dataset!r} ({why}) calls tools, and template {template.name!r} cannot "
            f"write them; the templates with a tool form are {', '.join(TOOL_TEMPLATES)}")


def check_tool_templates(config: dict) -> None:
    """Refuse an experiment whose template has no tool form while its local data has tool records
    among the first each file holds (:func:`tunemake.formats.first_tool_record`)."""
    from tunemake.formats import first_tool_record

    found: dict[str, str | None] = {}
    for exp in config["experiments"].values():
        template = get_template(exp["template"], config.get("templates"))
        if writes_tools(template):
            continue
        for name in exp["datasets"]:
            if name not in found:
                found[name] = first_tool_record(config["datasets"][name], config["source_files"][name])
            if found[name]:
                raise ConfigError(_no_tool_form(exp["_key"], name, f"first at {found[name]}", template))
_FIELDS_OF = {
    "custom": ("input", "output", "system", "loss"),
    "sharegpt": ("messages", "system", "tools", "role_tag", "content_tag", "user_tag", "assistant_tag",
                 "observation_tag", "function_tag", "system_tag"),
}


def _check_fields(dataset: dict, key: str) -> None:
    """``fields:`` names only what its dataset's format reads."""
    allowed = _FIELDS_OF.get(dataset["format"], ())
    for field in dataset.get("fields") or {}:
        if field not in allowed:
            reads = f"reads {', '.join(allowed)}" if allowed else "reads no fields"
            raise ConfigError(f"{key}.{field}: format {dataset['format']} {reads}")


def _root_model(experiment: str, config: dict, key: str) -> str:
    seen = set()
    while True:
        if experiment in seen:
            raise ConfigError(f"{key}.model: experiments chain into a cycle through {experiment!r}")
        seen.add(experiment)
        model = config["experiments"][experiment]["model"]
        if not isinstance(model, dict):
            return model  # a known model: :func:`_name_experiments` checked
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
            "suffix_as_eos": t.suffix_as_eos, "sep": t.sep, **({"tool_form": t.tool_form} if t.tool_form else {}),
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
            "path": root["path"], "revision": root.get("revision"), **({"commit": root["commit"]} if "commit" in root else {}),
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


def expand_sources(dataset: dict, name: str, origin: str | None = None) -> list[str]:
    """The local files a dataset reads, globs expanded (sorted); [] for a hub dataset.

    A path without glob characters is returned as is, even if it does not exist yet: another rule
    may build it (the demo's data is a build output).

    Args:
        dataset: one entry of the config's ``datasets:``.
        name: its name, for messages.
        origin: the config file that set its ``path``, which messages start with.

    Raises:
        ConfigError: a glob matches no file, or a file there is empty or a directory; the message
            names the key ``datasets.NAME.path``.
    """
    if "path" not in dataset:
        return []
    key = f"{origin}: datasets.{name}.path" if origin else f"datasets.{name}.path"
    paths = [dataset["path"]] if isinstance(dataset["path"], str) else dataset["path"]
    files: list[str] = []
    for pattern in paths:
        if GLOB_CHARS & set(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise ConfigError(f"{key}: {pattern!r} matches no file")
            files.extend(matches)
        else:
            files.append(pattern)
    for path in files:
        if os.path.isdir(path):
            raise ConfigError(f"{key}: {path} is a directory, not a data file")
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            raise ConfigError(f"{key}: {path} is empty")
    return files


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


def read_revision(source: dict) -> str | None:
    """The revision a hub model, dataset or tokenizer is read at: the commit ``tunemake.lock``
    pinned (:func:`tunemake.lock.pin`), else the revision the config asks for."""
    return source.get("commit") or source.get("revision")


def base_model_of(exp: dict, config: dict) -> dict:
    """The model an experiment trains on: a config model, or (chained) its upstream's final merge."""
    if exp["upstream"]:
        from tunemake.paths import final_merge

        upstream = config["experiments"][exp["upstream"]]
        root = config["models"][exp["root_model"]]
        return {"path": final_merge(upstream["name"], upstream["epochs"]), "revision": None,
                "dtype": root["dtype"], "trust_remote_code": root["trust_remote_code"]}
    model = config["models"][exp["model"]]
    return {"path": model["path"], "revision": read_revision(model), "dtype": model["dtype"],
            "trust_remote_code": model["trust_remote_code"]}
