"""Benchmark (issue #9): `rank1 fit-pls` with leave-one-out against a naive loop of sklearn refits.

A generated factor store shaped like an 8B run: 32 layers x 7 modules with Llama-3-8B shapes
(d_out up to 14336), 50 checkpoints, k = 1; trajectories are a line in the metric plus noise.
  cli    `rank1 fit-pls STORE --metrics M --out ...` (whole process, imports included; tables and
         fit store written; no plots, so only the fitting is compared)
  naive  the same per-module inputs, fitted with sklearn PLSRegression(1, scale=True): in-sample,
         one refit per left-out checkpoint, and the step fit (whole process)
  import python importing what the CLI imports before work starts
Medians of REPS runs for the CLI (one naive run: it is the slow side). Both report every module's
R²s; the largest difference between them is recorded (target: 1e-9).
`--quick` (or BENCH_QUICK=1): 2 layers of small shapes, 8 checkpoints, one run, to check the script and its report.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _proc import measure, repeat  # noqa: E402
from _report import extra, machine, quick_mode, report, row, runs_of, table, target, work_dir, write_results  # noqa: E402

QUICK = quick_mode()
WORK = work_dir(QUICK) / ("fit-pls-quick" if QUICK else "fit-pls-8B")
PY = sys.executable
RANK1 = str(Path(PY).with_name("rank1"))
REPS = 1 if QUICK else 3
LAYERS, T = (2, 8) if QUICK else (32, 50)
SHAPES = {
    "q": (4096, 4096),
    "k": (1024, 4096),
    "v": (1024, 4096),
    "o": (4096, 4096),
    "gate": (14336, 4096),
    "up": (14336, 4096),
    "down": (4096, 14336),
}
if QUICK:
    SHAPES = {t: (m // 64, n // 64) for t, (m, n) in SHAPES.items()}

NAIVE = r"""
import json, sys
import numpy as np
from sklearn.cross_decomposition import PLSRegression
from rank1tools.io.factor_store import FactorStore
from rank1tools.math.signs import align_to_next

store = FactorStore(sys.argv[1])
metric = {int(k): v for k, v in json.load(open(sys.argv[2])).items()}
steps = store.steps
y = np.array([metric[s] for s in steps])
def r2(yt, yp):
    return 1 - ((yt - yp) ** 2).sum() / ((yt - yt.mean()) ** 2).sum()
def fit(X, t):
    return PLSRegression(n_components=1, scale=True).fit(X, t)
out = {}
for name in store.modules:
    f = store.load(name)
    U, V = align_to_next(f["U"][:, :, 0], f["V"][:, :, 0])
    X = (f["S"][:, 0:1].double() * U.double()).numpy()
    ins = r2(y, fit(X, y).predict(X).ravel())
    held = np.array([fit(np.delete(X, i, 0), np.delete(y, i)).predict(X[i:i + 1]).ravel()[0] for i in range(len(y))])
    st = np.array(steps, float)
    out[name] = [ins, r2(y, held), r2(st, fit(X, st).predict(X).ravel())]
json.dump(out, open(sys.argv[3], "w"))
"""


def _ensure() -> Path:
    store = WORK / "store"
    if (store / "manifest.json").is_file():
        return store
    from rank1tools.synthetic import write_factor_store

    shutil.rmtree(WORK, ignore_errors=True)
    rng = np.random.default_rng(0)
    steps = list(range(10, 10 * T + 1, 10))
    acc = np.sort(rng.uniform(0.2, 0.7, T))
    modules = {}
    for layer in range(LAYERS):
        for t, (m, n) in SHAPES.items():
            a, b = rng.standard_normal(m), rng.standard_normal(m)
            X = a[None] * 0.1 + acc[:, None] * b[None] + 0.05 * rng.standard_normal((T, m))
            S = np.linalg.norm(X, axis=1)
            V = rng.standard_normal((T, n))
            part = "mlp" if t in ("gate", "up", "down") else "self_attn"
            modules[f"model.layers.{layer}.{part}.{t}_proj.weight"] = {
                "U": (X / S[:, None]).astype(np.float32),
                "S": S.astype(np.float32),
                "V": (V / np.linalg.norm(V, axis=1, keepdims=True)).astype(np.float32),
                "layer": layer,
                "type": t,
            }
    write_factor_store(store, steps, modules)
    (WORK / "metrics.json").write_text(json.dumps({str(s): float(v) for s, v in zip(steps, acc)}))
    return store


def main() -> None:
    store = _ensure()
    metrics = WORK / "metrics.json"
    out = WORK / "out"
    r: dict = {
        "machine_info": machine(),
        "layers": LAYERS,
        "modules": LAYERS * len(SHAPES),
        "checkpoints": T,
        "max_d_out": max(m for m, _ in SHAPES.values()),
        "store_bytes": sum(f.stat().st_size for f in (store / "factors").iterdir()),
    }
    r["import"] = repeat(
        [PY, "-c", "import torch, typer, rich.table, sklearn, rank1tools.cli, rank1tools.commands.fit_pls"], REPS
    )
    r["cli"] = repeat(
        [
            RANK1,
            "fit-pls",
            str(store),
            "--metrics",
            str(metrics),
            "--out",
            str(out),
            "--force",
            "--quiet",
            "--no-plots",
        ],
        REPS,
    )
    ours = {
        row["module"]: [row["r2"], row["loo_r2"], row["r2_step"]]
        for row in map(json.loads, (out / "fits.jsonl").read_text().splitlines())
    }
    naive_out = WORK / "naive.json"
    r["naive"] = measure([PY, "-c", NAIVE, str(store), str(metrics), str(naive_out)])
    naive = json.loads(naive_out.read_text())
    r["max_abs_r2_diff"] = max(abs(a - b) for n in ours for a, b in zip(ours[n], naive[n]))
    largest = max(m for m, _ in SHAPES.values())
    r["one_module_block_bytes"] = T * largest * 8  # the float64 T x d_out block of the largest module
    for k in ("import", "cli", "naive"):
        r[k].pop("stdout", None)
    r["speedup"] = r["naive"]["seconds"] / r["cli"]["seconds"]
    shutil.rmtree(out)
    c, i = r["cli"], r["import"]
    print(
        f"fit-pls {c['seconds']:.1f} s (imports {i['seconds']:.1f} s), peak RSS {c['peak_rss'] / 1e6:.0f} MB "
        f"(+{(c['peak_rss'] - i['peak_rss']) / 1e6:.0f} over imports; one module block "
        f"{r['one_module_block_bytes'] / 1e6:.1f} MB); naive {r['naive']['seconds']:.1f} s -> "
        f"{r['speedup']:.1f}x; max |R² diff| {r['max_abs_r2_diff']:.1e}",
        file=sys.stderr,
    )
    write_results("fit_pls", r, summarise, QUICK)


MEASURED = """A generated factor store shaped like an 8B run: 32 layers × 7 modules with Llama-3-8B shapes
(q/o 4096 × 4096, k/v 1024 × 4096, gate/up 14336 × 4096, down 4096 × 14336), 50 checkpoints, k = 1;
trajectories are a line in the metric plus noise. `rank1 fit-pls STORE --metrics M --no-plots` (in-sample,
leave-one-out and step R² for every module; tables and fit store written) as a whole process, imports
included, against a naive process fitting the same per-module inputs with scikit-learn's
`PLSRegression(n_components=1, scale=True)`: once in-sample, once per left-out checkpoint and once against the
step. Both report every module's R²s; their largest difference is recorded. The import baseline is a process
importing what the CLI imports before it starts work; peak RSS is the whole process's (`wait4`)."""


def summarise(raw: dict) -> dict:
    cli, naive, imp = raw["cli"], raw["naive"], raw["import"]
    naive_case = "naive scikit-learn refit loop (whole process)"
    rows = [
        row("`rank1 fit-pls` (whole process)", cli["seconds"], runs_of(cli), naive_case, cli["peak_rss"]),
        row(naive_case, naive["seconds"], runs_of(naive), None, naive["peak_rss"]),
        row("imports alone", imp["seconds"], runs_of(imp), None, imp["peak_rss"]),
    ]
    above = cli["peak_rss"] - imp["peak_rss"]
    block = raw["one_module_block_bytes"]
    facts = extra(
        "Store and memory",
        [
            "modules",
            "checkpoints",
            "largest d_out",
            "factor store (MB)",
            "peak RSS above imports (MB)",
            "one module's float64 T × d_out block (MB)",
            "peak above imports ÷ block",
        ],
        [
            [
                raw["modules"],
                raw["checkpoints"],
                raw["max_d_out"],
                raw["store_bytes"] / 1e6,
                above / 1e6,
                block / 1e6,
                above / block,
            ]
        ],
    )
    targets = [
        target(
            "speedup",
            "speed-up over the naive scikit-learn refit loop, whole process (issue #9)",
            ">=",
            5.0,
            naive["seconds"] / cli["seconds"],
            unit="×",
            met_limit="The leave-one-out (T² · d_out per module, all folds from downdates) is most of the work; "
            "reading the factors (float32 to float64) and writing the fit store make most of the rest. R²_step is "
            "in-sample only, so it costs one fit, not T.",
            missed_limit="Imports and reading the factors are a fixed cost next to the naive loop's refits; the "
            "margin is small on few cores and shrinks when other work shares them.",
        ),
        target(
            "r2_equal",
            "largest difference between the two tools' R² values (issue #9: same R², 1e-9)",
            "<=",
            1e-9,
            raw["max_abs_r2_diff"],
            met_limit="Same estimator in float64; the leave-one-out downdates are exact algebra.",
            missed_limit="The two tools do not compute the same R²: alignment or standardisation differs.",
        ),
        target(
            "memory_block",
            "peak RSS above imports in units of one module's float64 T × d_out block of the "
            "largest module (issue #9: 'about one block', read as at most 2)",
            "<=",
            2.0,
            above / block,
            unit="×",
            met_limit="Modules are processed one at a time and the leave-one-out keeps one block of temporaries.",
            missed_limit="Modules are processed one at a time, so the peak does not grow with the number of "
            "modules or the store size, but the leave-one-out keeps a few T × d_out float64 temporaries at "
            "once (see the table), not one. A fold-chunked leave-one-out would get closer, at some speed.",
        ),
    ]
    return report(
        raw,
        name="fit_pls",
        title="`rank1 fit-pls`",
        issue="#9",
        measured=MEASURED,
        table=table(rows, memory="peak RSS, whole process"),
        tables=[facts],
        targets=targets,
        notes=[
            "The per-module leave-one-out alone is measured in "
            "[Leave-one-out PLS of one module](#pls) (`bench_pls.py`)."
        ],
    )


if __name__ == "__main__":
    main()
