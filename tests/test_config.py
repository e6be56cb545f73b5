"""Config: defaults, experiment names and chains, the data key, and errors that name the key."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from tunemake.config import canonical, epoch_identity, load_config
from tunemake.errors import ConfigError
from tunemake.templates import get_template

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))

BASE = {
    "models": {
        "tiny": {"path": "/models/tiny"},
        "other": {"path": "/models/other", "template": "internlm2_chat"},
    },
    "datasets": {
        "chat": {"path": "data/chat.jsonl"},
        "alpaca": {"path": ["data/a.json", "data/b.json"], "format": "alpaca"},
    },
    "experiments": [{"model": "tiny", "datasets": "chat", "method": "lora"}],
}


def config_with(**changes) -> dict:
    config = copy.deepcopy(BASE)
    config.update(copy.deepcopy(changes))
    return config


def experiments(*exps, **changes) -> dict:
    return load_config(config_with(experiments=list(exps), **changes))["experiments"]


def only(exps: dict) -> dict:
    assert len(exps) == 1
    return next(iter(exps.values()))


def exp(**fields) -> dict:
    return {"model": "tiny", "datasets": "chat", "method": "lora", **fields}


# --- defaults -----------------------------------------------------------------------------------


def test_experiment_defaults_are_xtuners():
    e = only(experiments(exp()))
    assert e["epochs"] == 3
    assert e["lr"] == pytest.approx(2e-4)
    assert e["packing"] is True
    assert e["max_length"] == 2048
    assert e["batch_size"] == 1 and e["grad_accumulation"] == 16
    assert e["betas"] == [0.9, 0.999] and e["weight_decay"] == 0
    assert e["max_grad_norm"] == 1.0
    assert e["template"] == "default"  # the model's default template


def test_method_defaults():
    config = load_config(config_with(experiments=[exp(method="lora"), exp(method="qlora"), exp(method="full")]))
    methods = config["methods"]
    for name in ("lora", "qlora"):
        m = methods[name]
        assert (m["r"], m["alpha"], m["dropout"], m["bias"]) == (64, 16, 0.1, "none")
    assert methods["qlora"]["gradient_checkpointing"] is True
    assert methods["lora"]["gradient_checkpointing"] is False
    assert methods["qlora"]["bits"] == 4 and methods["qlora"]["quant_type"] == "nf4"
    assert methods["qlora"]["double_quant"] is True
    assert config["experiments"]["tiny_qlora_chat"]["method_config"] == methods["qlora"]


def test_custom_method_gradient_checkpointing_explicit_and_default():
    methods = {
        "q8": {"type": "qlora", "bits": 8, "r": 16},
        "lora_gc": {"type": "lora", "gradient_checkpointing": True},
        "q_nogc": {"type": "qlora", "gradient_checkpointing": False},
    }
    config = load_config(config_with(methods=methods, experiments=[exp(method="q8")]))
    assert config["methods"]["q8"]["gradient_checkpointing"] is True
    assert config["methods"]["q8"]["r"] == 16 and config["methods"]["q8"]["alpha"] == 16
    assert config["methods"]["lora_gc"]["gradient_checkpointing"] is True
    assert config["methods"]["q_nogc"]["gradient_checkpointing"] is False


def test_dataset_defaults():
    config = load_config(config_with())
    chat = config["datasets"]["chat"]
    assert chat["format"] == "conversation"
    assert chat["heldout_fraction"] == 0 and chat["text_unit"] == "line"


def test_load_config_does_not_mutate_its_input():
    source = config_with()
    before = copy.deepcopy(source)
    load_config(source)
    assert source == before


def test_load_config_from_yaml_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_with()), encoding="utf-8")
    assert list(load_config(path)["experiments"]) == ["tiny_lora_chat"]


# --- names and chains ---------------------------------------------------------------------------


def test_default_name_is_model_method_datasets():
    exps = experiments(exp(datasets=["chat", "alpaca"], method="qlora"), exp(name="mine"))
    assert list(exps) == ["tiny_qlora_chat+alpaca", "mine"]
    assert exps["tiny_qlora_chat+alpaca"]["datasets"] == ["chat", "alpaca"]
    assert exps["mine"]["datasets"] == ["chat"]  # a single name becomes a list


def test_chained_experiment():
    exps = experiments(
        exp(model={"experiment": "tiny_lora_chat"}, datasets="alpaca", method="full"),  # before its upstream
        exp(),
    )
    chained = exps["tiny_lora_chat_full_alpaca"]
    assert chained["name"].startswith("tiny_lora_chat")
    assert chained["upstream"] == "tiny_lora_chat"
    assert chained["root_model"] == "tiny"
    assert exps["tiny_lora_chat"]["upstream"] is None


def test_chain_of_three_reaches_the_root_model():
    exps = experiments(
        exp(name="a", model="other"),
        exp(name="b", model={"experiment": "a"}),
        exp(model={"experiment": "b"}, method="qlora"),
    )
    c = exps["b_qlora_chat"]
    assert c["upstream"] == "b" and c["root_model"] == "other"
    assert c["template"] == "internlm2_chat"  # the root model's template
    assert c["data_recipe"]["tokenizer"]["path"] == "/models/other"


# --- the data key -------------------------------------------------------------------------------


def data_keys(*variants) -> list[str]:
    exps = experiments(*[exp(name=f"e{i}", **v) for i, v in enumerate(variants)])
    return [e["data_key"] for e in exps.values()]


def test_data_key_ignores_training_only_settings():
    keys = data_keys({}, {"seed": 7}, {"lr": 1e-3}, {"method": "qlora"}, {"epochs": 5}, {"batch_size": 4},
                     {"deepspeed": "zero2"})
    assert len(set(keys)) == 1


def test_data_key_of_a_chained_experiment_follows_its_root_model():
    keys = data_keys({}, {"model": {"experiment": "e0"}, "method": "full"})
    assert keys[0] == keys[1]


@pytest.mark.parametrize(
    "change",
    [
        {"max_length": 1024},
        {"template": "zephyr"},
        {"data_seed": 1},
        {"packing": False},
        {"datasets": ["chat", "alpaca"]},
        {"datasets": "alpaca"},
        {"model": "other", "template": "default"},  # another tokenizer, same template
    ],
)
def test_data_key_changes_with_what_the_data_depends_on(change):
    base, changed = data_keys({}, change)
    assert base != changed


def test_data_key_changes_with_dataset_settings():
    keys = []
    for heldout in (0.0, 0.1):
        datasets = copy.deepcopy(BASE["datasets"])
        datasets["chat"]["heldout_fraction"] = heldout
        keys.append(only(experiments(exp(), datasets=datasets))["data_key"])
    assert keys[0] != keys[1]


def test_data_key_changes_with_custom_template_fields():
    keys = []
    for instruction in ("Q: {input}\nA: ", "Question: {input}\nAnswer: "):
        templates = {"mine": {"instruction": instruction}}
        keys.append(only(experiments(exp(template="mine"), templates=templates))["data_key"])
    assert keys[0] != keys[1]


def test_data_recipe_holds_the_template_fields():
    e = only(experiments(exp(template="internlm2_chat")))
    template = e["data_recipe"]["template"]
    assert template["name"] == "internlm2_chat"
    assert template["suffix"] == "<|im_end|>" and template["suffix_as_eos"] is True
    assert e["data_recipe"]["datasets"][0]["name"] == "chat"
    assert e["data_recipe"]["datasets"][0]["path"] == ["data/chat.jsonl"]


def test_hf_template_recipe():
    e = only(experiments(exp(template="hf")))
    assert e["data_recipe"]["template"] == {"name": "hf"}


# --- errors -------------------------------------------------------------------------------------


def config_error(config) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(config)
    return str(info.value)


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"experiments": [exp(max_length="long")]}, "experiments[0].max_length"),
        ({"experiments": [exp(epochs=0)]}, "experiments[0].epochs"),
        ({"experiments": [exp(lr=0)]}, "experiments[0].lr"),
        ({"experiments": [exp(packing="yes")]}, "experiments[0].packing"),
        ({"methods": {"tiny_r": {"type": "lora", "r": 0}}, "experiments": [exp(method="tiny_r")]}, "methods.tiny_r.r"),
        ({"methods": {"m": {"type": "dora"}}}, "methods.m.type"),
        ({"datasets": {"chat": {"path": "x.jsonl", "heldout_fraction": 2}}}, "datasets.chat.heldout_fraction"),
        ({"datasets": {"chat": {"path": "x.jsonl", "format": "chatml"}}}, "datasets.chat.format"),
        ({"datasets": {"chat": {"format": "alpaca"}}}, "datasets.chat"),
        ({"experiments": [exp(name="has space")]}, "experiments[0].name"),
        ({"experiments": []}, "experiments"),
    ],
)
def test_schema_errors_name_the_key(changes, key):
    message = config_error(config_with(**changes))
    assert message.startswith(f"config: {key}:"), message


@pytest.mark.parametrize(
    "changes, key, typo",
    [
        ({"experiments": [exp(epoch=3)]}, "experiments[0]", "epoch"),
        ({"models": {"tiny": {"path": "/m", "tempalte": "default"}}}, "models.tiny", "tempalte"),
        ({"experimnts": []}, "(top level)", "experimnts"),
    ],
)
def test_unknown_key_is_named(changes, key, typo):
    message = config_error(config_with(**changes))
    assert message.startswith(f"config: {key}:"), message
    assert "unknown key" in message and typo in message


def test_origin_names_the_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_with(experiments=[exp(epochs=0)])), encoding="utf-8")
    assert config_error(path).startswith(f"{path}: experiments[0].epochs:")


@pytest.mark.parametrize(
    "experiment, key, name",
    [
        (exp(model="huge"), "experiments[0].model", "'huge'"),
        (exp(datasets=["chat", "nope"]), "experiments[0].datasets[1]", "'nope'"),
        (exp(method="dora"), "experiments[0].method", "'dora'"),
        (exp(template="nope"), "experiments[0].template", "'nope'"),
        (exp(model={"experiment": "ghost"}), "experiments[0].model.experiment", "'ghost'"),
        (exp(deepspeed="zero4"), "experiments[0].deepspeed", "'zero4'"),
    ],
)
def test_unknown_references(experiment, key, name):
    message = config_error(config_with(experiments=[experiment]))
    assert message.startswith(f"config: {key}:"), message
    assert name in message


def test_named_experiment_with_unknown_upstream():
    message = config_error(config_with(experiments=[exp(name="a", model={"experiment": "ghost"})]))
    assert message.startswith("config: experiments[0].model.experiment:") and "'ghost'" in message


def test_unknown_model_template():
    message = config_error(config_with(models={"tiny": {"path": "/m", "template": "nope"}}))
    assert "template" in message and "'nope'" in message


def test_deepspeed_json_file_is_accepted():
    assert only(experiments(exp(deepspeed="ds/my_zero.json")))["deepspeed"] == "ds/my_zero.json"


def test_qlora_under_zero3_is_refused_when_the_config_loads(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 3}}')
    for deepspeed in ("zero3", "zero3_offload", str(ds)):
        message = config_error(config_with(experiments=[exp(method="qlora", deepspeed=deepspeed)]))
        assert message == ("config: experiments[0].deepspeed: ZeRO-3 is not supported with QLoRA (4/8-bit weights, "
                           "which it cannot partition); use zero2")
    assert only(experiments(exp(method="qlora", deepspeed="zero2")))["deepspeed"] == "zero2"
    assert only(experiments(exp(method="lora", deepspeed="zero3")))["deepspeed"] == "zero3"


def test_duplicate_names():
    message = config_error(config_with(experiments=[exp(), exp(seed=1)]))
    assert message.startswith("config: experiments[1]:") and "'tiny_lora_chat'" in message
    message = config_error(config_with(experiments=[exp(name="x"), exp(name="x", method="full")]))
    assert "'x'" in message and "twice" in message


def test_a_typo_in_a_chains_root_model_is_named_where_it_is():
    """Not as the downstream experiment's unknown upstream (its default name came from the typo)."""
    message = config_error(config_with(experiments=[
        exp(model="tinyy"),
        exp(model={"experiment": "tiny_lora_chat"}, datasets="alpaca"),
    ]))
    assert message.startswith("config: experiments[0].model: unknown model 'tinyy'"), message


def test_chain_cycle():
    message = config_error(config_with(experiments=[
        exp(name="a", model={"experiment": "b"}),
        exp(name="b", model={"experiment": "a"}),
    ]))
    assert message.startswith("config: experiments[0].model:") and "cycle" in message
    message = config_error(config_with(experiments=[exp(name="self", model={"experiment": "self"})]))
    assert "cycle" in message


def test_custom_template_errors_name_the_key():
    message = config_error(config_with(templates={"mine": {"instruction": "{question}"}}))
    assert "templates.mine.instruction" in message and "{question}" in message
    message = config_error(config_with(templates={"mine": {"instruction": "no input here"}}))
    assert "templates.mine.instruction" in message and "{input}" in message
    message = config_error(config_with(templates={"mine": {"system": "{system}"}}))
    assert "templates.mine" in message and "instruction" in message


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("models:\n  tiny:\n    path: /m: x\ndatasets: {}\n", encoding="utf-8")
    message = config_error(path)
    assert message.startswith(f"{path}:3:") and "invalid YAML" in message


def test_missing_and_non_mapping_files(tmp_path):
    assert "no such config file" in config_error(tmp_path / "absent.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n", encoding="utf-8")
    assert config_error(path).startswith(f"{path}:")


@pytest.mark.skipif(not EXAMPLES, reason="examples/ holds no config yet")
@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_load(path):
    config = load_config(path, check_files=False)  # their data is the user's, not in the repo
    assert config["experiments"]
    for e in config["experiments"].values():
        assert len(e["data_key"]) == 16


def test_unparsable_shard_size_is_refused_before_anything_runs():
    with pytest.raises(ConfigError, match=r"experiments\[0\]\.max_shard_size: cannot read '2 gigs' as a size; write e\.g\. 2GB"):
        experiments(exp(max_shard_size="2 gigs"))
    assert only(experiments(exp(max_shard_size="500MB")))["max_shard_size"] == "500MB"
    assert only(experiments(exp()))["max_shard_size"] == "2GB"  # XTuner's default


# --- config files: keys written twice, several files, the file an error names, data files -------


def write(tmp_path: Path, name: str, config: dict) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def test_key_written_twice_names_the_key_and_both_lines(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(
        "models:\n  tiny: {path: /m}\n"
        "datasets:\n  chat: {path: chat.jsonl}\n"
        "experiments:\n"
        "  - model: tiny\n"
        "    datasets: chat\n"
        "    lr: 0.001\n"
        "    method: lora\n"
        "    lr: 0.01\n",
        encoding="utf-8",
    )
    assert config_error(path) == f"{path}:10: key 'lr' is written twice, on lines 8 and 10; keep one"
    path.write_text("models:\n  tiny: {path: /a, template: default, path: /b}\n", encoding="utf-8")
    assert config_error(path) == f"{path}:2: key 'path' is written twice, on line 2; keep one"


def test_section_written_twice(tmp_path):
    path = write(tmp_path, "config.yaml", config_with())
    first = path.read_text().splitlines().index("models:") + 1
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("models:\n  other: {path: /o}\n")
    last = len(path.read_text().splitlines()) - 1
    assert config_error(path) == f"{path}:{last}: key 'models' is written twice, on lines {first} and {last}; keep one"


def test_json_with_tabs_is_read_as_snakemake_reads_it(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config_with(), indent="\t"), encoding="utf-8")  # tabs: not YAML
    assert list(load_config(path)["experiments"]) == ["tiny_lora_chat"]
    path.write_text('{\n\t"models": {},\n\t"models": {}\n}\n', encoding="utf-8")
    assert config_error(path) == f"{path}: key 'models' is written twice in one object; keep one"


def test_yaml_merge_keys_may_still_override(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(
        "models:\n  tiny: &tiny {path: /m, template: zephyr}\n  other:\n    <<: *tiny\n    path: /o\n"
        + yaml.safe_dump({"datasets": BASE["datasets"], "experiments": BASE["experiments"]}),
        encoding="utf-8",
    )
    other = load_config(path)["models"]["other"]
    assert (other["path"], other["template"]) == ("/o", "zephyr")


def test_files_merge_as_snakemake_merges_them(tmp_path):
    from snakemake.utils import update_config

    from tunemake.config import origin_of, read_config_files

    layers = [
        config_with(),
        {"models": {"tiny": {"template": "zephyr"}, "new": {"path": "/n", "dtype": "float16"}},
         "experiments": [exp(method="full")]},
        {"models": {"new": "/a scalar replaces the mapping"}},
        {"models": {"new": {"path": "/again"}}},
    ]
    paths = [write(tmp_path, f"{index}.yaml", layer) for index, layer in enumerate(layers)]
    expected: dict = {}
    for layer in layers:
        update_config(expected, copy.deepcopy(layer))
    merged, origins = read_config_files(paths)
    assert merged == expected
    assert origin_of(origins, ("models", "tiny", "path")) == str(paths[0])
    assert origin_of(origins, ("models", "tiny", "template")) == str(paths[1])
    assert origin_of(origins, ("experiments", 0, "method")) == str(paths[1])  # a list is replaced whole
    assert origin_of(origins, ("models", "new", "dtype")) == str(paths[3])  # gone with the scalar
    assert origin_of(origins, ("datasets", "chat", "path")) == str(paths[0])
    assert origin_of(origins, ()) == str(paths[3])


def test_a_later_file_updates_mappings_and_replaces_lists(tmp_path):
    base = write(tmp_path, "base.yaml", config_with(experiments=[exp(epochs=0), exp(name="x")]))
    extra = write(tmp_path, "extra.yaml", {"models": {"tiny": {"template": "zephyr"}},
                                           "experiments": [exp(method="full")]})
    config = load_config([base, extra])
    assert list(config["experiments"]) == ["tiny_full_chat"]  # base's invalid epochs went with its list
    assert config["models"]["tiny"]["path"] == "/models/tiny" and config["models"]["tiny"]["template"] == "zephyr"


@pytest.mark.parametrize(
    "base_changes, extra, named, key",
    [
        ({}, {"experiments": [exp(epochs=0)]}, "extra.yaml", "experiments[0].epochs"),
        ({"experiments": [exp(epochs=0)]}, {"models": {"tiny": {"template": "zephyr"}}}, "base.yaml",
         "experiments[0].epochs"),
        ({}, {"experiments": [exp(model="huge")]}, "extra.yaml", "experiments[0].model"),
        ({}, {"models": {"tiny": {"tempalte": "zephyr"}}}, "extra.yaml", "models.tiny"),
        ({"models": {"tiny": {"path": "/m", "tempalte": "zephyr"}}}, {"models": {"tiny": {"dtype": "float32"}}},
         "base.yaml", "models.tiny"),
        ({}, {"datasets": {"chat": {"heldout_fraction": 2}}}, "extra.yaml", "datasets.chat.heldout_fraction"),
        ({}, {"templates": {"mine": {"instruction": "no input"}}}, "extra.yaml", "templates.mine.instruction"),
        ({}, {"experimnts": []}, "extra.yaml", "(top level)"),
    ],
)
def test_error_names_the_file_that_set_the_key(tmp_path, base_changes, extra, named, key):
    base = write(tmp_path, "base.yaml", config_with(**base_changes))
    extra = write(tmp_path, "extra.yaml", extra)
    message = config_error([base, extra])
    assert message.startswith(f"{tmp_path / named}: {key}:"), message


def test_origin_names_one_file_for_every_key():
    message = config_error(config_with(experiments=[exp(epochs=0)]))
    assert message.startswith("config: experiments[0].epochs:")
    with pytest.raises(ConfigError, match=r"^my\.yaml: experiments\[0\]\.epochs:"):
        load_config(config_with(experiments=[exp(epochs=0)]), origin="my.yaml")


def test_glob_is_expanded_when_the_config_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = config_with(datasets={"chat": {"path": "data/*.jsonl"}})
    assert config_error(config) == "config: datasets.chat.path: 'data/*.jsonl' matches no file"
    (tmp_path / "data").mkdir()
    for name in ("b.jsonl", "a.jsonl"):
        (tmp_path / "data" / name).write_text('{"conversation": [{"input": "a", "output": "b"}]}\n')
    assert load_config(config)["source_files"] == {"chat": ["data/a.jsonl", "data/b.jsonl"]}


@pytest.mark.parametrize("path", ["chat.jsonl", "*.jsonl", ["data.json", "chat.jsonl"]])
def test_empty_data_file_is_refused_when_the_config_loads(tmp_path, monkeypatch, path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "chat.jsonl").write_text("")
    (tmp_path / "data.json").write_text("[]")  # not empty as a file: its reader refuses it
    config = config_with(datasets={"chat": {"path": path}})
    assert config_error(config) == "config: datasets.chat.path: chat.jsonl is empty"
    assert "source_files" not in load_config(config, check_files=False)


def test_directory_as_a_data_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "chat.jsonl").mkdir(parents=True)
    assert config_error(config_with()) == "config: datasets.chat.path: data/chat.jsonl is a directory, not a data file"


# --- numbers written as strings; one value, one spelling ----------------------------------------


def test_numeric_strings_become_the_numbers_the_schema_wants(tmp_path):
    text = """
models: {tiny: {path: /models/tiny}}
datasets: {chat: {path: data/chat.jsonl, heldout_fraction: "0.1"}}
methods: {big: {type: lora, r: "16", alpha: 3.2e+1, dropout: 0}}
experiments:
  - {model: tiny, datasets: chat, method: big, lr: 2e-4, betas: ["0.9", 0.999], epochs: "2",
     save_steps: 1e3, weight_decay: 0, max_grad_norm: 1}
"""
    assert yaml.safe_load(text)["experiments"][0]["lr"] == "2e-4"  # YAML 1.1: no dot, so a string
    path = tmp_path / "config.yaml"
    path.write_text(text)
    config = load_config(path, check_files=False)
    e = only(config["experiments"])
    # a `number` key holds a float, an `integer` key an int, however the config wrote them
    assert repr([e["lr"], e["betas"], e["weight_decay"], e["max_grad_norm"]]) == "[0.0002, [0.9, 0.999], 0.0, 1.0]"
    assert repr([e["epochs"], e["save_steps"]]) == "[2, 1000]"
    assert repr([config["methods"]["big"][key] for key in ("r", "alpha", "dropout")]) == "[16, 32.0, 0.0]"
    assert repr(config["methods"]["lora"]["alpha"]) == "16.0"  # the built-in methods' defaults too
    assert repr(config["datasets"]["chat"]["heldout_fraction"]) == "0.1"


def test_numeric_strings_stay_strings_where_the_schema_wants_a_string(tmp_path):
    text = """
models: {tiny: {path: /models/tiny, template: 1e3}}
datasets: {chat: {path: data/chat.jsonl}}
templates: {1e3: {instruction: "<q>{input}</q>"}}
experiments:
  - {name: 2e4, model: tiny, datasets: chat, method: lora, max_shard_size: "1000"}
"""
    path = tmp_path / "config.yaml"
    path.write_text(text)
    e = only(load_config(path, check_files=False)["experiments"])
    assert (e["name"], e["template"], e["max_shard_size"]) == ("2e4", "1e3", "1000")


@pytest.mark.parametrize(
    "experiment, message",
    [
        (exp(lr="fast"), "experiments[0].lr: 'fast' is not of type 'number'"),
        (exp(lr="nan"), "experiments[0].lr: 'nan' is not of type 'number'"),
        (exp(epochs="1.5"), "experiments[0].epochs: '1.5' is not of type 'integer'"),
        (exp(betas=["0.9", "high"]), "experiments[0].betas[1]: 'high' is not of type 'number'"),
    ],
)
def test_a_string_that_is_no_number_is_still_the_schema_error(experiment, message):
    assert config_error(config_with(experiments=[experiment])) == f"config: {message}"


def reversed_keys(value):
    """``value`` with every mapping's keys in reverse order."""
    if isinstance(value, dict):
        return {key: reversed_keys(value[key]) for key in reversed(list(value))}
    return [reversed_keys(item) for item in value] if isinstance(value, list) else value


def test_a_value_has_one_spelling_in_the_params():
    """Keys in another order, defaults written out, numbers as ints, floats or strings: the same
    epoch identity and data recipe, to the repr Snakemake compares."""
    plain = config_with(experiments=[exp(lr=0.001, epochs=2)])
    restyled = reversed_keys(config_with(
        methods={"lora": {"dropout": 0.1, "alpha": 16, "type": "lora"}},
        experiments=[{**exp(), "lr": "1e-3", "epochs": 2.0, "weight_decay": 0, "max_grad_norm": 1,
                      "schedule": {"warmup_ratio": "3e-2", "type": "cosine"}, "betas": ["0.9", 0.999]}],
    ))
    identities, recipes, unsorted = [], [], []
    for config in (plain, restyled):
        loaded = load_config(config, check_files=False)
        e = loaded["experiments"]["tiny_lora_chat"]
        identities.append(repr(canonical(epoch_identity(e, 2, loaded))))
        recipes.append(repr(canonical(e["data_recipe"])))
        unsorted.append(repr(epoch_identity(e, 2, loaded)))
    assert identities[0] == identities[1]
    assert recipes[0] == recipes[1]
    assert unsorted[0] != unsorted[1]  # without canonical(), how the config was written shows


def test_canonical_sorts_keys_all_the_way_down_and_refuses_what_snakemake_would_not_compare():
    value = {"b": (1, {"z": 1, "y": [2.0]}), "a": {"d": frozenset({"q", "p"}), "c": Path("x/y"), "e": None}}
    assert repr(canonical(value)) == "{'a': {'c': 'x/y', 'd': ['p', 'q'], 'e': None}, 'b': [1, {'y': [2.0], 'z': 1}]}"
    assert canonical(canonical(value)) == canonical(value)
    with pytest.raises(TypeError, match="Template .* cannot be a Snakemake param"):
        canonical({"template": get_template("default")})  # a dataclass: Snakemake would not compare it
