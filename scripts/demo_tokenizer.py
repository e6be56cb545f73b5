"""Rule demo_tokenizer (rules/demo.smk): train the demo model's byte-level BPE tokenizer."""
from tunemake.demo import build_demo_tokenizer
from tunemake.rule_entry import run
from tunemake.templates import get_template

model = snakemake.params.model
run(
    snakemake,
    build_demo_tokenizer,
    corpus=snakemake.input.corpus,
    out_dir=snakemake.wildcards.model_dir,
    template=get_template(model["template"], snakemake.params.templates),
    vocab_size=model["demo"]["vocab_size"],
)
