# The config, resolved once by tunemake.config, and every input function the rules use.
# Every param passes through canonical(): Snakemake reruns a job when a param's repr changes, and a
# config only reordered or restyled must rerun nothing.
import functools
import glob
import os
import re
import sys

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger

from pathlib import Path

from tunemake import paths
from tunemake.paths import hub_receipt
from tunemake.config import (base_model_of, canonical, epoch_identity, load_config, merge_config,
                             normalise_numbers, origin_of, parse_size, read_config_files, read_revision)
from tunemake.demo import MODEL_FILES, TOKENIZER_FILES
from tunemake.errors import TunemakeError
from tunemake.hub import check_config as check_hub, is_hub_id
from tunemake.lock import LOCK_FILE, pin, read_lock, resolve as resolve_lock, write_lock
from tunemake.resources import LARGEST_COMMON_GPU_MB, estimate_resources, model_shape
from tunemake.templates import get_template, template_to_dict


def _shown(path):
    """A config file's name in messages: relative to the working directory when inside it."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith(os.pardir) else relative


# The files `config` was merged from, in Snakemake's order: the --configfile ones, or else the
# Snakefile's config.yaml.
CONFIG_FILES = [_shown(path) for path in workflow.configfiles]
CONFIG_FILE = CONFIG_FILES[-1] if CONFIG_FILES else "config"

# Jobs share the cores: OpenMP threads that spin while waiting make a busy machine many times
# slower (measured: a 5 s evaluation took 120 s beside a training job). Set it to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    # Read again by tunemake, which refuses a key written twice (Snakemake keeps the later value)
    # and notes which file set each key, so that an error names that file.
    _, ORIGINS = read_config_files(CONFIG_FILES)
    merge_config({}, dict(workflow.config_settings.config), ORIGINS, "--config")
    # `lr: 2e-4` is a string to YAML 1.1: numbers as the schema types them, in Snakemake's config
    # too, which validate() and every job read.
    normalise_numbers(config)
    TM = load_config(config, origin=ORIGINS)
    # Hub revisions pinned by tunemake.lock: what it lacks is resolved here, in the main process
    # (rules/hub.smk writes it when the run starts); a job re-parsing the workflow only reads it.
    LOCKED = read_lock(LOCK_FILE)
    PINNED = resolve_lock(TM, LOCKED, may_resolve=workflow.is_main_process, origin=ORIGINS)
    pin(TM, PINNED)
    check_hub(TM, origin=ORIGINS)
except TunemakeError as exc:
    sys.exit(f"error: {exc}")  # one line: a WorkflowError would print traceback frames after it

EXPERIMENTS = TM["experiments"]
DEMO_MODELS = {m["path"]: name for name, m in TM["models"].items() if "demo" in m}
# One experiment per templated dataset, to read its recipe and root model from.
DATA_EXPERIMENT = {}
for _exp in EXPERIMENTS.values():
    DATA_EXPERIMENT.setdefault(_exp["data_key"], _exp)
DEMO_DIR = TM["demo"]["out_dir"]


def _hub_repos():
    """Receipt path -> fetch_receipt's arguments, for every hub model and dataset the experiments read."""
    repos = {}
    for exp in EXPERIMENTS.values():
        model = TM["models"][exp["root_model"]]
        if "demo" not in model and is_hub_id(model["path"]):
            repos[hub_receipt("model", model["path"], read_revision(model))] = ("model", model["path"], read_revision(model))
        for dataset in exp["data_recipe"]["datasets"]:
            if "hub" in dataset and is_hub_id(dataset["hub"]):
                repos[hub_receipt("dataset", dataset["hub"], read_revision(dataset))] = (
                    "dataset", dataset["hub"], read_revision(dataset))
    return {path: dict(zip(("repo_type", "repo_id", "revision"), repo)) for path, repo in repos.items()}


HUB_REPOS = _hub_repos()

# Tokenizer files of a local model that are not built by the workflow.
_TOKENIZER_GLOBS = ("tokenizer*", "vocab*", "merges.txt", "special_tokens_map.json", "*.model", "chat_template*")


def _alternatives(values):
    return "|".join(re.escape(v) for v in sorted(values)) or "(?!)"


wildcard_constraints:
    data_key=_alternatives(DATA_EXPERIMENT),
    experiment=_alternatives(EXPERIMENTS),
    epoch=r"[1-9]\d*",
    model_dir=_alternatives(DEMO_MODELS),
    receipt=_alternatives(Path(path).stem for path in HUB_REPOS),


def all_templated_datasets():
    return sorted({paths.templated_dataset(key) for key in DATA_EXPERIMENT})


def all_demo_model_files():
    return [f"{path}/{name}" for path in sorted(DEMO_MODELS) for name in (*TOKENIZER_FILES, *MODEL_FILES)]


def hub_receipts(model: dict):
    """A hub model's download receipt, [] for a local or demo model."""
    if "demo" in model or not is_hub_id(model["path"]):
        return []
    return [hub_receipt("model", model["path"], read_revision(model))]


def get_hub_repo(wildcards):
    return canonical(HUB_REPOS[paths.HUB_RECEIPT.format(receipt=wildcards.receipt)])


def tokenizer_files(model: dict):
    """The files a model's tokenizer is read from: rule outputs for a demo model, the download
    receipt of a hub id."""
    if "demo" in model:
        return [f"{model['path']}/{name}" for name in TOKENIZER_FILES]
    if os.path.isdir(model["path"]):
        found = [f for pattern in _TOKENIZER_GLOBS for f in glob.glob(os.path.join(model["path"], pattern))]
        return sorted(set(found))
    return hub_receipts(model)


def get_source_files(recipe):
    """Local source files of each dataset of a recipe (globs expanded and checked by load_config)."""
    return {d["name"]: TM["source_files"][d["name"]] for d in recipe["datasets"] if "hub" not in d}


def get_templated_dataset_input(wildcards):
    exp = DATA_EXPERIMENT[wildcards.data_key]
    sources = [f for files in get_source_files(exp["data_recipe"]).values() for f in files]
    hub = [hub_receipt("dataset", d["hub"], read_revision(d)) for d in exp["data_recipe"]["datasets"]
           if "hub" in d and is_hub_id(d["hub"])]
    return {"sources": sources, "hub": hub, "tokenizer": tokenizer_files(TM["models"][exp["root_model"]])}


def get_recipe(wildcards):
    return canonical(DATA_EXPERIMENT[wildcards.data_key]["data_recipe"])


def get_recipe_files(wildcards):
    return canonical(get_source_files(get_recipe(wildcards)))


def get_demo_model(wildcards):
    return canonical(TM["models"][DEMO_MODELS[wildcards.model_dir]])


def all_final_checkpoints():
    """The last epoch of every experiment (a chained one trains on its upstream's final merge)."""
    return [paths.checkpoint(name, e["epochs"]) for name, e in EXPERIMENTS.items()]


def model_files(model: dict):
    """The files a local base model is read from; a hub id's download receipt."""
    if "demo" in model:
        return [f"{model['path']}/{name}" for name in (*TOKENIZER_FILES, *MODEL_FILES)]
    if os.path.isdir(model["path"]):
        return sorted(f for f in glob.glob(os.path.join(model["path"], "*")) if os.path.isfile(f))
    return hub_receipts(model)


def get_train_epoch_input(wildcards):
    exp = EXPERIMENTS[wildcards.experiment]
    epoch = int(wildcards.epoch)
    if epoch > exp["epochs"]:
        raise WorkflowError(f"{wildcards.experiment} has {exp['epochs']} epochs; epoch {epoch} is not configured")
    inputs = {"data": paths.templated_dataset(exp["data_key"]), "base": base_inputs(exp)}
    if epoch > 1:
        inputs["previous"] = paths.checkpoint(exp["name"], epoch - 1)
        inputs["previous_state"] = paths.train_state(exp["name"], epoch - 1)
    return inputs


def get_epoch_identity(wildcards):
    return canonical(epoch_identity(EXPERIMENTS[wildcards.experiment], int(wildcards.epoch), TM))


@functools.cache
def experiment_resources(name):
    """tunemake.resources' requests for one experiment's jobs, its `resources:` overrides applied."""
    estimate = estimate_resources(EXPERIMENTS[name], TM)
    if (estimate["train"]["gpu_mem_mb"] or 0) > LARGEST_COMMON_GPU_MB:
        logger.warning(f"experiment {name}: training needs about {estimate['train']['gpu_mem_mb'] / 1000:.0f} GB "
                       "per GPU, more than an 80 GB GPU holds; use qlora or lora, DeepSpeed zero3, or more GPUs")
    evaluate = estimate["evaluate"]
    if (evaluate["gpu_mem_mb"] or 0) > LARGEST_COMMON_GPU_MB:
        logger.warning(f"experiment {name}: evaluation needs about {evaluate['gpu_mem_mb'] / 1000:.0f} GB per GPU "
                       f"(on {evaluate['gpus']}), more than an 80 GB GPU holds; set more gpus (or "
                       "resources.evaluate.gpus), or a smaller evaluation.batch_size")
    return estimate


# Estimated now, where an error is one line, rather than inside the rules' input functions.
try:
    for _name in EXPERIMENTS:
        experiment_resources(_name)
except TunemakeError as exc:
    sys.exit(f"error: {origin_of(ORIGINS, ('models', EXPERIMENTS[_name]['root_model']))}: experiment {_name}: {exc}")


def _data_resources(data_key):
    """The templated dataset's requests: its first experiment's estimate; per key, the first
    experiment sharing the dataset that sets it in `resources.data` wins."""
    sharing = [exp for exp in EXPERIMENTS.values() if exp["data_key"] == data_key]
    values = dict(experiment_resources(sharing[0]["name"])["data"])
    for exp in reversed(sharing):
        values.update(exp["resources"].get("data", {}))
    return values


def stage_resource(stage, key):
    """The input function of one rule's `threads` or resource `key` (data, train, convert, merge, evaluate)."""

    def get(wildcards):
        if stage == "data":
            return _data_resources(wildcards.data_key).get(key)
        return experiment_resources(wildcards.experiment)[stage].get(key)

    get.__name__ = f"get_{stage}_{key}"
    return get


def _profile_default(key):
    """A profile's (or --default-resources) constant value of `key`, None when unset."""
    defaults = workflow.resource_settings.default_resources
    resource = defaults.get(key) if defaults is not None else None
    if resource is None:
        return None
    try:
        return resource.evaluate(None, input=[], attempt=1, threads=1, rulename="", async_run=None).value
    except Exception:
        return None


def stage_overrides(stage):
    """`slurm_partition` / `constraint` resources for a rule, only those some experiment sets for
    `stage`: a rule never declares them otherwise, so a profile's default-resources stay in force.
    Experiments that do not set one get the profile's default value."""
    keys = {key for exp in EXPERIMENTS.values() for key in exp["resources"].get(stage, {})}
    return {key: _stage_override(stage, key) for key in sorted(keys & {"slurm_partition", "constraint"})}


def _stage_override(stage, key):
    default = _profile_default(key)

    def get(wildcards):
        value = stage_resource(stage, key)(wildcards)
        return default if value is None else value

    return get


def get_demo_model_mem_mb(wildcards):
    """Building a demo model holds it in float32 about three times (init, state dict, safetensors)."""
    return max(2000, 1500 + 12 * model_shape(get_demo_model(wildcards)).parameters // 2**20)


def get_train_gpus(wildcards):
    """GPUs of a one-node job (--gpus); a multi-node job asks per node through get_train_gres."""
    exp = EXPERIMENTS[wildcards.experiment]
    return None if exp["nodes"] > 1 else exp["gpus"] or 0


def get_train_nodes(wildcards):
    return EXPERIMENTS[wildcards.experiment]["nodes"]


def get_train_mpi_tasks(wildcards):
    """A multi-node job is one task per node (the Slurm plugin's `mpi` + `tasks`): the train
    script starts one torchrun per task with srun. One node: unset, one task."""
    exp = EXPERIMENTS[wildcards.experiment]
    return exp["nodes"] if exp["nodes"] > 1 else None


def get_train_mpi(wildcards):
    return "srun" if EXPERIMENTS[wildcards.experiment]["nodes"] > 1 else None


def get_train_gres(wildcards):
    """GPUs per node of a multi-node job (sbatch --gres is per node; --gpus would be per job)."""
    exp = EXPERIMENTS[wildcards.experiment]
    if exp["nodes"] == 1 or not exp["gpus"]:
        return None
    return ":".join(["gpu", *([exp["gpu_model"]] if exp.get("gpu_model") else []), str(exp["gpus"])])


def get_train_tasks_per_gpu(wildcards):
    # The plugin turns `tasks` into --ntasks-per-gpu for GPU jobs unless this is set; 0 leaves it out.
    return 0 if EXPERIMENTS[wildcards.experiment]["nodes"] > 1 else None


def all_final_adapters():
    """The final epoch's adapter (or full model) of every experiment."""
    return [paths.adapter(name, e["epochs"]) for name, e in EXPERIMENTS.items()]


def get_convert_base_path(wildcards):
    return base_model_of(EXPERIMENTS[wildcards.experiment], TM)["path"]


def get_convert_input(wildcards):
    exp = EXPERIMENTS[wildcards.experiment]
    return {"checkpoint": paths.checkpoint(exp["name"], int(wildcards.epoch)), "base": base_inputs(exp)}


def base_inputs(exp):
    """The files an experiment's starting model is read from: its upstream's final merge, or a config model's files."""
    return base_model_of(exp, TM)["path"] if exp["upstream"] else model_files(TM["models"][exp["model"]])


def all_final_merges():
    return canonical({name: paths.merge(name, e["epochs"]) for name, e in EXPERIMENTS.items()})


def get_merge_input(wildcards):
    exp = EXPERIMENTS[wildcards.experiment]
    return {"adapter": paths.adapter(exp["name"], int(wildcards.epoch)), "base": base_inputs(exp),
            "tokenizer": tokenizer_files(TM["models"][exp["root_model"]])}


def get_merge_params(wildcards):
    """What merge_model is called with, besides the adapter and the output."""
    exp = EXPERIMENTS[wildcards.experiment]
    base = base_model_of(exp, TM)
    return canonical({"base_model": base["path"], "revision": base["revision"],
                      "trust_remote_code": base["trust_remote_code"],
                      # bytes, so that writing the same size another way re-merges nothing
                      "max_shard_size": parse_size(exp["max_shard_size"]),
                      "dtype": exp["merge_dtype"], "tokenizer_path": TM["models"][exp["root_model"]]["path"]})


def get_model_access(wildcards):
    """How the experiment's starting model is read: hub revision and trust_remote_code."""
    base = base_model_of(EXPERIMENTS[wildcards.experiment], TM)
    return canonical({"revision": base["revision"], "trust_remote_code": base["trust_remote_code"]})


def get_eval_model_path(wildcards):
    """Epoch 0 is the model the experiment starts from; epoch n its merge."""
    exp = EXPERIMENTS[wildcards.experiment]
    epoch = int(wildcards.epoch)
    if epoch > exp["epochs"]:
        raise WorkflowError(f"{wildcards.experiment} has {exp['epochs']} epochs; epoch {epoch} is not configured")
    return paths.merge(exp["name"], epoch) if epoch else base_model_of(exp, TM)["path"]


def get_eval_input(wildcards):
    exp = EXPERIMENTS[wildcards.experiment]
    model = get_eval_model_path(wildcards)
    tools = TM["evaluation"]["tools"]
    return {"model": model if int(wildcards.epoch) or exp["upstream"] else base_inputs(exp),
            "data": paths.templated_dataset(exp["data_key"]), **({"tools": tools} if tools else {})}


def get_eval_template(wildcards):
    return canonical(template_to_dict(get_template(EXPERIMENTS[wildcards.experiment]["template"], TM.get("templates"))))


def all_evals():
    return [paths.evaluation(name, epoch) for name, e in EXPERIMENTS.items() for epoch in range(e["epochs"] + 1)]


def train_metric_logs():
    """Per experiment, the training metrics (JSONL) of its epochs, for the loss-curve plot."""
    return canonical({name: [f"{paths.TRAIN_LOG_DIR.format(experiment=name)}/epoch_{epoch}.metrics.jsonl"
                             for epoch in range(1, e["epochs"] + 1)] for name, e in EXPERIMENTS.items()})


def get_eval_gpus(wildcards):
    """The GPUs tunemake.resources counts for the model spread over them (resources.evaluate.gpus
    overrides); none where the experiment trains on the CPU."""
    return experiment_resources(wildcards.experiment)["evaluate"]["gpus"]


def get_train_gpu_model(wildcards):
    """The experiment's gpu_model where the job asks for GPUs by --gpus (multi-node: in gres)."""
    return EXPERIMENTS[wildcards.experiment]["gpu_model"] if get_train_gpus(wildcards) else None


def get_eval_gpu_model(wildcards):
    return EXPERIMENTS[wildcards.experiment]["gpu_model"] if get_eval_gpus(wildcards) else None


def get_eval_access(wildcards):
    """Epoch 0 reads the starting model as training did; merges are local directories."""
    if int(wildcards.epoch) == 0:
        return get_model_access(wildcards)
    return canonical({"revision": None, "trust_remote_code": get_model_access(wildcards)["trust_remote_code"]})


def get_train_group(wildcards):
    """One cluster job for all of an experiment's epochs when it asks for it (group_epochs)."""
    exp = EXPERIMENTS[wildcards.experiment]
    return f"train_{exp['name']}" if exp["group_epochs"] else None
