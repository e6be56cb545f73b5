"""Hub ids on the user's path: resolved from the offline hub fixture (HF_HUB_OFFLINE=1) at every
stage, at a revision, with one-line errors; the fetch job around huggingface_hub's download.

The Snakemake runs from hub ids are in tests/test_examples.py; these are the unit-level ones.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hub_fixture import (GLAIVE_ROWS, GLAIVE_TOOLCALL, GLAIVE_UNKNOWN_CALLS, GUANACO, GUANACO_TRAIN_ROWS,
                         GUANACO_TRAIN_ROWS_V1, INTERNLM, INTERNLM2, LLAMA3, write_repo)
from tunemake import hub
from tunemake.config import load_config
from tunemake.data import build_templated_dataset
from tunemake.errors import DataError, TunemakeError
from tunemake.hub import HubError, HubRepo

EMBED = "model.embed_tokens.weight"


def config(model: dict, dataset: dict | None = None, **experiment) -> dict:
    return load_config({
        "models": {"m": {"template": "llama3_chat", "dtype": "float32", **model}},
        "datasets": {"d": dataset or {"hub": GUANACO, "format": "oasst1", "heldout_fraction": 0.2}},
        "experiments": [{"model": "m", "datasets": "d", "method": "lora", "max_length": 128, "epochs": 1,
                         "batch_size": 2, "grad_accumulation": 1, "gpus": 0, **experiment}],
    })


def only(resolved: dict) -> dict:
    return next(iter(resolved["experiments"].values()))


def embeddings(directory: Path) -> torch.Tensor:
    return load_file(str(directory / "model.safetensors"))[EMBED]


# --- resolution --------------------------------------------------------------------------------


@pytest.mark.parametrize("revision", [None, "main", "v1", "sha"])
def test_a_hub_id_resolves_to_its_revisions_snapshot(offline_hub, revision):
    branch = "main" if revision in (None, "main") else "v1"
    for repo_id, resolve in ((LLAMA3, hub.model_dir), (GUANACO, hub.dataset_dir)):
        asked = offline_hub.commits[repo_id]["v1"] if revision == "sha" else revision
        assert resolve(repo_id, asked) == offline_hub.snapshots[repo_id][branch]


def test_revisions_hold_different_bytes(offline_hub):
    main, v1 = (hub.model_dir(LLAMA3, r) for r in ("main", "v1"))
    assert not torch.equal(embeddings(main), embeddings(v1))


def test_an_uncached_id_names_the_key_revision_and_the_command(offline_hub):
    with pytest.raises(HubError, match=r"^models\.m\.path: org/absent at revision dev is not in the Hugging Face "
                                       r"cache .*`hf download org/absent --revision dev`"):
        hub.model_dir("org/absent", "dev", key="models.m.path")
    with pytest.raises(HubError, match=r"dataset org/absent at revision main .*`hf download org/absent --repo-type dataset`"):
        hub.dataset_dir("org/absent")


def test_a_path_that_is_neither_a_directory_nor_a_hub_id():
    with pytest.raises(HubError) as raised:
        hub.model_dir("/nonexistent/model", key="models.m.path")
    assert str(raised.value) == "models.m.path: '/nonexistent/model' is neither a directory nor a hub id (ORG/NAME)"


def _http_error(kind, status: int):
    import httpx2

    response = httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/org/x"))
    return kind("refused", response=response)


@pytest.mark.parametrize("status", [401, 403])
def test_gated_or_private_repos_say_how_to_log_in(monkeypatch, status):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

    error = _http_error(GatedRepoError if status == 403 else HfHubHTTPError, status)

    def refuse(*args, **kwargs):
        raise error

    class Api:
        list_repo_files = repo_info = refuse

    monkeypatch.setattr(hub, "offline", lambda: False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    with pytest.raises(HubError, match=r"org/x at revision main.*`hf auth login` or set HF_TOKEN"):
        hub.fetch(HubRepo("org/x"))


# --- the fetch job -----------------------------------------------------------------------------


def _fill_cache_instead_of_downloading(monkeypatch, offline_hub, files: dict[str, bytes]):
    """huggingface_hub's download, stood in for: writes the repo into the cache as it would."""
    import huggingface_hub

    def download(repo_id, repo_type=None, revision=None, ignore_patterns=None, **kwargs):
        asked.append(ignore_patterns)
        shas = write_repo(offline_hub.cache_dir, repo_type or "model", repo_id, [(revision or "main", files)])
        folder = "--".join([f"{repo_type or 'model'}s", *repo_id.split("/")])
        return str(offline_hub.cache_dir / folder / "snapshots" / shas[revision or "main"])

    class Api:  # the repository's listing, as the hub would answer it
        def list_repo_files(self, repo_id, revision=None, **kwargs):
            return [*files, "original/consolidated.00.pth", "pytorch_model.bin"]

    asked = []
    monkeypatch.setattr(hub, "offline", lambda: False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    return asked


def test_fetch_downloads_into_the_cache_and_writes_a_receipt(monkeypatch, offline_hub, tmp_path):
    files = {name: path.read_bytes() for name in ("config.json", "model.safetensors")
             for path in [offline_hub.snapshots[LLAMA3]["main"] / name]}
    asked = _fill_cache_instead_of_downloading(monkeypatch, offline_hub, files)
    receipt = hub.fetch_receipt("fetch-test/model", "model", "dev", tmp_path / "fetched" / "r.json")
    # what transformers loads, not the copies in other formats, nor .bin beside safetensors
    assert "original/*" in asked[0] and "*.bin" in asked[0]
    assert json.loads((tmp_path / "fetched" / "r.json").read_text()) == receipt
    assert receipt["revision"] == "dev" and len(receipt["commit"]) == 40
    monkeypatch.undo()  # offline again: the stages find it in the cache
    assert hub.model_dir("fetch-test/model", "dev") == Path(receipt["snapshot"])


def test_a_snapshot_without_weights_is_not_a_finished_fetch(monkeypatch, offline_hub, tmp_path):
    _fill_cache_instead_of_downloading(monkeypatch, offline_hub, {"config.json": b"{}"})
    with pytest.raises(HubError, match=r"fetch-test/partial at revision main: the cached snapshot .* lacks \*\.safetensors"):
        hub.fetch_receipt("fetch-test/partial", "model", None, tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()


def test_fetch_offline_passes_a_cached_repo_and_refuses_an_uncached_one(offline_hub, tmp_path):
    receipt = hub.fetch_receipt(INTERNLM, "model", "v1", tmp_path / "r.json")
    assert receipt["commit"] == offline_hub.commits[INTERNLM]["v1"]
    with pytest.raises(HubError, match="is not in the Hugging Face cache"):
        hub.fetch_receipt("org/absent", "dataset", None, tmp_path / "s.json")


# --- what the DAG needs at parse time ----------------------------------------------------------


def test_parse_time_fetches_only_a_config_json_when_online(monkeypatch, offline_hub):
    import huggingface_hub

    shape = json.loads((offline_hub.snapshots[LLAMA3]["main"] / "config.json").read_text())
    fetched = []

    def download(repo_id, filename, revision=None, **kwargs):
        fetched.append(filename)
        write_repo(offline_hub.cache_dir, "model", repo_id, [(revision or "main", {filename: json.dumps(shape).encode()})])
        return huggingface_hub.try_to_load_from_cache(repo_id, filename, revision=revision)

    resolved = config({"path": "parse-test/model"})
    with pytest.raises(HubError, match=r"^config: models\.m\.path: parse-test/model at revision main is not in"):
        hub.check_config(resolved)
    monkeypatch.setattr(hub, "offline", lambda: False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    hub.check_config(resolved)
    assert fetched == ["config.json"]

    from tunemake.resources import estimate_resources

    estimate = estimate_resources(only(resolved), resolved)
    assert estimate["model"]["source"].endswith("config.json")


def test_a_model_with_its_own_code_needs_trust_remote_code(offline_hub):
    resolved = config({"path": INTERNLM, "template": "internlm_chat"})
    with pytest.raises(HubError, match=r"^config: models\.m\.trust_remote_code: internlm/internlm-chat-7b ships its own"):
        hub.check_config(resolved)
    hub.check_config(config({"path": INTERNLM, "template": "internlm_chat", "trust_remote_code": True}))


def test_offline_a_hub_dataset_must_be_cached(offline_hub):
    resolved = config({"path": LLAMA3}, {"hub": "org/absent-data", "format": "alpaca"})
    with pytest.raises(HubError, match=r"^config: datasets\.d\.hub: dataset org/absent-data at revision main"):
        hub.check_config(resolved)


def test_a_models_own_code_failing_is_one_line(offline_hub):
    from transformers import AutoModelForCausalLM

    import transformers

    with pytest.raises(HubError) as raised:
        hub.load_pretrained(AutoModelForCausalLM, hub.model_dir(INTERNLM2), INTERNLM2, trust_remote_code=True)
    message = str(raised.value)
    assert message.startswith(f"{INTERNLM2}: the model's own code (trust_remote_code) failed under transformers "
                              f"{transformers.__version__}: ImportError")
    assert "\n" not in message


# --- every stage at a revision -----------------------------------------------------------------


def test_data_reads_the_dataset_and_tokenizer_at_their_revisions(offline_hub, tmp_path):
    model = {"path": INTERNLM, "template": "internlm_chat", "trust_remote_code": True}
    counts = {}
    for revision in ("v1", None):
        resolved = config({**model, "revision": revision}, {"hub": GUANACO, "format": "oasst1", "revision": revision})
        stats = build_templated_dataset(only(resolved)["data_recipe"], tmp_path / str(revision))
        counts[revision] = stats["records_in"]
    assert counts == {"v1": GUANACO_TRAIN_ROWS_V1, None: GUANACO_TRAIN_ROWS}


def test_the_train_stage_builds_the_base_at_its_revision(offline_hub):
    from tunemake.train import EpochSpec
    from tunemake.train.model import build_model

    spec = EpochSpec.from_config(only(config({"path": LLAMA3, "revision": "v1"})), 1, config({"path": LLAMA3, "revision": "v1"}))
    model = build_model(spec.method, spec.base_model, torch.device("cpu"))
    weight = model.get_input_embeddings().weight.detach()
    assert torch.equal(weight, embeddings(offline_hub.snapshots[LLAMA3]["v1"]))


@pytest.fixture(scope="module")
def trained_at_v1(offline_hub, tmp_path_factory):
    """One LoRA epoch of the llama stand-in at revision v1, in two processes under ZeRO-2."""
    from tunemake.paths import templated_dataset
    from tunemake.train import EpochSpec, launch

    work = tmp_path_factory.mktemp("hub_train")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        resolved = config({"path": LLAMA3, "revision": "v1"}, deepspeed="zero2", nproc=2)
        exp = only(resolved)
        build_templated_dataset(exp["data_recipe"], templated_dataset(exp["data_key"]))
        spec = EpochSpec.from_config(exp, 1, resolved)
        assert launch(spec) == 0
    finally:
        os.chdir(cwd)
    return work / spec.out.pth, work / templated_dataset(exp["data_key"])


def test_two_processes_under_zero2_train_from_a_hub_id(trained_at_v1):
    ckpt = torch.load(trained_at_v1[0], weights_only=True)
    assert ckpt["base_model"] == LLAMA3
    assert ckpt["trainable"] and all(".lora_" in name for name in ckpt["trainable"])


def test_convert_and_merge_at_the_revision(offline_hub, trained_at_v1, tmp_path):
    from tunemake.convert import convert_checkpoint
    from tunemake.merge import merge_model

    adapter = convert_checkpoint(trained_at_v1[0], tmp_path / "adapter", base_model=LLAMA3, revision="v1")
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == LLAMA3  # vanilla PEFT finds the base anywhere
    merged = merge_model(adapter, tmp_path / "merged", base_model=LLAMA3, revision="v1", dtype="float32")
    # LoRA leaves the embeddings alone: the merge's are exactly the v1 base's
    assert torch.equal(embeddings(merged), embeddings(offline_hub.snapshots[LLAMA3]["v1"]))
    assert json.loads((merged / "tunemake.json").read_text())["base_model"] == LLAMA3


def test_evaluate_and_chat_read_a_hub_id_at_its_revision(offline_hub, trained_at_v1, tmp_path):
    from tunemake.chat import load_chat_model
    from tunemake.evaluate import evaluate_model

    losses = {}
    for revision in ("v1", "main"):
        result = evaluate_model(LLAMA3, trained_at_v1[1], tmp_path / f"{revision}.json", template="llama3_chat",
                                revision=revision, max_prompts=2, max_new_tokens=4)
        losses[revision] = result["heldout"]["loss"]
    assert None not in losses.values() and losses["v1"] != losses["main"]
    model, _ = load_chat_model(LLAMA3, revision="v1", device="cpu")
    assert torch.equal(model.get_input_embeddings().weight, embeddings(offline_hub.snapshots[LLAMA3]["v1"]))


def test_cli_commands_from_a_hub_id(offline_hub, tmp_path, monkeypatch, capsys):
    import yaml

    from tunemake.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({
        "models": {"internlm": {"path": INTERNLM, "revision": "v1", "template": "internlm_chat",
                                "trust_remote_code": True}},
        "datasets": {"oasst1": {"hub": GUANACO, "format": "oasst1", "revision": "v1"}},
        "experiments": [{"model": "internlm", "datasets": "oasst1", "method": "qlora", "max_length": 256}],
    }))
    assert main(["list-experiments"]) == 0
    assert "internlm_qlora_oasst1" in capsys.readouterr().out
    assert main(["check-dataset", "oasst1", "-n", "1", "--no-color"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith(f"--- hub:{GUANACO}[train]: row 0:") and "<|User|>:" in shown and "<eoa>]]" in shown
    assert main(["build-data", "internlm_qlora_oasst1"]) == 0
    assert f"{GUANACO_TRAIN_ROWS_V1} train" in capsys.readouterr().out


def test_a_local_dataset_directory_is_read_as_a_hub_dataset(tmp_path, tokenizer_dir):
    ds_dir = tmp_path / "hub_dataset"
    ds_dir.mkdir()
    rows = [{"instruction": f"Say {i}", "input": "", "output": str(i)} for i in range(20)]
    rows.append({"instruction": "Say nothing", "input": "", "output": "<nooutput>"})
    (ds_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    resolved = load_config({
        "models": {"tok": {"path": str(tokenizer_dir("default")), "template": "default"}},
        "datasets": {"remote": {"hub": str(ds_dir), "split": "train", "format": "alpaca"}},
        "experiments": [{"model": "tok", "datasets": "remote", "method": "lora", "max_length": 64}],
    })
    stats = build_templated_dataset(only(resolved)["data_recipe"], tmp_path / "out")
    assert (stats["records_in"], stats["records_out"]["train"], stats["dropped"]["empty_conversation"]) == (21, 20, 1)


def test_hub_record_errors_name_the_row(tmp_path, tokenizer_dir):
    ds_dir = tmp_path / "hub_dataset"
    ds_dir.mkdir()
    (ds_dir / "train.jsonl").write_text(json.dumps({"text": "### Human: hi"}) + "\n")
    resolved = load_config({
        "models": {"tok": {"path": str(tokenizer_dir("default")), "template": "default"}},
        "datasets": {"remote": {"hub": str(ds_dir), "split": "train", "format": "alpaca"}},
        "experiments": [{"model": "tok", "datasets": "remote", "method": "lora", "max_length": 64}],
    })
    with pytest.raises(DataError, match=r"^hub:.*hub_dataset\[train\]: row 0: missing key 'output'"):
        build_templated_dataset(only(resolved)["data_recipe"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_sharegpt_tool_call_dataset_from_a_hub_id(offline_hub, tmp_path, tokenizer_dir, capsys):
    from tunemake.cli import main

    settings = {
        "models": {"tok": {"path": str(tokenizer_dir("qwen_chat")), "template": "qwen_chat"}},
        "datasets": {"calls": {"hub": GLAIVE_TOOLCALL, "format": "sharegpt"}},
        "experiments": [{"model": "tok", "datasets": "calls", "method": "lora", "max_length": 4096}],
    }
    stats = build_templated_dataset(only(load_config(settings))["data_recipe"], tmp_path / "out")
    kept = GLAIVE_ROWS - GLAIVE_UNKNOWN_CALLS
    assert (stats["tool_records"], stats["tool_calls"], stats["dropped"]["unknown_tool"]) == (kept, kept, 1)
    assert (stats["records_out"]["train"], stats["truncated"]) == (kept, 0)
    (tmp_path / "c.yaml").write_text(json.dumps(settings))
    assert main(["check-dataset", "calls", "-n", "1", "--config", str(tmp_path / "c.yaml")]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith(f"--- hub:{GLAIVE_TOOLCALL}[train]: row 0:") and ", 1 tool call" in shown
    assert '[[<tool_call>\n{"name": "calculate", "arguments": {"expression": "0+30"}}\n</tool_call><|im_end|>]]' in shown
    assert '<tool_response>\n{"result": 30}\n</tool_response>' in shown


def test_an_uncached_hub_dataset_fails_the_data_stage_in_one_line(offline_hub, tmp_path):
    resolved = config({"path": LLAMA3}, {"hub": "org/absent-data", "format": "alpaca"})
    with pytest.raises(TunemakeError, match=r"dataset org/absent-data at revision main is not in the Hugging Face cache"):
        build_templated_dataset(only(resolved)["data_recipe"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_command_names_its_config_file_for_an_uncached_hub_model(offline_hub, tmp_path, monkeypatch, capsys):
    from tunemake.cli import main

    settings = {"models": {"m": {"path": "org/nowhere", "template": "llama3_chat"}},
                "datasets": {"d": {"hub": GUANACO, "format": "oasst1"}},
                "experiments": [{"model": "m", "datasets": "d", "method": "lora"}]}
    (tmp_path / "mine.yaml").write_text(json.dumps(settings))
    monkeypatch.chdir(tmp_path)
    assert main(["list-experiments", "-c", "mine.yaml"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "error: mine.yaml: models.m.path: org/nowhere at revision main is not in the Hugging Face cache")
