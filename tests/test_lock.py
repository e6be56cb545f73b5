"""tunemake.lock: hub revisions pinned to commits, offline with the hub fixture.

A branch that moves rebuilds nothing until the lock is updated; then exactly what reads that
repository rebuilds. Each Snakemake test here runs on a hub of its own (``HF_HOME`` of its own),
since it moves branches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hub_fixture import GUANACO, INTERNLM, LLAMA3, build_offline_hub, write_repo
from smk import planned_jobs, snakemake, write_config
from tunemake.config import load_config
from tunemake.errors import ConfigError
from tunemake.lock import entries, load_pinned, pin, read_lock, resolve, write_lock

CONFIG = {
    "models": {"llama": {"path": LLAMA3, "template": "llama3_chat", "dtype": "float32"},
               "internlm": {"path": INTERNLM, "template": "internlm_chat", "trust_remote_code": True,
                            "dtype": "float32"}},
    "datasets": {"oasst1": {"hub": GUANACO, "format": "oasst1", "heldout_fraction": 0.2}},
    "methods": {"lora8": {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0}},
    "experiments": [{"model": name, "datasets": "oasst1", "method": "lora8", "epochs": 1, "max_length": 256,
                     "batch_size": 2, "grad_accumulation": 1, "precision": "fp32"} for name in ("llama", "internlm")],
    "evaluation": {"max_prompts": 2, "max_new_tokens": 4},
}


def move_main(hub, repo_id: str, note: bytes) -> str:
    """A new commit on ``main`` of a model repo: its main snapshot plus a README."""
    files = {p.name: p.read_bytes() for p in hub.snapshots[repo_id]["main"].iterdir()}
    return write_repo(hub.cache_dir, "model", repo_id, [("main", {**files, "README.md": note})])["main"]


def tunemake_cli(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunemake.cli", *args], cwd=workdir, capture_output=True,
                          text=True, env=os.environ.copy())


# --- the lock on its own -----------------------------------------------------------------------


def test_missing_entries_are_resolved_from_the_cache_offline_and_round_trip(offline_hub, tmp_path):
    config = load_config(CONFIG)
    assert [(e.repo_type, e.name, e.keys) for e in entries(config)] == [
        ("dataset", f"{GUANACO}@main", ("datasets.oasst1",)),
        ("model", f"{INTERNLM}@main", ("models.internlm",)),
        ("model", f"{LLAMA3}@main", ("models.llama",)),
    ]
    locked = resolve(config, {}, may_resolve=True)
    assert locked[("model", f"{LLAMA3}@main")] == offline_hub.commits[LLAMA3]["main"]
    write_lock(locked, tmp_path / "tunemake.lock")
    assert read_lock(tmp_path / "tunemake.lock") == locked
    text = (tmp_path / "tunemake.lock").read_text()
    assert text.startswith("# tunemake.lock") and yaml.safe_load(text)["models"][f"{LLAMA3}@main"] == locked[("model", f"{LLAMA3}@main")]


def test_a_job_only_reads_the_lock(offline_hub, tmp_path):
    with pytest.raises(ConfigError, match=rf"tunemake.lock: no entry for {GUANACO}@main \(datasets.oasst1\); run snakemake"):
        load_pinned(CONFIG, may_resolve=False, lock_file=tmp_path / "absent.lock")


def test_a_pinned_commit_reaches_the_data_and_the_stages(offline_hub):
    config = load_config(CONFIG)
    before = {name: exp["data_key"] for name, exp in config["experiments"].items()}
    v1 = offline_hub.commits[LLAMA3]["v1"]
    locked = resolve(config, {("model", f"{LLAMA3}@main"): v1}, may_resolve=True)
    pin(config, locked)
    llama, internlm = config["experiments"]["llama_lora8_oasst1"], config["experiments"]["internlm_lora8_oasst1"]
    assert llama["data_recipe"]["tokenizer"]["commit"] == v1 and llama["data_key"] != before["llama_lora8_oasst1"]
    from tunemake.config import base_model_of
    from tunemake.train import EpochSpec

    assert base_model_of(llama, config)["revision"] == v1
    assert EpochSpec.from_config(llama, 1, config).tokenizer.revision == v1
    assert internlm["data_recipe"]["datasets"][0]["commit"] == offline_hub.commits[GUANACO]["main"]


def test_update_names_only_keys_the_config_reads(offline_hub):
    with pytest.raises(ConfigError, match=r"models.nope: not a hub model or dataset the experiments read"):
        resolve(load_config(CONFIG), {}, may_resolve=True, update={"models.nope"})


# --- on the user's path: Snakemake, a branch that moves, tunemake lock --update ----------------


@pytest.fixture
def own_hub(tmp_path, monkeypatch):
    """A hub fixture in an HF_HOME of this test's own (the Snakemake and CLI subprocesses read it)."""
    hf_home = tmp_path / "hf"
    hub = build_offline_hub(hf_home)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    return hub


@pytest.mark.slow
def test_a_moved_branch_rebuilds_nothing_until_the_lock_moves(own_hub, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    write_config(work, CONFIG)
    assert planned_jobs(work, target="adapters")["fetch_hub"] == 3
    assert not (work / "tunemake.lock").exists()  # a dry run writes nothing
    snakemake(work, target="adapters")
    lock = read_lock(work / "tunemake.lock")
    assert lock[("model", f"{LLAMA3}@main")] == own_hub.commits[LLAMA3]["main"]
    adapter_meta = json.loads((work / "adapters" / "llama_lora8_oasst1" / "epoch_1" / "tunemake.json").read_text())
    assert adapter_meta["base_commit"] == own_hub.commits[LLAMA3]["main"]
    import torch

    ckpt = torch.load(work / "checkpoints" / "llama_lora8_oasst1" / "epoch_1.pth", weights_only=True)
    assert ckpt["fingerprint_parts"]["base_model"] == f"{LLAMA3}@{own_hub.commits[LLAMA3]['main']}"

    moved = move_main(own_hub, LLAMA3, b"a later commit")
    assert planned_jobs(work, target="adapters") == {}

    out = tunemake_cli(work, "lock", "--update", "models.llama")
    assert out.returncode == 0, out.stderr
    assert f"{LLAMA3}@main: {own_hub.commits[LLAMA3]['main']} -> {moved}" in out.stdout
    jobs = planned_jobs(work, target="adapters")
    # the llama experiment's chain, from the fetch on; nothing of the internlm experiment's
    assert jobs == {"fetch_hub": 1, "templated_dataset": 1, "train_epoch": 1, "convert_epoch": 1, "adapters": 1}, jobs
    shown = tunemake_cli(work, "lock").stdout
    assert f"models.llama" in shown and moved in shown
