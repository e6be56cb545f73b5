"""Benchmark the data stage: tunemake's encoder against XTuner's record-by-record ``datasets.map``.

Run from the repository root: ``python bench/data_stage.py [--records 50000] [--threads 2]
[--json out.json]``. Everything is built in a temporary directory: a byte-level BPE tokenizer
(``tunemake.demo.build_demo_tokenizer``, template ``internlm2_chat``, trained on the same kind of
text) and seeded synthetic multi-turn conversations. Timed on the same records, in this order:

- baseline: ``datasets.Dataset.from_list(records).map(encode_fn)``, one process, where encode_fn is
  XTuner's (``tunemake.encode.encode_record``: the template's pieces, each ``tokenizer.encode``-d
  on its own). Only the ``map`` is timed. It is kind to XTuner: one pass, where XTuner makes four
  (``--xtuner-section`` times those too).
- tunemake encode: ``tunemake.encode.encode_records`` over chunks of ``tunemake.data.ENCODE_CHUNK``
  records, the tokenizer on ``RAYON_NUM_THREADS=--threads``.
- tokenizer alone: the Rust tokenizer's ``encode_batch`` on every distinct piece and nothing else,
  on the same threads: the ceiling for any encoder built on this tokenizer.
- tunemake full stage: ``tunemake.data.build_templated_dataset`` on the records as a .jsonl, end to
  end (tokenizer load, reading, held-out split, encoding, packing, saving).
- the baseline with ``num_proc=--threads`` (recent XTuner passes ``map_num_proc``, 32 by default;
  older releases map in one process). ``--no-multiproc-baseline`` skips it.

Baseline and tunemake must give the same input_ids and labels for every record, or the benchmark
stops with exit status 2. It exits 1 when tunemake encode is below ``--target`` times the
single-process baseline's tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from itertools import chain
from pathlib import Path

import numpy as np

TEMPLATE = "internlm2_chat"
MAX_LENGTH = 2048
VOCAB_SIZE = 16384
HELDOUT_FRACTION = 0.05
# The modules this benchmark runs: the commit it reports is "+changes" when one of them is edited.
DATA_STAGE_MODULES = [
    f"tunemake/{name}.py" for name in ("atomic", "config", "data", "demo", "encode", "formats", "templates")
]
TOKENIZER_DOCS = 20_000  # documents of synthetic text the tokenizer is trained on

# Words that open the Zipf ranking, so the most frequent tokens look like English; the rest of the
# vocabulary is made of syllables, one to four each, rarer words longer.
_COMMON = (
    "the of and to a in is that for it as with was on be by this are or from at an not have but "
    "they which you can will if we all one there their has more when been would what so about "
    "into than its only other some could these two may then do first any like new also use how"
).split()
_ONSETS = "b c d f g h j k l m n p r s t v w y z br cl cr dr fl gr pl pr sc sh sk sl sp st str th tr ch".split()
_VOWELS = "a e i o u a e i o ea ou ai io ee oo".split()
_CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng", "ck", "rt", "x"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=50_000, help="conversations (default 50000)")
    parser.add_argument("--threads", type=int, default=2, help="tokenizer threads / map processes (default 2)")
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    parser.add_argument("--seed", type=int, default=0, help="seeds the synthetic data (default 0)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of the single-process rows; each row keeps its fastest (default 1)")
    parser.add_argument("--target", type=float, default=3.0,
                        help="required tokens/s ratio of tunemake encode over the baseline (default 3)")
    parser.add_argument("--no-multiproc-baseline", action="store_true",
                        help="skip the baseline with num_proc=--threads")
    parser.add_argument("--xtuner-section", action="store_true",
                        help="also time XTuner's tokenize section pass for pass (template map, filter, "
                             "encode map, label filter), about as long again as the baseline")
    return parser.parse_args(argv)


# --- synthetic data -------------------------------------------------------------------------------


class TextMaker:
    """English-like text: Zipf-distributed words in sentences and paragraphs, from a numpy seed."""

    def __init__(self, seed: int, vocabulary: int = 40_000):
        self.rng = np.random.default_rng(seed)
        words, seen = list(_COMMON), set(_COMMON)
        while len(words) < vocabulary:
            syllables = 1 + min(3, int(self.rng.exponential(0.4 + 1.6 * len(words) / vocabulary)))
            word = "".join(
                self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) + self.rng.choice(_CODAS)
                for _ in range(syllables)
            )
            if word not in seen:
                seen.add(word)
                words.append(word)
        self.words = np.array(words, dtype=object)
        weights = 1.0 / (np.arange(len(words)) + 2.7) ** 1.05
        self.cumulative = np.cumsum(weights / weights.sum())

    def passage(self, n_words: int, paragraphs: bool) -> str:
        rng = self.rng
        index = np.minimum(np.searchsorted(self.cumulative, rng.random(n_words)), len(self.words) - 1)
        words = self.words[index].tolist()
        for i in np.flatnonzero(rng.random(n_words) < 0.02):  # numbers, digits split by the tokenizer
            words[i] = str(int(rng.integers(0, 2000)))
        for i in np.flatnonzero(rng.random(n_words) < 0.06):
            words[i] += ","
        out, start, sentences = [], 0, 0
        while start < n_words:
            end = min(n_words, start + int(rng.integers(6, 24)))
            sentence = words[start:end]
            sentence[0] = sentence[0].capitalize()
            sentence[-1] = sentence[-1].rstrip(",") + ("?" if rng.random() < 0.1 else ".")
            sentences += 1
            if out and paragraphs and sentences % int(rng.integers(3, 7)) == 0:
                out.append("\n\n")
            elif out:
                out.append(" ")
            out.append(" ".join(sentence))
            start = end
        return "".join(out)

    def length(self, low: int, high: int) -> int:
        """Log-uniform between low and high words: many short messages, some long ones."""
        return int(np.exp(self.rng.uniform(np.log(low), np.log(high))))


def make_records(n: int, seed: int) -> list[dict]:
    """``n`` conversations in XTuner's unified format; a system prompt (from a pool of 24) on 30%.

    1-4 turns (45/25/18/12%), inputs 10-200 words, outputs 20-250 words (log-uniform), outputs
    in paragraphs. Every turn has the three keys; ``system`` is "" except on a first turn.
    """
    maker = TextMaker(seed)
    systems = [maker.passage(maker.length(12, 80), paragraphs=False) for _ in range(24)]
    turn_counts = maker.rng.choice([1, 2, 3, 4], size=n, p=[0.45, 0.25, 0.18, 0.12])
    records = []
    for turns in turn_counts:
        system = systems[int(maker.rng.integers(len(systems)))] if maker.rng.random() < 0.3 else ""
        conversation = []
        for k in range(turns):
            conversation.append({
                "system": system if k == 0 else "",
                "input": maker.passage(maker.length(10, 200), paragraphs=False),
                "output": maker.passage(maker.length(20, 250), paragraphs=True),
            })
        records.append({"conversation": conversation})
    return records


def build_tokenizer(work: Path, seed: int, template) -> Path:
    """Train the demo's byte-level BPE on a separate sample of the same kind of text."""
    from tunemake.demo import build_demo_tokenizer

    maker = TextMaker(seed)  # same vocabulary and frequencies, text drawn afresh below
    maker.rng = np.random.default_rng(seed + 1)
    corpus = work / "tokenizer_corpus.txt"
    with open(corpus, "w", encoding="utf-8") as handle:
        for _ in range(TOKENIZER_DOCS):
            handle.write(maker.passage(maker.length(20, 250), paragraphs=False) + "\n")
    model_dir = work / "tokenizer"
    build_demo_tokenizer(corpus, model_dir, template, vocab_size=VOCAB_SIZE, model_max_length=MAX_LENGTH)
    return model_dir


# --- the measurements ----------------------------------------------------------------------------


def timed(fn, *args):
    """``(wall seconds, CPU seconds of this process and its finished children, result)``."""
    cpu0, wall0 = sum(os.times()[:4]), time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - wall0, sum(os.times()[:4]) - cpu0, result


def baseline_map(dataset, tokenizer, template, num_proc: int):
    """XTuner's way: the Dataset mapped record by record with encode_fn (template, then pieces)."""
    from tunemake.encode import encode_record

    def encode_fn(example):
        enc = encode_record(example["conversation"], tokenizer, template, MAX_LENGTH)
        return {"input_ids": enc.input_ids, "labels": enc.labels}

    return dataset.map(encode_fn, remove_columns=["conversation"], num_proc=None if num_proc == 1 else num_proc)


def xtuner_tokenize_section(dataset, tokenizer, template):
    """XTuner's ``process()`` from the template map to the label filter, pass for pass.

    ``template_map_fn`` writes the rendered (system +) instruction and output + suffix back into
    the conversation, a filter drops empty conversations, ``encode_fn`` tokenizes the rendered
    turns, a second filter drops records without a labelled token: four passes over the data.
    """
    from tunemake.encode import encode_record
    from tunemake.templates import Template

    rendered = Template("rendered", suffix_as_eos=template.suffix_as_eos, sep=template.sep)

    def template_map_fn(example):
        conversation = example["conversation"]
        for round_, turn in enumerate(conversation, start=1):
            turn["input"] = template.render_input(turn["input"] or "", turn["system"], round_)
            turn["output"] = template.render_output(turn["output"])
            turn["system"] = ""  # rendered into the input; encode_record would render it again
            turn["need_eos_token"] = not template.suffix_as_eos  # the two fields XTuner's encode_fn reads
            turn["sep"] = template.sep
        return {"conversation": conversation}

    def encode_fn(example):
        enc = encode_record(example["conversation"], tokenizer, rendered, MAX_LENGTH)
        return {"input_ids": enc.input_ids, "labels": enc.labels}

    dataset = dataset.map(template_map_fn)
    dataset = dataset.filter(lambda example: len(example["conversation"]) > 0)
    dataset = dataset.map(encode_fn, remove_columns=list(dataset.column_names))
    return dataset.filter(lambda example: any(label >= 0 for label in example["labels"]))


def tunemake_encode(records: list[dict], tokenizer, template):
    """tunemake's way: encode_records over chunks of ENCODE_CHUNK records, as tunemake.data does."""
    from tunemake.data import ENCODE_CHUNK
    from tunemake.encode import encode_records

    encoded = []
    for start in range(0, len(records), ENCODE_CHUNK):
        chunk = records[start:start + ENCODE_CHUNK]
        encoded += encode_records(((r["conversation"], False) for r in chunk), tokenizer, template, MAX_LENGTH)
    return encoded


def distinct_pieces(records: list[dict], template) -> list[str]:
    from tunemake.encode import plan

    # text pieces are (text, labelled) tuples; bos and eos markers are not
    return list({piece[0] for r in records for piece in plan(r["conversation"], template, False)
                 if isinstance(piece, tuple) and piece[0]})


def tokenizer_alone(texts: list[str], tokenizer) -> None:
    """The Rust tokenizer on every distinct piece, nothing else: the floor under any encoder.

    Not a way to encode (no labels, no assembly); it shows how much of tunemake's time is the
    tokenizer's own work, which threads can divide but nothing in Python can remove.
    """
    backend = tokenizer.backend_tokenizer
    for start in range(0, len(texts), 16384):
        backend.encode_batch(texts[start:start + 16384], add_special_tokens=False)


def write_jsonl(records: list[dict], path: Path) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def full_stage(path: Path, out_dir: Path, tokenizer_dir: Path, template, threads: int) -> dict:
    """tunemake.data.build_templated_dataset end to end on a .jsonl of the records."""
    from tunemake.data import build_templated_dataset

    recipe = {
        "tokenizer": {"path": str(tokenizer_dir), "revision": None, "trust_remote_code": False},
        "template": {
            "name": template.name, "system": template.system, "instruction": template.instruction,
            "suffix": template.suffix, "suffix_as_eos": template.suffix_as_eos, "sep": template.sep,
        },
        "datasets": [{"name": "bench", "path": [str(path)], "format": "conversation",
                      "heldout_fraction": HELDOUT_FRACTION}],
        "max_length": MAX_LENGTH,
        "packing": True,
        "data_seed": 0,
    }
    return build_templated_dataset(recipe, out_dir, files={"bench": [str(path)]}, threads=threads)


# --- checking and reporting ----------------------------------------------------------------------


def flat_columns(mapped):
    """input_ids, labels and row offsets of a mapped Dataset, as numpy arrays."""
    import pyarrow as pa

    out = []
    for name in ("input_ids", "labels"):
        column = mapped.data.column(name)
        array = pa.concat_arrays(column.chunks) if column.num_chunks != 1 else column.chunk(0)
        array = array.cast(pa.large_list(pa.int64()))
        offsets = np.asarray(array.offsets)
        out.append((array.flatten().to_numpy(), offsets - offsets[0]))
    (ids, offsets), (labels, label_offsets) = out
    assert np.array_equal(offsets, label_offsets), "input_ids and labels rows differ in length"
    return ids, labels, offsets


def flat_encoded(encoded):
    """input_ids, labels and row offsets of tunemake's Encoded records, as numpy arrays."""
    lengths = np.fromiter((len(e.input_ids) for e in encoded), dtype=np.int64, count=len(encoded))
    total = int(lengths.sum())
    ids = np.fromiter(chain.from_iterable(e.input_ids for e in encoded), dtype=np.int64, count=total)
    labels = np.fromiter(chain.from_iterable(e.labels for e in encoded), dtype=np.int64, count=total)
    return ids, labels, np.concatenate([[0], np.cumsum(lengths)])


def check_identical(baseline, tunemake, what: str) -> None:
    """Stop with exit status 2, naming the first differing record, unless both encodings agree."""
    b_ids, b_labels, b_offsets = baseline
    t_ids, t_labels, t_offsets = tunemake
    if len(b_offsets) != len(t_offsets):
        fail(f"{what}: {len(t_offsets) - 1} records, the baseline has {len(b_offsets) - 1}")
    longer = np.flatnonzero(b_offsets != t_offsets)
    if len(longer):
        row = int(longer[0]) - 1  # offsets[0] is 0 for both, so row >= 0
        fail(f"{what}: record {row} has {t_offsets[row + 1] - t_offsets[row]} tokens, "
             f"the baseline {b_offsets[row + 1] - b_offsets[row]}")
    for name, b, t in (("input_ids", b_ids, t_ids), ("labels", b_labels, t_labels)):
        differ = np.flatnonzero(b != t)
        if len(differ):
            row = int(np.searchsorted(b_offsets, differ[0], side="right")) - 1
            fail(f"{what}: record {row}: {name} differ from the baseline's at token {differ[0] - b_offsets[row]}")


def fail(message: str) -> None:
    print(f"MISMATCH: {message}", file=sys.stderr)
    sys.exit(2)


def machine() -> dict:
    model = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            model = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu_count": os.cpu_count(), "cpus_usable": usable, "cpu_model": model,
            "python": platform.python_version(), "platform": platform.platform(),
            "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None}


def _commit() -> str:
    """The repository's commit, with "+changes" when a module the data stage runs differs from it."""
    import subprocess

    root = Path(__file__).resolve().parent.parent

    def git(*command: str) -> str:
        return subprocess.run(["git", "-C", str(root), *command], capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        changed = git("status", "--porcelain", *DATA_STAGE_MODULES)
        return git("rev-parse", "--short", "HEAD") + ("+changes" if changed else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions() -> dict:
    import datasets
    import pyarrow
    import tokenizers
    import transformers

    return {"tunemake": _commit(), "datasets": datasets.__version__,
            "tokenizers": tokenizers.__version__, "transformers": transformers.__version__,
            "pyarrow": pyarrow.__version__, "numpy": np.__version__}


def main(argv=None) -> int:
    args = parse_args(argv)
    # The tokenizers library reads RAYON_NUM_THREADS once, when its thread pool first starts, so it
    # is set before anything below imports tokenizers.
    os.environ["RAYON_NUM_THREADS"] = str(max(1, args.threads))
    os.environ.setdefault("TQDM_DISABLE", "1")  # the stage's progress bar would garble the table
    import datasets
    from transformers import AutoTokenizer

    from tunemake.templates import TEMPLATES

    datasets.disable_progress_bars()
    datasets.disable_caching()
    template = TEMPLATES[TEMPLATE]
    info = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
            "versions": versions(), "records": args.records, "threads": args.threads, "template": TEMPLATE,
            "max_length": MAX_LENGTH, "vocab_size": VOCAB_SIZE, "seed": args.seed}
    rows: dict[str, tuple[float, float]] = {}  # name -> (wall, cpu) seconds

    def measure(name: str, fn, *fn_args):
        wall, cpu, result = timed(fn, *fn_args)
        print(f"{name}: {wall:.1f} s (cpu {cpu:.1f} s)", flush=True)
        if name not in rows or wall < rows[name][0]:
            rows[name] = (wall, cpu)
        return result

    with tempfile.TemporaryDirectory(prefix="tunemake-bench-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        tokenizer_dir = build_tokenizer(work, args.seed, template)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        records = make_records(args.records, args.seed)
        dataset = datasets.Dataset.from_list(records)  # not timed: XTuner's load_dataset
        jsonl = write_jsonl(records, work / "conversations.jsonl")
        texts = distinct_pieces(records, template)
        print(f"setup: tokenizer and {len(records)} records in {time.perf_counter() - started:.1f} s", flush=True)

        # Rounds rather than repeats of one row, so that a busy spell hits every row alike; each
        # row keeps its fastest time.
        baseline = None
        for _ in range(args.repeat):
            mapped = measure("baseline", baseline_map, dataset, tokenizer, template, 1)
            if baseline is None:
                baseline = flat_columns(mapped)
            del mapped
            tokens = int(len(baseline[0]))
            if args.xtuner_section:
                mapped = measure("xtuner_tokenize_section", xtuner_tokenize_section, dataset, tokenizer, template)
                check_identical(baseline, flat_columns(mapped), "XTuner's tokenize section")
                del mapped
            encoded = measure("tunemake_encode", tunemake_encode, records, tokenizer, template)
            check_identical(baseline, flat_encoded(encoded), "tunemake encode_records")
            truncated = sum(e.truncated for e in encoded)
            del encoded
            measure("tokenizer_alone", tokenizer_alone, texts, tokenizer)
            stats = measure("tunemake_full_stage", full_stage, jsonl, work / "templated", tokenizer_dir, template,
                            args.threads)
            stage_tokens = stats["tokens"] + stats["heldout_tokens"]
            if stage_tokens != tokens or stats["records_in"] != len(records):
                fail(f"full stage: {stats['records_in']} records, {stage_tokens} tokens; "
                     f"the baseline has {len(records)}, {tokens}")

        # Last: datasets.map(num_proc>1) sets TOKENIZERS_PARALLELISM=false in this process's C
        # environment for its workers and never unsets it (it only rebinds os.environ), which
        # would make every later encode_batch here run on one thread.
        multi = f"baseline_num_proc_{args.threads}"
        if not args.no_multiproc_baseline and args.threads > 1:
            mapped = measure(multi, baseline_map, dataset, tokenizer, template, args.threads)
            check_identical(baseline, flat_columns(mapped), f"baseline with num_proc={args.threads}")
            del mapped
    info["machine"]["load_average_at_end"] = os.getloadavg()

    n = len(records)
    base = rows["baseline"][0]
    order = ["baseline", multi, "xtuner_tokenize_section", "tunemake_encode", "tokenizer_alone",
             "tunemake_full_stage"]
    results = {
        name: {"seconds": round(rows[name][0], 3), "cpu_seconds": round(rows[name][1], 3),
               "records_per_s": round(n / rows[name][0], 1), "tokens_per_s": round(tokens / rows[name][0]),
               "vs_baseline": round(base / rows[name][0], 2)}
        for name in order if name in rows
    }
    ratio = base / rows["tunemake_encode"][0]
    info.update({
        "tokens": tokens, "tokens_per_record": round(tokens / n, 1), "truncated_records": truncated,
        "trained_tokens": stats["trained_tokens"], "packed_rows": stats["rows"], "results": results,
        "ratio_encode_vs_baseline": round(ratio, 2),
        "ratio_full_stage_vs_baseline": round(base / rows["tunemake_full_stage"][0], 2),
        "ratio_tokenizer_alone_vs_baseline": round(base / rows["tokenizer_alone"][0], 2),
        "target": args.target, "passed": ratio >= args.target,
    })

    m, v = info["machine"], info["versions"]
    loads = lambda key: ", ".join(f"{x:.2f}" for x in m[key] or [])  # noqa: E731
    print()
    print(f"data stage benchmark, {info['date']}")
    print(f"machine: {m['cpu_count']} cpus ({m['cpus_usable']} usable), {m['cpu_model']}; "
          f"load average {loads('load_average_at_start')} at start, {loads('load_average_at_end')} at end")
    print("versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + f", python {m['python']}")
    print(f"data: {n} conversations, {tokens} tokens ({tokens / n:.0f} per record, {truncated} truncated to "
          f"{MAX_LENGTH}), template {TEMPLATE}, vocab {VOCAB_SIZE}, threads {args.threads}")
    print()
    print(f"{'':26} {'seconds':>8} {'cpu s':>8} {'records/s':>10} {'tokens/s':>10} {'vs baseline':>12}")
    for name, r in results.items():
        print(f"{name:26} {r['seconds']:8.2f} {r['cpu_seconds']:8.2f} {r['records_per_s']:10.0f} "
              f"{r['tokens_per_s']:10.0f} {r['vs_baseline']:11.2f}x")
    cpus = min(args.threads, m["cpus_usable"])
    busy = [r for r in ("tunemake_encode", "tokenizer_alone") if rows[r][1] < 0.8 * cpus * rows[r][0]]
    if busy or (m["load_average_at_end"] or [0])[0] > args.threads + 0.5:
        # Threaded rows should keep about `threads` CPUs busy; much less means others took them.
        print("note: other processes were using the CPUs (cpu s / s is low on the threaded rows or the "
              "load average is high); those rows suffer most. Rerun when the machine is idle.")
    print()
    verdict = "PASS" if info["passed"] else "FAIL"
    print(f"{verdict}: tunemake encode is {ratio:.2f}x the single-process baseline's tokens/s "
          f"(target {args.target:g}x); input_ids and labels identical on all {n} records")
    print(f"(the tokenizer alone, on {args.threads} threads, is {info['ratio_tokenizer_alone_vs_baseline']:.2f}x: "
          "no encoder built on it can go faster here)")
    if args.json:
        args.json.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return 0 if info["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
