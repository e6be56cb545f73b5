"""Where every artefact lives, relative to the workflow's working directory: written once here.

The Snakefile's rules, the CLI and the tests format these patterns; nothing else spells a path.
"""

#: A templated dataset, named by the hash of its recipe (``tunemake.config.recipe_key``).
TEMPLATED_DATASET = "data/templated/{data_key}"

#: A hub repository's download receipt (``tunemake.hub.fetch_receipt``); the jobs that read the
#: repository take it as input, so they run after its download.
HUB_RECEIPT = "fetched/{receipt}.json"


def hub_receipt(repo_type: str, repo_id: str, revision: str | None) -> str:
    from urllib.parse import quote

    name = f"{repo_type}s--{repo_id.replace('/', '--')}--{quote(revision or 'main', safe='')}"
    return HUB_RECEIPT.format(receipt=name)


#: The log of each rule, by rule name and the wildcard that identifies the job.
LOG = "logs/{rule}/{job}.log"


def templated_dataset(data_key: str) -> str:
    return TEMPLATED_DATASET.format(data_key=data_key)

#: Epoch n of an experiment: the checkpoint, the state epoch n+1 resumes from, the mid-epoch resume point.
CHECKPOINT = "checkpoints/{experiment}/epoch_{epoch}.pth"
TRAIN_STATE = "checkpoints/{experiment}/epoch_{epoch}.state"
RESUME_POINT = "checkpoints/{experiment}/epoch_{epoch}.resume"

#: Per-step metrics (JSONL) and TensorBoard events of an experiment's training.
TRAIN_LOG_DIR = "logs/train/{experiment}"


def checkpoint(experiment: str, epoch: int) -> str:
    return CHECKPOINT.format(experiment=experiment, epoch=epoch)


def train_state(experiment: str, epoch: int) -> str:
    return TRAIN_STATE.format(experiment=experiment, epoch=epoch)

#: The merged model of an epoch (the export stage); a chained experiment trains on its upstream's last one.
MERGE = "merges/{experiment}/epoch_{epoch}"


def final_merge(experiment: str, epochs: int) -> str:
    return MERGE.format(experiment=experiment, epoch=epochs)

#: The HF artefact of an epoch: a PEFT adapter (LoRA/QLoRA) or a model directory (full).
ADAPTER = "adapters/{experiment}/epoch_{epoch}"


def adapter(experiment: str, epoch: int) -> str:
    return ADAPTER.format(experiment=experiment, epoch=epoch)

#: ``snakemake merged/``: one link per experiment to its final epoch's merge.
MERGED_DIR = "merged"


def merge(experiment: str, epoch: int) -> str:
    return MERGE.format(experiment=experiment, epoch=epoch)

#: Evaluation of an experiment's epoch (epoch 0: the model it starts from), and the summary over all.
EVAL = "evals/{experiment}/epoch_{epoch}.json"
EVAL_SUMMARY = "evals/summary.tsv"
EVAL_PLOTS = "evals/plots"


def evaluation(experiment: str, epoch: int) -> str:
    return EVAL.format(experiment=experiment, epoch=epoch)
