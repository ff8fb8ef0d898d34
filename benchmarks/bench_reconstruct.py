"""Benchmark (issue #4): `rank1 reconstruct --rank 1` against copying the same bytes through safetensors.

Pairs: the generated bf16 135M-shaped and ~4x larger base/checkpoint of bench_decompose.
  cli     `rank1 reconstruct BASE CKPT --rank 1 --out ...` (whole process, imports included)
  copy    load_file(base) + load_file(checkpoint) + save_file(one model): the bytes reconstruct reads
          and writes, with nothing computed (whole process, imports included)
  import  python importing what each of them imports before work starts
Medians of REPS runs; peaks are the largest seen.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _proc import repeat  # noqa: E402
from bench_decompose import SHAPES, _ensure  # noqa: E402

RESULTS = HERE / "results"
PY = sys.executable
RANK1 = str(Path(PY).with_name("rank1"))
REPS = 3
COPY = ("import sys; from safetensors.torch import load_file, save_file; b = load_file(sys.argv[1]); "
        "c = load_file(sys.argv[2]); save_file(b, sys.argv[3], metadata={'format': 'pt'})")


def main() -> None:
    results: dict = {"machine": f"{os.cpu_count()} cores, no GPU", "reps": REPS, "models": {}}
    for name in SHAPES:
        root = _ensure(name)
        out = root / "out-reconstruct"
        m: dict = {"bytes_read": sum(f.stat().st_size for f in root.glob("*/model.safetensors"))}
        m["import_cli"] = repeat([PY, "-c", "import torch, typer, rich.progress, rich.table, huggingface_hub, "
                                  "safetensors.torch, rank1tools.cli, rank1tools.commands.reconstruct"], REPS)
        m["import_copy"] = repeat([PY, "-c", "import torch, safetensors.torch"], REPS)
        m["cli"] = repeat([RANK1, "reconstruct", str(root / "base"), str(root / "checkpoint-100"), "--rank", "1",
                           "--out", str(out), "--force", "--quiet", "--device", "cpu"], REPS)
        m["bytes_written"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        m["copy"] = repeat([PY, "-c", COPY, str(root / "base" / "model.safetensors"),
                            str(root / "checkpoint-100" / "model.safetensors"), str(root / "copy.safetensors")], REPS)
        (root / "copy.safetensors").unlink()
        shutil.rmtree(out)
        for k in list(m):
            if isinstance(m[k], dict):
                m[k].pop("stdout", None)
        results["models"][name] = m
        c, cp = m["cli"], m["copy"]
        print(f"{name}: reconstruct {c['seconds']:.1f} s, peak RSS {c['peak_rss'] / 1e6:.0f} MB "
              f"(+{(c['peak_rss'] - m['import_cli']['peak_rss']) / 1e6:.0f} over imports); copy {cp['seconds']:.1f} s, "
              f"peak RSS {cp['peak_rss'] / 1e6:.0f} MB -> time ratio {c['seconds'] / cp['seconds']:.2f}", file=sys.stderr)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "reconstruct.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
