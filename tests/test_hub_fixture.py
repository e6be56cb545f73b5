"""The offline hub of hub_fixture.py is what huggingface_hub, transformers and datasets read."""

from __future__ import annotations

import os

import pytest
import torch
from hub_fixture import (
    GUANACO,
    GUANACO_EVAL_ROWS,
    GUANACO_TRAIN_ROWS,
    GUANACO_TRAIN_ROWS_V1,
    INTERNLM,
    INTERNLM2,
    LLAMA3,
)

from tunemake.templates import TEMPLATES

# internlm_chat's special tokens inside text, Chinese, accents and a 4-byte emoji.
TEXT = (
    "<|System|>:Be brief.\n<|User|>:请给我介绍五个上海的景点 Ünïcödé 🎉<eoh>\n<|Bot|>:Yes.<eoa>"
)


def test_the_session_is_offline_in_its_own_home(offline_hub):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert offline_hub.hf_home == offline_hub.cache_dir.parent
    assert os.path.samefile(os.environ["HF_HOME"], offline_hub.hf_home)


def test_every_repo_and_revision_resolves_from_the_cache(offline_hub):
    from huggingface_hub import snapshot_download

    assert set(offline_hub.commits[INTERNLM]) == {"main", "v1"}
    assert set(offline_hub.commits[INTERNLM2]) == {"main"}
    for repo_id, commits in offline_hub.commits.items():
        repo_type = offline_hub.repo_types[repo_id]
        for branch, sha in commits.items():
            for revision in (branch, sha):
                path = snapshot_download(repo_id, repo_type=repo_type, revision=revision,
                                         local_files_only=True, cache_dir=offline_hub.cache_dir)
                assert path == str(offline_hub.snapshots[repo_id][branch])
            ref = offline_hub.snapshots[repo_id][branch].parents[1] / "refs" / branch
            assert ref.read_text() == sha
        # No cache_dir: found through HF_HOME, as the project's own code will.
        assert snapshot_download(repo_id, repo_type=repo_type) == str(offline_hub.snapshots[repo_id]["main"])


def test_snapshot_files_are_relative_links_to_content_named_blobs(offline_hub):
    snapshot = offline_hub.snapshots[LLAMA3]["main"]
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        link = snapshot / name
        assert link.is_symlink() and not os.path.isabs(os.readlink(link))
        assert link.resolve().parent.name == "blobs"
    # An LFS file is named by its sha256 (64 hex digits), a plain one by its git blob sha1 (40).
    assert len((snapshot / "model.safetensors").resolve().name) == 64
    assert len((snapshot / "config.json").resolve().name) == 40


def test_llama3_loads_by_hub_id_and_its_commits_differ(offline_hub):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(LLAMA3)
    model = AutoModelForCausalLM.from_pretrained(LLAMA3)
    old = AutoModelForCausalLM.from_pretrained(LLAMA3, revision="v1")
    assert tokenizer.is_fast and model.config.vocab_size == len(tokenizer)
    assert "<|eot_id|>" in tokenizer.all_special_tokens
    assert not torch.equal(model.lm_head.weight, old.lm_head.weight)


@pytest.mark.parametrize("auto", ["AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"])
def test_internlm_refuses_to_load_without_trust_remote_code(offline_hub, auto):
    import transformers

    # False, not the default None: None asks on stdin first (with a 15 s timeout) when there is one.
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        getattr(transformers, auto).from_pretrained(INTERNLM, trust_remote_code=False)


def test_internlm_tokenizer_is_slow_and_round_trips(offline_hub, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(INTERNLM, trust_remote_code=True)
    assert type(tokenizer).__name__ == "InternLMTokenizer" and tokenizer.is_fast is False
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert tokenizer.decode(ids) == TEXT
    for token in TEMPLATES["internlm_chat"].special_tokens():
        assert tokenizer.encode(token, add_special_tokens=False) == [tokenizer.convert_tokens_to_ids(token)]
    assert tokenizer.encode("a") == [tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("a")]
    assert tokenizer.pad_token_id == tokenizer.eos_token_id

    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "tokenization_internlm.py").is_file()
    reloaded = AutoTokenizer.from_pretrained(tmp_path, trust_remote_code=True)
    assert reloaded.is_fast is False and len(reloaded) == len(tokenizer)
    assert reloaded.encode(TEXT, add_special_tokens=False) == ids


def test_internlm_model_trains_generates_and_takes_lora(offline_hub):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(INTERNLM, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(INTERNLM, trust_remote_code=True)
    assert type(model).__name__ == "InternLMForCausalLM" and model.config.model_type == "internlm"
    assert model.config.vocab_size == len(tokenizer)

    ids = torch.tensor([tokenizer.encode("Hello 你好")])
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.lm_head.weight.grad.abs().sum() > 0
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (1, ids.shape[1] + 4)

    old = AutoModelForCausalLM.from_pretrained(INTERNLM, revision="v1", trust_remote_code=True)
    assert not torch.equal(model.lm_head.weight, old.lm_head.weight)
    lora = get_peft_model(old, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    lora(input_ids=ids, labels=ids).loss.backward()
    assert any(p.grad is not None for n, p in lora.named_parameters() if "lora_" in n)


def test_internlm2_loads_all_but_its_model(offline_hub):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(INTERNLM2, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(INTERNLM2, trust_remote_code=True)
    assert config.model_type == "internlm2" and config.vocab_size == len(tokenizer)
    for token in TEMPLATES["internlm2_chat"].special_tokens():
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1
    with pytest.raises(ImportError, match="LlamaFlashAttention2"):
        AutoModelForCausalLM.from_pretrained(INTERNLM2, trust_remote_code=True)


def test_guanaco_loads_from_its_snapshot_with_a_test_split(offline_hub):
    import datasets

    from tunemake.formats import map_oasst1

    # datasets names splits by file-name keywords: "_eval" means test.
    main = datasets.load_dataset(str(offline_hub.snapshots[GUANACO]["main"]))
    old = datasets.load_dataset(str(offline_hub.snapshots[GUANACO]["v1"]), split="train")
    assert {name: len(split) for name, split in main.items()} == {
        "train": GUANACO_TRAIN_ROWS, "test": GUANACO_EVAL_ROWS,
    }
    assert len(old) == GUANACO_TRAIN_ROWS_V1
    turns = [len(map_oasst1(row, f"row {i}")) for i, row in enumerate(main["train"])]
    assert set(turns) == {1, 2}
