"""Benchmark (issue #3): `rank1 decompose` against a naive baseline, on generated bf16 pairs.

Models: the 135M Llama shape (30 layers, hidden 576, MLP 1536, tied) and a ~4x larger one.
Each mode runs in its own process; this orchestrator imports no torch, so children start small.
  cli       `rank1 decompose BASE CKPT --out ...` (whole process, imports included)
  import    python importing torch + rank1tools.commands.decompose (the import baseline)
  naive     load both full state dicts (safetensors load_file), torch.linalg.svd of every matrix delta
  tight     read each base/checkpoint tensor + the same top-k SVD in a plain loop (no pipeline)
  inproc    decompose() called in-process, prefetch on and off (timing of the pipeline itself)
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _proc import measure, repeat  # noqa: E402

WORK = HERE / "work"
RESULTS = HERE / "results"
PY = sys.executable
RANK1 = str(Path(PY).with_name("rank1"))
REPS = 3  # medians of this many runs: these machines are noisy
SHAPES = {
    "135M": "SHAPE_135M",
    "4x": "LlamaShape(vocab=49152, hidden=1152, intermediate=3456, layers=30, heads=9, kv_heads=3, tie=True)",
}

GEN = """
import sys, torch
from pathlib import Path
from rank1tools.synthetic import LlamaShape, SHAPE_135M, make_base, checkpoint_tensors, write_model
shape = {shape}
root = Path(sys.argv[1])
make_base(root / "base", shape, dtype=torch.bfloat16)
write_model(root / "checkpoint-100", checkpoint_tensors(shape, 100, 100, torch.bfloat16, torch.bfloat16,
            rank1_scale=0.05, noise=1e-3), shape.config(torch.bfloat16))
"""

CHILD = """
import json, sys, time
t0 = time.perf_counter()
import torch
from rank1tools.commands.decompose import DecomposeOptions, decompose
from rank1tools.io import open_checkpoint
from rank1tools.math.spectrum import delta
from rank1tools.math.svd import topk_svd
from rank1tools.modules import select_tensors
import_s = time.perf_counter() - t0
mode, root = sys.argv[1], sys.argv[2]
res = {"import_seconds": import_s}
base, ck = open_checkpoint(root + "/base"), open_checkpoint(root + "/checkpoint-100")
mods = select_tensors({n: e.shape for n, e in base.entries.items()})
t0 = time.perf_counter()
if mode == "naive":
    from safetensors.torch import load_file
    b = load_file(root + "/base/model.safetensors"); c = load_file(root + "/checkpoint-100/model.safetensors")
    for n in mods:
        torch.linalg.svd(c[n].float() - b[n].float(), full_matrices=False)
elif mode == "tight":
    for n in mods:
        topk_svd(delta(ck.read(n), base.read(n)), 8)
elif mode in ("prefetch", "noprefetch"):
    decompose(root + "/base", [root + "/checkpoint-100"], root + "/out-" + mode, force=True,
              options=DecomposeOptions(rank=8, device="cpu", prefetch=mode == "prefetch"))
res["work_seconds"] = time.perf_counter() - t0
res["largest_read_fp32"] = max(base.entry(n).numel for n in mods) * 4
res["modules"] = len(mods)
print(json.dumps(res))
"""


def _ensure(name: str) -> Path:
    root = WORK / f"decompose-{name}"
    if not (root / "checkpoint-100" / "model.safetensors").exists():
        shutil.rmtree(root, ignore_errors=True)
        print(f"generating the {name} pair in {root}", file=sys.stderr)
        measure([PY, "-c", GEN.format(shape=SHAPES[name]), str(root)])
    return root


def _child(mode: str, root: Path, reps: int) -> dict:
    import statistics

    runs = []
    for _ in range(reps):
        r = measure([PY, "-c", CHILD, mode, str(root)])
        r.update(json.loads(r.pop("stdout").strip().splitlines()[-1]))
        runs.append(r)
    out = dict(runs[-1])
    for key in ("seconds", "work_seconds"):
        out[key] = statistics.median(r[key] for r in runs)
        out["all_" + key] = [r[key] for r in runs]
    out["peak_rss"] = max(r["peak_rss"] for r in runs)
    return out


def main() -> None:
    results: dict = {"machine": f"{os.cpu_count()} cores, no GPU", "models": {}}
    for name in SHAPES:
        root = _ensure(name)
        size = sum(f.stat().st_size for f in root.rglob("*.safetensors"))
        m: dict = {"bytes_on_disk": size}
        # what `rank1 decompose` has imported before it reads the first tensor
        imp = repeat([PY, "-c", "import torch, typer, rich.progress, rich.table, huggingface_hub, safetensors.torch, "
                       "rank1tools.cli, rank1tools.commands.decompose"], REPS)
        m["import"] = imp
        out = root / "out-cli"
        shutil.rmtree(out, ignore_errors=True)
        cli = repeat([RANK1, "decompose", str(root / "base"), str(root / "checkpoint-100"), "--out", str(out),
                      "--quiet", "--device", "cpu", "--force"], REPS)
        cli.pop("stdout")
        imp.pop("stdout")
        m["cli"] = cli
        for mode in ("tight", "prefetch", "noprefetch") + (("naive",) if name == "135M" else ()):
            m[mode] = _child(mode, root, 1 if mode == "naive" else REPS)
        results["models"][name] = m
        t = m["tight"]
        line = (f"{name}: cli {cli['seconds']:.1f} s (imports {imp['seconds']:.1f} s), peak RSS {cli['peak_rss'] / 1e6:.0f} MB "
                f"(+{(cli['peak_rss'] - imp['peak_rss']) / 1e6:.0f} over imports), peak anon +"
                f"{(cli['peak_anon_sampled'] - imp['peak_anon_sampled']) / 1e6:.0f} MB; largest tensor read "
                f"{t['largest_read_fp32'] / 1e6:.1f} MB fp32; tight loop {t['work_seconds']:.1f} s; pipeline "
                f"{m['prefetch']['work_seconds']:.1f} s (no prefetch {m['noprefetch']['work_seconds']:.1f} s)")
        if "naive" in m:
            n = m["naive"]
            line += (f"; naive {n['seconds']:.1f} s, peak RSS {n['peak_rss'] / 1e6:.0f} MB -> speed-up "
                     f"{n['seconds'] / cli['seconds']:.1f}x, RSS ratio {cli['peak_rss'] / n['peak_rss']:.2f}")
        print(line, file=sys.stderr)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "decompose.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
