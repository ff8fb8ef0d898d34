"""Run a child process and measure it from outside: wall time, peak RSS (wait4), peak RssAnon (sampled)."""

from __future__ import annotations

import os
import subprocess
import threading
import time


def _anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Peak RSS from the kernel's rusage of this child alone (os.wait4), so keep the caller small:
    a forked child starts with its parent's resident pages counted."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _anon(p.pid))
            time.sleep(0.005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out = p.stdout.read()
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    seconds = time.perf_counter() - t0
    stop.set()
    th.join()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"{cmd} failed ({p.returncode}): {err.decode()[-2000:]}")
    return {"seconds": seconds, "peak_rss": ru.ru_maxrss * 1024, "peak_anon_sampled": peak[0], "stdout": out.decode()}


def repeat(cmd: list[str], n: int, env: dict | None = None) -> dict:
    """`measure` n times: median seconds, every run's seconds, and the largest peaks seen."""
    import statistics

    runs = [measure(cmd, env) for _ in range(n)]
    return {
        "seconds": statistics.median(r["seconds"] for r in runs),
        "all_seconds": [r["seconds"] for r in runs],
        "peak_rss": max(r["peak_rss"] for r in runs),
        "peak_anon_sampled": max(r["peak_anon_sampled"] for r in runs),
        "stdout": runs[-1]["stdout"],
    }
