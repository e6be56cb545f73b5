"""Where every artefact lives, relative to the workflow's working directory: written once here.

The Snakefile's rules, the CLI and the tests format these patterns; nothing else spells a path.
"""

#: A templated dataset, named by the hash of its recipe (``tunemake.config.recipe_key``).
TEMPLATED_DATASET = "data/templated/{data_key}"

#: The log of each rule, by rule name and the wildcard that identifies the job.
LOG = "logs/{rule}/{job}.log"


def templated_dataset(data_key: str) -> str:
    return TEMPLATED_DATASET.format(data_key=data_key)
