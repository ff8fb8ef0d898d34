"""engine layer: machinery several commands share (docs/concepts.md#how-the-code-is-layered-for-contributors).

Per-tensor units of work and where they run (in this process or as Ray tasks: executors.py,
tensor_units.py), writing one or several checkpoints in one pass (checkpoint_outputs.py), and the
spectrum tables decompose, fit-pls and linearity write (spectrum_tables.py). Nothing here is a user
operation, and nothing here imports commands/ or cli/.
"""
