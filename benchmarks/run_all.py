"""`make bench`: run every benchmark; each writes results/<name>.json."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ["bench_io.py", "bench_decompose.py", "bench_reconstruct.py", "bench_pls.py", "bench_fit_pls.py",
           "bench_relex.py", "bench_extrapolation_quality.py"]

for b in BENCHES:
    print(f"== {b}", file=sys.stderr)
    subprocess.run([sys.executable, str(HERE / b)], check=True)
