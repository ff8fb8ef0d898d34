"""rank1tools: diagnose, reconstruct and extrapolate RLVR checkpoints.

Importing the package is cheap (no torch): the CLI answers ``--help`` fast.
"""

__version__ = "0.1.0"
