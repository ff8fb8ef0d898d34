"""Benchmark (issue #23): `rank1 export-lora --rank K` against `rank1 reconstruct --rank K` from the
same factor store.

Pair: the generated bf16 135M-shaped base/checkpoint of bench_decompose (`--quick`: its tiny pair).
A factor store of rank 16 is made once with `rank1 decompose` (not timed). Then, as whole processes
(imports included), for K = 1 and 16:
  export-lora   `rank1 export-lora BASE CKPT --rank K --factors STORE --out ...`: reads the factors,
                compares the tensors outside the targets with the base (what the adapter leaves out)
                and writes the adapter
  reconstruct   `rank1 reconstruct BASE CKPT --rank K --factors STORE --dtype float32 --out ...`:
                the same update merged into a full float32 checkpoint
and export-lora without a store (its own randomized SVD per module) at K = 1.
Medians of REPS runs; peaks are the largest seen.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _proc import measure, repeat  # noqa: E402
from _report import extra, machine, quick_mode, report, row, runs_of, table, target, write_results  # noqa: E402
from bench_decompose import _ensure  # noqa: E402

QUICK = quick_mode()
PY = sys.executable
RANK1 = str(Path(PY).with_name("rank1"))
REPS = 1 if QUICK else 3
MODEL = "tiny" if QUICK else "135M"
RANKS = (1, 16)
STORE_RANK = 16


def _cmd(command: str, root: Path, out: Path, k: int, factors: bool) -> list[str]:
    cmd = [RANK1, command, str(root / "base"), str(root / "checkpoint-100"), "--rank", str(k), "--out", str(out)]
    cmd += ["--factors", str(root / "spectra-16")] if factors else []
    cmd += ["--dtype", "float32"] if command == "reconstruct" else ["--json"]
    return [*cmd, "--force", "--quiet", "--device", "cpu"]


def main() -> None:
    root = _ensure(MODEL)
    store = root / "spectra-16"
    if not (store / "manifest.json").exists():
        measure(
            [RANK1, "decompose", str(root / "base"), str(root / "checkpoint-100"), "--rank", str(STORE_RANK)]
            + ["--out", str(store), "--force", "--quiet", "--device", "cpu"]
        )
    results: dict = {"machine_info": machine(), "reps": REPS, "model": MODEL, "ranks": list(RANKS), "runs": {}}
    checkpoint_bytes = (root / "checkpoint-100" / "model.safetensors").stat().st_size
    results["checkpoint_file_bytes"] = checkpoint_bytes
    for k in RANKS:
        for command in ("export-lora", "reconstruct"):
            out = root / f"out-{command}-{k}"
            r = repeat(_cmd(command, root, out, k, factors=True), REPS)
            if command == "export-lora":
                r["result"] = json.loads(r["stdout"])
            r.pop("stdout", None)
            r["bytes_written"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
            shutil.rmtree(out)
            results["runs"][f"{command}-{k}"] = r
    out = root / "out-export-lora-direct"
    r = repeat(_cmd("export-lora", root, out, 1, factors=False), REPS)
    r.pop("stdout", None)
    shutil.rmtree(out)
    results["runs"]["export-lora-direct-1"] = r
    for key, r in results["runs"].items():
        print(f"{key}: {r['seconds']:.1f} s, peak RSS {r['peak_rss'] / 1e6:.0f} MB", file=sys.stderr)
    write_results("export_lora", results, summarise, QUICK)


MEASURED = """The generated bf16 base/checkpoint pair of the decompose benchmark (the 135M Llama shape: 30
layers, 210 matrix modules) and a rank-16 factor store of it made by `rank1 decompose` (not timed).
`rank1 export-lora BASE CKPT --rank K --factors STORE` reads each module's factors, compares every other
tensor of the checkpoint with the base's (to report what the adapter leaves out) and writes the float32
adapter; `rank1 reconstruct BASE CKPT --rank K --factors STORE --dtype float32` merges the same update into a
full float32 checkpoint. Both as whole processes, imports included; peak RSS is the whole process's (`wait4`)."""


def summarise(raw: dict) -> dict:
    runs, model = raw["runs"], raw["model"]
    rows, sizes = [], []
    for k in raw["ranks"]:
        rec = f"{model}: `reconstruct --rank {k} --factors` (whole process)"
        e, c = runs[f"export-lora-{k}"], runs[f"reconstruct-{k}"]
        rows.append(
            row(
                f"{model}: `export-lora --rank {k} --factors` (whole process)",
                e["seconds"],
                runs_of(e),
                rec,
                e["peak_rss"],
            )
        )
        rows.append(row(rec, c["seconds"], runs_of(c), None, c["peak_rss"]))
        res = e["result"]
        sizes.append(
            [k, res["adapter_bytes"] / 1e6, c["bytes_written"] / 1e6, res["checkpoint_bytes"] / 1e6, res["size_ratio"]]
        )
    d = runs["export-lora-direct-1"]
    rows.append(
        row(
            f"{model}: `export-lora --rank 1` without a store (randomized SVD per module)",
            d["seconds"],
            runs_of(d),
            f"{model}: `export-lora --rank 1 --factors` (whole process)",
            d["peak_rss"],
        )
    )
    targets = [
        target(
            f"time_rank{k}",
            f"{model}: `export-lora --rank {k}` no slower than `reconstruct --rank {k}` from the same factor store",
            "<=",
            1.0,
            runs[f"export-lora-{k}"]["seconds"] / runs[f"reconstruct-{k}"]["seconds"],
            unit="×",
            met_limit="Both read the base and the checkpoint's tensors outside the targets; export-lora writes "
            "k·(m+n) numbers per module instead of the m·n of a merged checkpoint, and computes no rounding report.",
            missed_limit="export-lora reads the checkpoint's tensors outside the targets to report what the "
            "adapter leaves out, which reconstruct (copying the base's) does not.",
        )
        for k in raw["ranks"]
    ]
    return report(
        raw,
        name="export_lora",
        title="`rank1 export-lora`",
        issue="#23",
        measured=MEASURED,
        table=table(rows, memory="peak RSS, whole process"),
        tables=[
            extra(
                "Adapter size",
                [
                    "rank",
                    "adapter (MB)",
                    "reconstructed float32 checkpoint (MB)",
                    "checkpoint tensors (MB)",
                    "adapter / checkpoint",
                ],
                sizes,
            )
        ],
        targets=targets,
        notes=[
            "The machine was shared (load average 6 to 8 on its 2 cores): the runs of one case spread up to "
            "5x (every run's seconds are in the results file).",
            "At rank 16 most of export-lora's time (and part of reconstruct's) is the norm-matching factor's "
            "float64 k x k Gram products (math/reconstruct.update_norm), measured in a profile on that loaded "
            "machine at 24 ms per module with torch's 2 threads against 0.25 ms with 1 thread: thread "
            "oversubscription, not arithmetic.",
        ],
    )


if __name__ == "__main__":
    main()
