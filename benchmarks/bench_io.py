"""Benchmark (issue #2): memory while streaming every tensor of a ~1 GB checkpoint.

Each mode runs in its own process so peaks do not mix:
  stream   rank1tools: open_checkpoint + read() every tensor as float32, one at a time
  mmap     safetensors.safe_open + get_tensor().float() every tensor (file pages mapped while open)
  load     safetensors.torch.load_file: the whole state dict, then upcast each tensor (naive)
Also times `rank1 --help` (the CLI must answer without importing torch).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
RESULTS = HERE / "results"
REPS = 3  # medians: these machines are noisy

# ~1.07 GB in bf16: a 535M-parameter Llama shape
SHAPE = dict(vocab=32000, hidden=1536, intermediate=4096, layers=14, heads=12, kv_heads=4, tie=False)


def _child(mode: str, path: str) -> dict:
    sys.path.insert(0, str(HERE))
    from _mem import AnonPeak, peak_rss, rss

    import torch  # noqa: F401  (import baseline measured after heavy imports)
    import safetensors.torch  # noqa: F401
    import rank1tools.io  # noqa: F401

    base_rss = rss()
    tracker = AnonPeak()
    largest = 0
    t0 = time.perf_counter()
    if mode == "stream":
        from rank1tools.io import open_checkpoint

        ckpt = open_checkpoint(path)
        for name in ckpt.names:
            t = ckpt.read(name)
            largest = max(largest, t.numel() * 4)
            tracker.sample()
            del t
    elif mode == "mmap":
        from safetensors import safe_open

        with safe_open(str(Path(path) / "model.safetensors"), "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name).float()
                largest = max(largest, t.numel() * 4)
                tracker.sample()
                del t
    elif mode == "load":
        from safetensors.torch import load_file

        sd = load_file(str(Path(path) / "model.safetensors"))
        for name in list(sd):
            t = sd[name].float()
            largest = max(largest, t.numel() * 4)
            tracker.sample()
            del t
    seconds = time.perf_counter() - t0
    return {"mode": mode, "seconds": seconds, "import_rss": base_rss, "peak_rss": peak_rss(),
            "peak_anon": tracker.peak, "anon_at_start": tracker.start, "largest_fp32_tensor": largest}


def main() -> None:
    if len(sys.argv) == 3:
        print(json.dumps(_child(sys.argv[1], sys.argv[2])))
        return
    from rank1tools.synthetic import LlamaShape

    shape = LlamaShape(**SHAPE)
    model = WORK / "io-1gb"
    if not (model / "model.safetensors").exists():
        print(f"generating {shape.parameter_count / 1e6:.0f}M-parameter bf16 model in {model}", file=sys.stderr)
        # in a child: the generator's own peak must not touch this process
        subprocess.run([sys.executable, "-c", "import sys, torch; from rank1tools.synthetic import LlamaShape, make_base; "
                        f"make_base(sys.argv[1], LlamaShape(**{SHAPE!r}), dtype=torch.bfloat16)", str(model)], check=True)
    size = (model / "model.safetensors").stat().st_size
    runs = {}
    for mode in ("stream", "mmap", "load"):
        reps = []
        for _ in range(REPS):
            out = subprocess.run([sys.executable, __file__, mode, str(model)], capture_output=True, text=True, check=True)
            reps.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = runs[mode] = dict(reps[-1])
        r["all_seconds"] = [x["seconds"] for x in reps]
        r["seconds"] = statistics.median(r["all_seconds"])
        for key in ("peak_rss", "peak_anon"):
            r[key] = max(x[key] for x in reps)
        print(f"{mode:7s} peak RSS {r['peak_rss'] / 1e6:8.0f} MB (+{(r['peak_rss'] - r['import_rss']) / 1e6:.0f} over imports), "
              f"peak anon +{(r['peak_anon'] - r['anon_at_start']) / 1e6:.0f} MB, {r['seconds']:.2f} s", file=sys.stderr)
    rank1 = Path(sys.executable).with_name("rank1")
    help_times = []
    for _ in range(7):
        t0 = time.perf_counter()
        subprocess.run([str(rank1), "--help"], capture_output=True, check=True)
        help_times.append(time.perf_counter() - t0)
    result = {
        "machine": f"{os.cpu_count()} cores", "checkpoint_bytes": size, "parameters": shape.parameter_count,
        "runs": runs, "rank1_help_seconds_median": statistics.median(help_times),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "io.json").write_text(json.dumps(result, indent=2) + "\n")
    s = runs["stream"]
    print(f"checkpoint {size / 1e9:.2f} GB; stream peak RSS above imports "
          f"{(s['peak_rss'] - s['import_rss']) / 1e6:.0f} MB (largest fp32 tensor {s['largest_fp32_tensor'] / 1e6:.0f} MB); "
          f"rank1 --help {result['rank1_help_seconds_median'] * 1000:.0f} ms", file=sys.stderr)


if __name__ == "__main__":
    main()
