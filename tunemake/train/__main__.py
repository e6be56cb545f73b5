"""``python -m tunemake.train SPEC.json``: what torchrun runs in each process (``SPEC.json``:
:meth:`tunemake.train.EpochSpec.to_json`, written by :func:`tunemake.train.launch`)."""

import json
import sys

from tunemake.errors import TunemakeError
from tunemake.rule_entry import setup_logging
from tunemake.train.loop import train_epoch
from tunemake.train.spec import EpochSpec


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    setup_logging("%(asctime)s %(name)s: %(message)s")
    with open(argv[0], encoding="utf-8") as handle:
        spec = EpochSpec.from_json(json.load(handle))
    try:
        return train_epoch(spec)
    except TunemakeError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1


sys.exit(main())
