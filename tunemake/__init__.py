"""tunemake: a declarative, reproducible build system for fine-tuned language models.

The package holds the logic of every stage; Snakemake rules in ``rules/`` only wire stages together.
"""

__version__ = "0.1.0"
