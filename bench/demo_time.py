"""How long the offline demo takes: `snakemake --cores all` on config.yaml in a fresh directory.

The target (issue 4): the whole demo, set-up excluded, in under 10 minutes on a 2-core machine.
Runs the README's demo command in a temporary directory holding only a copy of config.yaml, times
it, and prints each rule's share (from the jobs' log files' lifetimes) and the ratio to the budget.
Exits 1 when the budget is exceeded. Also prints the evaluation summary the demo ends with.

    python bench/demo_time.py [--cores 2] [--budget 600] [--keep DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cores", default="all", help="snakemake --cores (default all)")
    parser.add_argument("--budget", type=float, default=600.0, help="seconds allowed (default 600)")
    parser.add_argument("--target", default="all", help="snakemake target (default all; merged/ for the models alone)")
    parser.add_argument("--keep", type=Path, help="build here and keep it (default: a temporary directory)")
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    return parser.parse_args(argv)


def rule_seconds(work: Path) -> dict[str, float]:
    """Per rule, the summed wall time of its jobs: from the first to the last write of each job's log."""
    totals: dict[str, float] = defaultdict(float)
    snakelog = sorted((work / ".snakemake" / "log").glob("*.snakemake.log"))[-1]
    started: dict[str, float] = {}
    rule = None
    # Snakemake's own log: "[date]" then "rule NAME:" ... "jobid: N" ... later "Finished jobid: N"
    stamp = None
    for line in snakelog.read_text().splitlines():
        if line.startswith("[") and line.endswith("]"):
            stamp = time.mktime(time.strptime(line[1:-1], "%a %b %d %H:%M:%S %Y"))
        elif line.startswith(("rule ", "localrule ")):
            rule = line.split()[1].rstrip(":")
        elif line.strip().startswith("jobid:") and rule:
            started[line.split()[-1]] = (rule, stamp)
        elif line.startswith("Finished jobid:"):
            jobid = line.split()[2]
            if jobid in started:
                name, begin = started.pop(jobid)
                totals[name] += stamp - begin
    return dict(totals)


def main(argv=None) -> int:
    args = parse_args(argv)
    work = args.keep or Path(tempfile.mkdtemp(prefix="tunemake-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "config.yaml", work / "config.yaml")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(work),
           "--cores", str(args.cores), args.target]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        print(proc.stdout[-3000:], proc.stderr[-5000:], sep="\n")
        print(f"FAIL: snakemake exited with {proc.returncode}")
        return 1
    per_rule = rule_seconds(work)
    print(f"\n{'rule':20} {'job seconds':>12}")
    for name, value in sorted(per_rule.items(), key=lambda kv: -kv[1]):
        print(f"{name:20} {value:12.0f}")
    summary = work / "evals" / "summary.tsv"
    if summary.exists():
        print("\nevals/summary.tsv:\n" + summary.read_text())
    ratio = seconds / args.budget
    verdict = "PASS" if seconds <= args.budget else "FAIL"
    print(f"demo ({args.target}): {seconds:.0f} s wall, {ratio:.2f} of the {args.budget:.0f} s budget: {verdict}"
          f" (load average at end {os.getloadavg()[0]:.2f})")
    if args.json:
        args.json.write_text(json.dumps({"seconds": seconds, "budget": args.budget, "per_rule": per_rule,
                                         "target": args.target, "cores": args.cores}, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
