"""Run a child process and measure its whole process tree from outside: wall time until the command
exits; user and system CPU time of every process below this one (the command's own children and any
daemons it starts, e.g. Ray's services and workers), sampled from /proc, by process name; the CPU time
the rest of the machine used meanwhile (/proc/stat). Linux only. Call `subreaper()` once first."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
SAMPLE = 0.1  # seconds between two samples of the process tree's CPU time


def subreaper() -> None:
    """Orphaned descendants (Ray's processes once their parent exits) are reparented to this process:
    they stay in the tree sampled below, and are reaped here."""
    if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def _busy() -> float:
    """CPU seconds the whole machine has spent busy (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq = map(int, f.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / TICK


def _processes() -> dict[int, tuple[int, int, int, int, str]]:
    """pid -> (parent pid, start time, user ticks, system ticks, name) of every process."""
    out = {}
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/stat") as f:
                name, x = f.read().split("(", 1)[1].rsplit(")", 1)
        except OSError:
            continue
        x = x.split()
        out[int(d)] = (int(x[1]), int(x[19]), int(x[11]), int(x[12]), name)
    return out


def _descendants(procs: dict, keep: frozenset[int] = frozenset()) -> dict:
    """The processes below this one (its children include the orphans it adopts as a subreaper),
    less the trees rooted at `keep` (processes the benchmark runs beside the measured command)."""
    below: dict[int, list[int]] = {}
    for pid, (ppid, *_) in procs.items():
        below.setdefault(ppid, []).append(pid)
    out, todo = {}, [p for p in below.get(os.getpid(), []) if p not in keep]
    while todo:
        pid = todo.pop()
        out[pid] = procs[pid]
        todo += below.get(pid, [])
    return out


class TreeCPU:
    """User and system CPU of this process's descendants, sampled from /proc every SAMPLE seconds
    (the last moments of a process that exits between two samples are missed; Ray's workers are
    reaped by Ray itself, so the kernel's RUSAGE_CHILDREN would miss them altogether)."""

    def __init__(self, root: int, keep: frozenset[int] = frozenset()) -> None:
        self.root = root  # the measured command, named "command"
        self.keep = keep
        self.seen: dict[tuple[int, int], tuple[int, int, str]] = {}  # (pid, start) -> last (user, system, name)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        for pid, (_, start, user, system, name) in _descendants(_processes(), self.keep).items():
            self.seen[pid, start] = (user, system, "command" if pid == self.root else name)

    def _run(self) -> None:
        while not self.stop.wait(SAMPLE):
            self.sample()

    def done(self) -> tuple[float, float, dict[str, float]]:
        """User and system CPU seconds, and user + system CPU seconds by process name (a Ray worker is
        named by what it did when last sampled: ray::IDLE once its tasks are done)."""
        self.stop.set()
        self.thread.join()
        by_name: dict[str, float] = {}
        for u, s, name in self.seen.values():
            by_name[name] = by_name.get(name, 0.0) + (u + s) / TICK
        return (
            sum(u for u, _, _ in self.seen.values()) / TICK,
            sum(s for _, s, _ in self.seen.values()) / TICK,
            by_name,
        )


def _children() -> list[int]:
    return [pid for pid, (ppid, *_) in _processes().items() if ppid == os.getpid()]


def _reap(grace: float = 60.0, keep: frozenset[int] = frozenset()) -> tuple[float, int]:
    """Wait for every remaining descendant but `keep` (seconds waited); kill those still alive after
    `grace` seconds (how many), all of them started by this benchmark."""
    t0, killed = time.perf_counter(), set()
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return time.perf_counter() - t0, len(killed)
        if pid:
            continue
        others = [c for c in _children() if c not in keep]
        if not others:
            return time.perf_counter() - t0, len(killed)
        if time.perf_counter() - t0 > grace:
            for child in others:
                os.kill(child, signal.SIGKILL)
                killed.add(child)
        time.sleep(0.02)


def measure(cmd: list[str], env: dict, log: Path, keep: frozenset[int] = frozenset()) -> dict:
    """Wall time until the command exits; CPU time of its whole process tree, stragglers included;
    the CPU time the rest of the machine used meanwhile. `keep`: processes of this benchmark that run
    beside the command (a Ray cluster): neither counted nor waited for."""
    busy0, load = _busy(), os.getloadavg()[0]
    with open(log, "wb") as f:  # a file, not a pipe: processes that inherit it cannot hold the wait
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        cpu = TreeCPU(p.pid, keep)
        _, status, ru = os.wait4(p.pid, 0)
        seconds = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    straggling, killed = _reap(keep=keep)
    user, system, by_name = cpu.done()
    busy1 = _busy()
    if p.returncode != 0:
        raise RuntimeError(f"{cmd} failed ({p.returncode}): {log.read_text(errors='replace')[-2000:]}")
    return {
        "seconds": seconds,
        "user_cpu": user,
        "sys_cpu": system,
        "other_cpu": busy1 - busy0 - user - system,
        "cpu_by_process": by_name,
        "load_average": load,
        "largest_rss": ru.ru_maxrss * 1024,
        "straggler_seconds": straggling,
        "killed": killed,
        "stdout": log.read_text(errors="replace"),
    }
