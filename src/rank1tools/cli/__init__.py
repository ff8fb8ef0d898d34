"""`rank1` command line: parse options, call a command, render the result.

Heavy modules (torch, scikit-learn) are imported inside the commands that need them, so
`rank1 --help` and option errors answer at once. Results go to stdout (a rich table, or JSON
with --json); progress and errors go to stderr. Exit codes: see rank1tools.errors.

Layout: `app.py` holds the typer app, shared options and `main`; each `*_commands.py` module
registers its commands on the app when imported here.
"""

# imported in the order `rank1 --help` lists the commands
from . import model_commands  # noqa: F401, I001 (registers inspect, decompose, reconstruct, demo)
from . import export_lora_commands  # noqa: F401 (registers export-lora)
from . import fit_commands  # noqa: F401 (registers fit-pls, linearity)
from . import extrapolate_commands  # noqa: F401 (registers extrapolate)
from . import logprobs_commands  # noqa: F401 (registers logprobs)
from . import generate_commands  # noqa: F401 (registers generate)
from . import backtest_commands  # noqa: F401 (registers backtest)
from . import report_commands  # noqa: F401 (registers report)
from .app import app, main

__all__ = ["app", "main"]
