"""`make bench`: run every benchmark, then regenerate docs/benchmarks.md from the results files.

Each name in BENCHES is a script `benchmarks/bench_<name>.py` that writes `benchmarks/results/<name>.json`
(its raw data plus the report block defined in `_report.py`). Adding a benchmark is one line here; the
page lists the results in this order, then any other results file by name.

  run_all.py                   every benchmark, then the page
  run_all.py --only NAME ...   only these benchmarks, then the page (from every results file)
  run_all.py --quick           tiny sizes (each script's --quick): checks that every script runs and
                               reports; results and page go to benchmarks/work/quick/, nothing measured
  run_all.py --report-only     only the page, from the existing results (`make bench-report`)
  run_all.py --list            the benchmarks, in order
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = [
    "io",
    "decompose",
    "decompose_run",
    "decompose_lora",
    "ray",
    "reconstruct",
    "export_lora",
    "fit_pls",
    "pls",
    "relex",
    "extrapolation_quality",
    "logprobs",
    "generate",
    "reground",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", choices=BENCHES, help="run only these benchmarks")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, results under benchmarks/work/quick/")
    ap.add_argument("--report-only", action="store_true", help="only regenerate the page")
    ap.add_argument("--list", action="store_true", help="list the benchmarks")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(BENCHES))
        return 0
    if not args.report_only:
        for name in args.only or BENCHES:
            print(f"== bench_{name}.py{' --quick' if args.quick else ''}", file=sys.stderr, flush=True)
            subprocess.run(
                [sys.executable, str(HERE / f"bench_{name}.py"), *(["--quick"] if args.quick else [])], check=True
            )
    report = [sys.executable, str(HERE / "report.py")]
    if args.quick:
        quick = HERE / "work" / "quick"
        report += ["--results", str(quick / "results"), "--out", str(quick / "benchmarks.md")]
    return subprocess.run(report).returncode


if __name__ == "__main__":
    sys.exit(main())
