"""Epoch checkpoints -> HF artefacts that vanilla transformers / PEFT load with no tunemake import."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_train import MODEL, base_config, checkpoint, prepare

from tunemake import convert
from tunemake.convert import ConvertError, _canonical_adapter_config, convert_checkpoint, read_metadata
from tunemake.demo import build_demo_model, build_demo_tokenizer, generate_demo_data
from tunemake.hub import model_dir
from tunemake.shards import read_header
from tunemake.templates import TEMPLATES
from tunemake.train import EpochSpec, train_epoch
from tunemake.train.model import build_model, load_trainable
from tunemake.train.spec import BaseModel, Method


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


def test_another_base_than_the_trained_one_is_warned_of(project, tmp_path, caplog):
    spec = prepare(project, tmp_path / "w", base_config(method="lora", epochs=1))
    assert train_epoch(spec) == 0
    recorded = torch.load(spec.out.pth, map_location="cpu", weights_only=True)["base_model"]
    copy = shutil.copytree(tmp_path / "w" / recorded, tmp_path / "copy")
    with caplog.at_level(logging.WARNING, logger="tunemake.convert"):
        convert_checkpoint(spec.out.pth, tmp_path / "same", base_model=recorded)
        assert "was trained on" not in caplog.text
        convert_checkpoint(spec.out.pth, tmp_path / "other", base_model=str(copy))
    assert f"was trained on {recorded}, converted here against {copy}" in caplog.text


def test_adapter_and_base_that_do_not_match(project, tmp_path):
    spec = prepare(project, tmp_path / "w", base_config(method="lora", epochs=1))
    assert train_epoch(spec) == 0
    other = tmp_path / "other"
    build_demo_model(tmp_path / "w" / "models" / "tiny", other, hidden_size=128, num_layers=1, num_heads=2,
                     intermediate_size=128)
    with pytest.raises(ConvertError, match="do not fit"):
        convert_checkpoint(spec.out.pth, tmp_path / "out", base_model=str(other))
    assert not (tmp_path / "out").exists()
    (tmp_path / "junk.pth").write_text("junk")
    with pytest.raises(ConvertError, match="not a readable tunemake checkpoint") as error:
        convert_checkpoint(tmp_path / "junk.pth", tmp_path / "out")
    assert "\n" not in str(error.value) and "weights_only" not in str(error.value)  # one line, no unsafe advice


# --- the artefact is what building the whole model wrote -------------------------------------------

METHODS = {
    "lora8": {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
    "qlora8": {"type": "qlora", "r": 8, "alpha": 16, "dropout": 0.0},
    # the embeddings and output head trained in full beside LoRA on two named modules
    "lora_save": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "down_proj"],
                  "modules_to_save": ["embed_tokens", "lm_head"]},
    # LoRA on the input embedding: PEFT saves the base embedding beside it, the one base weight read
    "lora_embedding": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0,
                       "target_modules": ["embed_tokens", "v_proj"]},
    "full": {"type": "full"},
}


@pytest.fixture(scope="module")
def trained(project, tmp_path_factory) -> dict[str, Path]:
    """Method name -> the epoch-1 checkpoint of a short training run with it, in its project
    directory (the checkpoint names its base relative to it: a test works there)."""
    cwd, found = os.getcwd(), {}
    try:
        for name, method in METHODS.items():
            config = base_config(method=name, epochs=1, lr=0.01)
            config["methods"] = {name: method}
            spec = prepare(project, tmp_path_factory.mktemp(name) / "w", config)
            assert train_epoch(spec) == 0
            found[name] = Path(spec.out.pth).resolve()
    finally:
        os.chdir(cwd)
    return found


def in_project(pth: Path) -> Path:
    os.chdir(pth.parents[2])  # <project>/checkpoints/<experiment>/epoch_1.pth
    return pth


def convert_with_the_whole_model(pth: Path, out: Path, dtype: str, max_shard_size: str = "50GB") -> None:
    """What convert wrote before it stopped loading the base model: the whole model built in float32,
    the checkpoint loaded into it, cast and saved by PEFT or transformers (the reference)."""
    ckpt = torch.load(pth, weights_only=True)
    base = str(model_dir(ckpt["base_model"]))
    method = Method.from_dict(ckpt["method"])
    model = build_model(method.for_export(), BaseModel(base, dtype="float32", dir=base), torch.device("cpu"))
    load_trainable(model, ckpt["trainable"], str(pth))
    model.to(getattr(torch, dtype)).save_pretrained(out, max_shard_size=max_shard_size)
    if method.adapter:
        _canonical_adapter_config(out / "adapter_config.json")
    else:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(base).save_pretrained(str(out))


def assert_same_artefact(got: Path, expected: Path) -> None:
    names = sorted(p.name for p in expected.iterdir())
    unrecorded = set() if "tunemake.json" in names else {"tunemake.json"}  # convert's own record
    assert sorted(p.name for p in got.iterdir() if p.name not in unrecorded) == names
    for name in names:
        if name.endswith(".json"):
            new, old = (json.loads((d / name).read_text()) for d in (got, expected))
            assert new.keys() == old.keys(), name
            for key in old:
                assert new[key] == old[key], f"{name}: {key}"
        elif name.endswith(".safetensors"):
            new, old = load_file(got / name), load_file(expected / name)
            assert new.keys() == old.keys(), name
            for key in old:
                assert new[key].dtype == old[key].dtype and torch.equal(new[key], old[key]), f"{name}: {key}"
        assert (got / name).read_bytes() == (expected / name).read_bytes(), name


@pytest.mark.parametrize("method, dtype", [("lora8", None), ("qlora8", None), ("lora_save", "bfloat16"),
                                           ("lora_embedding", None), ("full", None), ("full", "float16")])
def test_the_artefact_is_what_building_the_whole_model_wrote(trained, tmp_path, method, dtype):
    pth = in_project(trained[method])
    got = convert_checkpoint(pth, tmp_path / "new", dtype=dtype)
    convert_with_the_whole_model(pth, tmp_path / "old", read_metadata(got)["dtype"])
    assert_same_artefact(got, tmp_path / "old")
    saved = set(read_header(got / "adapter_model.safetensors")) if method != "full" else set()
    if method == "lora_save":
        assert {"base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"} <= saved
    if method == "lora_embedding":
        assert "base_model.model.model.embed_tokens.base_layer.weight" in saved


def test_a_full_fine_tune_over_several_shards_is_what_transformers_wrote(trained, tmp_path, monkeypatch):
    pth = in_project(trained["full"])
    monkeypatch.setattr(convert, "_write_model", partial(convert._write_model, max_shard_size="200KB"))
    got = convert_checkpoint(pth, tmp_path / "new")
    convert_with_the_whole_model(pth, tmp_path / "old", read_metadata(got)["dtype"], max_shard_size="200KB")
    assert (got / "model.safetensors.index.json").is_file() and not (got / "model.safetensors").exists()
    assert_same_artefact(got, tmp_path / "old")


def test_a_full_fine_tune_of_tied_embeddings_is_what_transformers_wrote(project, tmp_path):
    """The output head is the input embedding: stored once, under the embedding's name."""
    shutil.copytree(project, tmp_path / "w")
    tiny = tmp_path / "w" / "models" / "tiny"
    weights = load_file(tiny / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, tiny / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tiny / "config.json").read_text())
    (tiny / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    spec = prepare(project, tmp_path / "w", base_config(method="full", epochs=1, lr=0.01))
    assert train_epoch(spec) == 0
    got = convert_checkpoint(spec.out.pth, tmp_path / "new", dtype="bfloat16")
    convert_with_the_whole_model(Path(spec.out.pth), tmp_path / "old", "bfloat16")
    assert "lm_head.weight" not in read_header(got / "model.safetensors")
    assert_same_artefact(got, tmp_path / "old")


def copy_base(pth: Path, out: Path) -> Path:
    """A copy of the checkpoint's base model, and the checkpoint pointing at it."""
    ckpt = torch.load(pth, weights_only=True)
    shutil.copytree(Path(ckpt["base_model"]).resolve(), out / "base")
    torch.save({**ckpt, "base_model": str(out / "base")}, out / "epoch_1.pth")
    return out / "base"


@pytest.mark.parametrize("method", ["lora8", "qlora8", "lora_save", "full"])
def test_the_base_models_weights_are_never_read(trained, tmp_path, method):
    """The base's weights replaced by garbage under the same header, then removed: the same artefact."""
    base = copy_base(in_project(trained[method]), tmp_path)
    expected = convert_checkpoint(tmp_path / "epoch_1.pth", tmp_path / "expected")
    weights = base / "model.safetensors"
    data_start = min(t.offset for t in read_header(weights).values())
    with open(weights, "r+b") as handle:
        handle.seek(data_start)
        handle.write(os.urandom(weights.stat().st_size - data_start))
    assert_same_artefact(convert_checkpoint(tmp_path / "epoch_1.pth", tmp_path / "garbage"), expected)
    weights.unlink()
    assert_same_artefact(convert_checkpoint(tmp_path / "epoch_1.pth", tmp_path / "removed"), expected)


def test_lora_on_an_embedding_reads_the_base_embedding_and_says_where_it_is_missing(trained, tmp_path):
    base = copy_base(in_project(trained["lora_embedding"]), tmp_path)
    (base / "model.safetensors").unlink()
    with pytest.raises(ConvertError, match=r"/base: no safetensors weights \(model\.safetensors or "):
        convert_checkpoint(tmp_path / "epoch_1.pth", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_base_of_other_shapes_is_refused_from_its_config(trained, tmp_path):
    base = copy_base(in_project(trained["lora8"]), tmp_path)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "intermediate_size": 2 * config["intermediate_size"]}))
    (base / "model.safetensors").unlink()
    with pytest.raises(ConvertError, match=r"do not fit .* of another shape, e\.g\. .*mlp\.(gate|up|down)_proj.* "
                                           r"\(is .*/base the base model it was trained from\?\)"):
        convert_checkpoint(tmp_path / "epoch_1.pth", tmp_path / "out")
    assert not (tmp_path / "out").exists()
