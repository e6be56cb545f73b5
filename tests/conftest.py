"""Shared fixtures: tiny byte-level BPE tokenizers trained on the fly, one per template.

No model hub: every tokenizer is built by ``tunemake.demo.build_demo_tokenizer`` on a small corpus
written here, once per session per template (a few milliseconds each).
"""

from __future__ import annotations

from pathlib import Path

import pytest

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
def no_bos_tokenizer(tokenizer_dir):
    """The default template's tokenizer loaded without a bos token (XTuner then adds none)."""
    tokenizer = load_tokenizer(tokenizer_dir("default"), bos_token=None)
    assert tokenizer.bos_token_id is None and tokenizer.eos_token_id is not None
    return tokenizer


def load_tokenizer(path, **kwargs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), **kwargs)
