"""Rule merge_epoch (rules/merge.smk): adapter (or full fine-tune) + base -> merged model shards."""
from tunemake.merge import merge_model
from tunemake.rule_entry import run

run(snakemake, merge_model, source=snakemake.input.adapter, out_dir=snakemake.output[0], **snakemake.params.merge)
