"""The README's two commands are the ones CI and users run."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    command = next(line for line in ci if line.startswith("python3 -m venv"))
    assert command.endswith("&& pytest")
    assert command in (REPO / "README.md").read_text()


def test_readme_demo_command_builds_the_default_target():
    readme = (REPO / "README.md").read_text()
    demo = next(line for line in readme.splitlines() if line.endswith("snakemake --cores all"))
    assert demo.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0")
