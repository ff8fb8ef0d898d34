"""Machinery several commands share (docs/concepts.md, "Layers")."""
