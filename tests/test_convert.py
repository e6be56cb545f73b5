"""Epoch checkpoints -> HF artefacts that vanilla transformers / PEFT load with no tunemake import."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_train import MODEL, base_config, checkpoint, prepare

from tunemake.convert import ConvertError, convert_checkpoint, read_metadata
from tunemake.demo import build_demo_model, build_demo_tokenizer, generate_demo_data
from tunemake.templates import TEMPLATES
from tunemake.train import EpochSpec, train_epoch
from tunemake.train.model import build_model, load_trainable


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("convert_project")
    generate_demo_data(root / "data" / "demo", seed=0, corpus_docs=200, tasks_per_family=40)
    build_demo_tokenizer(root / "data" / "demo" / "corpus.txt", root / "models" / "tiny", TEMPLATES["internlm2_chat"], vocab_size=400)
    build_demo_model(root / "models" / "tiny", root / "models" / "tiny", **MODEL)
    return root


@pytest.fixture(autouse=True)
def _restore_cwd():
    cwd = os.getcwd()
    yield
    os.chdir(cwd)


VANILLA_LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base = AutoModelForCausalLM.from_pretrained(sys.argv[1])
model = PeftModel.from_pretrained(base, sys.argv[2]) if sys.argv[2] != "-" else base
ids = torch.tensor([list(range(3, 40))])
torch.save(model.eval()(input_ids=ids).logits.detach(), sys.argv[3])
"""


def vanilla_logits(base: str, adapter: str, out: Path) -> torch.Tensor:
    """Logits from a fresh interpreter that imports only transformers and peft."""
    subprocess.run([sys.executable, "-c", VANILLA_LOAD, base, adapter, str(out)], check=True,
                   env={**os.environ, "PYTHONPATH": ""}, cwd="/")
    return torch.load(out, weights_only=True)


def trained_logits(spec: EpochSpec) -> torch.Tensor:
    model = build_model(replace(spec.method, gradient_checkpointing=False), spec.base_model, torch.device("cpu"))
    load_trainable(model, checkpoint(spec)["trainable"], "test")
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor([list(range(3, 40))])).logits


@pytest.mark.parametrize("method", ["lora_embed", "full"])
def test_converted_artefact_loads_in_vanilla_transformers_and_peft(project, tmp_path, method):
    config = base_config(method=method, epochs=1, lr=0.01)
    config["methods"]["lora_embed"] = {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0,
                                       "modules_to_save": ["lm_head"]}
    spec = prepare(project, tmp_path / "w", config)
    assert train_epoch(spec) == 0
    out = tmp_path / "w" / "adapters" / "epoch_1"
    convert_checkpoint(spec.out.pth, out, dtype="float32")
    base = str(tmp_path / "w" / "models" / "tiny")
    if method == "full":
        assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
        got = vanilla_logits(str(out), "-", tmp_path / "logits.pt")
    else:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
        got = vanilla_logits(base, str(out), tmp_path / "logits.pt")
    expected = trained_logits(spec)
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    base_only = vanilla_logits(base, "-", tmp_path / "base.pt")
    assert not torch.allclose(base_only, expected, atol=1e-3)  # the fine-tune changed something
    meta = read_metadata(out)
    assert meta["epoch"] == 1 and meta["template"]["name"] == "internlm2_chat"
    assert meta["fingerprint"] == checkpoint(spec)["fingerprint"]


def test_adapter_and_base_that_do_not_match(project, tmp_path):
    spec = prepare(project, tmp_path / "w", base_config(method="lora", epochs=1))
    assert train_epoch(spec) == 0
    other = tmp_path / "other"
    build_demo_model(tmp_path / "w" / "models" / "tiny", other, hidden_size=128, num_layers=1, num_heads=2,
                     intermediate_size=128)
    with pytest.raises(ConvertError, match="do not fit"):
        convert_checkpoint(spec.out.pth, tmp_path / "out", base_model=str(other))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConvertError, match="not a readable tunemake checkpoint"):
        (tmp_path / "junk.pth").write_text("junk")
        convert_checkpoint(tmp_path / "junk.pth", tmp_path / "out")
