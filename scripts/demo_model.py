"""Rule demo_model (rules/demo.smk): a small Llama with random weights for the demo tokenizer."""
from tunemake.demo import build_demo_model
from tunemake.rule_entry import run

arch = dict(snakemake.params.model["demo"])
arch.pop("vocab_size")  # the tokenizer's size decides
run(
    snakemake,
    build_demo_model,
    tokenizer_dir=snakemake.wildcards.model_dir,
    out_dir=snakemake.wildcards.model_dir,
    **arch,
)
