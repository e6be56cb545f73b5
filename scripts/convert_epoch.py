"""Rule convert_epoch (rules/convert.smk): an epoch's .pth -> PEFT adapter or HF model directory."""
from tunemake.convert import convert_checkpoint
from tunemake.rule_entry import run

run(
    snakemake,
    convert_checkpoint,
    checkpoint=snakemake.input.checkpoint,
    out_dir=snakemake.output[0],
    base_model=snakemake.params.base,
    dtype=snakemake.params.dtype,
    **snakemake.params.access,
)
