"""Adapter + base -> one HF model directory that vanilla transformers loads and that chats like the adapter.

Tiny Llamas (untied, and tied with attention biases) and PEFT adapters made directly with peft
(lora_B and every trainable tensor perturbed, so the update is not zero); one subprocess that imports
only transformers and peft checks logits against ``PeftModel(base, adapter)`` and generation.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tunemake.atomic import write_json
from tunemake.cli import main
from tunemake.demo import build_demo_model
from tunemake.encode import prompt_ids
from tunemake.errors import TunemakeError
from tunemake.merge import MergeError, merge_model
from tunemake.templates import TEMPLATES, Template, template_to_dict

MODEL = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128, "max_position_embeddings": 256}
TEMPLATE = "internlm2_chat"
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = list(range(3, 40))


def tunemake_json(base: Path, method: str = "lora") -> dict:
    return {"experiment": "exp", "epoch": 1, "method": {"type": method, "r": 8, "alpha": 16}, "base_model": str(base),
            "template": template_to_dict(TEMPLATES[TEMPLATE]), "fingerprint": "f" * 32, "versions": {"peft": "x"},
            "dtype": "float32"}


def make_adapter(base: Path, out: Path, method: str | None = "lora", modify=None, seed: int = 0, **lora) -> Path:
    """A PEFT adapter for ``base`` with every trainable tensor perturbed; ``tunemake.json`` unless method is None."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **lora))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:  # lora A/B, modules_to_save copies, trained biases
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
        if modify:
            modify(model)
    model.save_pretrained(out)
    if method:
        write_json(out / "tunemake.json", tunemake_json(base, method))
    return out


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, "pt") as handle:
            out.update({key: handle.get_tensor(key) for key in handle.keys()})
    return out


@pytest.fixture(scope="module")
def bases(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """``plain``: untied demo Llama with the tokenizer minus its chat_template; ``tied``: tied
    embeddings (lm_head not stored) and attention biases."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("merge_bases")
    plain = root / "plain"
    shutil.copytree(tokenizer_dir(TEMPLATE), plain)
    (plain / "chat_template.jinja").unlink()  # so the merged one can only come from the merge
    assert not AutoTokenizer.from_pretrained(plain).chat_template
    build_demo_model(plain, plain, **MODEL)
    tied = root / "tied"
    shutil.copytree(plain, tied)
    config = LlamaConfig.from_pretrained(plain)
    config.tie_word_embeddings, config.attention_bias = True, True
    with torch.random.fork_rng():
        torch.manual_seed(1)
        LlamaForCausalLM(config).save_pretrained(tied)
    with safe_open(tied / "model.safetensors", "pt") as handle:
        assert "lm_head.weight" not in handle.keys()
    return {"plain": plain, "tied": tied}


def _force_stop_token(model) -> None:
    """Make the template's end-of-turn token the argmax after any prompt: a large constant in
    dimension 0 of every embedding dominates the final hidden state, which lm_head's stop row reads."""
    inner = model.base_model.model
    stop = 4  # checked against the tokenizer in the test
    inner.model.embed_tokens.modules_to_save["default"].weight[:, 0] = 100.0
    head = inner.lm_head.modules_to_save["default"].weight
    head[stop] = 0.0
    head[stop, 0] = 1.0


# name: (base, adapter arguments, merge arguments)
CASES = {
    "patterns_modules_to_save": ("plain", {"target_modules": LINEAR, "r": 8, "lora_alpha": 16,
                                           "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"down_proj": 32},
                                           "modules_to_save": ["lm_head"]}, {}),
    "rslora_embedding_no_metadata": ("plain", {"method": None, "target_modules": ["q_proj", "v_proj", "embed_tokens"],
                                               "r": 4, "lora_alpha": 8, "use_rslora": True}, {"template": TEMPLATE}),
    "tied_lm_head_biases": ("tied", {"target_modules": ["q_proj", "v_proj"], "r": 4, "lora_alpha": 8,
                                     "modules_to_save": ["lm_head"], "bias": "all", "lora_bias": True}, {}),
    "tied_embed_tokens": ("tied", {"target_modules": ["o_proj"], "r": 4, "lora_alpha": 8,
                                   "modules_to_save": ["embed_tokens"]}, {}),
    "tied_one_copy": ("tied", {"target_modules": ["o_proj"], "r": 4, "lora_alpha": 8, "modules_to_save": ["lm_head"],
                               "ensure_weight_tying": True}, {}),
}

VANILLA = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
jobs, results = json.loads(sys.argv[1]), {}
ids = torch.tensor([json.loads(sys.argv[3])])
load = lambda path: AutoModelForCausalLM.from_pretrained(path).eval()
with torch.no_grad():
    for name, job in jobs.items():
        if "adapter" in job:
            results[name] = {"merged": load(job["merged"])(input_ids=ids).logits,
                             "peft": PeftModel.from_pretrained(load(job["base"]), job["adapter"]).eval()(input_ids=ids).logits,
                             "base": load(job["base"])(input_ids=ids).logits}
        else:
            model, tokenizer = load(job["merged"]), AutoTokenizer.from_pretrained(job["merged"])
            prompt = torch.tensor([job["prompt"]])
            kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
            results[name] = {"generated": model.generate(prompt, **kwargs)[0].tolist(),
                             "eos_only": model.generate(prompt, eos_token_id=tokenizer.eos_token_id, **kwargs)[0].tolist()}
assert "tunemake" not in sys.modules
torch.save(results, sys.argv[2])
"""


@pytest.fixture(scope="module")
def merged(bases, tmp_path_factory) -> dict[str, tuple[Path, Path, Path]]:
    """``case -> (base, adapter, merged dir)`` for CASES and the forced-stop model."""
    root = tmp_path_factory.mktemp("merged")
    out = {}
    for name, (base, lora, merge_args) in CASES.items():
        adapter = make_adapter(bases[base], root / "adapters" / name, **lora)
        out[name] = (bases[base], adapter, merge_model(adapter, root / name, max_shard_size="40KB", **merge_args))
    adapter = make_adapter(bases["plain"], root / "adapters" / "stop", target_modules=["q_proj"], r=4, lora_alpha=8,
                           modules_to_save=["embed_tokens", "lm_head"], modify=_force_stop_token)
    out["stop"] = (bases["plain"], adapter, merge_model(adapter, root / "stop"))
    return out


@pytest.fixture(scope="module")
def prompt(merged):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged["stop"][2])
    turns = [{"system": "Be brief.", "input": "What is 2 + 3?", "output": ""}]
    return prompt_ids(turns, TEMPLATES[TEMPLATE], tokenizer)[1]


@pytest.fixture(scope="module")
def vanilla(merged, prompt, tmp_path_factory) -> dict:
    """Logits and generations from a fresh interpreter that imports only transformers and peft."""
    jobs = {name: {"base": str(base), "adapter": str(adapter), "merged": str(out)}
            for name, (base, adapter, out) in merged.items() if name in CASES}
    jobs["stop"] = {"merged": str(merged["stop"][2]), "prompt": prompt}
    result = tmp_path_factory.mktemp("vanilla") / "results.pt"
    subprocess.run([sys.executable, "-c", VANILLA, json.dumps(jobs), str(result), json.dumps(IDS)], check=True,
                   env={**os.environ, "PYTHONPATH": ""}, cwd="/")
    return torch.load(result, weights_only=True)


@pytest.mark.parametrize("case", list(CASES))
def test_merged_model_gives_the_adapters_logits_in_vanilla_transformers(vanilla, merged, case):
    got, expected, base = vanilla[case]["merged"], vanilla[case]["peft"], vanilla[case]["base"]
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    assert not torch.allclose(base, expected, atol=1e-2)  # the adapter changes the model
    config = json.loads((merged[case][2] / "config.json").read_text())
    assert config["tie_word_embeddings"] is (case == "tied_one_copy") and config["dtype"] == "float32"


def test_tied_embeddings_stay_tied_unless_the_adapter_makes_them_differ(bases, tmp_path):
    def merge(name: str, **lora) -> tuple[bool, dict]:
        adapter = make_adapter(bases["tied"], tmp_path / f"adapter_{name}", target_modules=["q_proj"], **lora)
        out = merge_model(adapter, tmp_path / name)
        return json.loads((out / "config.json").read_text())["tie_word_embeddings"], tensors(out)

    base_embeddings = tensors(bases["tied"])["model.embed_tokens.weight"]
    tied, weights = merge("lora_only")
    assert tied is True and "lm_head.weight" not in weights
    # ensure_weight_tying: one trained copy serves both, so the output stays tied, with that copy
    tied, weights = merge("one_copy", modules_to_save=["lm_head"], ensure_weight_tying=True)
    assert tied is True and "lm_head.weight" not in weights
    assert not torch.equal(weights["model.embed_tokens.weight"], base_embeddings)
    tied, weights = merge("own_head", modules_to_save=["lm_head"])
    assert tied is False and torch.equal(weights["model.embed_tokens.weight"], base_embeddings)
    assert not torch.equal(weights["lm_head.weight"], base_embeddings)


def test_generation_stops_at_the_templates_end_of_turn_token(vanilla, merged, prompt):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged["stop"][2])
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert stop == 4 and stop != tokenizer.eos_token_id
    generation = json.loads((merged["stop"][2] / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tokenizer.eos_token_id, stop]
    assert generation["pad_token_id"] == tokenizer.pad_token_id
    generated = vanilla["stop"]["generated"]
    assert generated[:len(prompt)] == prompt
    assert generated[len(prompt):] == [stop]  # returned after one token, not max_new_tokens
    # without the stop word in eos_token_id it would have run on to max_new_tokens
    assert vanilla["stop"]["eos_only"][len(prompt):] == [stop] * 8


def test_saved_chat_template_renders_the_trained_prompt(merged):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged["patterns_modules_to_save"][2])
    turns = [{"system": "Be brief.", "input": "Add 2 and 3.", "output": "5"},
             {"input": "And 4 and 4?", "output": ""}]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 3."},
                {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 4 and 4?"}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == prompt_ids(turns, TEMPLATES[TEMPLATE], tokenizer)[0]
    assert rendered.endswith("<|im_start|>assistant\n")


def test_shards_follow_max_shard_size(merged, bases, tmp_path):
    _, adapter, small = merged["patterns_modules_to_save"]
    index = json.loads((small / "model.safetensors.index.json").read_text())
    shard_files = sorted(small.glob("model-*.safetensors"))
    assert len(shard_files) > 3 and shard_files[0].name == f"model-00001-of-{len(shard_files):05d}.safetensors"
    stored = {}
    for path in shard_files:
        with safe_open(path, "pt") as handle:
            keys = list(handle.keys())
            assert handle.metadata() == {"format": "pt"}
        stored.update(dict.fromkeys(keys, path.name))
        # at most 40KB, header included, unless one tensor alone is larger (the 500 x 64 float32 embeddings)
        assert path.stat().st_size <= 40_000 or len(keys) == 1, (path.name, keys)
    assert index["weight_map"] == stored
    assert len([p for p in shard_files if p.stat().st_size > 40_000]) == 2  # embed_tokens and lm_head
    with safe_open(bases["plain"] / "model.safetensors", "pt") as handle:
        assert set(stored) == set(handle.keys())
    single = merge_model(adapter, tmp_path / "single", max_shard_size="1GB")
    assert not (single / "model.safetensors.index.json").exists() and (single / "model.safetensors").exists()
    small_tensors, single_tensors = tensors(small), tensors(single)
    assert small_tensors.keys() == single_tensors.keys()
    assert all(torch.equal(small_tensors[k], single_tensors[k]) for k in small_tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in single_tensors.values())


def test_merging_twice_gives_identical_bytes(merged, tmp_path):
    _, adapter, first = merged["patterns_modules_to_save"]
    again = merge_model(adapter, tmp_path / "again", max_shard_size="40KB")
    assert files(first) == files(again)
    meta = json.loads((first / "tunemake.json").read_text())
    assert meta["kind"] == "merge" and meta["source"] == str(adapter) and meta["max_shard_size"] == "40KB"
    assert meta["epoch"] == 1 and meta["fingerprint"] == "f" * 32 and meta["template"]["name"] == TEMPLATE
    assert meta["dtype"] == "float32" and meta["base_model"] == str(merged["patterns_modules_to_save"][0])


def test_full_fine_tune_is_resharded(bases, tmp_path):
    from transformers import AutoModelForCausalLM

    source = tmp_path / "full"
    shutil.copytree(bases["plain"], source)
    write_json(source / "tunemake.json", tunemake_json(bases["plain"], "full"))
    out = merge_model(source, tmp_path / "merged", max_shard_size="100KB", dtype="bfloat16")
    assert len(list(out.glob("model-*.safetensors"))) > 1
    original, resharded = tensors(source), tensors(out)
    assert original.keys() == resharded.keys()
    assert all(torch.equal(resharded[k], original[k].bfloat16()) for k in original)
    assert {t.dtype for t in resharded.values()} == {torch.bfloat16}
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    assert json.loads((out / "tunemake.json").read_text())["method"]["type"] == "full"


def test_qlora_adapter_merges_into_the_float_base(bases, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(bases["plain"], tmp_path / "adapter", method="qlora", target_modules=LINEAR, r=8,
                           lora_alpha=16)
    out = merge_model(adapter, tmp_path / "merged", dtype="float32")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bases["plain"]), adapter)
    expected = peft_model.merge_and_unload().state_dict()
    got = tensors(out)
    assert got.keys() == expected.keys()
    assert all(torch.allclose(got[k], expected[k], atol=1e-6) for k in got)
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(got[name], tensors(bases["plain"])[name])
    meta = json.loads((out / "tunemake.json").read_text())
    assert meta["method"]["type"] == "qlora"
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def _dora(base: Path, tmp_path: Path) -> dict:
    return {"source": make_adapter(base, tmp_path / "dora", target_modules=["q_proj"], use_dora=True)}


def _other_base(base: Path, tmp_path: Path) -> dict:
    other = tmp_path / "other"
    shutil.copytree(base, other)
    build_demo_model(other, other, **{**MODEL, "hidden_size": 128})
    return {"source": make_adapter(base, tmp_path / "adapter", target_modules=["q_proj"]), "base_model": str(other)}


def _word_level_base(base: Path, tmp: Path) -> Path:
    """The base with a word-level tokenizer that has no Chinese: chatglm2's 问/答 become [UNK]."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    out = tmp / "word_level"
    shutil.copytree(base, out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        (out / name).unlink(missing_ok=True)
    words = Tokenizer(WordLevel({"[UNK]": 0, "</s>": 1, "Round": 2, "[": 3, "]": 4}, unk_token="[UNK]"))
    words.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", eos_token="</s>").save_pretrained(out)
    return out


BAD = {
    "mismatch": (_other_base, MergeError, r"adapter .*/adapter does not fit base model .*/other: LoRA of "
                 r"model.layers.0.self_attn.q_proj makes a \[64, 64\] update, the base's .* is \[128, 128\]"),
    "shard_size": (lambda base, tmp: {"source": make_adapter(base, tmp / "adapter", target_modules=["q_proj"]),
                                      "max_shard_size": "2 gigabytes"},
                   TunemakeError, r"max_shard_size: cannot read '2 gigabytes' as a size; write e.g. 2GB .*1GiB"),
    "missing_base": (lambda base, tmp: {"source": make_adapter(base, tmp / "adapter", target_modules=["q_proj"]),
                                        "base_model": str(tmp / "nowhere")},
                     TunemakeError, r"/nowhere' is neither a directory nor a hub id"),
    "missing_source": (lambda base, tmp: {"source": tmp / "no_adapter"}, MergeError, r"/no_adapter: no such adapter"),
    "stop_word": (lambda base, tmp: {"source": make_adapter(base, tmp / "adapter", target_modules=["q_proj"]),
                                     "template": Template("custom", stop_words=("END OF TURN",))},
                  MergeError, r"template 'custom': stop word 'END OF TURN' is \d+ tokens, not one, in the tokenizer "
                  r".*/plain: a template the tokenizer can't encode"),
    "unknown_token": (lambda base, tmp: {"source": make_adapter(base, tmp / "adapter", target_modules=["q_proj"]),
                                         "base_model": str(_word_level_base(base, tmp)),
                                         "template": TEMPLATES["chatglm2"]},
                      MergeError, r"template 'chatglm2': its instruction .* encodes to the unknown token '\[UNK\]',? "
                      r"in the tokenizer .*/word_level: a template the tokenizer can't encode"),
    "dora": (_dora, MergeError, r"DoRA \(use_dora\) is not supported by merge"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_and_leaves_nothing(bases, tmp_path, case):
    make_args, error, message = BAD[case]
    args = make_args(bases["plain"], tmp_path)
    out = tmp_path / "out" / "merged"
    with pytest.raises(error, match=message):
        merge_model(args.pop("source"), out, **args)
    assert not out.exists() and not list(tmp_path.rglob(".tmp-*"))


def test_cli_merge(bases, tmp_path, capsys):
    adapter = make_adapter(bases["plain"], tmp_path / "adapter", target_modules=["q_proj"])
    out = tmp_path / "merged"
    assert main(["merge", str(adapter), str(out), "--max-shard-size", "50KB", "--dtype", "bfloat16"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{out}: ") and "bfloat16" in lines[0]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert main(["merge", str(adapter), str(tmp_path / "bad"), "--max-shard-size", "lots"]) == 1
    assert "error: max_shard_size: cannot read 'lots'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("method", ["lora8", "qlora8"])
def test_trained_and_converted_adapter_merges(method, tmp_path):
    """The real pipeline: tunemake.train (QLoRA: 4-bit NF4 base) -> convert -> merge into the float base."""
    from peft import PeftModel
    from test_train import base_config, prepare
    from transformers import AutoModelForCausalLM

    from tunemake.convert import convert_checkpoint
    from tunemake.demo import build_demo_tokenizer, generate_demo_data
    from tunemake.train import train_epoch

    project = tmp_path / "project"
    generate_demo_data(project / "data" / "demo", seed=0, corpus_docs=100, tasks_per_family=20)
    build_demo_tokenizer(project / "data" / "demo" / "corpus.txt", project / "models" / "tiny", TEMPLATES[TEMPLATE],
                         vocab_size=400)
    build_demo_model(project / "models" / "tiny", project / "models" / "tiny", **MODEL)
    work, cwd = tmp_path / "work", os.getcwd()
    try:
        spec = prepare(project, work, base_config(method=method, epochs=1, lr=0.01))
        assert train_epoch(spec) == 0
        adapter = convert_checkpoint(spec.out.pth, work / "adapters" / "epoch_1", dtype="float32")
    finally:
        os.chdir(cwd)
    out = merge_model(adapter, tmp_path / "merged", base_model=str(work / "models" / "tiny"))
    ids = torch.tensor([IDS])
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(work / "models" / "tiny"), str(adapter))
    with torch.no_grad():
        expected = peft_model.eval()(input_ids=ids).logits
        with peft_model.disable_adapter():
            base_logits = peft_model(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    assert not torch.allclose(got, base_logits, atol=1e-3)  # training changed something
    meta = json.loads((out / "tunemake.json").read_text())
    assert meta["method"]["type"] == method[:-1] and meta["kind"] == "merge" and meta["source_dtype"] == "float32"


def test_template_marker_split_by_the_tokenizer_merges_with_a_warning(bases, tmp_path, caplog):
    """XTuner trains templates like `default` on tokenizers that split <|User|>: allowed, but said."""
    adapter = make_adapter(bases["plain"], tmp_path / "adapter", target_modules=["q_proj"])
    with caplog.at_level("WARNING", logger="tunemake.merge"):
        merge_model(adapter, tmp_path / "merged", template=Template("custom", instruction="<|User|>{input}<|Bot|>"))
    assert "'<|User|>' is" in caplog.text and "not one special token" in caplog.text
    assert (tmp_path / "merged" / "config.json").exists()
