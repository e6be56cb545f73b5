"""Rule train_epoch (rules/train.smk): one epoch, in-process or across processes with torchrun."""
import sys

from tunemake.lock import load_pinned
from tunemake.rule_entry import run
from tunemake.train import EpochSpec, launch


def train(config: dict, experiment: str, epoch: int, data_dir: str, threads: int) -> int:
    # the main process wrote tunemake.lock before any job started: its commits are the DAG's
    config = load_pinned(config, may_resolve=False, check_files=False)
    # data_dir: the input the DAG gave this job, whatever changed since
    return launch(EpochSpec.from_config(config["experiments"][experiment], epoch, config, threads, data_dir))


status = run(snakemake, train, config=snakemake.config, experiment=snakemake.wildcards.experiment,
             epoch=int(snakemake.wildcards.epoch), data_dir=snakemake.input.data, threads=snakemake.threads)
if status:
    sys.exit(status)
