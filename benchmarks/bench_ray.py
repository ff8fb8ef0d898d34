"""Benchmark (issue #13): `rank1 decompose --executor ray` on one machine against the local executor.

The run is bench_decompose_run.py's (same folder under benchmarks/work/, built by its `_ensure` when
missing): the generated bf16 run of the 135M Llama shape, steps 10..100, 10 checkpoints, about 3 GB.
Modes, each a whole process (imports included), interleaved (local, ray, init, workers, local, ...)
so that load from other processes hits them alike; medians of REPS runs:
  local    `rank1 decompose BASE --run RUN --rank 8 --out OUT --device cpu --quiet --force`, the
           default executor. On a 2-core machine: two worker threads in one process, each taking
           whole modules; torch's intra-op threads halved to 1 for the call, so two threads compute
           at once (no read-ahead thread: that is the one-worker mode).
  ray      the same command plus `--executor ray --max-in-flight 2`: the command starts a local Ray
           instance (Ray's defaults: one CPU slot per core) and shuts it down at the end, both paid
           by the user and measured here. One task per module, each reserving 1 CPU (the local
           run's intra-op thread count) and running torch with 1 thread (no read-ahead thread, as
           the local workers); 2 tasks at once in 2 worker processes; the driver waits, counts and
           assembles the tables.
  ray_cluster  the same command plus `--ray-address` of a local Ray instance (one CPU slot per core)
           that this script starts before the command and stops after it (not timed): what a
           user with a running cluster pays.
  ray_init     a process that imports ray and times `ray.init` + `ray.shutdown` with the options
               rank1 uses: Ray's own start-up, the part of the overhead no task can avoid
  ray_workers  the same with 2 one-CPU tasks importing torch and rank1tools' decompose module in
               between: start-up until two workers are ready to compute (also checks that the
               workers import this checkout's rank1tools)
With a GPU (torch.cuda.is_available() in a child process), also: `gpu_local` (`--device cuda`) and
`gpu_ray` (`--device cuda --executor ray --ray-num-gpus 0.25 --max-in-flight 4 --ray-num-cpus
cores/4`: four tasks share the GPU; without --ray-num-cpus each task would reserve every core, the
local GPU path's thread count, and only one would run at a time). Without a GPU: recorded as skipped.
Every ray output is compared with the local output of the same repetition, every file byte for byte
(both written at the same --out path, which provenance.json records); a difference fails the
benchmark after the results are written. Times: the command's wall time; the CPU time of its whole
process tree, Ray's processes included (sampled from /proc every 0.1 s; this process is a child
subreaper, so processes orphaned on the way stay in the tree); the CPU time the rest of the machine
used meanwhile (/proc/stat) and the load average at the start (the machine is shared).
Targets (docs/benchmarks.md): ray and ray_cluster wall time <= 1.20x local.

`--reps N`: medians of N runs instead of 3. `--quick` (or BENCH_QUICK=1): bench_decompose_run's tiny
run, one repetition, results under benchmarks/work/quick/ (checks the script; measures nothing).
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _proctree import measure, subreaper  # noqa: E402
from _report import extra, machine, report, row, table, target, write_results  # noqa: E402

# the same run (built once), work folder, interpreter and repetitions (--quick, --reps N) as that benchmark
from bench_decompose_run import ENV, PY, QUICK, RANK1, REPS, ROOT, STEPS, WORK, _ensure  # noqa: E402

CORES = os.cpu_count() or 1
OUT = WORK / "ray-bench-out"  # every mode writes here (same --out, same provenance), then it is moved aside
RAY_ENV = {k: v for k, v in ENV.items() if k != "RAY_ADDRESS"}  # a fresh local instance, not a cluster
OPTS = {
    "local": [],
    "ray": ["--executor", "ray", "--max-in-flight", "2"],
    "ray_cluster": ["--executor", "ray", "--max-in-flight", "2"],
    "gpu_local": [],
    "gpu_ray": [
        "--executor",
        "ray",
        "--ray-num-gpus",
        "0.25",
        "--max-in-flight",
        "4",
        "--ray-num-cpus",
        f"{CORES / 4:g}",
    ],
}
PAIRS = {"ray": "local", "ray_cluster": "local", "gpu_ray": "gpu_local"}
RAY_AGENTS = ("ray::DashboardA", "ray::RuntimeEnv")  # Ray's agents (names cut to 15 characters), not workers

PROBE = """
import json, sys, time
t0 = time.perf_counter()
import ray
t1 = time.perf_counter()
ray.init(include_dashboard=False, log_to_driver=False)  # what rank1tools.engine.executors.ray_session does
t2 = time.perf_counter()
out = {}
if int(sys.argv[1]):
    @ray.remote(num_cpus=1)
    def ready():
        import os, torch, rank1tools, rank1tools.commands.decompose
        return os.getpid(), rank1tools.__file__
    got = ray.get([ready.remote() for _ in range(int(sys.argv[1]))])
    out.update(worker_processes=len({p for p, _ in got}), rank1tools=sorted({f for _, f in got}))
t3 = time.perf_counter()
ray.shutdown()
t4 = time.perf_counter()
out.update(import_ray=t1 - t0, init=t2 - t1, workers=t3 - t2, shutdown=t4 - t3)
print(json.dumps(out))
"""


# A Ray cluster that is already running when the command starts (what a verl / OpenRLHF user has): a
# process of this benchmark starts a fresh local instance before each `ray_cluster` run, prints its
# address and holds it until its stdin closes
CLUSTER = """
import sys, ray
ray.init(num_cpus=int(sys.argv[1]), include_dashboard=False, log_to_driver=False)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()
ray.shutdown()
"""


# ---- the modes ---------------------------------------------------------------------------------------


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for name in _files(folder):
        h.update(name.encode() + b"\0" + hashlib.sha256((folder / name).read_bytes()).digest())
    return h.hexdigest()


def _differing(a: Path, b: Path) -> list[str]:
    """Files not byte-identical in the two folders (present in one only included)."""
    fa, fb = _files(a), _files(b)
    return sorted(set(fa) ^ set(fb)) + [n for n in fa if n in fb and not filecmp.cmp(a / n, b / n, shallow=False)]


def _decompose(mode: str) -> dict:
    device = "cuda" if mode.startswith("gpu") else "cpu"
    cmd = [
        RANK1,
        "decompose",
        str(ROOT / "base"),
        "--run",
        str(ROOT / "run"),
        "--rank",
        "8",
        "--out",
        str(OUT),
        "--device",
        device,
        "--quiet",
        "--force",
        *OPTS[mode],
    ]
    if mode == "ray_cluster":
        holder = subprocess.Popen(
            [PY, "-c", CLUSTER, str(CORES)],
            env=RAY_ENV,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        address = holder.stdout.readline().strip()
        try:
            # a client of a running instance needs its authentication mode (the token is in ~/.ray)
            r = measure(
                [*cmd, "--ray-address", address],
                {**RAY_ENV, "RAY_AUTH_MODE": "token"},
                WORK / f"ray-bench-{mode}.log",
                keep=frozenset([holder.pid]),
            )
        finally:
            holder.stdin.close()
            holder.wait(timeout=120)
    else:
        r = measure(cmd, RAY_ENV, WORK / f"ray-bench-{mode}.log")
    r.pop("stdout")
    kept = WORK / f"ray-bench-{mode}"
    shutil.rmtree(kept, ignore_errors=True)
    OUT.rename(kept)
    r.update(files=len(_files(kept)), digest=_digest(kept))
    if mode in PAIRS:
        r["differing"] = _differing(kept, WORK / f"ray-bench-{PAIRS[mode]}")
    return r


def _probe(workers: int) -> dict:
    r = measure([PY, "-c", PROBE, str(workers)], RAY_ENV, WORK / f"ray-bench-probe{workers}.log")
    r.update(json.loads(r.pop("stdout").strip().splitlines()[-1]))
    src = str(HERE.parent / "src")
    if workers and not all(f.startswith(src) for f in r["rank1tools"]):
        raise RuntimeError(f"Ray workers imported rank1tools from {r['rank1tools']}, not from {src}")
    return r


def _gpu() -> bool:
    r = subprocess.run(
        [PY, "-c", "import torch; print(torch.cuda.is_available())"],
        env=RAY_ENV,
        check=False,
        capture_output=True,
        text=True,
    )
    return r.returncode == 0 and r.stdout.strip().endswith("True")


def _summary(runs: list[dict]) -> dict:
    out = {k: v for k, v in runs[-1].items() if k not in ("differing", "digest", "cpu_by_process")}
    out["all_cpu_by_process"] = [r["cpu_by_process"] for r in runs]
    for k in (
        "seconds",
        "user_cpu",
        "sys_cpu",
        "other_cpu",
        "load_average",
        "import_ray",
        "init",
        "workers",
        "shutdown",
    ):
        if k in runs[0]:
            out[k] = statistics.median(r[k] for r in runs)
            out["all_" + k] = [r[k] for r in runs]
    if "init" in runs[0]:
        both = [r["init"] + r["shutdown"] for r in runs]
        out.update(init_shutdown=statistics.median(both), all_init_shutdown=both)
        full = [r["init"] + r["workers"] + r["shutdown"] for r in runs]
        out.update(init_workers_shutdown=statistics.median(full), all_init_workers_shutdown=full)
    out["largest_rss"] = max(r["largest_rss"] for r in runs)
    out["killed"] = sum(r["killed"] for r in runs)
    if "digest" in runs[0]:
        out["reproducible"] = len({r["digest"] for r in runs}) == 1  # every repetition wrote the same bytes
    if "differing" in runs[0]:
        out["differing"] = sorted({f for r in runs for f in r["differing"]})
        out["differing_count"] = sum(len(r["differing"]) for r in runs)
    return out


def main() -> None:
    raw: dict = {"machine_info": machine()}
    subreaper()
    _ensure()
    gpu = _gpu()
    modes = ["local", "ray", "ray_cluster", "ray_init", "ray_workers"] + (["gpu_local", "gpu_ray"] if gpu else [])
    runs: dict[str, list] = {m: [] for m in modes}
    for _ in range(REPS):
        for mode in modes:
            runs[mode].append(
                _probe(0) if mode == "ray_init" else _probe(2) if mode == "ray_workers" else _decompose(mode)
            )
            print(f"{mode}: {runs[mode][-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    raw.update(
        {
            "bytes_on_disk": sum(f.stat().st_size for f in ROOT.rglob("*.safetensors")),
            "checkpoints": len(STEPS),
            "reps": REPS,
            "cores": CORES,
            "options": {m: OPTS[m] for m in modes if m in OPTS},
            "ray_address_env": "RAY_ADDRESS" in ENV,
            "gpu": {
                "available": gpu,
                "status": "measured" if gpu else "skipped: no GPU (torch.cuda.is_available() is False)",
            },
            "modes": {m: _summary(v) for m, v in runs.items()},
        }
    )
    m = raw["modes"]
    print(
        f"decompose run ({len(STEPS)} checkpoints): local {m['local']['seconds']:.1f} s, ray {m['ray']['seconds']:.1f} s "
        f"(x{m['ray']['seconds'] / m['local']['seconds']:.2f}), on a running cluster {m['ray_cluster']['seconds']:.1f} s "
        f"(x{m['ray_cluster']['seconds'] / m['local']['seconds']:.2f}); ray.init+shutdown {m['ray_init']['init_shutdown']:.1f} s; "
        f"files differing {sum(m[k]['differing_count'] for k in PAIRS if k in m)}",
        file=sys.stderr,
    )
    write_results("ray", raw, summarise, QUICK)
    if any(m[k]["differing_count"] for k in PAIRS if k in m):
        sys.exit(f"FAILED: ray outputs differ from local: {[(k, m[k]['differing']) for k in PAIRS if k in m]}")


# ---- the report --------------------------------------------------------------------------------------

MEASURED = """The generated bf16 run of the 135M Llama shape of the section on a whole run (10 checkpoints plus
the base, about 3 GB; 210 matrix modules × 10 checkpoints), `rank1 decompose --rank 8` on the CPU with the
default local executor; with `--executor ray --max-in-flight 2`, which starts a local Ray instance inside
the command and shuts it down at the end (a user without a running cluster pays both); and with the same
options plus `--ray-address` of a local Ray instance (2 CPUs) started before the command (a user with a running
cluster: verl, OpenRLHF). On this 2-core
machine both compute two modules at once with one torch thread each: locally two worker threads in one
process; on Ray two worker processes, one task per module reserving one CPU (no read-ahead thread, as the
local workers: a task reads ahead only when it reserves two CPUs or more). Whole processes (imports included), interleaved in one run of
the benchmark, medians; the CPU time is that of the command's whole process tree, Ray's processes
included (sampled from /proc every 0.1 s), beside the CPU time the rest of the machine used meanwhile. Separately, in processes of their own: `ray.init` + `ray.shutdown` with the options rank1
uses, and the same with two one-CPU tasks importing torch and rank1tools in between (Ray's start-up until
two workers are ready). Every Ray output is compared with the local output of the same repetition, every
file byte for byte."""

NAMES = {
    "local": "local executor (default)",
    "ray": "`--executor ray --max-in-flight 2`",
    "ray_cluster": "the same, on a Ray instance already running (`--ray-address`)",
    "ray_init": "Ray alone: `ray.init` + `ray.shutdown`",
    "ray_workers": "Ray alone, with 2 workers ready",
    "gpu_local": "local executor, `--device cuda`",
    "gpu_ray": "`--executor ray`, `--device cuda`, 4 tasks on one GPU (0.25 each)",
}


def _kinds(cpu: dict[str, float]) -> tuple[float, float, float]:
    """A run's CPU seconds: the command itself, Ray's worker processes (named ray::<what they run>),
    Ray's other processes (raylet, gcs_server, its agents, log monitor)."""
    command = cpu.get("command", 0.0)
    workers = sum(v for k, v in cpu.items() if k.startswith("ray::") and k not in RAY_AGENTS)
    return command, workers, sum(cpu.values()) - command - workers


def summarise(raw: dict) -> dict:
    m = raw["modes"]
    rows = [
        row(NAMES["local"], m["local"]["seconds"], len(m["local"]["all_seconds"])),
        row(NAMES["ray"], m["ray"]["seconds"], len(m["ray"]["all_seconds"]), NAMES["local"]),
        row(NAMES["ray_cluster"], m["ray_cluster"]["seconds"], len(m["ray_cluster"]["all_seconds"]), NAMES["local"]),
        row(NAMES["ray_init"], m["ray_init"]["init_shutdown"], len(m["ray_init"]["all_init_shutdown"])),
        row(
            NAMES["ray_workers"],
            m["ray_workers"]["init_workers_shutdown"],
            len(m["ray_workers"]["all_init_workers_shutdown"]),
        ),
    ]
    if "gpu_local" in m:
        rows += [
            row(NAMES["gpu_local"], m["gpu_local"]["seconds"], len(m["gpu_local"]["all_seconds"])),
            row(NAMES["gpu_ray"], m["gpu_ray"]["seconds"], len(m["gpu_ray"]["all_seconds"]), NAMES["gpu_local"]),
        ]
    cpu = [
        [
            NAMES[k] + (" (whole process)" if k in ("ray_init", "ray_workers") else ""),
            v["seconds"],
            v["user_cpu"],
            v["sys_cpu"],
            v["other_cpu"],
            v["load_average"],
        ]
        for k, v in m.items()
    ]
    by_process = [
        [
            NAMES[k] + (" (whole process)" if k in ("ray_init", "ray_workers") else ""),
            *(statistics.median(_kinds(d)[i] for d in v["all_cpu_by_process"]) for i in range(3)),
            statistics.median(sum(d.values()) for d in v["all_cpu_by_process"]),
        ]
        for k, v in m.items()
    ]
    overhead = m["ray"]["seconds"] - m["local"]["seconds"]
    ri, rw = m["ray_init"], m["ray_workers"]
    parts = [
        ("`rank1 decompose`: ray − local (wall)", overhead),
        ("`import ray`", ri["import_ray"]),
        ("`ray.init`", ri["init"]),
        ("`ray.shutdown`", ri["shutdown"]),
        ("`ray.init` + `ray.shutdown`", ri["init_shutdown"]),
        ("2 workers ready: import torch and rank1tools (after `ray.init`)", rw["workers"]),
    ]
    split = [[label, s, s / overhead if overhead > 0 else None] for label, s in parts]
    outputs = [
        [
            f"{NAMES[k]} vs {NAMES[PAIRS[k]]}",
            len(m[k]["all_seconds"]),
            m[k]["files"],
            m[k]["differing_count"],
            m[PAIRS[k]]["reproducible"],
        ]
        for k in PAIRS
        if k in m
    ]
    differing = sum(m[k]["differing_count"] for k in PAIRS if k in m)
    targets = [
        target(
            "ray_overhead",
            "`decompose --executor ray` (2 tasks at once) within 1.20× the local executor's wall "
            "time: overhead ≤ 20 % (issue #13)",
            "<=",
            1.2,
            m["ray"]["seconds"] / m["local"]["seconds"],
            unit="×",
            met_limit="Ray's fixed costs (start-up, shut-down, two workers importing torch) are paid once per "
            "command and amortised over the run; on two cores they compete with the computation for CPU.",
            missed_limit="On two cores the overhead is CPU time taken from the two threads that compute: Ray's "
            "start-up and shut-down (its services and prestarted workers), two worker processes importing torch, "
            "and the driver's and Ray's own processes' CPU time. The fixed part is paid once per command: a "
            "longer run, a cluster already running (`--ray-address`: no start-up, the next target), or more cores "
            "(Ray's processes beside the computation) amortise it.",
        ),
        target(
            "ray_cluster_overhead",
            "the same on a Ray instance already running (what a verl / OpenRLHF user "
            "has): within 1.20× the local executor's wall time",
            "<=",
            1.2,
            m["ray_cluster"]["seconds"] / m["local"]["seconds"],
            unit="×",
            met_limit="Without Ray's start-up, what is left is two workers importing torch, one task per module "
            "and Ray's processes' CPU time beside the computation on the same two cores.",
            missed_limit="Even without Ray's start-up, two workers import torch and Ray's own processes (its "
            "services, the driver's threads) take CPU time from the two cores that compute.",
        ),
        target(
            "identical",
            "every Ray output byte-identical to the local output of the same repetition: files differing",
            "<=",
            0,
            differing,
            met_limit="Each task uses the local run's torch thread count, and the executor options are left out "
            "of the recorded command line.",
            missed_limit="A differing file fails the benchmark; the results file lists which (on a GPU, check "
            "first whether the local repetitions agree with each other).",
        ),
    ]
    notes = [
        "The CPU-time tables account for the overhead: on two busy cores, Ray's extra CPU time (its own "
        "processes, the workers' imports, the driver's work) spread over the two cores comes close to the extra "
        "wall time.",
        "The task's arguments (the base's and every checkpoint's parsed headers, about 290 KB) go into Ray's object "
        "store once per command, and each worker process unpickles them once, not once per task.",
        "The running instance of the `ray_cluster` mode is started by the benchmark before each run (not timed) and "
        "stopped after it; its processes (its workers included) are not the command's: their CPU time shows as other "
        "processes' CPU time in that mode's row.",
        "The machine is shared: the table of CPU time shows each mode's CPU time (its whole process tree) and "
        "the CPU time other processes used while it ran, with the 1-minute load average at its start.",
        "Memory is not compared: the Ray run spreads over several processes whose resident sets share pages.",
        "Here Ray runs on the same two cores as the local executor, so it cannot be faster: the benchmark "
        "measures what the executor costs, not the scale-out it is for (several nodes reading at once).",
        "The local time can differ from the warm-start row of the section on a whole run (the same command on "
        "the same run, measured in another session): this machine's speed varies between sessions; compare "
        "ratios measured in one run.",
    ] + (
        []
        if "gpu_local" in m
        else [
            "No GPU was available: the GPU mode (four tasks sharing one GPU against the local GPU path) was skipped; "
            "the script runs it where torch sees a GPU."
        ]
    )
    return report(
        raw,
        name="ray",
        title="`rank1 decompose --executor ray` on one machine",
        issue="#13",
        measured=MEASURED,
        table=table(rows),
        tables=[
            extra(
                "Wall and CPU time (medians; CPU of the whole process tree)",
                [
                    "mode",
                    "wall (s)",
                    "user CPU (s)",
                    "system CPU (s)",
                    "other processes' CPU meanwhile (s)",
                    "load average at start",
                ],
                cpu,
            ),
            extra(
                "CPU time by process (user + system, seconds, medians)",
                [
                    "mode",
                    "the command itself (`rank1`: Ray's driver)",
                    "Ray's worker processes",
                    "Ray's other processes",
                    "total",
                ],
                by_process,
            ),
            extra("Where Ray's overhead goes (medians)", ["figure", "seconds", "share of the overhead"], split),
            extra(
                "Outputs compared, file by file",
                ["pair", "runs", "files per output", "files differing", "local runs reproducible"],
                outputs,
            ),
            extra("GPU mode", ["status"], [[raw["gpu"]["status"]]]),
        ],
        targets=targets,
        notes=notes,
    )


if __name__ == "__main__":
    main()
