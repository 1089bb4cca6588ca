"""``python -m bench``: list, run one or run every benchmark (see :mod:`bench`)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from .report import BENCHMARKS, DOC, run_benchmark, summary, write_doc


def run_all(quick: bool, doc: Path) -> list[str]:
    """Run every benchmark, each in a process of its own (a benchmark may set up its own
    environment), then rebuild ``doc`` once; returns the names that failed."""
    failed = []
    for name in BENCHMARKS:
        print(f"== {name}", flush=True)
        done = subprocess.run([sys.executable, "-m", "bench", name, *(["--quick"] if quick else []), "--doc", str(doc),
                               "--no-doc"])
        if done.returncode:
            failed.append(name)
    write_doc(doc)
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     epilog="Options after NAME that are not listed here go to the benchmark "
                                            "(python -m bench NAME --help shows them).")
    parser.add_argument("name", nargs="?", help="a benchmark, or all")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and what each measures")
    parser.add_argument("--quick", action="store_true", help="the small run (what CI runs)")
    parser.add_argument("--doc", type=Path, default=DOC, help="the doc to rebuild (its figures are kept beside it)")
    parser.add_argument("--no-doc", action="store_true", help="save the figures without rebuilding the doc")
    args, rest = parser.parse_known_args(argv)
    if args.list or not args.name:
        for name in BENCHMARKS:
            print(f"{name:22s} {summary(name)}")
        return 0
    if args.name == "all":
        if rest:
            parser.error(f"options for a single benchmark ({' '.join(rest)}) do not go with all")
        failed = run_all(args.quick, args.doc)
        if failed:
            print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1 if failed else 0
    run_benchmark(args.name, args.quick, rest, doc=args.doc, rebuild=not args.no_doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
