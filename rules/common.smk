# The config, resolved once by tunemake.config, and every input function the rules use.
import glob
import os
import re

from snakemake.exceptions import WorkflowError

from tunemake import paths
from tunemake.config import expand_sources, is_local_model, load_config
from tunemake.demo import MODEL_FILES, TOKENIZER_FILES
from tunemake.errors import TunemakeError

CONFIG_FILE = workflow.configfiles[-1] if workflow.configfiles else "config"

try:
    TM = load_config(config, origin=str(CONFIG_FILE))
except TunemakeError as exc:
    raise WorkflowError(str(exc)) from None

EXPERIMENTS = TM["experiments"]
DEMO_MODELS = {m["path"]: name for name, m in TM["models"].items() if "demo" in m}
# One experiment per templated dataset, to read its recipe and root model from.
DATA_EXPERIMENT = {}
for _exp in EXPERIMENTS.values():
    DATA_EXPERIMENT.setdefault(_exp["data_key"], _exp)
DEMO_DIR = TM["demo"]["out_dir"]

# Tokenizer files of a local model that are not built by the workflow.
_TOKENIZER_GLOBS = ("tokenizer*", "vocab*", "merges.txt", "special_tokens_map.json", "*.model", "chat_template*")


def _alternatives(values):
    return "|".join(re.escape(v) for v in sorted(values)) or "(?!)"


wildcard_constraints:
    data_key=_alternatives(DATA_EXPERIMENT),
    model_dir=_alternatives(DEMO_MODELS),


def all_templated_datasets():
    return sorted({paths.templated_dataset(key) for key in DATA_EXPERIMENT})


def all_demo_model_files():
    return [f"{path}/{name}" for path in sorted(DEMO_MODELS) for name in (*TOKENIZER_FILES, *MODEL_FILES)]


def tokenizer_files(model: dict):
    """The files a model's tokenizer is read from: rule outputs for a demo model, [] for a hub id."""
    if "demo" in model:
        return [f"{model['path']}/{name}" for name in TOKENIZER_FILES]
    if is_local_model(model):
        found = [f for pattern in _TOKENIZER_GLOBS for f in glob.glob(os.path.join(model["path"], pattern))]
        return sorted(set(found))
    return []


def get_source_files(recipe):
    """Local source files of each dataset of a recipe, globs expanded now."""
    try:
        return {d["name"]: expand_sources(d, d["name"]) for d in recipe["datasets"] if "hub" not in d}
    except TunemakeError as exc:
        raise WorkflowError(str(exc)) from None


def get_templated_dataset_input(wildcards):
    exp = DATA_EXPERIMENT[wildcards.data_key]
    sources = [f for files in get_source_files(exp["data_recipe"]).values() for f in files]
    return {"sources": sources, "tokenizer": tokenizer_files(TM["models"][exp["root_model"]])}


def get_recipe(wildcards):
    return DATA_EXPERIMENT[wildcards.data_key]["data_recipe"]


def get_recipe_files(wildcards):
    return get_source_files(get_recipe(wildcards))


def get_demo_model(wildcards):
    return TM["models"][DEMO_MODELS[wildcards.model_dir]]
