"""Shared fixtures: tiny byte-level BPE tokenizers trained on the fly, one per template.

No model hub: every tokenizer is built by ``tunemake.demo.build_demo_tokenizer`` on a small corpus
written here, once per session per template (a few milliseconds each).

The Hugging Face home is a fresh temporary directory, offline, set here before anything imports
huggingface_hub or transformers; ``offline_hub`` fills its hub cache with tiny stand-ins for the
repos the examples name (see hub_fixture.py).
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# huggingface_hub, transformers and datasets read these once, when first imported; so they are
# set here, at collection, for the whole session and every subprocess (Snakemake) it starts.
# A fresh home keeps tests off the network and out of the user's own cache.
if "huggingface_hub" in sys.modules:
    raise RuntimeError("huggingface_hub was imported before tests/conftest.py set HF_HOME")
HF_HOME = tempfile.mkdtemp(prefix="tunemake-hf-")
os.environ["HF_HOME"] = HF_HOME
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
# Each of these would point part of the cache back outside HF_HOME.
for _name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE", "HF_MODULES_CACHE",
              "HF_ASSETS_CACHE", "HF_XET_CACHE", "TRANSFORMERS_CACHE"):
    os.environ.pop(_name, None)
atexit.register(shutil.rmtree, HF_HOME, ignore_errors=True)

CORPUS_LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, how are you today? I am fine, thank you.",
    "What is the capital of France? The capital of France is Paris.",
    "Add 12 and 30. The sum is 42.",
    "Reverse the words: apple cup book. Answer: book cup apple.",
    "A chat between a curious user and an assistant gives helpful answers.",
    "System prompts tell the assistant how to behave in a conversation.",
    "Ünïcödé text, 问答 and emoji 🎉 also appear in the data sometimes.",
]

VOCAB_SIZE = 500


@pytest.fixture(scope="session")
def corpus_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    lines = [f"{line} ({i})" for i in range(40) for line in CORPUS_LINES]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus_path):
    """``tokenizer_dir(template_name) -> Path``: a saved demo tokenizer for that template."""
    from tunemake.demo import build_demo_tokenizer
    from tunemake.templates import TEMPLATES

    root = tmp_path_factory.mktemp("tokenizers")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            out = root / name
            build_demo_tokenizer(corpus_path, out, TEMPLATES[name], vocab_size=VOCAB_SIZE)
            built[name] = out
        return built[name]

    return get


@pytest.fixture(scope="session")
def tokenizer_for(tokenizer_dir):
    """``tokenizer_for(template_name)``: the loaded tokenizer, cached per session.

    Shared between tests: a test that changes a tokenizer must load its own with
    :func:`load_tokenizer`.
    """
    loaded: dict[str, object] = {}

    def get(name: str):
        if name not in loaded:
            loaded[name] = load_tokenizer(tokenizer_dir(name))
        return loaded[name]

    return get


@pytest.fixture(scope="session")
def tool_tokenizer(tokenizer_dir):
    """``tool_tokenizer(template)``: the template's test tokenizer with its tool markers as special
    tokens and the template's chat_template, as a merged model ships them."""
    from transformers import AutoTokenizer

    from tunemake.templates import TEMPLATES
    from tunemake.toolforms import FORMS

    loaded = {}

    def get(name: str):
        if name not in loaded:
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir(name)))
            tokenizer.add_special_tokens({"additional_special_tokens": list(FORMS[name].markers)})
            tokenizer.chat_template = TEMPLATES[name].chat_template()
            loaded[name] = tokenizer
        return loaded[name]

    return get


@pytest.fixture(scope="session")
def no_bos_tokenizer(tokenizer_dir):
    """The default template's tokenizer loaded without a bos token (XTuner then adds none)."""
    tokenizer = load_tokenizer(tokenizer_dir("default"), bos_token=None)
    assert tokenizer.bos_token_id is None and tokenizer.eos_token_id is not None
    return tokenizer


def load_tokenizer(path, **kwargs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), **kwargs)


@pytest.fixture(scope="session")
def offline_hub():
    """The session's hub cache with the stand-in repos of hub_fixture.py (built once, < 1 s)."""
    from hub_fixture import build_offline_hub

    return build_offline_hub(Path(os.environ["HF_HOME"]))
