"""Rule fetch_hub (rules/hub.smk): download a hub model or dataset into the Hugging Face cache."""
from tunemake.hub import fetch_receipt
from tunemake.rule_entry import run

run(snakemake, fetch_receipt, out=snakemake.output[0], **snakemake.params.repo)
