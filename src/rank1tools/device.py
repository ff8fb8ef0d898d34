"""Choosing the compute device: `--device auto|cpu|cuda[:i]`."""

from __future__ import annotations

from .errors import UsageError


def parse_device(spec: str):
    """The torch.device an explicit `--device` (not `auto`) names; whether it exists is not checked."""
    import torch

    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {spec!r}: only cpu and cuda are supported")
    return dev


def resolve_device(spec: str = "auto"):
    """The device this process computes on: `auto` is CUDA when torch sees a GPU."""
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = parse_device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {spec}: CUDA is not available on this machine")
    return dev
