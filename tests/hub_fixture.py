"""An offline Hugging Face hub: tiny stand-ins for the repos tunemake's examples name.

:func:`build_offline_hub` writes them into ``HF_HOME/hub`` in ``huggingface_hub``'s own cache
layout, so ``from_pretrained("internlm/internlm-chat-7b", revision=...)``,
``snapshot_download(..., local_files_only=True)`` and ``datasets.load_dataset`` find them with
``HF_HUB_OFFLINE=1``, exactly as they would find a real download.

Repos (each with two commits, the older one also the branch ``v1``, unless said otherwise):

- :data:`LLAMA3`: a tiny ``LlamaForCausalLM`` with the demo's fast byte-level BPE tokenizer for
  the ``llama3_chat`` template. The commits' weights differ (other seed).
- :data:`INTERNLM`: remote code, like the real repo: ``model_type`` ``internlm``, which
  transformers does not know, so config, model and tokenizer load only with
  ``trust_remote_code=True``. The model is Llama's code under InternLM's names (with attention
  biases, as InternLM has), not declaring transformers' attention interface, as remote code
  written before it does not; the tokenizer is a slow, pure-Python byte-level one (one token per
  UTF-8 byte) whose pad token is its eos, as InternLM's is. The commits' weights differ.
- :data:`INTERNLM2`: remote code whose modelling file fails to import under transformers 5
  (``LlamaFlashAttention2`` is gone), as the real InternLM2 code does: config and tokenizer load,
  the model does not. One commit, ``main`` only.
- :data:`GUANACO` (a dataset repo): guanaco-style ``{"text": "### Human: ...### Assistant: ..."}``
  rows, some multi-turn, in the real repo's file names. The train file grows from
  :data:`GUANACO_TRAIN_ROWS_V1` to :data:`GUANACO_TRAIN_ROWS` rows between the commits;
  ``load_dataset`` puts the ``_eval`` file into the ``test`` split, as for the real repo.
- :data:`GLAIVE_TOOLCALL` (a dataset repo): sharegpt records as LLaMA-Factory's glaive tool-call
  data has them (``conversations`` with ``function_call`` and ``observation`` messages, ``tools``
  a JSON string); one record in :data:`GLAIVE_UNKNOWN_CALLS` calls a function it does not offer.
  One commit, ``main`` only.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

LLAMA3 = "meta-llama/Meta-Llama-3-8B-Instruct"
INTERNLM = "internlm/internlm-chat-7b"
INTERNLM2 = "internlm/internlm2-chat-7b"
GUANACO = "timdettmers/openassistant-guanaco"
GLAIVE_TOOLCALL = "llamafactory/glaive_toolcall_en"
GLAIVE_ROWS = 8
GLAIVE_UNKNOWN_CALLS = 1

GUANACO_TRAIN = "openassistant_best_replies_train.jsonl"
GUANACO_EVAL = "openassistant_best_replies_eval.jsonl"
GUANACO_TRAIN_ROWS = 24
GUANACO_TRAIN_ROWS_V1 = 16
GUANACO_EVAL_ROWS = 6

#: The byte-level tokenizers' fixed ids, as in Llama's and InternLM's sentencepiece vocabularies.
UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = "<unk>", "<s>", "</s>"

#: The tiny models' shape: heads 16 wide; sizes are multiples of 64 for bitsandbytes.
MODEL_SHAPE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    intermediate_size=128,
    max_position_embeddings=512,
)

_CORPUS_LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, how are you today? I am fine, thank you.",
    "What is the capital of France? The capital of France is Paris.",
    "Add 12 and 30. The sum is 42.",
    "A chat between a curious user and an assistant gives helpful answers.",
    "Ünïcödé text, 问答 and emoji 🎉 also appear in the data sometimes.",
]


@dataclass
class OfflineHub:
    """What :func:`build_offline_hub` wrote.

    Attributes:
        hf_home: the ``HF_HOME`` it wrote into; the cache itself is ``hf_home / "hub"``.
        commits: repo id -> branch (``"main"``, ``"v1"``) -> 40-hex commit sha.
        snapshots: repo id -> branch -> that commit's snapshot directory.
        repo_types: repo id -> ``"model"`` or ``"dataset"``.
    """

    hf_home: Path
    commits: dict[str, dict[str, str]] = field(default_factory=dict)
    snapshots: dict[str, dict[str, Path]] = field(default_factory=dict)
    repo_types: dict[str, str] = field(default_factory=dict)

    @property
    def cache_dir(self) -> Path:
        return self.hf_home / "hub"


def build_offline_hub(hf_home: Path) -> OfflineHub:
    """Write every repo into ``hf_home / "hub"`` and return where each commit landed.

    Deterministic: the same transformers version gives the same bytes and commit shas. Rebuilding
    into the same ``hf_home`` overwrites refs and links and leaves other repos there alone.
    """
    hub = OfflineHub(Path(hf_home))
    with tempfile.TemporaryDirectory(prefix="hub-fixture-") as staging:
        repos = [
            ("model", LLAMA3, _llama3_commits(Path(staging))),
            ("model", INTERNLM, _internlm_commits()),
            ("model", INTERNLM2, _internlm2_commits()),
            ("dataset", GUANACO, _guanaco_commits()),
            ("dataset", GLAIVE_TOOLCALL, [("main", {"glaive_toolcall_en.json": _json(glaive_rows())})]),
        ]
    for repo_type, repo_id, commits in repos:
        shas = write_repo(hub.cache_dir, repo_type, repo_id, commits)
        folder = hub.cache_dir / _repo_folder(repo_type, repo_id)
        hub.commits[repo_id] = shas
        hub.snapshots[repo_id] = {ref: folder / "snapshots" / sha for ref, sha in shas.items()}
        hub.repo_types[repo_id] = repo_type
    return hub


def write_repo(
    cache_dir: Path, repo_type: str, repo_id: str, commits: list[tuple[str, dict[str, bytes]]]
) -> dict[str, str]:
    """Write one repo's commits, oldest first, as ``huggingface_hub`` caches them.

    ``refs/<branch>`` holds the commit sha (no newline); ``snapshots/<sha>/<file>`` is a relative
    symlink to ``blobs/<hash>``, the hash being the git blob sha1 of the file, or the sha256 for
    ``.safetensors`` (stored with git LFS on the hub, which names blobs by the LFS oid). Each
    commit's sha hashes its parent and its files, so it is stable across runs.

    Returns:
        branch -> commit sha.
    """
    folder = cache_dir / _repo_folder(repo_type, repo_id)
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    (folder / "refs").mkdir(exist_ok=True)
    shas: dict[str, str] = {}
    parent = ""
    for branch, files in commits:
        listing = "".join(f"{name} {_blob_name(name, data)}\n" for name, data in sorted(files.items()))
        sha = hashlib.sha1(f"{repo_type}s/{repo_id}\n{parent}\n{listing}".encode()).hexdigest()
        for name, data in files.items():
            _write_snapshot_file(folder, sha, name, data)
        (folder / "refs" / branch).write_text(sha)
        shas[branch] = parent = sha
    return shas


def _repo_folder(repo_type: str, repo_id: str) -> str:
    return f"{repo_type}s--{repo_id.replace('/', '--')}"


def _blob_name(name: str, data: bytes) -> str:
    if name.endswith(".safetensors"):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _write_snapshot_file(folder: Path, sha: str, name: str, data: bytes) -> None:
    blob = folder / "blobs" / _blob_name(name, data)
    if not blob.exists():
        blob.write_bytes(data)
    link = folder / "snapshots" / sha / name
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(os.path.relpath(blob, link.parent))


# --- meta-llama/Meta-Llama-3-8B-Instruct -------------------------------------------------------


def _llama3_commits(staging: Path) -> list[tuple[str, dict[str, bytes]]]:
    """The demo tokenizer and model, built by tunemake.demo; the commits differ in the seed."""
    from tunemake.demo import build_demo_model, build_demo_tokenizer
    from tunemake.templates import TEMPLATES

    corpus = staging / "corpus.txt"
    lines = [f"{line} ({i})" for i in range(20) for line in _CORPUS_LINES]
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    commits = []
    for branch, seed in (("v1", 1), ("main", 0)):
        out = staging / f"llama3-{branch}"
        names = build_demo_tokenizer(corpus, out, TEMPLATES["llama3_chat"], vocab_size=400)
        names += build_demo_model(
            out,
            out,
            hidden_size=MODEL_SHAPE["hidden_size"],
            num_layers=MODEL_SHAPE["num_hidden_layers"],
            num_heads=MODEL_SHAPE["num_attention_heads"],
            intermediate_size=MODEL_SHAPE["intermediate_size"],
            max_position_embeddings=MODEL_SHAPE["max_position_embeddings"],
            seed=seed,
        )
        commits.append((branch, {name: (out / name).read_bytes() for name in names}))
    return commits


# --- internlm/internlm-chat-7b and internlm/internlm2-chat-7b: remote code ---------------------

_TOKENIZER_CODE = '''\
"""A byte-level stand-in for InternLM's tokenizer: every UTF-8 byte is one token.

Ids 0-2 are <unk>, <s>, </s>; the 256 bytes follow; added special tokens (the chat template's)
come after them. encode() prepends <s> unless add_special_tokens=False, as Llama's tokenizer does.
"""

from transformers import AddedToken, PreTrainedTokenizer


class InternLMTokenizer(PreTrainedTokenizer):
    vocab_files_names = {}
    model_input_names = ["input_ids", "attention_mask"]
    offset = 3

    def __init__(self, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>",
                 add_bos_token=True, add_eos_token=False, **kwargs):
        # Before super().__init__, so the fixed tokens keep ids 0-2 rather than being appended.
        self._added_tokens_decoder = {
            i: AddedToken(str(t), special=True, normalized=False)
            for i, t in enumerate((unk_token, bos_token, eos_token))
        }
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        super().__init__(unk_token=unk_token, bos_token=bos_token, eos_token=eos_token,
                         pad_token=pad_token, add_bos_token=add_bos_token,
                         add_eos_token=add_eos_token, **kwargs)

    @property
    def vocab_size(self):
        return self.offset + 256

    def get_vocab(self):
        vocab = {chr(b): b + self.offset for b in range(256)}
        vocab.update({t.content: i for i, t in self._added_tokens_decoder.items()})
        return vocab

    def _tokenize(self, text, **kwargs):
        return [chr(b) for b in text.encode("utf-8")]

    def _convert_token_to_id(self, token):
        if len(token) == 1 and ord(token) < 256:
            return ord(token) + self.offset
        return self._added_tokens_encoder.get(token, 0)

    def _convert_id_to_token(self, index):
        if self.offset <= index < self.vocab_size:
            return chr(index - self.offset)
        return str(self.unk_token)

    def convert_tokens_to_string(self, tokens):
        data = b"".join(
            t.encode("utf-8") if t in self._added_tokens_encoder else bytes([ord(t)])
            for t in tokens
        )
        return data.decode("utf-8", errors="replace")

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        ids = bos + token_ids_0 + eos
        if token_ids_1 is not None:
            ids += bos + token_ids_1 + eos
        return ids

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, True)
        bos = [1] if self.add_bos_token else []
        eos = [1] if self.add_eos_token else []
        mask = bos + [0] * len(token_ids_0) + eos
        if token_ids_1 is not None:
            mask += bos + [0] * len(token_ids_1) + eos
        return mask

    def save_vocabulary(self, save_directory, filename_prefix=None):
        return ()  # the vocabulary is the 256 bytes: nothing to save
'''

_CONFIG_CODE = '''\
"""InternLM's configuration, as a stand-in: Llama's, under InternLM's model type."""

from transformers import LlamaConfig


class InternLMConfig(LlamaConfig):
    model_type = "internlm"
'''

_MODELING_CODE = '''\
"""InternLM as a stand-in: Llama's modelling code under InternLM's names."""

from transformers import LlamaForCausalLM, LlamaModel

from .configuration_internlm import InternLMConfig


class InternLMModel(LlamaModel):
    config_class = InternLMConfig


class InternLMForCausalLM(LlamaForCausalLM):
    config_class = InternLMConfig
    # Remote code written before transformers' attention interface does not declare it.
    _supports_attention_backend = False
'''

# The real InternLM2 code imports this at the top of modeling_internlm2.py; transformers 5 removed
# the per-backend attention classes, so the import fails before any class is defined.
_BROKEN_IMPORT = "from transformers.models.llama.modeling_llama import LlamaFlashAttention2\n"


def _internlm_commits() -> list[tuple[str, dict[str, bytes]]]:
    code = {
        "configuration_internlm.py": _CONFIG_CODE,
        "modeling_internlm.py": _MODELING_CODE,
        "tokenization_internlm.py": _TOKENIZER_CODE,
    }
    return _remote_code_commits("internlm", "InternLM", "internlm_chat", code, seeds={"v1": 1, "main": 0})


def _internlm2_commits() -> list[tuple[str, dict[str, bytes]]]:
    def rename(text: str) -> str:
        return text.replace("InternLM", "InternLM2").replace("_internlm", "_internlm2")

    code = {
        "configuration_internlm2.py": rename(_CONFIG_CODE).replace('"internlm"', '"internlm2"'),
        "modeling_internlm2.py": _BROKEN_IMPORT + rename(_MODELING_CODE),
        "tokenization_internlm2.py": rename(_TOKENIZER_CODE),
    }
    return _remote_code_commits("internlm2", "InternLM2", "internlm2_chat", code, seeds={"main": 0})


def _remote_code_commits(
    model_type: str, prefix: str, template: str, code: dict[str, str], seeds: dict[str, int]
) -> list[tuple[str, dict[str, bytes]]]:
    """A remote-code repo per seed: the .py files, tokenizer config, config and random weights."""
    from tunemake.templates import TEMPLATES

    special = TEMPLATES[template].special_tokens()
    tokenizer_files = _remote_tokenizer_files(model_type, prefix, special)
    # Ids as the tokenizer assigns them: 3 fixed tokens, 256 bytes, then the template's tokens.
    vocab_size = 3 + 256 + len(special)
    common = {name: text.encode() for name, text in code.items()} | tokenizer_files
    return [
        (branch, common | _remote_model_files(model_type, prefix, vocab_size, seed))
        for branch, seed in seeds.items()
    ]


def _remote_tokenizer_files(model_type: str, prefix: str, special: list[str]) -> dict[str, bytes]:
    """tokenizer_config.json and special_tokens_map.json as transformers 4 wrote them."""
    tokens = [UNK_TOKEN, BOS_TOKEN, EOS_TOKEN] + special
    ids = list(range(3)) + list(range(259, 259 + len(special)))
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for i, t in zip(ids, tokens)
    }
    config = {
        "added_tokens_decoder": added,
        "additional_special_tokens": special,
        "auto_map": {"AutoTokenizer": [f"tokenization_{model_type}.{prefix}Tokenizer", None]},
        "bos_token": BOS_TOKEN,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "model_max_length": MODEL_SHAPE["max_position_embeddings"],
        "pad_token": EOS_TOKEN,
        "tokenizer_class": f"{prefix}Tokenizer",
        "unk_token": UNK_TOKEN,
    }
    special_map = {
        "additional_special_tokens": special,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": UNK_TOKEN,
    }
    return {"tokenizer_config.json": _json(config), "special_tokens_map.json": _json(special_map)}


def _remote_model_files(model_type: str, prefix: str, vocab_size: int, seed: int) -> dict[str, bytes]:
    """config.json pointing at the repo's own code, and random Llama-named weights for it."""
    import torch
    from safetensors.torch import save
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    llama = LlamaConfig(
        vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        attention_bias=True, tie_word_embeddings=False, **MODEL_SHAPE,
    )
    # Seeding inside fork_rng leaves the caller's global torch RNG as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(llama)
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    config = llama.to_dict() | {
        "model_type": model_type,
        "architectures": [f"{prefix}ForCausalLM"],
        "auto_map": {
            "AutoConfig": f"configuration_{model_type}.{prefix}Config",
            "AutoModel": f"modeling_{model_type}.{prefix}Model",
            "AutoModelForCausalLM": f"modeling_{model_type}.{prefix}ForCausalLM",
        },
    }
    return {
        "config.json": _json(config),
        "generation_config.json": GenerationConfig.from_model_config(llama).to_json_string().encode(),
        "model.safetensors": save(weights, metadata={"format": "pt"}),
    }


def _json(value) -> bytes:
    return (json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True) + "\n").encode()


# --- timdettmers/openassistant-guanaco ---------------------------------------------------------

_QUESTIONS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Add 12 and 30.", "12 + 30 = 42."),
    ("Reverse the words: apple cup book.", "book cup apple"),
    ("Name a colour of the sky.", "Blue, on a clear day."),
    ("请给我介绍一个上海的景点", "外滩是上海著名的景点。"),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("Write a greeting.", "Hello! How are you today?"),
    ("What is 7 times 6?", "7 times 6 is 42."),
]
_FOLLOW_UPS = [
    ("And why?", "Because that is how it is usually said."),
    ("Can you say it shorter?", "Yes: it is so."),
]


def guanaco_rows(n: int, offset: int = 0) -> list[dict]:
    """``n`` guanaco-style rows; every third is multi-turn (two human/assistant exchanges).

    As in the real data, a turn's text runs straight into the next ``### `` marker.
    """
    rows = []
    for i in range(offset, offset + n):
        question, answer = _QUESTIONS[i % len(_QUESTIONS)]
        text = f"### Human: {question} ({i})### Assistant: {answer}"
        if i % 3 == 2:
            follow_up, reply = _FOLLOW_UPS[i % len(_FOLLOW_UPS)]
            text += f"### Human: {follow_up}### Assistant: {reply}"
        rows.append({"text": text})
    return rows


_GUANACO_README = """\
---
license: apache-2.0
---
A tiny offline stand-in for timdettmers/openassistant-guanaco (tunemake's tests).
"""


def _guanaco_commits() -> list[tuple[str, dict[str, bytes]]]:
    """v1 holds the first train rows; main appends more. The eval file is the same in both."""
    eval_rows = _jsonl(guanaco_rows(GUANACO_EVAL_ROWS, offset=1000))
    return [
        (branch, {
            "README.md": _GUANACO_README.encode(),
            GUANACO_TRAIN: _jsonl(guanaco_rows(n)),
            GUANACO_EVAL: eval_rows,
        })
        for branch, n in (("v1", GUANACO_TRAIN_ROWS_V1), ("main", GUANACO_TRAIN_ROWS))
    ]


# --- llamafactory/glaive_toolcall_en -------------------------------------------------------------


def glaive_rows() -> list[dict]:
    """Sharegpt tool-call records: ask, call ``calculate``, read its result, answer; the last one
    calls ``search``, which its tools do not offer."""
    calculate = {"name": "calculate", "description": "Evaluate an arithmetic expression",
                 "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                                "required": ["expression"]}}
    rows = []
    for i in range(GLAIVE_ROWS):
        name = "search" if i >= GLAIVE_ROWS - GLAIVE_UNKNOWN_CALLS else "calculate"
        rows.append({
            "conversations": [
                {"from": "human", "value": f"What is {i} + 30?"},
                {"from": "function_call", "value": json.dumps({"name": name, "arguments": {"expression": f"{i}+30"}})},
                {"from": "observation", "value": json.dumps({"result": i + 30})},
                {"from": "gpt", "value": f"{i} + 30 is {i + 30}."},
            ],
            "tools": json.dumps([calculate]),
        })
    return rows


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
