"""The ``tunemake`` command: inspect a config, its templates, formats and datasets, and run stages.

Each subcommand calls the same stage entry point the Snakemake rule calls. Bad input prints one
``error: ...`` line naming the file and line (or config key) and exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from tunemake.errors import ConfigError, TunemakeError
from tunemake.rule_entry import setup_logging


def _load(args, check_files: bool = True):
    """The ``--config`` file, resolved, its hub revisions pinned by ``tunemake.lock`` (what it lacks
    is resolved, not written); ``check_files=False`` for commands that read no data."""
    from tunemake.lock import load_pinned

    return load_pinned(args.config, may_resolve=True, check_files=check_files)


def cmd_list_templates(args) -> None:
    from tunemake.templates import HF, TEMPLATES

    for name, t in TEMPLATES.items():
        print(f"{name:15} {t.instruction!r}" + (f"  suffix {t.suffix!r}" if t.suffix else ""))
    print(f"{HF:15} the tokenizer's own chat_template")


def cmd_list_formats(args) -> None:
    from tunemake.formats import FORMATS

    for name, description in FORMATS.items():
        print(f"{name:13} {description}")


def cmd_list_experiments(args) -> None:
    from tunemake.paths import templated_dataset

    config = _load(args, check_files=False)
    for name, exp in config["experiments"].items():
        base = f"experiment {exp['upstream']}" if exp["upstream"] else f"model {exp['root_model']}"
        print(f"{name}\n  from {base}, method {exp['method']}, template {exp['template']}, "
              f"{exp['epochs']} epochs\n  data {templated_dataset(exp['data_key'])} "
              f"({' + '.join(exp['datasets'])}, max_length {exp['max_length']})")


def _experiment(config: dict, name: str | None, dataset: str | None = None) -> dict:
    experiments = config["experiments"]
    if name is None:
        matching = [e for e in experiments.values() if dataset is None or dataset in e["datasets"]]
        if not matching:
            raise ConfigError(f"no experiment uses dataset {dataset!r}; pass --model and --template")
        return matching[0]
    if name not in experiments:
        raise ConfigError(f"unknown experiment {name!r}; experiments: {', '.join(experiments)}")
    return experiments[name]


def cmd_check_dataset(args) -> None:
    from tunemake.templates import get_template
    from tunemake.data import check_dataset, load_tokenizer

    config = _load(args)
    if args.dataset not in config["datasets"]:
        raise ConfigError(f"unknown dataset {args.dataset!r}; datasets: {', '.join(config['datasets'])}")
    dataset = {"name": args.dataset, **config["datasets"][args.dataset]}
    if args.model:
        if args.model not in config["models"]:
            raise ConfigError(f"unknown model {args.model!r}; models: {', '.join(config['models'])}")
        model = config["models"][args.model]
        template_name = args.template or model["template"]
        max_length = args.max_length or 2048
    else:
        exp = _experiment(config, args.experiment, args.dataset)
        model = config["models"][exp["root_model"]]
        template_name = args.template or exp["template"]
        max_length = args.max_length or exp["max_length"]
    template = get_template(template_name, config.get("templates"))
    from tunemake.config import read_revision

    tokenizer = load_tokenizer({"path": model["path"], "revision": read_revision(model),
                                "trust_remote_code": model.get("trust_remote_code", False)})
    paths = None if "hub" in dataset else config["source_files"][args.dataset]
    print(check_dataset(dataset, paths, tokenizer, template, max_length, args.count,
                        color=sys.stdout.isatty() and not args.no_color))


def cmd_build_data(args) -> None:
    from tunemake.data import build_templated_dataset
    from tunemake.paths import templated_dataset

    config = _load(args)
    exp = _experiment(config, args.experiment)
    out = args.out or templated_dataset(exp["data_key"])
    if args.out is None and (Path(out) / "stats.json").exists():
        # rewriting it would make every epoch trained on it stale to Snakemake, which rebuilds it
        # itself when its sources change
        stats = json.loads((Path(out) / "stats.json").read_text())
        print(f"{out}: already built, left as it is (snakemake rebuilds it when its sources change; "
              "--out DIR builds a copy)")
    else:
        stats = build_templated_dataset(exp["data_recipe"], out, threads=args.threads)
    print(f"{out}: {stats['records_out']['train']} train / {stats['records_out']['heldout']} held-out "
          f"records, {stats['tokens']} tokens, packing efficiency {stats['packing_efficiency']:.1%}")


def cmd_prune_state(args) -> None:
    from tunemake.paths import train_state
    from tunemake.train import prune_state

    config = _load(args, check_files=False)
    names = args.experiments or list(config["experiments"])
    total = 0
    for name in names:
        exp = _experiment(config, name)
        keep = exp["epochs"] if not args.all else None
        for epoch in range(1, exp["epochs"] + 1):
            if epoch == keep:
                continue
            freed = prune_state(train_state(name, epoch))
            if freed:
                print(f"{train_state(name, epoch)}: pruned {freed / 2**20:.1f} MiB")
            total += freed
    print(f"freed {total / 2**20:.1f} MiB")


def cmd_lock(args) -> None:
    from tunemake.lock import LOCK_FILE, entries, read_lock, resolve, write_lock

    from tunemake.config import load_config

    config = load_config(args.config, check_files=False)
    if not entries(config):
        print(f"{args.config}: no model or dataset from the hub, nothing to pin; {LOCK_FILE} left as it is")
        return
    locked = read_lock(LOCK_FILE)
    if args.update is not None:
        wanted = set(args.update) or {key for entry in entries(config) for key in entry.keys}
        updated = resolve(config, locked, may_resolve=True, update=wanted)
        write_lock(updated, LOCK_FILE)
        for (kind, name), sha in sorted(updated.items()):
            if locked.get((kind, name)) != sha:
                print(f"{name}: {locked.get((kind, name), 'not locked')} -> {sha}")
        locked = updated
    for entry in entries(config):
        sha = locked.get((entry.repo_type, entry.name), "not locked yet: resolved at the next run")
        print(f"{', '.join(entry.keys):30} {entry.name}  {sha}")


def cmd_convert(args) -> None:
    from tunemake.convert import convert_checkpoint

    out = convert_checkpoint(args.checkpoint, args.out, base_model=args.base, dtype=args.dtype,
                             revision=args.revision, trust_remote_code=args.trust_remote_code)
    print(f"{out}: written")


def cmd_merge(args) -> None:
    from tunemake.convert import read_metadata
    from tunemake.merge import merge_model

    out = merge_model(args.source, args.out, base_model=args.base, max_shard_size=args.max_shard_size,
                      dtype=args.dtype, template=args.template, revision=args.revision,
                      trust_remote_code=args.trust_remote_code)
    meta = read_metadata(out)
    shards = len(list(out.glob("model*.safetensors")))
    print(f"{out}: merged model written ({meta['dtype']}, {shards} shard{'s' if shards > 1 else ''}, "
          f"template {meta['template']['name']}, base {meta['base_model']})")


def cmd_chat(args) -> None:
    from tunemake.chat import run_chat

    run_chat(args)


def build_parser() -> argparse.ArgumentParser:
    from tunemake.config import DTYPE_BYTES

    parser = argparse.ArgumentParser(prog="tunemake", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def with_hub(p):
        p.add_argument("--revision", help="hub revision (branch, tag or commit) when the base is a hub id")
        p.add_argument("--trust-remote-code", action="store_true", help="let transformers run the model's own code")

    def with_config(p):
        p.add_argument("--config", "-c", default="config.yaml", help="config file (default: config.yaml)")
        return p

    sub.add_parser("list-templates", help="prompt templates and their instruction strings").set_defaults(fn=cmd_list_templates)
    sub.add_parser("list-formats", help="dataset formats and what each reads").set_defaults(fn=cmd_list_formats)
    with_config(sub.add_parser("list-experiments", help="the config's experiments, resolved")).set_defaults(fn=cmd_list_experiments)

    p = with_config(sub.add_parser("check-dataset", help="render records of a dataset with trained tokens marked"))
    p.add_argument("dataset", help="a dataset name from the config")
    p.add_argument("--experiment", help="take model, template and max_length from this experiment")
    p.add_argument("--model", help="a model name from the config (instead of --experiment)")
    p.add_argument("--template", help="override the template")
    p.add_argument("--max-length", type=_number(int, above=0))
    p.add_argument("-n", "--count", type=_number(int, above=0), default=3, help="records to show (default 3)")
    p.add_argument("--no-color", action="store_true", help="mark trained spans with [[ ]] even on a terminal")
    p.set_defaults(fn=cmd_check_dataset)

    p = with_config(sub.add_parser("build-data", help="build an experiment's templated dataset"))
    p.add_argument("experiment")
    p.add_argument("--out", help="output directory (default: where the workflow puts it)")
    p.add_argument("--threads", type=_number(int, above=0), default=1)
    p.set_defaults(fn=cmd_build_data)

    p = with_config(sub.add_parser("lock", help="the hub commits tunemake.lock pins; --update moves them"))
    p.add_argument("--update", nargs="*", metavar="KEY",
                   help="resolve these entries again (models.NAME, datasets.NAME; none named: all) "
                        "from the hub, or offline from the cache, and write the lock")
    p.set_defaults(fn=cmd_lock)

    p = sub.add_parser("convert", help="an epoch .pth -> PEFT adapter (LoRA/QLoRA) or HF model (full)")
    p.add_argument("checkpoint", help="an epoch_N.pth written by tunemake")
    p.add_argument("out", help="the directory to write")
    p.add_argument("--base", help="base model directory or hub id (default: the one recorded in the checkpoint)")
    with_hub(p)
    p.add_argument("--dtype", choices=list(DTYPE_BYTES),
                   help="weights' dtype (default: float16 for adapters, as XTuner's pth_to_hf; the base's for full)")
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("merge", help="adapter + base -> one HF model directory (a full fine-tune: resharded)")
    p.add_argument("source", help="an adapter or full fine-tune directory written by tunemake convert")
    p.add_argument("out", help="the model directory to write")
    p.add_argument("--base", help="base model directory or hub id (default: the one recorded with the adapter)")
    with_hub(p)
    p.add_argument("--max-shard-size", default="2GB", help="largest shard file, e.g. 2GB, 500MB, 1GiB (default 2GB)")
    p.add_argument("--dtype", choices=list(DTYPE_BYTES),
                   help="weights' dtype (default: the base's, else float16)")
    p.add_argument("--template", help="prompt template (default: the one recorded with the adapter)")
    p.set_defaults(fn=cmd_merge)

    p = with_config(sub.add_parser(
        "prune-state", help="free the optimizer state of epochs nobody will re-run from (all but the last)"))
    p.add_argument("experiments", nargs="*", help="experiments (default: all)")
    p.add_argument("--all", action="store_true", help="prune the last epoch's state too (it can then not be extended)")
    p.set_defaults(fn=cmd_prune_state)

    from tunemake.chat import BATCH_FORMAT

    p = sub.add_parser("chat", help="chat with a model, a merge or base + adapter (XTuner's chat)",
                       epilog=BATCH_FORMAT, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Interactive: a prompt ends on an empty line; EXIT quits, RESET starts a new "
                                   "conversation. Answers stream to stdout, everything else goes to stderr.")
    p.add_argument("model", help="a Hugging Face model directory (a merge, a base model, a full fine-tune), "
                                 "or a hub id in the local cache")
    p.add_argument("--adapter", help="a PEFT adapter directory to load on top of MODEL")
    p.add_argument("--prompt-template", help="template name (default: the one recorded in the adapter's, "
                                             "else MODEL's tunemake.json)")
    p.add_argument("--bits", type=int, choices=[4, 8], help="load quantized: 4 (NF4 + double quant) or 8")
    p.add_argument("--revision", help="hub revision (branch, tag or commit) when MODEL is a hub id")
    p.add_argument("--trust-remote-code", action="store_true", help="let transformers run the model's own code")
    p.add_argument("--system", default="", help="system text of every conversation")
    p.add_argument("--temperature", type=_number(float, at_least=0), default=0.1, help="0 for greedy (default 0.1)")
    p.add_argument("--top-k", type=_number(int, at_least=0), default=40, help="0: off (default 40)")
    p.add_argument("--top-p", type=_number(float, above=0, at_most=1), default=0.75, help="default 0.75")
    p.add_argument("--repetition-penalty", type=_number(float, above=0), default=1.0, help="default 1.0")
    p.add_argument("--max-new-tokens", type=_number(int, above=0), default=2048, help="default 2048")
    p.add_argument("--seed", type=int, default=0, help="set once at start: same inputs, same answers (default 0)")
    p.add_argument("--stop-words", nargs="+", default=[], metavar="W", help="more words that end an answer")
    p.add_argument("--no-streamer", action="store_true", help="print each answer whole, not as it is generated")
    p.add_argument("--batch", metavar="FILE", help="answer the prompts of FILE (- for stdin), JSON lines out; see below")
    p.add_argument("--with-plugins", nargs="+", default=[], metavar="NAME",
                   help="built-in tools the model may call: calculate, solve (XTuner's names)")
    p.add_argument("--tools", metavar="FILE", help="a Python module whose typed, documented functions are tools")
    p.add_argument("--max-tool-rounds", type=_number(int, at_least=0), default=5, metavar="N",
                   help="tool calls run per prompt before the model must answer (default 5)")
    p.set_defaults(fn=cmd_chat)
    return parser


def _number(kind, above=None, at_least=None, at_most=None):
    """An argparse type: ``kind`` (int or float) within the bounds given, else a usage error."""
    bounds = [f"> {above}" if above is not None else "", f">= {at_least}" if at_least is not None else "",
              f"<= {at_most}" if at_most is not None else ""]

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if (not math.isfinite(value) or (above is not None and value <= above)
                or (at_least is not None and value < at_least) or (at_most is not None and value > at_most)):
            raise argparse.ArgumentTypeError(f"{text} is out of range (must be {' and '.join(b for b in bounds if b)})")
        return value

    return parse


def _reader_gone(stream) -> bool:
    """Whether ``stream`` is a pipe whose reading end is closed."""
    import select

    poll = select.poll()
    poll.register(stream.fileno(), select.POLLOUT)
    return any(events & select.POLLERR for _, events in poll.poll(0))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("%(name)s: %(message)s")
    try:
        args.fn(args)
        sys.stdout.flush()  # here, not at exit, where a closed pipe would print a traceback
    except TunemakeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        if not _reader_gone(sys.stdout):
            raise
        # the output's reader went away (`| head`): no traceback; exit 1, as Python's docs advise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
