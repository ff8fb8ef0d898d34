"""Benchmark (issue #2): memory while streaming every tensor of a ~1 GB checkpoint.

Each mode runs in its own process so peaks do not mix:
  stream   rank1tools: open_checkpoint + read() every tensor as float32, one at a time
  mmap     safetensors.safe_open + get_tensor().float() every tensor (file pages mapped while open)
  load     safetensors.torch.load_file: the whole state dict, then upcast each tensor (naive)
Also times `rank1 --help` (the CLI must answer without importing torch).
`--quick` (or BENCH_QUICK=1): a tiny model and one run per mode, to check the script and its report.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _report import extra, machine, quick_mode, report, row, runs_of, table, target, work_dir, write_results  # noqa: E402

QUICK = quick_mode()
WORK = work_dir(QUICK)
REPS = 1 if QUICK else 3  # medians: these machines are noisy
HELP_REPS = 2 if QUICK else 7

# 0.90 GB in bf16: a 451M-parameter Llama shape
SHAPE = dict(vocab=32000, hidden=1536, intermediate=4096, layers=14, heads=12, kv_heads=4, tie=False)
if QUICK:
    SHAPE = dict(vocab=512, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, tie=False)


def _child(mode: str, path: str) -> dict:
    sys.path.insert(0, str(HERE))
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401  (import baseline measured after heavy imports)
    from _mem import AnonPeak, peak_rss, rss

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
    return {
        "mode": mode,
        "seconds": seconds,
        "import_rss": base_rss,
        "peak_rss": peak_rss(),
        "peak_anon": tracker.peak,
        "anon_at_start": tracker.start,
        "largest_fp32_tensor": largest,
    }


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] in ("stream", "mmap", "load"):
        print(json.dumps(_child(sys.argv[1], sys.argv[2])))
        return
    from rank1tools.synthetic import LlamaShape

    shape = LlamaShape(**SHAPE)
    model = WORK / ("io-tiny" if QUICK else "io-1gb")
    if not (model / "model.safetensors").exists():
        print(f"generating {shape.parameter_count / 1e6:.0f}M-parameter bf16 model in {model}", file=sys.stderr)
        # in a child: the generator's own peak must not touch this process
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys, torch; from rank1tools.synthetic import LlamaShape, make_base; "
                f"make_base(sys.argv[1], LlamaShape(**{SHAPE!r}), dtype=torch.bfloat16)",
                str(model),
            ],
            check=True,
        )
    size = (model / "model.safetensors").stat().st_size
    info = machine()
    runs = {}
    for mode in ("stream", "mmap", "load"):
        reps = []
        for _ in range(REPS):
            out = subprocess.run(
                [sys.executable, __file__, mode, str(model)], capture_output=True, text=True, check=True
            )
            reps.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = runs[mode] = dict(reps[-1])
        r["all_seconds"] = [x["seconds"] for x in reps]
        r["seconds"] = statistics.median(r["all_seconds"])
        for key in ("peak_rss", "peak_anon"):
            r[key] = max(x[key] for x in reps)
        print(
            f"{mode:7s} peak RSS {r['peak_rss'] / 1e6:8.0f} MB (+{(r['peak_rss'] - r['import_rss']) / 1e6:.0f} over imports), "
            f"peak anon +{(r['peak_anon'] - r['anon_at_start']) / 1e6:.0f} MB, {r['seconds']:.2f} s",
            file=sys.stderr,
        )
    rank1 = Path(sys.executable).with_name("rank1")
    help_times = []
    for _ in range(HELP_REPS):
        t0 = time.perf_counter()
        subprocess.run([str(rank1), "--help"], capture_output=True, check=True)
        help_times.append(time.perf_counter() - t0)
    result = {
        "machine_info": info,
        "checkpoint_bytes": size,
        "parameters": shape.parameter_count,
        "runs": runs,
        "rank1_help_seconds_median": statistics.median(help_times),
        "rank1_help_runs": len(help_times),
    }
    write_results("io", result, summarise, QUICK)
    s = runs["stream"]
    print(
        f"checkpoint {size / 1e9:.2f} GB; stream peak RSS above imports "
        f"{(s['peak_rss'] - s['import_rss']) / 1e6:.0f} MB (largest fp32 tensor {s['largest_fp32_tensor'] / 1e6:.0f} MB); "
        f"rank1 --help {result['rank1_help_seconds_median'] * 1000:.0f} ms",
        file=sys.stderr,
    )


MEASURED = """A generated bf16 Llama-shaped model in one `model.safetensors` (vocab 32000, hidden 1536, MLP 4096,
14 layers, untied; the largest tensor is the 32000 × 1536 embedding). Every tensor is read and upcast to
float32, one at a time, in three ways, each in its own process: rank1tools' streaming reader, safetensors
through its memory map, and safetensors' `load_file` of the whole state dict (the naive way). Peak RSS is
the process's `VmHWM` above its RSS after the imports; anonymous memory (`RssAnon`, which excludes pages of
the memory-mapped file) is sampled after every tensor. `rank1 --help` is timed as a whole process: the CLI
answers without importing torch."""

LOAD = "safetensors `load_file()` (naive)"
CASES = {
    "stream": "rank1tools `open_checkpoint().read()`",
    "mmap": "safetensors `safe_open().get_tensor().float()` (mmap)",
    "load": LOAD,
}


def summarise(raw: dict) -> dict:
    runs, size = raw["runs"], raw["checkpoint_bytes"]
    above = {m: r["peak_rss"] - r["import_rss"] for m, r in runs.items()}
    rows = [row(CASES[m], r["seconds"], runs_of(r), None if m == "load" else LOAD, above[m]) for m, r in runs.items()]
    rows.append(row("`rank1 --help` (whole process)", raw["rank1_help_seconds_median"], raw.get("rank1_help_runs", 7)))
    s = runs["stream"]
    anon = extra(
        "Memory by mode",
        [
            "mode",
            "peak RSS above imports (MB)",
            "peak anonymous memory above start (MB)",
            "largest float32 tensor (MB)",
        ],
        [
            [CASES[m], above[m] / 1e6, (r["peak_anon"] - r["anon_at_start"]) / 1e6, r["largest_fp32_tensor"] / 1e6]
            for m, r in runs.items()
        ],
    )
    setup = extra("Checkpoint", ["parameters (M)", "file size (GB)"], [[raw["parameters"] / 1e6, size / 1e9]])
    targets = [
        target(
            "stream_vs_checkpoint",
            "rank1tools' peak RSS above imports, as a share of the checkpoint size "
            "(issue #2: 'far below the checkpoint size', read as at most half)",
            "<=",
            0.5,
            above["stream"] / size,
            unit="×",
            met_limit="The peak is one float32 tensor plus its bf16 source, whatever the checkpoint size; on a larger "
            "checkpoint the share only falls. Through the memory map the whole file becomes resident instead (on a "
            "16 GB checkpoint, 16 GB of RSS).",
            missed_limit="The streaming reader should hold one float32 tensor plus its source: a larger share means it "
            "holds more, or that the checkpoint is so small that one tensor is a large part of it (quick runs).",
        ),
        target(
            "stream_vs_tensor",
            "rank1tools' peak RSS above imports, in units of the largest float32 tensor (issue #2: "
            "'around one tensor, not one model', read as at most 2)",
            "<=",
            2.0,
            above["stream"] / s["largest_fp32_tensor"],
            unit="×",
            met_limit="One float32 tensor plus its bf16 source (1.5 tensors) is the floor of an upcasting reader; "
            "the price is one copy out of the page cache, slower than mmap's zero copy.",
            missed_limit="More than one tensor is resident at the peak: the reader or the allocator keeps a second "
            "tensor; or, on tiny models, the allocator's arenas outweigh the tensors (quick runs).",
        ),
    ]
    return report(
        raw,
        name="io",
        title="Streaming reads",
        issue="#2",
        measured=MEASURED,
        table=table(rows, memory="peak RSS above imports"),
        tables=[anon, setup],
        targets=targets,
        notes=[
            "rank1tools' peak is set by the largest tensor, not by the checkpoint: the same reader on a "
            "16 GB checkpoint peaks at the same figure plus the difference in largest tensor.",
            "The copy out of the page cache is what the reader pays for that: compare its time with "
            "the memory-mapped read's in the table.",
            "Option errors and `--out` refusals answer as fast as `--help`: they are checked before "
            "torch is imported (tested in `tests/test_cli.py`).",
        ],
    )


if __name__ == "__main__":
    main()
