# tunemake: a declarative build of fine-tuned models. Rules wire; the tunemake package computes.
#   snakemake --cores all            the default target (everything configured, as far as built so far)
#   snakemake --cores all -n         what would run, and why
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


include: "rules/common.smk"


validate(config, "schemas/config.schema.yaml")


include: "rules/demo.smk"
include: "rules/data.smk"
include: "rules/train.smk"
include: "rules/convert.smk"


rule all:
    default_target: True
    input:
        demo_models=all_demo_model_files(),
        templated_datasets=all_templated_datasets(),
        checkpoints=all_final_checkpoints(),
        adapters=all_final_adapters(),


# `snakemake datasets --cores all`: every experiment's templated dataset, and nothing after.
rule datasets:
    input:
        demo_models=all_demo_model_files(),
        templated_datasets=all_templated_datasets(),
