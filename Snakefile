# tunemake: a declarative build of fine-tuned models. Rules wire; the tunemake package computes.
#   snakemake --cores all            everything configured: merged models, evaluations, summary, plots
#   snakemake merged/ --cores all    every experiment down to its merged model, no evaluations
#   snakemake --cores all -n         what would run, and why
#   snakemake --report report.html   the evaluation summary and plots as a report
from snakemake.utils import min_version, validate

min_version("9.0")

# The offline demo's config.yaml, unless --configfile names others: Snakemake would merge those
# over it, and the demo's models and experiments would build beside an example's.
if not workflow.config_settings.configfiles:
    import sys

    from tunemake.config import read_config_file
    from tunemake.errors import TunemakeError

    try:  # first, for a syntax error named by line: Snakemake's own reading names none
        read_config_file("config.yaml")
    except TunemakeError as exc:
        sys.exit(f"error: {exc}")

    configfile: "config.yaml"


include: "rules/common.smk"


validate(config, "schemas/config.schema.yaml")


include: "rules/hub.smk"
include: "rules/demo.smk"
include: "rules/data.smk"
include: "rules/train.smk"
include: "rules/convert.smk"
include: "rules/merge.smk"
include: "rules/evaluate.smk"


rule all:
    default_target: True
    input:
        demo_models=all_demo_model_files(),
        templated_datasets=all_templated_datasets(),
        checkpoints=all_final_checkpoints(),
        adapters=all_final_adapters(),
        merged=paths.MERGED_DIR,
        evals=all_evals(),
        summary=paths.EVAL_SUMMARY,


# `snakemake datasets --cores all`: every experiment's templated dataset, and nothing after.
rule datasets:
    input:
        demo_models=all_demo_model_files(),
        templated_datasets=all_templated_datasets(),


# `snakemake adapters --cores all`: train every experiment and export its final epoch's adapter
# (or full model), without merging or evaluating. Chained experiments still merge their upstream.
rule adapters:
    input:
        checkpoints=all_final_checkpoints(),
        adapters=all_final_adapters(),
