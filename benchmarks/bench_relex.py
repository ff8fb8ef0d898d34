"""Benchmark (issue #10): `rank1 extrapolate --method relex` (streaming, Gram matrix) against the
materialising approach of the RELEX reference code, and `--method linear --mode lstsq` against
reading the window once.

Run: SmolLM-135M's tensor shapes (vocab 49152, hidden 576, MLP 1536, 9 heads, 3 KV heads, tied
embeddings) with 6 of its 30 layers (49.5M parameters: the dense SVD of all 30 layers at T = 32
alone would take about ten minutes of this 2-core machine; every per-tensor figure, peak memory
included, is that of the full model, whose largest tensor is the embedding), bf16 base and 32 bf16
checkpoints at steps 10, 20, ..., 320 (planted rank-1 drift + noise); T = 4, 16, 32 are the first
T checkpoints (--history-until). Every mode runs in its own process (this orchestrator
imports no torch); the target is step 2·t_T, rank 1, every tensor extrapolated.
  relex    `rank1 extrapolate BASE --run RUN --method relex ...` (whole process, imports included)
  dense    the reference approach: per tensor, read the T checkpoints whole, materialise the
           T × d float32 update matrix, torch.linalg.svd of it, fit the coefficient line, write
           the same output (same reader and writer as rank1: only the approach differs)
  lstsq    `rank1 extrapolate ... --method linear --mode lstsq` at T = 32
  read     reading the window once (base + T checkpoints, every tensor, rank1's chunked reader with
           the commands' chunk size, nothing computed)
  import   python importing what each of them imports before work starts (the baseline)
Peaks are whole-process peak RSS (wait4) minus the import baseline's. One run each (the T = 32
dense SVD alone takes minutes of this machine); the window's files are read once beforehand
so that every mode starts from a warm page cache.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _proc import measure  # noqa: E402

WORK = HERE / "work" / "relex-135M-6layers"
RESULTS = HERE / "results"
PY = sys.executable
RANK1 = str(Path(PY).with_name("rank1"))
STEPS = [10 * (i + 1) for i in range(32)]
TS = (4, 16, 32)

GEN = """
import sys, torch
from pathlib import Path
from safetensors.torch import save_file
from rank1tools.synthetic import LlamaShape, base_tensor, update_tensor, write_model
shape = LlamaShape(vocab=49152, hidden=576, intermediate=1536, layers=6, heads=9, kv_heads=3, tie=True)
root, steps = Path(sys.argv[1]), [int(s) for s in sys.argv[2].split(",")]
bf = torch.bfloat16
names = shape.shapes()
base = {n: base_tensor(n, s, 0).to(bf) for n, s in names.items()}
write_model(root / "base", base, shape.config(bf))
# the planted direction once per tensor (update_tensor at t = t_max without noise), then per step
# theta_t = theta_0 + (t/t_max) direction + sqrt(t/t_max) noise N_t
direction = {n: update_tensor(n, b.float(), 1, 1, 0, noise=0.0) for n, b in base.items()}
g = torch.Generator().manual_seed(1)
for s in steps:
    f = s / steps[-1]
    t = {n: (b.float() + f * direction[n] + f ** 0.5 * 2e-5 * torch.randn(b.shape, generator=g)).to(bf)
         for n, b in base.items()}
    write_model(root / "run" / f"checkpoint-{s}", t, shape.config(bf))
"""

DENSE = """
import sys, time
t0 = time.perf_counter()
import torch
from rank1tools.io import open_checkpoint
from rank1tools.io.writer import ShardedWriter, TensorSpec
import_s = time.perf_counter() - t0
root, T, target, out = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
steps = [10 * (i + 1) for i in range(T)]
base = open_checkpoint(root + "/base")
cks = [open_checkpoint(f"{root}/run/checkpoint-{s}") for s in steps]
specs = [TensorSpec(n, e.shape, e.torch_dtype) for n, e in base.entries.items()]
t = torch.tensor(steps, dtype=torch.float64)
tc = t - t.mean()
with ShardedWriter(out, specs, force=True) as w:
    for name in base.entries:
        b = base.read(name)
        M = torch.stack([c.read(name).sub_(b).reshape(-1) for c in cks])  # T x d float32, materialised
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        C = (U[:, 0] * S[0]).double()  # the rank-1 coefficient series
        slope = float(tc @ (C - C.mean())) / float(tc @ tc)
        c = float(C.mean()) + slope * (target - float(t.mean()))
        w.write(name, (b.double() + c * Vh[0].double().reshape(b.shape)))
        del M, U, S, Vh
    w.commit(copy_from=base, provenance={"command": "dense-reference"})
print(import_s)
"""

READ = """
import sys
import torch
from rank1tools.io import open_checkpoint
from rank1tools.commands.history_extrapolation import HISTORY_BUDGET
from rank1tools.io.run_inputs import chunk_elements, trajectory_chunks
root, T = sys.argv[1], int(sys.argv[2])
base = open_checkpoint(root + "/base")
cks = [open_checkpoint(f"{root}/run/checkpoint-{10 * (i + 1)}") for i in range(T)]
n = 0
for name in base.entries:
    for ch in trajectory_chunks(base, cks, name, chunk=chunk_elements(T, HISTORY_BUDGET)):  # the commands' chunks
        n += ch.values.numel()
print(n)
"""

IMPORT_CLI = ("import torch, typer, rich.progress, rich.table, huggingface_hub, safetensors.torch, rank1tools.cli, "
              "rank1tools.commands.extrapolate_relex, rank1tools.commands.extrapolate_linear")
IMPORT_DENSE = "import torch, rank1tools.io, rank1tools.io.writer"


def _ensure() -> Path:
    if not (WORK / "run" / f"checkpoint-{STEPS[-1]}" / "model.safetensors").exists():
        shutil.rmtree(WORK, ignore_errors=True)
        print(f"generating the 135M-shaped run (6 layers, {len(STEPS)} bf16 checkpoints) in {WORK}", file=sys.stderr)
        r = measure([PY, "-c", GEN, str(WORK), ",".join(map(str, STEPS))])
        print(f"  generated in {r['seconds']:.0f} s", file=sys.stderr)
    return WORK


def _warm(T: int) -> None:
    """Read the window's files once (page cache), so that no mode pays the disk for another."""
    for f in [WORK / "base" / "model.safetensors", *(WORK / "run" / f"checkpoint-{s}" / "model.safetensors"
                                                     for s in STEPS[:T])]:
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def _run(cmd: list[str], T: int) -> dict:
    _warm(T)
    r = measure(cmd)
    r.pop("stdout", None)
    return r


def _cli(method: str, T: int, out: Path, *extra: str) -> list[str]:
    return [RANK1, "extrapolate", str(WORK / "base"), "--run", str(WORK / "run"), "--method", method,
            "--history-until", str(STEPS[T - 1]), "--target-step", str(2 * STEPS[T - 1]), "--out", str(out),
            "--quiet", "--device", "cpu", "--force", *extra]


def main() -> None:
    _ensure()
    out = WORK / "out"
    results: dict = {"machine": f"{os.cpu_count()} cores, no GPU", "shape": "SmolLM-135M shapes, 6 of 30 layers",
                     "dtype": "bfloat16 base and checkpoints", "steps": f"{STEPS[0]}..{STEPS[-1]} every 10",
                     "bytes_per_checkpoint": (WORK / "run" / "checkpoint-10" / "model.safetensors").stat().st_size,
                     "import_cli": measure([PY, "-c", IMPORT_CLI]), "import_dense": measure([PY, "-c", IMPORT_DENSE]),
                     "T": {}}
    for k in ("import_cli", "import_dense"):
        results[k].pop("stdout", None)
    base_cli, base_dense = results["import_cli"]["peak_rss"], results["import_dense"]["peak_rss"]
    for T in TS:
        m: dict = {"relex": _run(_cli("relex", T, out), T)}
        m["dense"] = _run([PY, "-c", DENSE, str(WORK), str(T), str(2 * STEPS[T - 1]), str(WORK / "out-dense")], T)
        m["relex"]["peak_above_imports"] = m["relex"]["peak_rss"] - base_cli
        m["dense"]["peak_above_imports"] = m["dense"]["peak_rss"] - base_dense
        if T == TS[-1]:
            m["lstsq"] = _run(_cli("linear", T, out, "--mode", "lstsq"), T)
            m["lstsq"]["peak_above_imports"] = m["lstsq"]["peak_rss"] - base_cli
            m["read"] = _run([PY, "-c", READ, str(WORK), str(T)], T)
            m["read"]["peak_above_imports"] = m["read"]["peak_rss"] - base_dense
        results["T"][str(T)] = m
        r, d = m["relex"], m["dense"]
        print(f"T={T:>2}: relex {r['seconds']:6.1f} s, +{r['peak_above_imports'] / 1e6:6.0f} MB | dense SVD "
              f"{d['seconds']:6.1f} s, +{d['peak_above_imports'] / 1e6:6.0f} MB | time ratio "
              f"{r['seconds'] / d['seconds']:.2f}, memory ratio {d['peak_above_imports'] / r['peak_above_imports']:.1f}x",
              file=sys.stderr)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(WORK / "out-dense", ignore_errors=True)
    t4, t32 = results["T"]["4"]["relex"], results["T"]["32"]
    results["targets"] = {
        "relex_peak_T32_over_T4": t32["relex"]["peak_above_imports"] / t4["peak_above_imports"],
        "dense_over_relex_peak_T32": t32["dense"]["peak_above_imports"] / t32["relex"]["peak_above_imports"],
        "relex_over_dense_time_T32": t32["relex"]["seconds"] / t32["dense"]["seconds"],
        "lstsq_over_read_time_T32": t32["lstsq"]["seconds"] / t32["read"]["seconds"],
    }
    tg = results["targets"]
    print(f"relex peak T=32 / T=4: {tg['relex_peak_T32_over_T4']:.2f} (target <= 1.5); dense / relex peak at T=32: "
          f"{tg['dense_over_relex_peak_T32']:.1f}x (target >= 10); relex / dense time at T=32: "
          f"{tg['relex_over_dense_time_T32']:.2f} (target <= 1.5)\nlstsq T=32 {t32['lstsq']['seconds']:.1f} s, "
          f"+{t32['lstsq']['peak_above_imports'] / 1e6:.0f} MB; reading the window once {t32['read']['seconds']:.1f} s "
          f"-> {tg['lstsq_over_read_time_T32']:.2f}x", file=sys.stderr)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "relex.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
