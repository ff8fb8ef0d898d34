"""Benchmark (issue #3): `rank1 decompose` against a naive baseline, on generated bf16 pairs.

Models: the 135M Llama shape (30 layers, hidden 576, MLP 1536, tied) and a ~4x larger one.
Each mode runs in its own process; this orchestrator imports no torch, so children start small.
  cli       `rank1 decompose BASE CKPT --out ...` (whole process, imports included)
  import    python importing torch + rank1tools.commands.decompose (the import baseline)
  naive     load both full state dicts (safetensors load_file), torch.linalg.svd of every matrix delta
  tight     read each base/checkpoint tensor + the same top-k SVD in a plain loop (no pipeline)
  inproc    decompose() called in-process, prefetch on and off (timing of the pipeline itself)
`--quick` (or BENCH_QUICK=1): two tiny shapes and one run per mode, to check the script and its report.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _proc import measure, repeat  # noqa: E402
from _report import extra, machine, quick_mode, report, row, runs_of, table, target, work_dir, write_results  # noqa: E402

QUICK = quick_mode()
WORK = work_dir(QUICK)
PY = sys.executable
RANK1 = str(Path(PY).with_name("rank1"))
REPS = 1 if QUICK else 3  # medians of this many runs: these machines are noisy
SHAPES = {
    "135M": "SHAPE_135M",
    "4x": "LlamaShape(vocab=49152, hidden=1152, intermediate=3456, layers=30, heads=9, kv_heads=3, tie=True)",
}
if QUICK:
    SHAPES = {
        "tiny": "LlamaShape(vocab=256, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, tie=True)",
        "tiny-2x": "LlamaShape(vocab=256, hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, tie=True)",
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
    results: dict = {"machine_info": machine(), "models": {}}
    for name in SHAPES:
        root = _ensure(name)
        size = sum(f.stat().st_size for f in root.rglob("*.safetensors"))
        m: dict = {"bytes_on_disk": size}
        # what `rank1 decompose` has imported before it reads the first tensor
        imp = repeat(
            [
                PY,
                "-c",
                "import torch, typer, rich.progress, rich.table, huggingface_hub, safetensors.torch, "
                "rank1tools.cli, rank1tools.commands.decompose",
            ],
            REPS,
        )
        m["import"] = imp
        out = root / "out-cli"
        shutil.rmtree(out, ignore_errors=True)
        cli = repeat(
            [
                RANK1,
                "decompose",
                str(root / "base"),
                str(root / "checkpoint-100"),
                "--out",
                str(out),
                "--quiet",
                "--device",
                "cpu",
                "--force",
            ],
            REPS,
        )
        cli.pop("stdout")
        imp.pop("stdout")
        m["cli"] = cli
        for mode in ("tight", "prefetch", "noprefetch") + (("naive",) if name == next(iter(SHAPES)) else ()):
            m[mode] = _child(mode, root, 1 if mode == "naive" else REPS)
        results["models"][name] = m
        t = m["tight"]
        line = (
            f"{name}: cli {cli['seconds']:.1f} s (imports {imp['seconds']:.1f} s), peak RSS {cli['peak_rss'] / 1e6:.0f} MB "
            f"(+{(cli['peak_rss'] - imp['peak_rss']) / 1e6:.0f} over imports), peak anon +"
            f"{(cli['peak_anon_sampled'] - imp['peak_anon_sampled']) / 1e6:.0f} MB; largest tensor read "
            f"{t['largest_read_fp32'] / 1e6:.1f} MB fp32; tight loop {t['work_seconds']:.1f} s; pipeline "
            f"{m['prefetch']['work_seconds']:.1f} s (no prefetch {m['noprefetch']['work_seconds']:.1f} s)"
        )
        if "naive" in m:
            n = m["naive"]
            line += (
                f"; naive {n['seconds']:.1f} s, peak RSS {n['peak_rss'] / 1e6:.0f} MB -> speed-up "
                f"{n['seconds'] / cli['seconds']:.1f}x, RSS ratio {cli['peak_rss'] / n['peak_rss']:.2f}"
            )
        print(line, file=sys.stderr)
    write_results("decompose", results, summarise, QUICK)


MEASURED = """Generated bf16 base/checkpoint pairs: the 135M Llama shape (30 layers, hidden 576, MLP 1536, tied)
and a 3.9× larger one (hidden 1152, MLP 3456). `rank1 decompose --rank 8` (randomized SVD, CPU) of the 210
matrix modules, as a whole process (imports included), against the naive baseline of the issue: a process
that loads both state dicts with safetensors' `load_file` and takes `torch.linalg.svd` of every matrix update
(run on the 135M pair only: on the larger one it takes minutes). To see what the pipeline adds, the same
reads and top-k SVDs in a tight in-process loop are timed against `decompose()` called in-process, prefetch
on and off (work only, imports excluded). The import baseline is a process importing what `rank1 decompose`
imports before it reads a tensor. Peak RSS is the whole process's (`wait4`); peak anonymous memory
(`RssAnon`, sampled every 5 ms) excludes pages of memory-mapped files."""


def summarise(raw: dict) -> dict:
    rows, mem_rows, targets = [], [], []
    models = raw["models"]
    for name, m in models.items():
        naive = f"{name}: naive `load_file` + `torch.linalg.svd` (whole process)"
        tight = f"{name}: tight loop, read + the same top-k SVDs (work only)"
        rows.append(
            row(
                f"{name}: `rank1 decompose` (whole process)",
                m["cli"]["seconds"],
                runs_of(m["cli"]),
                naive if "naive" in m else None,
                m["cli"]["peak_rss"],
            )
        )
        rows.append(
            row(
                f"{name}: imports alone (torch + CLI)",
                m["import"]["seconds"],
                runs_of(m["import"]),
                None,
                m["import"]["peak_rss"],
            )
        )
        if "naive" in m:
            rows.append(row(naive, m["naive"]["seconds"], runs_of(m["naive"]), None, m["naive"]["peak_rss"]))
        rows.append(
            row(tight, m["tight"]["work_seconds"], runs_of(m["tight"], "work_seconds"), None, m["tight"]["peak_rss"])
        )
        for mode, label in (("prefetch", "prefetch on"), ("noprefetch", "prefetch off")):
            rows.append(
                row(
                    f"{name}: `decompose()` in-process, {label} (work only)",
                    m[mode]["work_seconds"],
                    runs_of(m[mode], "work_seconds"),
                    tight,
                    m[mode]["peak_rss"],
                )
            )
        anon = m["cli"]["peak_anon_sampled"] - m["import"]["peak_anon_sampled"]
        largest = m["tight"]["largest_read_fp32"]
        mem_rows.append(
            [
                name,
                m["bytes_on_disk"] / 1e9,
                (m["cli"]["peak_rss"] - m["import"]["peak_rss"]) / 1e6,
                anon / 1e6,
                largest / 1e6,
                anon / largest,
            ]
        )
        targets.append(
            target(
                f"pipeline_{name}",
                f"{name}: `decompose()` (prefetch on) within 1.5× of the tight read + SVD loop (issue #3)",
                "<=",
                1.5,
                m["prefetch"]["work_seconds"] / m["tight"]["work_seconds"],
                unit="×",
                met_limit="The pipeline adds the float64 norms, canonical signs, certificate checks and "
                "the writes of the tables and factors to the SVDs; on the larger model the SVDs dominate.",
                missed_limit="The pipeline's own work (float64 norms, certificate checks, per-module "
                "writes) is a large share next to SVDs of small matrices.",
            )
        )
        targets.append(
            target(
                f"anon_{name}",
                f"{name}: peak anonymous memory above the import baseline, in units of "
                "the largest float32 tensor read (issue #3: 'a few times the largest tensor', read as "
                "at most 5)",
                "<=",
                5.0,
                anon / largest,
                unit="×",
                met_limit="The working set per module is the float32 base and delta, the next tensor's "
                "raw bytes and a float64 chunk for norms: about 5× the largest tensor.",
                missed_limit="glibc keeps freed blocks of 1–32 MB in its heap (its mmap threshold adapts "
                "upwards), so the peak above imports is several times the ~5-tensor working set plus a "
                "few tens of MB; nothing is held. `MALLOC_MMAP_THRESHOLD_=1048576` brings it to about 5× "
                "at some 13 % more time (a one-off experiment during issue #3). Tensors above 32 MB "
                "(every matrix of an 8B model) are always mmapped by glibc and returned when freed.",
            )
        )
    first = next(iter(models))
    m = models[first]
    extras = [
        extra(
            "Memory",
            [
                "model",
                "size on disk, both files (GB)",
                "peak RSS above imports (MB)",
                "peak anonymous memory above imports (MB)",
                "largest float32 tensor read (MB)",
                "anonymous peak ÷ largest tensor",
            ],
            mem_rows,
        )
    ]
    if "naive" in m:
        cli, naive, imp = m["cli"], m["naive"], m["import"]
        extras.append(
            extra(
                f"Against the naive baseline ({first})",
                ["speed-up, whole process", "speed-up excluding the import time both pay", "peak RSS ÷ naive peak RSS"],
                [
                    [
                        naive["seconds"] / cli["seconds"],
                        (naive["seconds"] - imp["seconds"]) / (cli["seconds"] - imp["seconds"]),
                        cli["peak_rss"] / naive["peak_rss"],
                    ]
                ],
            )
        )
        targets.insert(
            0,
            target(
                f"speedup_{first}",
                f"{first}: speed-up over the naive baseline, whole process, imports included (issue #3)",
                ">=",
                5.0,
                naive["seconds"] / cli["seconds"],
                unit="×",
                met_limit="torch's import, paid by both processes, is a fixed share of the time; the "
                "gap widens with model size (a full SVD costs m·n·min(m, n), the sketch m·n·16 per "
                "power iteration).",
                missed_limit="torch's import, paid by both processes, is a large share of our "
                "whole-process time on few cores; the work alone is faster than the target (see "
                "'speed-up excluding the import time'), and the gap widens with model size (a full "
                "SVD costs m·n·min(m, n), the sketch m·n·16 per power iteration).",
            ),
        )
        targets.insert(
            1,
            target(
                f"rss_ratio_{first}",
                f"{first}: peak RSS at most half the naive baseline's (issue #3)",
                "<=",
                0.5,
                cli["peak_rss"] / naive["peak_rss"],
                unit="×",
                met_limit="The baseline holds both state dicts; decompose holds about one module's "
                "tensors, so the ratio falls as models grow.",
                missed_limit="On small models the import baseline (torch) dominates both peaks.",
            ),
        )
    notes = [
        "Memory does not grow with the number of layers: it is set by the largest tensor (compare the two "
        "models in the memory table).",
        "Prefetch (reading the next tensor in a thread while the current one is decomposed) shows no consistent "
        "effect here (compare prefetch on and off; one-off cold-cache runs during issue #3 showed none either): "
        "the SVD keeps both cores busy and local reads are a small share of the time. It stays on; it costs one "
        "tensor of memory and is meant for slow storage (network file systems, Hub shards), not measured here.",
        "A BLAS cliff found on the way (issue #3): MKL's thin product Mᵀ·Q is about 12× slower with 11 columns "
        "or fewer than with 12, so the sketch always has at least 16 columns.",
    ]
    return report(
        raw,
        name="decompose",
        title="`rank1 decompose`",
        issue="#3",
        measured=MEASURED,
        table=table(rows, memory="peak RSS, whole process"),
        tables=extras,
        targets=targets,
        notes=notes,
    )


if __name__ == "__main__":
    main()
