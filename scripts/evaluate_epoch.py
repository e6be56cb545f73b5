"""Rule evaluate_epoch (rules/evaluate.smk): held-out loss and scored generations of one epoch's model."""
from tunemake.evaluate import evaluate_model
from tunemake.rule_entry import run
from tunemake.templates import template_from_dict

run(
    snakemake,
    evaluate_model,
    model_dir=snakemake.params.model,
    data_dir=snakemake.input.data,
    out_json=snakemake.output[0],
    template=template_from_dict(snakemake.params.template),
    experiment=snakemake.wildcards.experiment,
    epoch=int(snakemake.wildcards.epoch),
    threads=snakemake.threads,
    **snakemake.params.settings,
    **snakemake.params.access,
)
