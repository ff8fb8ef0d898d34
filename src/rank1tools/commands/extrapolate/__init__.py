"""`rank1 extrapolate`: synthesize later checkpoints with AlphaRL, RELEX or straight lines
(docs/commands/extrapolate.md). base.py: what the methods share; one module per method
(alpharl, relex, linear) with its options and flags; registry.py: the methods by name, the
dispatcher `extrapolate` and the flat-name `ExtrapolateOptions(method=...)` factory.

This package's __init__ imports nothing, so that engine/ can import base.py without a cycle."""
