"""envs/*.yaml (for --software-deployment-method conda) must ask for what pyproject.toml asks for."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _normalise(requirement: str) -> tuple[str, str]:
    name, spec = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", requirement).groups()
    return name.lower().replace("_", "-"), ",".join(sorted(s.strip() for s in spec.split(",") if s.strip()))


def pyproject_requirements() -> set[tuple[str, str]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    return {_normalise(r) for r in reqs}


def env_requirements(path: Path) -> set[tuple[str, str]]:
    env = yaml.safe_load(path.read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    return {_normalise(r) for r in pip if not r.startswith("-")}


def test_every_env_matches_pyproject():
    envs = sorted((REPO / "envs").glob("*.yaml"))
    assert envs, "no conda environment in envs/"
    expected = pyproject_requirements()
    for env in envs:
        assert env_requirements(env) == expected, f"{env.name} differs from pyproject.toml"


def test_every_rule_names_its_environment():
    for smk in sorted((REPO / "rules").glob("*.smk")):
        text = smk.read_text()
        rules = re.findall(r"^rule (\w+):", text, flags=re.M)
        for rule in rules:
            body = text.split(f"rule {rule}:", 1)[1].split("\nrule ", 1)[0]
            assert "conda:" in body, f"rule {rule} in {smk.name} has no conda: directive"
