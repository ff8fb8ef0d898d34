"""Ctrl-C and SIGTERM around the few steps that must not be cut midway (docs/cli.md, "Signals and kills").

Publishing an output swaps folders in two renames and then removes the old one: a signal between
them would leave the old output moved away and the new one removed by the cleanup, or an
`.NAME.old-*` folder behind. `deferred_signals` holds both signals for such a block and lets
their handlers run as soon as it ends. Torch-free.

`pause_for_test` is a test hook: with `RANK1_TEST_PAUSE=PHASE` (`staged`, `publishing`,
`published`) a run stops at that point, says so on stderr and waits for a signal (SIGUSR1 just
resumes it), so tests can act on a real process at an exact phase instead of guessing a delay.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager

TEST_PAUSE_ENV = "RANK1_TEST_PAUSE"
_DEFERRABLE = (signal.SIGINT, signal.SIGTERM)
_pending: list[int] | None = None  # signals held by the innermost deferred_signals block, None outside one


@contextmanager
def deferred_signals():
    """SIGINT and SIGTERM arriving inside the block take effect when it ends (their handlers run
    then, in arrival order). Python runs signal handlers in the main thread only, so elsewhere
    nothing can cut the block and this is a no-op."""
    global _pending
    if threading.current_thread() is not threading.main_thread() or _pending is not None:
        yield
        return
    held: list[int] = []

    def hold(signum, frame) -> None:
        held.append(signum)

    previous = {}
    for s in _DEFERRABLE:
        handler = signal.getsignal(s)
        if handler is not None:  # None: installed outside Python, left alone
            previous[s] = signal.signal(s, hold)
    _pending = held
    try:
        yield
    finally:
        _pending = None
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(held):
            signal.raise_signal(s)  # the restored handler runs now (ours raises; the default ends the process)


def pause_for_test(phase: str) -> None:
    """With RANK1_TEST_PAUSE=`phase`: say `rank1: test pause: PHASE` on stderr and wait (at most
    60 s) until a signal arrives: SIGUSR1 resumes the run; SIGINT/SIGTERM take effect as always
    (inside deferred_signals they are only recorded: the run goes on and they act at the block's end)."""
    if os.environ.get(TEST_PAUSE_ENV) != phase or threading.current_thread() is not threading.main_thread():
        return
    resumed: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: resumed.append(signum))
    try:
        sys.stderr.write(f"rank1: test pause: {phase}\n")
        sys.stderr.flush()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not resumed and not (_pending or []):
            time.sleep(0.01)  # outside deferred_signals, a SIGINT/SIGTERM handler raises out of this sleep
    finally:
        signal.signal(signal.SIGUSR1, previous)
