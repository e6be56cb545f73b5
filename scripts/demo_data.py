"""Rule demo_data (rules/demo.smk): write the demo's synthetic corpus and tasks."""
from pathlib import Path

from tunemake.demo import generate_demo_data
from tunemake.rule_entry import run

demo = snakemake.params.demo
run(
    snakemake,
    generate_demo_data,
    out_dir=Path(snakemake.output.corpus).parent,
    seed=demo["seed"],
    corpus_docs=demo["corpus_docs"],
    tasks_per_family=demo["tasks_per_family"],
    tool_tasks=demo["tool_tasks"],
)
