"""Epochs as Snakemake targets: what raising `epochs`, changing lr or pruning state re-runs.

Each scenario builds a tiny one-experiment project through real Snakemake (demo data, demo
tokenizer and model, templated data, 2 epochs), then changes the config and reads the dry run.
"""

from __future__ import annotations

import copy
import os
import shutil

import pytest
import torch

from smk import planned_jobs, snakemake, write_config

pytestmark = pytest.mark.slow

CONFIG = {
    "demo": {"seed": 2, "corpus_docs": 150, "tasks_per_family": 30},
    "models": {"tiny": {"path": "models/tiny", "template": "internlm2_chat",
                        "demo": {"vocab_size": 400, "hidden_size": 64, "num_layers": 1, "num_heads": 2,
                                 "intermediate_size": 128}}},
    "datasets": {"tasks": {"path": "data/demo/tasks.jsonl", "heldout_fraction": 0.1}},
    "experiments": [{"name": "chain", "model": "tiny", "datasets": "tasks", "method": "lora", "epochs": 2,
                     "max_length": 64, "batch_size": 4, "grad_accumulation": 1, "lr": 0.001, "gpus": 0,
                     "schedule": {"type": "constant", "warmup_steps": 2}}],
}


def config_with(schedule: dict | None = None, **experiment) -> dict:
    config = copy.deepcopy(CONFIG)
    if schedule:
        config["experiments"][0]["schedule"] = schedule
    config["experiments"][0].update(experiment)
    return config


def build(tmp_path_factory, name: str, config: dict):
    work = tmp_path_factory.mktemp(name)
    write_config(work, config)
    snakemake(work, target="adapters")
    return work


@pytest.fixture(scope="module")
def constant(tmp_path_factory):
    return build(tmp_path_factory, "constant", config_with())


@pytest.fixture(scope="module")
def wsd(tmp_path_factory):
    return build(tmp_path_factory, "wsd", config_with({"type": "wsd", "warmup_steps": 2, "decay_epochs": 1}))


@pytest.fixture(scope="module")
def cosine(tmp_path_factory):
    return build(tmp_path_factory, "cosine", config_with({"type": "cosine", "warmup_ratio": 0.1}))


def copy_of(work, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(work, target, symlinks=True)
    return target


def changed(work, tmp_path, config) -> dict[str, int]:
    target = copy_of(work, tmp_path)
    write_config(target, config)
    jobs = planned_jobs_adapters(target)
    return jobs


def planned_jobs_adapters(work) -> dict[str, int]:
    return planned_jobs(work, target="adapters")


def test_built_chain_is_up_to_date(constant):
    assert planned_jobs_adapters(constant) == {}
    assert (constant / "adapters" / "chain" / "epoch_2" / "adapter_config.json").exists()
    ckpt = torch.load(constant / "checkpoints" / "chain" / "epoch_2.pth", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["counters"]["global_step"] == 2 * ckpt["counters"]["steps_per_epoch"]


def test_constant_schedule_extends_by_one_epoch(constant, tmp_path):
    assert changed(constant, tmp_path, config_with(epochs=3)) == {"train_epoch": 1, "convert_epoch": 1, "adapters": 1}


def test_wsd_reruns_only_from_the_decay_window(wsd, tmp_path):
    # epochs 2 -> 3 with the last epoch decaying: epoch 1 (stable in both) is reused,
    # epoch 2 (was the decay, now stable) and epoch 3 run
    config = config_with({"type": "wsd", "warmup_steps": 2, "decay_epochs": 1}, epochs=3)
    assert changed(wsd, tmp_path, config) == {"train_epoch": 2, "convert_epoch": 1, "adapters": 1}


def test_cosine_reruns_the_whole_chain(cosine, tmp_path):
    config = config_with({"type": "cosine", "warmup_ratio": 0.1}, epochs=3)
    assert changed(cosine, tmp_path, config) == {"train_epoch": 3, "convert_epoch": 1, "adapters": 1}


def test_lr_change_reruns_the_chain_not_the_data(constant, tmp_path):
    assert changed(constant, tmp_path, config_with(lr=0.002)) == {"train_epoch": 2, "convert_epoch": 1, "adapters": 1}


def test_logging_only_settings_do_not_rerun(constant, tmp_path):
    config = config_with(save_steps=7, evaluation_inputs=["Hello?"])
    assert changed(constant, tmp_path, config) == {}


def test_pruned_state_rebuilds_nothing_and_says_why_when_needed(wsd, tmp_path):
    work = copy_of(wsd, tmp_path)
    from tunemake.cli import main

    cwd = os.getcwd()
    os.chdir(work)
    try:
        assert main(["prune-state"]) == 0
    finally:
        os.chdir(cwd)
    assert (work / "checkpoints" / "chain" / "epoch_1.state" / "PRUNED").exists()
    assert not (work / "checkpoints" / "chain" / "epoch_1.state" / "optimizer.rank0.pt").exists()
    assert (work / "checkpoints" / "chain" / "epoch_2.state" / "optimizer.rank0.pt").exists()
    assert planned_jobs_adapters(work) == {}
    # extending with wsd must re-run epoch 2 from epoch 1's pruned state: a clear error
    write_config(work, config_with({"type": "wsd", "warmup_steps": 2, "decay_epochs": 1}, epochs=3))
    proc = snakemake(work, target="adapters", check=False)
    assert proc.returncode != 0
    assert "epoch_1.state: this resume state was pruned" in proc.stdout + proc.stderr
    assert "rebuild epoch 1 first, in one run: snakemake --forcerun checkpoints/chain/epoch_1.pth" in proc.stderr


@pytest.mark.parametrize("pruned, first", [((3,), 3), ((2, 3), 2), ((1, 2, 3), 1), ((1, 3), 3)])
def test_a_pruned_chain_names_the_first_epoch_to_rebuild(pruned, first, tmp_path, monkeypatch):
    """Epoch 4 after `prune-state`: the advice names the earliest epoch that can train again, so
    one --forcerun rebuilds the whole span (following it one epoch at a time would meet the next
    pruned state each time)."""
    from types import SimpleNamespace

    from tunemake import paths
    from tunemake.train.checkpoint import PRUNED_MARKER, find_start
    from tunemake.train.spec import Previous, TrainError

    monkeypatch.chdir(tmp_path)
    for epoch in range(1, 4):
        state = tmp_path / paths.train_state("x", epoch)
        state.mkdir(parents=True)
        if epoch in pruned:
            (state / PRUNED_MARKER).touch()
    previous = Previous(paths.checkpoint("x", 3), paths.train_state("x", 3))
    spec = SimpleNamespace(experiment="x", epoch=4, previous=previous)
    with pytest.raises(TrainError, match=rf"snakemake --forcerun {paths.checkpoint('x', first)}$"):
        find_start(spec, dist=None)
