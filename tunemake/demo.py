"""The offline demo: a made-up world to learn, a tokenizer trained on it, and a tiny random Llama.

Everything comes from a seed and a few fixed tables, so the demo needs no model hub and every
artefact rebuilds byte for byte.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from tunemake.atomic import atomic_file
from tunemake.errors import ConfigError, DataError, TunemakeError, at
from tunemake.templates import Template

#: What :func:`generate_demo_data` writes into its directory.
CORPUS_FILE = "corpus.txt"
TASKS_FILE = "tasks.jsonl"

#: The task families in ``tasks.jsonl``, in the order the summary lists them.
TASK_FAMILIES = ("arithmetic", "reversal", "facts", "multi_turn", "tool_arithmetic")

#: The one tool of the ``tool_arithmetic`` family: the built-in ``calculate`` plugin's schema
#: (``tunemake.toolbox``), so ``tunemake chat --with-plugins calculate`` offers the model what it
#: was trained with. Its description holds no number: the demo's 2-layer model copied an example's
#: numbers into its calls in place of the question's.
CALCULATE_TOOL = {"type": "function", "function": {
    "name": "calculate", "description": "Evaluate arithmetic.",
    "parameters": {"type": "object", "properties": {
        "expression": {"type": "string", "description": "arithmetic with + - * / ** and parentheses"}},
        "required": ["expression"]},
    "return": {"type": "string"},
}}

#: What :func:`build_demo_tokenizer` writes into the model directory (transformers 5 names).
TOKENIZER_FILES = ("chat_template.jinja", "tokenizer.json", "tokenizer_config.json")

#: What :func:`build_demo_model` writes into the model directory.
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors")

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"

# The fact table: (country, capital, language, currency). All names are made up, so a model can
# know them only from the demo's corpus and tasks, never from pre-training elsewhere.
# fmt: off
FACTS = [
    ("Zorvania", "Mibrel", "Telusian", "dorin"),
    ("Quellmark", "Ostavel", "Brenic", "pelk"),
    ("Ardenvale", "Karnis", "Ardish", "zamo"),
    ("Belmora", "Teodra", "Valorese", "krell"),
    ("Calvessa", "Velisk", "Kelvic", "talvo"),
    ("Drovnik", "Amberlund", "Dunmeric", "mirsa"),
    ("Elsmere", "Lorrin", "Ostric", "bront"),
    ("Fenwald", "Sethmar", "Pallic", "quen"),
    ("Glavoria", "Pallow", "Glavic", "vessa"),
    ("Hollovar", "Cindrel", "Hollese", "lunt"),
    ("Istrelle", "Brisa", "Marnish", "gharo"),
    ("Jandoria", "Norhaven", "Jandic", "sollet"),
    ("Kestovia", "Tolvik", "Kestran", "trink"),
    ("Lumeria", "Ermund", "Lumish", "pavo"),
    ("Morvath", "Gaspen", "Vothic", "drem"),
    ("Norvessa", "Idrossa", "Nerran", "fesk"),
    ("Ombrevia", "Jessan", "Ombric", "orbel"),
    ("Pravensk", "Korran", "Pravish", "nimm"),
    ("Quorisa", "Lunet", "Quorese", "caspa"),
    ("Rendalia", "Merrow", "Rendic", "huld"),
]
# fmt: on
_ATTRIBUTES = ("capital", "language", "currency")

# Words for the reversal and list tasks: short and common, so each is one BPE token.
WORDS = (
    "cat dog sun moon tree bird fish star rain wind road lamp book door milk salt rice bread ship "
    "boat hill lake rock sand snow fire leaf rose king cup egg box pen hat bell coat frog horse "
    "apple"
).split()
_NAMES = ("Anna", "Tom", "Mara", "Leo", "Ivy", "Sam", "Nora", "Ben")
_ITEMS = ("apple", "cup", "book", "stone", "coin", "egg", "pen", "hat")

#: Addition operands are drawn from 0..MAX_OPERAND. A number is one token in the demo tokenizer (as
#: short numbers are in most real tokenizers), so a sum is a table the model learns pair by pair:
#: a held-out sum is out of its reach without the calculate tool, which it needs only to copy.
MAX_OPERAND = 49

_FACT_QUESTIONS = {
    "capital": (
        "What is the capital of {country}?",
        "Name the capital city of {country}.",
        "Which city is the capital of {country}?",
        "{country} has its capital in which city?",
        "Tell me the capital of {country}.",
    ),
    "language": (
        "What language is spoken in {country}?",
        "Which language do people speak in {country}?",
        "Name the main language of {country}.",
        "What do people in {country} speak?",
        "Tell me the language of {country}.",
    ),
    "currency": (
        "What is the currency of {country}?",
        "Which money is used in {country}?",
        "Name the currency of {country}.",
        "What do people in {country} pay with?",
        "Tell me the currency used in {country}.",
    ),
}
_FACT_SENTENCES = {
    "capital": (
        "The capital of {country} is {value}.",
        "{value} is the capital city of {country}.",
        "The government of {country} sits in {value}, its capital.",
        "Travellers to {country} often start in the capital, {value}.",
    ),
    "language": (
        "People in {country} speak {value}.",
        "The main language of {country} is {value}.",
        "In {country}, children learn {value} at school.",
        "Most books in {country} are written in {value}.",
    ),
    "currency": (
        "The currency of {country} is the {value}.",
        "In {country}, people pay with the {value}.",
        "A loaf of bread in {country} costs one {value}.",
        "Shops in {country} take only the {value}.",
    ),
}
_COUNTRY_COLOUR = (
    "{country} is a small country by the sea.",
    "{country} lies between high hills and a quiet lake.",
    "Many farmers live in {country}, and the winters there are long.",
    "{country} is known for its old roads and its bright markets.",
)
_ARITHMETIC_QUESTIONS = (
    "What is {a} + {b}?",
    "What is {a} plus {b}?",
    "Add {a} and {b}.",
    "Compute {a} + {b}.",
)
_ARITHMETIC_SENTENCES = (
    "{a} + {b} = {sum}.",
    "{a} plus {b} is {sum}.",
    "If you add {a} and {b}, you get {sum}.",
    "{name} had {a} {item}s and found {b} more, so {name} had {sum} {item}s.",
    "There were {a} {item}s on the table and {b} in the box, {sum} in all.",
)
_REVERSAL_QUESTIONS = (
    "Reverse the order of these words: {words}",
    "Reverse: {words}",
    "Say these words backwards: {words}",
    "Write these words in reverse order: {words}",
)
_WORD_SENTENCES = (
    'In the list "{words}" the first word is {first} and the last word is {last}.',
    '{name} said "{words}" and then said it backwards: "{reversed}".',
    'Read "{words}" in reverse order and you get "{reversed}".',
    'There are {count} words in the list "{words}".',
    "The {w1} is next to the {w2}, and the {w3} is far away.",
    "{name} saw the {w1}, the {w2} and the {w3} on the way home.",
)
_LIST_OPENERS = ("Repeat these words: {words}", "Remember this list: {words}")
_LIST_FOLLOW_UPS = {
    "first": ("And the first one?", "Which word came first?"),
    "last": ("And the last one?", "Which word came last?"),
    "count": ("How many words were there?",),
}
_DIALOGUE_OPENERS = (
    'A user asked: "{q}" The assistant answered: "{a}".',
    'Someone said: "{q}" The reply was: "{a}".',
)
_DIALOGUE_FOLLOW_UP = 'Then the user asked: "{q}" The assistant answered: "{a}".'


def generate_demo_data(
    out_dir: str | os.PathLike,
    seed: int = 0,
    corpus_docs: int = 3000,
    tasks_per_family: int = 600,
    tool_tasks: int = 0,
) -> dict:
    """Write the demo's pre-training corpus and instruction tasks into ``out_dir``.

    ``corpus.txt`` holds one English-like document per line (UTF-8, no empty lines): prose that
    states every fact of :data:`FACTS` many times, sums, word lists read forwards and backwards,
    and short user/assistant exchanges in the tasks' own phrasing, so a tokenizer trained on it
    covers the tasks' vocabulary and pre-training on it helps with every family.

    ``tasks.jsonl`` holds one record per line in XTuner's unified conversation format,
    ``{"task": family, "conversation": [{"system": "", "input": ..., "output": ...}, ...]}``
    (``system`` in the first turn only), the families shuffled together so that any 10% slice
    is a fair held-out set. Families:

    - ``arithmetic``: ``What is 17 + 25?`` -> ``42``, operands 0..:data:`MAX_OPERAND`. Every
      pair of operands is asked at most once and never appears in the corpus, so a held-out sum
      is answered by adding, not by recall.
    - ``reversal``: ``Reverse: cat dog sun`` -> ``sun dog cat``, 3 to 5 distinct words. Word
      level, because a byte-level BPE model sees too little of a word's letters to reverse them.
    - ``facts``: the capital, language or currency of a made-up country, each fact asked in five
      phrasings. Every fact is stated in the corpus, and at the default sizes almost every
      held-out question's fact is also asked, phrased differently, in the other 90%; the family
      measures memorisation, not reasoning.
    - ``multi_turn``: ``Repeat these words: ...`` -> the words, then one or two of ``And the
      first one?``, ``And the last one?``, ``How many words were there?``.
    - ``tool_arithmetic``: the arithmetic questions with :data:`CALCULATE_TOOL` offered: the
      model calls ``calculate`` with ``"17 + 25"``, reads ``42`` back and answers ``42``
      (``tunemake.tools``' form; evaluations run the call). Its sums are drawn from every pair,
      as the answer comes from the tool.

    Word lists of the reversal and multi-turn tasks are unique and, like the sums, never appear
    in the corpus. The facts family has a ceiling: 20 countries x 3 attributes x 5 phrasings =
    300 records, so it holds ``min(tasks_per_family, 300)``.

    Args:
        out_dir: directory to write ``corpus.txt`` and ``tasks.jsonl`` into (created if missing).
        seed: seeds private ``random.Random`` generators; the same arguments give byte-identical
            files, and the tasks do not depend on ``corpus_docs``.
        corpus_docs: number of corpus documents (lines). Default 3000.
        tasks_per_family: records per task family (facts capped as above). Default 600.
        tool_tasks: records of the ``tool_arithmetic`` family. Default 0 (the demo config asks for 300).

    Returns:
        ``{"corpus_docs": int, "tasks": {family: number of records}}``.

    Raises:
        TunemakeError: ``corpus_docs`` or ``tasks_per_family`` is below 1, or
            ``tasks_per_family`` asks for more than half of all operand pairs (the corpus needs
            the other half).
    """
    max_tasks = (MAX_OPERAND + 1) ** 2 // 2
    if corpus_docs < 1:
        raise TunemakeError(f"corpus_docs: must be at least 1, got {corpus_docs}")
    if not 1 <= tasks_per_family <= max_tasks:
        raise TunemakeError(
            f"tasks_per_family: must be between 1 and {max_tasks}, got {tasks_per_family}"
        )
    # One generator per file, both derived from the seed, so the corpus's size never changes
    # the tasks.
    tasks_rng = random.Random(f"{seed}-tasks")
    corpus_rng = random.Random(f"{seed}-corpus")

    all_pairs = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]
    task_pairs = tasks_rng.sample(all_pairs, tasks_per_family)
    task_lists = _unique_word_lists(tasks_rng, 2 * tasks_per_family)
    records = (
        _arithmetic_tasks(tasks_rng, task_pairs)
        + _reversal_tasks(tasks_rng, task_lists[:tasks_per_family])
        + _fact_tasks(tasks_rng, tasks_per_family)
        + _multi_turn_tasks(tasks_rng, task_lists[tasks_per_family:])
    )
    # their own generator: the other families do not change with the number of tool tasks
    tools_rng = random.Random(f"{seed}-tools")
    records += _tool_tasks(tools_rng, tools_rng.sample(all_pairs, min(tool_tasks, len(all_pairs))))
    tasks_rng.shuffle(records)

    task_pair_set = set(task_pairs)
    corpus = _CorpusMaker(
        corpus_rng,
        pairs=[pair for pair in all_pairs if pair not in task_pair_set],
        avoid_lists={tuple(words) for words in task_lists},
    )
    docs = [corpus.doc(i) for i in range(corpus_docs)]

    out_dir = Path(out_dir)
    with atomic_file(out_dir / CORPUS_FILE, newline="\n") as handle:
        for doc in docs:
            handle.write(doc + "\n")
    with atomic_file(out_dir / TASKS_FILE, newline="\n") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    counts = {family: sum(r["task"] == family for r in records) for family in TASK_FAMILIES}
    return {"corpus_docs": len(docs), "tasks": counts}


def _pick_words(rng: random.Random) -> list[str]:
    return rng.sample(WORDS, rng.randint(3, 5))


def _unique_word_lists(rng: random.Random, n: int) -> list[list[str]]:
    lists: list[list[str]] = []
    seen: set[tuple[str, ...]] = set()
    while len(lists) < n:
        words = _pick_words(rng)
        if tuple(words) not in seen:
            seen.add(tuple(words))
            lists.append(words)
    return lists


def _record(family: str, turns: Sequence[tuple[str, str]]) -> dict:
    conversation = [{"input": question, "output": answer} for question, answer in turns]
    conversation[0] = {"system": "", **conversation[0]}
    return {"task": family, "conversation": conversation}


def _arithmetic_turn(rng: random.Random, a: int, b: int) -> tuple[str, str]:
    return rng.choice(_ARITHMETIC_QUESTIONS).format(a=a, b=b), str(a + b)


def _reversal_turn(rng: random.Random, words: list[str]) -> tuple[str, str]:
    return rng.choice(_REVERSAL_QUESTIONS).format(words=" ".join(words)), " ".join(reversed(words))


def _multi_turns(rng: random.Random, words: list[str]) -> list[tuple[str, str]]:
    answers = {"first": words[0], "last": words[-1], "count": str(len(words))}
    turns = [(rng.choice(_LIST_OPENERS).format(words=" ".join(words)), " ".join(words))]
    for key in rng.sample(list(_LIST_FOLLOW_UPS), rng.randint(1, 2)):
        turns.append((rng.choice(_LIST_FOLLOW_UPS[key]), answers[key]))
    return turns


def _fact_questions() -> list[tuple[str, str]]:
    return [
        (question.format(country=country), value)
        for country, *values in FACTS
        for attribute, value in zip(_ATTRIBUTES, values)
        for question in _FACT_QUESTIONS[attribute]
    ]


def _arithmetic_tasks(rng: random.Random, pairs: list[tuple[int, int]]) -> list[dict]:
    return [_record("arithmetic", [_arithmetic_turn(rng, a, b)]) for a, b in pairs]


def _reversal_tasks(rng: random.Random, lists: list[list[str]]) -> list[dict]:
    return [_record("reversal", [_reversal_turn(rng, words)]) for words in lists]


def _fact_tasks(rng: random.Random, n: int) -> list[dict]:
    questions = _fact_questions()
    return [_record("facts", [turn]) for turn in rng.sample(questions, min(n, len(questions)))]


def _multi_turn_tasks(rng: random.Random, lists: list[list[str]]) -> list[dict]:
    return [_record("multi_turn", _multi_turns(rng, words)) for words in lists]


def _tool_tasks(rng: random.Random, pairs: list[tuple[int, int]]) -> list[dict]:
    return [_tool_record(*_arithmetic_turn(rng, a, b), f"{a} + {b}") for a, b in pairs]


def _tool_record(question: str, answer: str, expression: str) -> dict:
    call = {"name": "calculate", "arguments": {"expression": expression}}
    return {"task": "tool_arithmetic", "conversation": [
        {"system": "", "input": question, "output": "", "tools": [CALCULATE_TOOL], "tool_calls": [call]},
        {"system": "", "input": "", "output": answer, "tool_results": [{"name": "calculate", "content": answer}]},
    ]}


# Three in eleven corpus documents state facts, three play with word lists, two show sums, two
# are user/assistant exchanges and one shows the calculate tool (so that the tokenizer learns its
# description and calls as a few tokens).
# fmt: off
_DOC_KINDS = ("fact", "words", "fact", "sums", "dialogue",
              "fact", "words", "sums", "dialogue", "words", "tool")
# fmt: on


class _CorpusMaker:
    """Corpus documents that avoid the tasks' sums and word lists."""

    def __init__(
        self, rng: random.Random, pairs: list[tuple[int, int]], avoid_lists: set[tuple[str, ...]]
    ):
        self.rng = rng
        self.pairs = pairs
        self.avoid_lists = avoid_lists
        self.fact_docs = 0

    def doc(self, index: int) -> str:
        rng = self.rng
        # A fixed cycle of document kinds, and a round robin over the fact table, so every fact
        # is stated about equally often even in a short corpus.
        kind = _DOC_KINDS[index % len(_DOC_KINDS)]
        if kind == "fact":
            country, *values = FACTS[self.fact_docs % len(FACTS)]
            self.fact_docs += 1
            sentences = [rng.choice(_COUNTRY_COLOUR).format(country=country)]
            for attribute, value in zip(_ATTRIBUTES, values):
                template = rng.choice(_FACT_SENTENCES[attribute])
                sentences.append(template.format(country=country, value=value))
            rng.shuffle(sentences)
        elif kind == "words":
            sentences = [self.word_sentence() for _ in range(rng.randint(2, 4))]
        elif kind == "sums":
            sentences = [self.sum_sentence() for _ in range(rng.randint(2, 4))]
        elif kind == "tool":
            sentences = self.tool_doc()
        else:
            sentences = self.dialogue()
        return " ".join(sentences)

    def words(self) -> list[str]:
        while True:
            words = _pick_words(self.rng)
            if tuple(words) not in self.avoid_lists:
                return words

    def word_sentence(self) -> str:
        rng = self.rng
        words = self.words()
        w1, w2, w3 = rng.sample(WORDS, 3)
        return rng.choice(_WORD_SENTENCES).format(
            words=" ".join(words),
            reversed=" ".join(reversed(words)),
            first=words[0],
            last=words[-1],
            count=len(words),
            name=rng.choice(_NAMES),
            w1=w1,
            w2=w2,
            w3=w3,
        )

    def sum_sentence(self) -> str:
        rng = self.rng
        a, b = rng.choice(self.pairs)
        return rng.choice(_ARITHMETIC_SENTENCES).format(
            a=a, b=b, sum=a + b, name=rng.choice(_NAMES), item=rng.choice(_ITEMS)
        )

    def tool_doc(self) -> list[str]:
        """The calculate tool as a prompt lists it (its JSON, without the newlines a corpus line
        cannot hold), then questions answered through it: the operands copied into a call, the
        result copied into the answer, as the tool family asks (with the corpus's sums)."""
        described = json.dumps([CALCULATE_TOOL["function"]], indent=4).replace("\n", "")
        sentences = [f"The tools: {described}"]
        for _ in range(self.rng.randint(2, 3)):
            a, b = self.rng.choice(self.pairs)
            question, answer = _arithmetic_turn(self.rng, a, b)
            call = json.dumps({"name": "calculate", "parameters": {"expression": f"{a} + {b}"}})
            sentences.append(f"Asked: {question} Call: {call} Result: {answer} Answer: {answer}")
        return sentences

    def dialogue(self) -> list[str]:
        rng = self.rng
        kind = rng.choice(("facts", "arithmetic", "reversal", "multi_turn"))
        if kind == "facts":
            turns = [rng.choice(_fact_questions())]
        elif kind == "arithmetic":
            turns = [_arithmetic_turn(rng, *rng.choice(self.pairs))]
        elif kind == "reversal":
            turns = [_reversal_turn(rng, self.words())]
        else:
            turns = _multi_turns(rng, self.words())
        opener = rng.choice(_DIALOGUE_OPENERS)
        return [opener.format(q=turns[0][0], a=turns[0][1])] + [
            _DIALOGUE_FOLLOW_UP.format(q=q, a=a) for q, a in turns[1:]
        ]


def build_demo_tokenizer(
    corpus: str | os.PathLike,
    out_dir: str | os.PathLike,
    template: Template,
    vocab_size: int = 2048,
    model_max_length: int = 512,
) -> list[str]:
    """Train a byte-level BPE tokenizer on ``corpus`` and save it into ``out_dir``.

    Any UTF-8 text round-trips (byte-level pre-tokenizer and decoder). A run of digits is a word
    of its own, never merged with the space or text around it, so a number is the same tokens
    wherever it appears (a question, a tool call, a tool result); the numbers the corpus uses
    often (0 to 97 at the demo's sizes) are one token each. ``<s>``,
    ``</s>``, ``<pad>``, every token of ``template.special_tokens()`` and the markers of its tool
    form (``tunemake.toolforms``) are special tokens (one id each, never split or merged); there
    is no unk token, as byte level never needs one. The tokenizer adds no bos/eos of its own: the
    template's encoder and ``chat_template`` add them.

    ``out_dir`` may already hold other files (the model's weights): each of
    :data:`TOKENIZER_FILES` is written to a temporary directory beside it and renamed into
    place, file by file; nothing else in ``out_dir`` is touched.

    Args:
        corpus: text file, one document per line (``corpus.txt`` of :func:`generate_demo_data`).
        out_dir: model directory to write into (created if missing).
        template: the prompt template the model will be trained with; the custom-template
            string ``"hf"`` is not supported, as a freshly trained tokenizer has no chat
            template of its own to fall back on.
        vocab_size: the most tokens, special tokens and the 256 bytes included; the default
            corpus has too few distinct words to fill the default 2048 and gives about 1,000.
        model_max_length: the tokenizer's ``model_max_length``; keep it equal to the model's
            ``max_position_embeddings``. Default 512.

    Returns:
        The names of the files written, :data:`TOKENIZER_FILES`.

    Raises:
        ConfigError: ``template`` is not a :class:`~tunemake.templates.Template`.
        DataError: ``corpus`` is missing or holds no text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not isinstance(template, Template):
        raise ConfigError(
            f"template: the demo tokenizer needs an XTuner-style template, got {template!r}; "
            "'hf' means the tokenizer's own chat_template, which a new tokenizer does not have"
        )
    corpus = Path(corpus)
    try:
        with open(corpus, encoding="utf-8") as handle:
            docs = [line.rstrip("\n") for line in handle if line.strip()]
    except FileNotFoundError:
        raise DataError(at(str(corpus), "no such file; generate the demo data first")) from None
    except UnicodeDecodeError as exc:
        message = f"not UTF-8 text ({exc.reason} at byte {exc.start})"
        raise DataError(at(str(corpus), message)) from None
    if not docs:
        raise DataError(at(str(corpus), "holds no text to train a tokenizer on"))

    from tunemake.toolforms import FORMS

    special = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN]
    markers = FORMS[template.tool_form].markers if template.tool_form else ()
    special += [token for token in (*template.special_tokens(), *markers) if token not in special]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        # All 256 bytes up front, so text the corpus never showed still encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # BpeTrainer breaks ties between equally frequent pairs by the pairs themselves, so the
    # result does not depend on the number of threads (checked with RAYON_NUM_THREADS=1 and 16).
    tokenizer.train_from_iterator(docs, trainer)

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=special[3:],
        chat_template=template.chat_template(),
        model_max_length=model_max_length,
    )
    return _save_into(out_dir, wrapped.save_pretrained, TOKENIZER_FILES)


def build_demo_model(
    tokenizer_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    hidden_size: int = 192,
    num_layers: int = 2,
    num_heads: int = 3,
    intermediate_size: int = 512,
    max_position_embeddings: int = 512,
    seed: int = 0,
) -> list[str]:
    """Save a small randomly initialised Llama sized for the tokenizer in ``tokenizer_dir``.

    The defaults give about 1.3M parameters with the demo tokenizer's ~1,000 tokens. Fully
    fine-tuned on the default tasks (AdamW lr 1e-3, 5% warm-up then cosine, batch 32, 1000
    steps: about two minutes on two CPU cores) they answer over 85% of held-out facts,
    reversals and multi-turn questions exactly; LoRA needs the embeddings and output head
    trainable too, as they start random. The vocabulary size and bos/eos/pad ids come from the
    tokenizer; input and output embeddings are separate (``tie_word_embeddings=False``), as in
    the Llama models tunemake fine-tunes. Weights are float32 safetensors. ``out_dir`` may
    already hold the tokenizer: each of :data:`MODEL_FILES` is renamed into place, file by file.

    Args:
        tokenizer_dir: directory of a saved tokenizer (usually ``out_dir`` itself).
        out_dir: model directory to write into (created if missing).
        hidden_size: model width; a multiple of 64, as bitsandbytes' 4-bit kernels want. Default
            192.
        num_layers: number of decoder layers. Default 2.
        num_heads: attention heads (as many key/value heads); must divide ``hidden_size``.
            Default 3, so heads are 64 wide.
        intermediate_size: MLP width; a multiple of 64. Default 512.
        max_position_embeddings: longest sequence the model is meant for. Default 512.
        seed: seeds ``torch`` for the random initialisation; the same seed gives the same bytes,
            and the caller's global torch RNG is left as it was.

    Returns:
        The names of the files written, :data:`MODEL_FILES`.

    Raises:
        ConfigError: a size is not a positive multiple of 64, or ``num_heads`` does not divide
            ``hidden_size``.
        DataError: ``tokenizer_dir`` holds no ``tokenizer.json``.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    for name, value in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size)):
        if value < 64 or value % 64:
            raise ConfigError(f"{name}: must be a positive multiple of 64, got {value}")
    if num_heads < 1 or hidden_size % num_heads:
        raise ConfigError(f"num_heads: must divide hidden_size ({hidden_size}), got {num_heads}")

    if not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        raise DataError(at(str(tokenizer_dir), "no tokenizer.json; build the demo tokenizer first"))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    # Seeding inside fork_rng leaves the caller's global torch RNG as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return _save_into(out_dir, model.save_pretrained, MODEL_FILES)


def _save_into(
    out_dir: str | os.PathLike, save: Callable[[str], object], names: Sequence[str]
) -> list[str]:
    """Run ``save`` into a temporary directory beside ``out_dir``, then rename ``names`` into it.

    Each file lands atomically; other files already in ``out_dir`` stay. Anything else ``save``
    writes is dropped, so the set of files is the same whatever the library version adds.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        save(str(tmp))
        missing = [name for name in names if not (tmp / name).is_file()]
        if missing:
            # Only a transformers version that saves differently gets here; say which files,
            # so TOKENIZER_FILES / MODEL_FILES (and the rules naming them) can be updated.
            written = sorted(p.name for p in tmp.iterdir())
            raise TunemakeError(
                f"{out_dir}: expected save_pretrained to write {', '.join(missing)}; it wrote "
                f"{', '.join(written) or 'nothing'}"
            )
        for name in names:
            os.replace(tmp / name, out_dir / name)
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)
    return list(names)
