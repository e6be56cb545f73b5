"""The README's two commands are the ones CI and users run; it names every config key."""

import re
from pathlib import Path

import yaml

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


def _schema_keys(node) -> set[str]:
    keys = set()
    if isinstance(node, dict):
        keys.update(node.get("properties") or {})
        for value in node.values():
            keys |= _schema_keys(value)
    elif isinstance(node, list):
        for value in node:
            keys |= _schema_keys(value)
    return keys


def test_readme_names_every_config_key():
    """config.yaml and the schema send users to the README for every key."""
    schema = yaml.safe_load((REPO / "schemas" / "config.schema.yaml").read_text())
    readme = (REPO / "README.md").read_text()
    missing = sorted(key for key in _schema_keys(schema) if not re.search(rf"\b{key}\b", readme))
    assert not missing, f"config keys the README does not name: {missing}"
