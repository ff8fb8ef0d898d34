"""Reading the fit store that `rank1 fit-pls` writes (docs/formats.md, "Fit store").

A validated reader, like io/factor_store.py's FactorStore: the manifest's format and version are
checked, every module's file is confined to the store's fits/ folder, each file must record its
module and hold tensors of the manifest's shapes. Anything wrong is a one-line InputError.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import InputError
from ..jsonutil import read_json_file
from .checkpoint import Checkpoint
from .factor_store import NORM_SLACK, is_shape, read_module_file
from .fingerprint import check_base

FIT_FORMAT = "rank1tools.pls-fits"
FIT_FORMAT_VERSION = 1
TARGETS = ("metric", "step")
# tensors that must be finite for a prediction (r2 may hold NaN: not fitted, constant target)
_FINITE = ("x_mean", "x_scale", "x_loadings", "score_line", "v_last", "fro")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_source(entry) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("source"), str)
        and (entry.get("revision") is None or isinstance(entry.get("revision"), str))
    )


def _check_fit(path: Path, data: dict[str, torch.Tensor]) -> None:
    """What fit-pls writes and alpharl relies on (docs/formats.md, "Fit store"): x_scale > 0 (a
    standard deviation, 1 for a constant column), the norms fro >= 0 and sigma_last between 0 and
    the last fro, v_last of unit norm (when sigma_last > 0). A tampered value would silently scale or flip ΔŴ."""

    def bad(key: str, what: str) -> InputError:
        return InputError(f"{path}: fit tensor {key!r} {what} (corrupt or edited fit store)")

    x_scale, fro, v = data["x_scale"].double(), data["fro"].double(), data["v_last"].double()
    if not bool((x_scale > 0).all()):
        raise bad("x_scale", f"has a value {float(x_scale.min()):.4g}; a scale is > 0")
    if bool((fro < 0).any()):
        raise bad("fro", f"is negative ({float(fro.min()):.4g}); a norm is >= 0")
    sigma = float(data["sigma_last"].double()[0])
    if not 0 <= sigma <= float(fro[-1]) * (1 + NORM_SLACK) + 1e-30:
        raise bad("sigma_last", f"is {sigma:.4g}, outside [0, fro of the last step = {float(fro[-1]):.4g}]")
    if sigma > 0 and abs(float(v.norm()) - 1) > NORM_SLACK:
        raise bad("v_last", f"has norm {float(v.norm()):.4g}, not 1")


class FitStore:
    """A fit-pls output folder: manifest plus one fit file per module."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        mf = self.folder / "manifest.json"
        if not mf.is_file():
            raise InputError(f"{folder}: not a fit store (no manifest.json; make one with rank1 fit-pls)")
        self.manifest = m = read_json_file(mf, "manifest")
        if not isinstance(m, dict):
            raise InputError(f"{mf}: manifest is not a JSON object")
        if m.get("format") != FIT_FORMAT:
            raise InputError(
                f"{mf}: not a rank1tools fit store (format {m.get('format')!r}; make one with rank1 fit-pls)"
            )
        if m.get("format_version") != FIT_FORMAT_VERSION:
            raise InputError(
                f"{mf}: fit store format_version {m.get('format_version')} is not supported "
                f"(this rank1tools reads {FIT_FORMAT_VERSION})"
            )
        try:
            fs = m["factor_store"]
            self.base = fs["base"]
            self.checkpoints = fs["checkpoints"]
            self.target = m["target"]
            self.metric = m["metric"]
            self.window = m["window"]
            self.modules = {e["name"]: e for e in m["modules"]}
            ok = (
                isinstance(fs.get("path"), str)
                and _is_source(self.base)
                and isinstance(self.checkpoints, list)
                and all(_is_source(c) and _is_int(c.get("step")) for c in self.checkpoints)
                and self.target in TARGETS
                and (
                    self.metric is None
                    if self.target == "step"
                    else isinstance(self.metric, dict) and isinstance(self.metric.get("relative", False), bool)
                )
                and isinstance(self.window, list)
                and len(self.window) >= 1
                and all(map(_is_int, self.window))
                and all(a < b for a, b in zip(self.window, self.window[1:]))
                and len(self.modules) == len(m["modules"])
                and all(
                    isinstance(n, str) and isinstance(e.get("file"), str) and is_shape(e.get("shape"))
                    for n, e in self.modules.items()
                )
            )
        except (KeyError, TypeError, AttributeError):
            ok = False
        if not ok:
            raise InputError(
                f"{mf}: malformed fit store manifest (factor_store, target, metric, window or modules "
                "missing or of the wrong type)"
            )
        self._fits_dir = Path(os.path.realpath(self.folder / "fits"))

    @property
    def relative(self) -> bool:
        """The metric was divided by its value at the window's last step (fit-pls --relative)."""
        return bool(self.metric and self.metric.get("relative", False))

    @property
    def metric_name(self) -> str | None:
        return self.metric.get("name") if self.metric else None

    def check_base(self, ck: Checkpoint, notes: list[str]) -> None:
        """Refuse a base other than the one behind these fits (io.fingerprint.check_base: by
        content when the factor store recorded a fingerprint)."""
        check_base(self.base, ck, str(self.folder), "fit store", notes)

    def checkpoint_at(self, step: int) -> dict | None:
        """The factor store's record ({step, source, revision}) of the checkpoint at `step`."""
        return next((c for c in self.checkpoints if c["step"] == step), None)

    def fit_path(self, name: str) -> Path:
        """The file of module `name`, confined to the store's fits/ folder (symlinks included)."""
        if name not in self.modules:
            raise InputError(f"fit store {self.folder} has no module {name!r}")
        rel = self.modules[name]["file"]
        parts = rel.split("/")
        path = Path(os.path.realpath(self.folder / rel)) if "\x00" not in rel else None
        if (
            len(parts) != 2
            or parts[0] != "fits"
            or parts[1] in ("", ".", "..")
            or path is None
            or path.parent != self._fits_dir
        ):
            raise InputError(
                f"{self.folder / 'manifest.json'}: module {name!r} names file {rel!r}, "
                "which is not a file in the store's fits/ folder"
            )
        return path

    def load(self, name: str) -> dict[str, torch.Tensor]:
        """All tensors of one module's fit file, checked: it records module `name`, every tensor
        has the manifest's shape, its steps are the window, what a prediction uses is finite."""

        path = self.fit_path(name)
        data = read_module_file(path, name, "fit file")
        if "fro" not in data:
            raise InputError(
                f"{path}: fit file has no 'fro' (||dW_t||_F of the window): it was written by an "
                f"older rank1tools; rerun rank1 fit-pls to update {self.folder}"
            )
        m, n = self.modules[name]["shape"]
        T = len(self.window)
        want = {
            "x_mean": (m,),
            "x_scale": (m,),
            "x_weights": (m,),
            "x_loadings": (m,),
            "y": (3,),
            "score_line": (2,),
            "r2": (3,),
            "steps": (T,),
            "targets": (T,),
            "u_last": (m,),
            "v_last": (n,),
            "sigma_last": (1,),
            "fro": (T,),
        }
        for key, dims in want.items():
            t = data.get(key)
            if t is None or tuple(t.shape) != dims or (key != "steps" and not t.is_floating_point()):
                got = "missing" if t is None else f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')}"
                raise InputError(f"{path}: fit tensor {key!r} is {got}, expected {list(dims)} (corrupt fit store)")
        if data["steps"].tolist() != self.window:
            raise InputError(
                f"{path}: fit file steps {data['steps'].tolist()} differ from the manifest's window {self.window}"
            )
        for key in _FINITE:
            if not bool(torch.isfinite(data[key]).all()):
                raise InputError(f"{path}: fit tensor {key!r} has non-finite values (corrupt fit store)")
        _check_fit(path, data)
        return data
