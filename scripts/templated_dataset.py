"""Rule templated_dataset (rules/data.smk): build one templated dataset with tunemake.data."""
from tunemake.data import build_templated_dataset
from tunemake.rule_entry import run

run(
    snakemake,
    build_templated_dataset,
    recipe=snakemake.params.recipe,
    out_dir=snakemake.output[0],
    files=snakemake.params.files,
    threads=snakemake.threads,
)
