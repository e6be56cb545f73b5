"""The evaluate stage: ``evals/{experiment}/epoch_{n}.json`` per model, then ``evals/summary.tsv`` and plots.

Entry points, called by ``rules/evaluate.smk``, the CLI and the tests: :func:`evaluate_model` scores
one model on one templated dataset's held-out split: loss and perplexity exactly as training
measures them (``tunemake.train.evaluation.heldout_loss`` on the same ids), and exact match of greedy
answers to the held-out conversations, per task family. :func:`summarize` gathers those files into
a table and the report's plots. Supported: any plain HF causal LM directory (a base model or a
merged epoch), every template; bfloat16 on the first GPU, or spread layer by layer over the
fewest visible GPUs that hold it when the first does not (:func:`gpu_placement`), else the CPU in
float32. Not supported: PEFT adapter directories (evaluate the merged model), offloading weights
to the CPU or disk, tensor parallelism (the GPUs of a spread model work one after another).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from pathlib import Path

import torch

from tunemake.atomic import atomic_file, write_json
from tunemake.hub import is_hub_id, load_pretrained, model_dir as hub_model_dir
from tunemake.demo import TASK_FAMILIES
from tunemake.encode import IGNORE_INDEX, answer_text, generation_stops, prompt_ids
from tunemake.errors import ConfigError, TunemakeError, at
from tunemake.resources import evaluation_batch_bytes, shape_from_config, spread_bytes, weight_parameters
from tunemake.templates import HF, Template, get_template
from tunemake.tools import has_tools

log = logging.getLogger("tunemake.evaluate")

HELDOUT_JSONL = "heldout.jsonl"
EXAMPLES = 8  # answers shown in the JSON (and the report), in file order
ALL = "all"  # the family that pools every scored record
METRICS_PLOT = "metrics_per_epoch.png"
TRAINING_PLOT = "training_loss.png"
FIXED_COLUMNS = ("experiment", "epoch", "heldout_loss", "perplexity")
DECIMALS = 4  # every number in summary.tsv: fixed precision, so the file is reproducible
#: The scores of an evaluation file, per family, and the prefix of their summary.tsv columns.
SCORES = {"exact_match": "exact_match", "tool_calls": "tool_call_accuracy"}


class EvaluateError(TunemakeError):
    """A model, dataset or evaluation file that cannot be read (missing, or not what tunemake wrote)."""


def evaluate_model(
    model_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    out_json: str | os.PathLike,
    *,
    template: Template | str,
    experiment: str | None = None,
    epoch: int | None = None,
    max_prompts: int = 200,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    seed: int = 0,
    threads: int | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    tools: str | None = None,
) -> dict:
    """Evaluate ``model_dir`` on the held-out split of ``data_dir`` and write ``out_json`` atomically.

    Held-out loss is the mean cross-entropy per labelled token over every held-out record (labels
    shifted as in training), perplexity its exp. Answers are greedy: for the first ``max_prompts``
    held-out conversations (file order), the prompt is the conversation up to its last turn's
    answer (earlier reference answers are the history), encoded with
    :func:`tunemake.encode.prompt_ids`, so the model gets exactly the ids it was trained on.
    Generation stops at the tokenizer's eos, the model's generation eos, a template stop word
    (those that are one token) or ``max_new_tokens``; the answer is the decoded text before the
    stop, special tokens skipped, cut at a stop word that spans several tokens. A record scores
    when ``answer.strip() == reference.strip()``; records are grouped by their ``task`` field, else
    their dataset name, and pooled as ``all``. Pretrain records (no input in any turn) get loss
    only. A dataset with an empty held-out split gives ``null`` loss and no scores. Records with
    tools are answered with the tools run, and their calls scored (``tool_calls``, per family; see
    :mod:`tunemake.tool_eval`).

    Args:
        model_dir: an HF model directory (``config.json``, weights, tokenizer); its tokenizer must
            be the one the dataset was built with.
        data_dir: a templated dataset written by ``tunemake.data.build_templated_dataset``.
        out_json: the JSON to write (keys sorted; identical on rerun apart from ``seconds``).
        template: a :class:`~tunemake.templates.Template`, ``"hf"``, or a built-in template's name;
            the one the dataset was encoded with.
        experiment: recorded in the JSON (the summary's row key).
        epoch: recorded in the JSON (0 for the base model).
        max_prompts: how many held-out conversations to answer. Default 200.
        max_new_tokens: the longest answer. Default 64.
        batch_size: records per forward pass, for the loss and for generation. Default 16.
        seed: seeds torch (greedy decoding does not draw, but the JSON records it). Default 0.
        threads: ``torch.set_num_threads`` for the evaluation (restored afterwards).
        revision: the hub revision when ``model_dir`` is a hub id (read from the local cache).
        trust_remote_code: let transformers run the model's own code.
        tools: a Python module whose functions the model's calls may run, beside the built-in
            plugins (``evaluation.tools``).

    Returns:
        The dictionary written to ``out_json``.

    Raises:
        EvaluateError: ``model_dir`` is not a model directory; ``data_dir`` has no held-out
            split or no ``heldout.jsonl``, or the two disagree in length. Nothing is written then.
        ConfigError: ``template`` is an unknown name.
    """
    started = time.perf_counter()
    if isinstance(template, str) and template != HF:
        template = get_template(template)
    named, data_dir = str(model_dir), Path(data_dir)
    model_dir = hub_model_dir(named, revision) if is_hub_id(named) else Path(named)
    if not (model_dir / "config.json").is_file():
        raise EvaluateError(at(named, "not a model directory (no config.json); build it first"))
    records, heldout_rows, longest = _read_heldout(data_dir)
    tool_calls: dict[str, dict] = {}

    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            tokenizer, model = _load(model_dir, trust_remote_code, batch_tokens=batch_size * (longest + max_new_tokens))
            loss, tokens = _heldout_loss(model, data_dir, heldout_rows, tokenizer, batch_size)
            scored = [r for r in records if _has_input(r["conversation"])][:max_prompts]
            prompts = [prompt_ids(r["conversation"], template, tokenizer) for r in scored]
            plain = [i for i, r in enumerate(scored) if not has_tools(r["conversation"])]
            answers = dict(zip(plain, generate_answers(model, tokenizer, [prompts[i][1] for i in plain], template,
                                                       max_new_tokens=max_new_tokens, batch_size=batch_size)))
            calls = _with_tools(model, tokenizer, template, scored, answers, tools, max_new_tokens, batch_size)
    finally:
        torch.set_num_threads(previous_threads)

    exact_match: dict[str, dict] = {}
    examples = []
    for index, (record, (prompt_text, _)) in enumerate(zip(scored, prompts)):
        reference, answer = record["conversation"][-1]["output"], answers[index]
        correct = answer.strip() == reference.strip()
        for family in (family_of(record), ALL):
            _count(exact_match, family, int(correct), 1)
            if index in calls and calls[index][1]:
                _count(tool_calls, family, *calls[index])
        if len(examples) < EXAMPLES:
            examples.append({"task": family_of(record), "prompt": prompt_text, "reference": reference,
                             "answer": answer, "correct": correct})
    for counts in (*exact_match.values(), *tool_calls.values()):
        counts["rate"] = round(counts["correct"] / counts["total"], 6)

    result = {
        "experiment": experiment,
        "epoch": epoch,
        "model": named,
        "data": str(data_dir),
        "template": HF if template == HF else template.name,
        "heldout": {
            "loss": None if loss is None else round(loss, 6),
            "perplexity": None if loss is None else round(math.exp(loss), 6),
            "tokens": tokens,
            "records": heldout_rows,
        },
        "exact_match": exact_match,
        **({"tool_calls": tool_calls} if tool_calls else {}),
        "generation": {"seed": seed, "max_new_tokens": max_new_tokens, "greedy": True},
        "examples": examples,
        "seconds": round(time.perf_counter() - started, 3),
    }
    write_json(out_json, result)
    log.info("%s: held-out loss %s on %d tokens, exact match %s (%d answers), %.1f s", out_json,
             result["heldout"]["loss"], tokens, exact_match.get(ALL, {}).get("rate"), len(scored),
             result["seconds"])
    return result


def _count(table: dict, family: str, correct: int, total: int) -> None:
    counts = table.setdefault(family, {"correct": 0, "total": 0})
    counts["correct"] += correct
    counts["total"] += total


def _with_tools(model, tokenizer, template, scored: list[dict], answers: dict, tools: str | None,
                max_new_tokens: int, batch_size: int) -> dict[int, tuple[int, int]]:
    """Answer the scored records that have tools with the tools run (into ``answers``, by index);
    return each one's ``(right call turns, call turns)`` (:mod:`tunemake.tool_eval`)."""
    from tunemake.tool_eval import ToolScorer
    from tunemake.toolbox import PLUGINS, load_toolbox

    indices = [i for i, r in enumerate(scored) if has_tools(r["conversation"])]
    if not indices:
        return {}
    stops = answer_stops(model, tokenizer, template)

    def generate(prompts):
        return generate_ids(model, tokenizer, prompts, stops, max_new_tokens=max_new_tokens, batch_size=batch_size)

    scorer = ToolScorer(generate, tokenizer, template, stops, load_toolbox(list(PLUGINS), tools))
    records = [scored[i] for i in indices]
    answers.update(zip(indices, scorer.final_answers(records)))
    return dict(zip(indices, scorer.call_accuracy(records)))


def family_of(record: dict) -> str:
    """The family a held-out record is scored under: its ``task`` field, else its dataset's name."""
    return record.get("task") or record["dataset"]


def _has_input(conversation: list[dict]) -> bool:
    # Pretrain records are one turn with an empty input: nothing to answer.
    return any(turn.get("input") for turn in conversation)


def _read_heldout(data_dir: Path) -> tuple[list[dict], int, int]:
    """The held-out records of ``heldout.jsonl``, the number of rows of the ``heldout`` split and
    the tokens of its longest row."""
    import datasets
    import pyarrow.compute as pc

    jsonl = data_dir / HELDOUT_JSONL
    if not data_dir.is_dir():
        raise EvaluateError(at(str(data_dir), "no such templated dataset; build it first"))
    try:
        splits = datasets.load_from_disk(str(data_dir))
    except (FileNotFoundError, ValueError) as exc:
        raise EvaluateError(at(str(data_dir), f"not a templated dataset ({exc}); rebuild it")) from None
    if not isinstance(splits, datasets.DatasetDict) or "heldout" not in splits:
        raise EvaluateError(at(str(data_dir), "has no 'heldout' split; rebuild it with this tunemake"))
    if not jsonl.is_file():
        raise EvaluateError(at(str(jsonl), "missing; rebuild the templated dataset with this tunemake"))
    records = []
    with open(jsonl, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            try:
                record = json.loads(line)
                if not record["conversation"] or "dataset" not in record:
                    raise KeyError("conversation")
            except (json.JSONDecodeError, KeyError, TypeError):
                raise EvaluateError(at(f"{jsonl}:{line_number}", "not a held-out record "
                                       '({"dataset", "conversation", ...}); rebuild the templated dataset')) from None
            records.append(record)
    rows = len(splits["heldout"])
    if len(records) != rows:
        raise EvaluateError(at(str(jsonl), f"{len(records)} records, but the heldout split has {rows} rows; "
                               "the directory is inconsistent, rebuild the templated dataset"))
    longest = pc.max(pc.list_value_length(splits["heldout"].data.table.column("input_ids"))).as_py() if rows else 0
    return records, rows, longest


def _load(model_dir: Path, trust_remote_code: bool = False, batch_tokens: int = 0):
    """The model and its tokenizer: in bfloat16 (float16 where the GPU lacks it) on the first GPU,
    or spread over several (:func:`gpu_placement`, for a batch of ``batch_tokens`` tokens), when
    there is a GPU; else on the CPU in float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16 if cuda else torch.float32
    max_memory = _spread_max_memory(model_dir, dtype, batch_tokens) if cuda and torch.cuda.device_count() > 1 else None
    placement = {"device_map": "sequential", "max_memory": max_memory} if max_memory else {}
    try:
        tokenizer = load_pretrained(AutoTokenizer, model_dir, trust_remote_code=trust_remote_code)
        model = load_pretrained(AutoModelForCausalLM, model_dir, dtype=dtype, trust_remote_code=trust_remote_code,
                                **placement)
    except (OSError, ValueError) as exc:
        raise EvaluateError(at(str(model_dir), f"cannot load the model or its tokenizer: {exc}")) from None
    if max_memory:
        log.info("%s: spread over GPUs %s", model_dir, sorted(set(model.hf_device_map.values()), key=str))
        return tokenizer, model.eval()
    return tokenizer, model.to("cuda" if cuda else "cpu").eval()


def gpu_placement(model_bytes: int, free_bytes: list[int], batch_bytes: int,
                  largest_module_bytes: int) -> dict[int, int] | None:
    """Where evaluation puts a model's weights on the visible GPUs.

    None: all of them on the first GPU, where its free memory holds the weights and a batch, or
    where it is the only one (then the load is tried, as it always was). Else ``max_memory`` for
    ``from_pretrained(device_map="sequential", max_memory=...)``: the fewest GPUs, from the first
    on, that hold the weights spread over them (:func:`tunemake.resources.spread_bytes`) within
    their free memory less a whole batch each, each capped at that, so that every GPU keeps room
    for its layers' KV cache and the logits (a whole batch on each is more than any one needs;
    the estimate in ``tunemake.resources`` counts the same). Sequential, not balanced: the caps
    alone decide where layers go, so a fit here is a fit there; balancing can send the last
    layers to disk when the GPUs' free memory differs.

    Args:
        model_bytes: the weights, in the dtype they are loaded in.
        free_bytes: the free memory of each visible GPU, in CUDA's order (at least one).
        batch_bytes: what one batch holds beside the weights
            (:func:`tunemake.resources.evaluation_batch_bytes`).
        largest_module_bytes: the largest piece the device map keeps whole (a decoder layer, the
            embeddings).

    Raises:
        EvaluateError: spread over every visible GPU, the weights still do not fit.
    """
    caps = [max(0, free - batch_bytes) for free in free_bytes]
    for count in range(1, len(caps) + 1):
        if sum(caps[:count]) >= spread_bytes(model_bytes, largest_module_bytes, count):
            return None if count == 1 else dict(enumerate(caps[:count]))
    if len(caps) == 1:
        return None
    gb = 1000**3
    raise EvaluateError(
        f"{model_bytes / gb:.1f} GB of weights do not fit the {len(caps)} visible GPUs "
        f"({', '.join(f'{free / gb:.1f}' for free in free_bytes)} GB free, {batch_bytes / gb:.1f} GB of each kept "
        "for a batch): evaluate on more GPUs (an experiment's resources.evaluate.gpus) or with a smaller "
        "evaluation.batch_size")


def _spread_max_memory(model_dir: Path, dtype: torch.dtype, batch_tokens: int) -> dict[int, int] | None:
    """:func:`gpu_placement` of this model on the visible GPUs; None (the first GPU) when its
    config.json does not tell its shape."""
    config_file = model_dir / "config.json"
    try:
        shape = shape_from_config(json.loads(config_file.read_text(encoding="utf-8")), str(config_file))
    except (ConfigError, OSError, ValueError) as exc:
        log.warning("%s: loading it on the first GPU: cannot size it to spread it over several (%s)", model_dir, exc)
        return None
    model_bytes = (weight_parameters(model_dir) or shape.parameters) * dtype.itemsize
    batch_bytes = evaluation_batch_bytes(shape, batch_tokens)
    # The other GPUs only when the first is not enough: asking one creates a CUDA context on it.
    free = [torch.cuda.mem_get_info(0)[0]]
    if model_bytes + batch_bytes > free[0]:
        free += [torch.cuda.mem_get_info(i)[0] for i in range(1, torch.cuda.device_count())]
    try:
        return gpu_placement(model_bytes, free, batch_bytes, shape.largest_module_parameters * dtype.itemsize)
    except EvaluateError as exc:
        raise EvaluateError(at(str(model_dir), str(exc))) from None


def input_device(model) -> torch.device:
    """Where a model's input ids go: its input embeddings' device (with a device_map, the GPU
    holding the first layers; the output comes back there)."""
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):  # a model's own code without the accessor
        return model.device


def _heldout_loss(model, data_dir: Path, rows: int, tokenizer, batch_size: int) -> tuple[float | None, int]:
    """Training's held-out loss on these weights, and the number of tokens it averages over."""
    from tunemake.train.batches import Rows
    from tunemake.train.evaluation import heldout_loss
    from tunemake.train.launch import Dist

    if rows == 0:
        return None, 0
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    loss = heldout_loss(model, str(data_dir), batch_size, Dist(device=input_device(model)), pad_id, amp_dtype=None)
    heldout = Rows(str(data_dir), "heldout")
    # The first token of a row is never a target (see tunemake.train.batches.make_batch).
    tokens = sum(int((heldout.row("labels", i)[1:] != IGNORE_INDEX).sum()) for i in range(heldout.num_rows))
    return loss, tokens


def generate_answers(model, tokenizer, prompts: list[list[int]], template, *, max_new_tokens: int = 64,
                     batch_size: int = 16, progress: bool = True) -> list[str]:
    """Greedy answers to tokenized prompts, batched with left padding; in the prompts' order.

    Prompts are batched by length (less padding); a prompt's answer does not depend on its batch.
    Nothing in the model's ``generation_config.json`` (sampling, repetition penalty) applies. The
    model may be spread over several GPUs: the prompts go to :func:`input_device`.
    """
    stops = answer_stops(model, tokenizer, template)
    generated = generate_ids(model, tokenizer, prompts, stops, max_new_tokens=max_new_tokens,
                             batch_size=batch_size, progress=progress)
    return [answer_text(ids, tokenizer, stops) for ids in generated]


def answer_stops(model, tokenizer, template):
    """Where an evaluation's answers stop: the template's stop words and the model's eos."""
    return generation_stops(tokenizer, template, getattr(model.generation_config, "eos_token_id", None))


@torch.no_grad()
def generate_ids(model, tokenizer, prompts: list[list[int]], stops, *, max_new_tokens: int = 64,
                 batch_size: int = 16, progress: bool = True) -> list[list[int]]:
    """The ids greedy decoding writes after each prompt (see :func:`generate_answers`)."""
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops.ids, default=0)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              eos_token_id=sorted(stops.ids) or None, pad_token_id=pad_id)
    device = input_device(model)
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    generated: list[list[int]] = [[] for _ in prompts]
    # generate() fills every field left unset from model.generation_config: lend it an empty one.
    model_config, model.generation_config = model.generation_config, GenerationConfig()
    try:
        for batch in tqdm(batches, desc="generate", unit="batch", disable=not progress or not batches,
                          mininterval=1.0, dynamic_ncols=True):
            length = max(len(prompts[i]) for i in batch)
            input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
            for row, i in enumerate(batch):
                input_ids[row, length - len(prompts[i]):] = torch.tensor(prompts[i], dtype=torch.long)
                attention_mask[row, length - len(prompts[i]):] = 1
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                    generation_config=config)
            for row, i in enumerate(batch):
                generated[i] = output[row, length:].tolist()
    finally:
        model.generation_config = model_config
    return generated


# --- summary and plots -------------------------------------------------------------------------


def summarize(
    eval_files: list[str | os.PathLike],
    out_tsv: str | os.PathLike,
    *,
    plots_dir: str | os.PathLike | None = None,
    train_logs: dict[str, list[str | os.PathLike]] | None = None,
) -> list[dict]:
    """Write one TSV row per (experiment, epoch), and the plots, from evaluation JSON files.

    Columns: ``experiment``, ``epoch``, ``heldout_loss``, ``perplexity``, then
    ``exact_match_<family>`` for every family any file scores (the demo's families in their own
    order, then others alphabetically), then ``exact_match_all``, then
    ``tool_call_accuracy_<family>`` the same way for the families with tool calls. Rows are sorted by experiment,
    then epoch; numbers have :data:`DECIMALS` decimals; a value a file lacks is blank.

    Plots, written to ``plots_dir`` when given: :data:`METRICS_PLOT` (held-out loss and each
    family's exact match against epoch, a line per experiment) and :data:`TRAINING_PLOT` (training
    loss against global step, a line per experiment, from ``train_logs``).

    Args:
        eval_files: the ``evals/{experiment}/epoch_{n}.json`` files; a file without an
            ``experiment`` / ``epoch`` takes them from its path.
        out_tsv: the TSV to write, atomically.
        plots_dir: where to write the PNGs (created if missing); none when omitted.
        train_logs: per experiment, its ``epoch_{n}.metrics.jsonl`` files; missing files are skipped.

    Returns:
        The rows, as ``{column: value}`` with numbers unformatted (``None`` where blank).

    Raises:
        EvaluateError: an unreadable evaluation file, or two files for the same experiment and epoch.
    """
    evals = [_read_eval(Path(path)) for path in eval_files]
    seen: dict[tuple[str, int], str] = {}
    for path, ev in zip(eval_files, evals):
        key = (ev["experiment"], ev["epoch"])
        if key in seen:
            raise EvaluateError(at(str(path), f"experiment {key[0]!r} epoch {key[1]} is also evaluated in {seen[key]}"))
        seen[key] = str(path)
    evals.sort(key=lambda ev: (ev["experiment"], ev["epoch"]))
    scores = {metric: _families(evals, metric) for metric in SCORES}
    columns = [*FIXED_COLUMNS, *(f"{SCORES[m]}_{family}" for m, families in scores.items() for family in families)]

    rows = []
    for ev in evals:
        heldout = ev.get("heldout") or {}
        row = {"experiment": ev["experiment"], "epoch": ev["epoch"],
               "heldout_loss": heldout.get("loss"), "perplexity": heldout.get("perplexity")}
        for metric, families in scores.items():
            for family in families:
                row[f"{SCORES[metric]}_{family}"] = (ev.get(metric) or {}).get(family, {}).get("rate")
        rows.append(row)

    if plots_dir is not None:
        plots_dir = Path(plots_dir)
        plot_metrics(rows, columns[len(FIXED_COLUMNS):], plots_dir / METRICS_PLOT)
        plot_training_loss(train_logs or {}, plots_dir / TRAINING_PLOT)
    with atomic_file(out_tsv, newline="\n") as handle:
        handle.write("\t".join(columns) + "\n")
        for row in rows:
            handle.write("\t".join(_format(row[column]) for column in columns) + "\n")
    log.info("%s: %d evaluations of %d experiments", out_tsv, len(rows), len({r["experiment"] for r in rows}))
    return rows


def _read_eval(path: Path) -> dict:
    try:
        ev = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EvaluateError(at(str(path), "no such evaluation; run the evaluate stage first")) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EvaluateError(at(str(path), f"not an evaluation JSON ({exc})")) from None
    if not isinstance(ev, dict):
        raise EvaluateError(at(str(path), "not an evaluation JSON (not an object)"))
    if ev.get("experiment") is None:
        ev["experiment"] = path.parent.name
    if ev.get("epoch") is None:
        match = re.fullmatch(r"epoch_(\d+)", path.stem)
        if not match:
            raise EvaluateError(at(str(path), "records no epoch and its name is not epoch_<n>.json"))
        ev["epoch"] = int(match.group(1))
    return ev


def _families(evals: list[dict], metric: str = "exact_match") -> list[str]:
    """Every family scored anywhere: the demo's in their order, the others sorted, ``all`` last."""
    seen = {family for ev in evals for family in (ev.get(metric) or {})}
    ordered = [f for f in TASK_FAMILIES if f in seen] + sorted(seen - set(TASK_FAMILIES) - {ALL})
    return ordered + [ALL] if seen else ordered


def _format(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{DECIMALS}f}"
    return str(value)


def _figure(panels: int):
    # Figure + Agg canvas, not pyplot: no global backend or figure state in the caller's process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = min(panels, 3)
    rows = -(-panels // columns)
    figure = Figure(figsize=(4.5 * columns, 3.4 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, [figure.add_subplot(rows, columns, i + 1) for i in range(panels)]


def _save(figure, target: Path) -> None:
    # No "Software" entry, so the bytes do not change with the matplotlib version alone.
    with atomic_file(target, "wb") as handle:
        figure.savefig(handle, format="png", metadata={"Software": None})


def plot_metrics(rows: list[dict], score_columns: list[str], target: str | os.PathLike) -> None:
    """Held-out loss and each score column (exact match, tool-call accuracy, per family) against
    epoch, one line per experiment."""
    titles = {column: f"{metric.replace('_', ' ')}: {column[len(metric) + 1:]}"
              for column in score_columns for metric in SCORES.values() if column.startswith(metric + "_")}
    panels = [("heldout_loss", "held-out loss")] + [(column, titles[column]) for column in score_columns]
    figure, axes = _figure(len(panels))
    experiments = sorted({row["experiment"] for row in rows})
    # one colour an experiment in every panel (the legend is drawn in the first only)
    colors = {experiment: f"C{i % 10}" for i, experiment in enumerate(experiments)}
    for ax, (column, title) in zip(axes, panels):
        for experiment in experiments:
            points = [(r["epoch"], r[column]) for r in rows if r["experiment"] == experiment and r[column] is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=experiment, color=colors[experiment])
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        if column != "heldout_loss":
            ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    if experiments:
        axes[0].legend(fontsize="small")
    _save(figure, Path(target))


def plot_training_loss(train_logs: dict[str, list[str | os.PathLike]], target: str | os.PathLike) -> None:
    """Training loss against global step, one line per experiment; missing log files are skipped."""
    figure, (ax,) = _figure(1)
    for experiment in sorted(train_logs):
        points = sorted(_training_points(train_logs[experiment]))
        if points:
            ax.plot(*zip(*points), label=experiment, linewidth=1)
    ax.set_title("training loss")
    ax.set_xlabel("global step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no training metrics", ha="center", va="center", transform=ax.transAxes)
    _save(figure, Path(target))


def _training_points(paths) -> list[tuple[int, float]]:
    points: dict[int, float] = {}  # by global step: a resumed epoch's rewritten steps count once
    for path in paths:
        path = Path(path)
        if not path.is_file():
            log.warning("%s: no such training log; skipped in %s", path, TRAINING_PLOT)
            continue
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by an interrupted epoch
                if not record.get("end_of_epoch") and "loss" in record and "global_step" in record:
                    points[record["global_step"]] = record["loss"]
    return list(points.items())
