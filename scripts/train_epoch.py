"""Rule train_epoch (rules/train.smk): one epoch, in-process or across processes with torchrun."""
import sys

from tunemake.config import load_config, train_spec
from tunemake.rule_entry import run
from tunemake.train import launch

config = load_config(snakemake.config, check_files=False)
spec = train_spec(config["experiments"][snakemake.wildcards.experiment], int(snakemake.wildcards.epoch),
                  config, threads=snakemake.threads)
status = run(snakemake, launch, spec=spec)
if status:
    sys.exit(status)
