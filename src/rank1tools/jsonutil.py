"""JSON output helpers shared by the CLI and the commands that write JSON files."""

from __future__ import annotations

import math


def json_safe(x):
    """NaN and infinities become null (JSON has no NaN); containers are converted recursively."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x
