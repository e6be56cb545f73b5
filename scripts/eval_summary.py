"""Rule eval_summary (rules/evaluate.smk): evals/summary.tsv and the plots the report shows."""
from pathlib import Path

from tunemake.evaluate import summarize
from tunemake.rule_entry import run

run(
    snakemake,
    summarize,
    eval_files=list(snakemake.input.evals),
    out_tsv=snakemake.output.summary,
    plots_dir=str(Path(snakemake.output.metrics).parent),
    train_logs=dict(snakemake.params.train_logs),
)
