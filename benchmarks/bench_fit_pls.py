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
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _proc import measure, repeat  # noqa: E402

RESULTS = HERE / "results"
WORK = HERE / "work" / "fit-pls-8B"
PY = sys.executable
RANK1 = str(Path(PY).with_name("rank1"))
REPS = 3
LAYERS, T = 32, 50
SHAPES = {"q": (4096, 4096), "k": (1024, 4096), "v": (1024, 4096), "o": (4096, 4096),
          "gate": (14336, 4096), "up": (14336, 4096), "down": (4096, 14336)}

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
                "U": (X / S[:, None]).astype(np.float32), "S": S.astype(np.float32),
                "V": (V / np.linalg.norm(V, axis=1, keepdims=True)).astype(np.float32), "layer": layer, "type": t}
    write_factor_store(store, steps, modules)
    (WORK / "metrics.json").write_text(json.dumps({str(s): float(v) for s, v in zip(steps, acc)}))
    return store


def main() -> None:
    store = _ensure()
    metrics = WORK / "metrics.json"
    out = WORK / "out"
    r: dict = {"machine": f"{os.cpu_count()} cores, no GPU", "layers": LAYERS, "modules": LAYERS * len(SHAPES),
               "checkpoints": T, "max_d_out": max(m for m, _ in SHAPES.values()),
               "store_bytes": sum(f.stat().st_size for f in (store / "factors").iterdir())}
    r["import"] = repeat([PY, "-c", "import torch, typer, rich.table, sklearn, rank1tools.cli, "
                          "rank1tools.commands.fit_pls"], REPS)
    r["cli"] = repeat([RANK1, "fit-pls", str(store), "--metrics", str(metrics), "--out", str(out), "--force",
                       "--quiet", "--no-plots"], REPS)
    ours = {row["module"]: [row["r2"], row["loo_r2"], row["r2_step"]]
            for row in map(json.loads, (out / "fits.jsonl").read_text().splitlines())}
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
    print(f"fit-pls {c['seconds']:.1f} s (imports {i['seconds']:.1f} s), peak RSS {c['peak_rss'] / 1e6:.0f} MB "
          f"(+{(c['peak_rss'] - i['peak_rss']) / 1e6:.0f} over imports; one module block "
          f"{r['one_module_block_bytes'] / 1e6:.1f} MB); naive {r['naive']['seconds']:.1f} s -> "
          f"{r['speedup']:.1f}x; max |R² diff| {r['max_abs_r2_diff']:.1e}", file=sys.stderr)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fit_pls.json").write_text(json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    main()
