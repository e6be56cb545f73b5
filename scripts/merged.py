"""Rule merged (rules/merge.smk): merged/{experiment} -> that experiment's final merge."""
from tunemake.merge import link_merges
from tunemake.rule_entry import run

run(snakemake, link_merges, links=snakemake.params.links, out_dir=snakemake.output[0])
