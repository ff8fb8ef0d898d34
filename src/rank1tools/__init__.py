"""rank1tools: diagnose, reconstruct and extrapolate RLVR checkpoints.

Importing the package is cheap (no torch): the CLI answers ``--help`` fast.
"""

__version__ = "0.1.0"

# The `rank1 ...` command line, set by the CLI for provenance records; None when rank1tools is
# used as a library (sys.argv would then be the host program's).
COMMAND_LINE: list[str] | None = None
