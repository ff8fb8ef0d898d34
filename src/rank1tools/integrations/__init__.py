"""Hooks into training frameworks (docs/reground.md): imported only by a training script, never by
the CLI; each module imports its framework through engine/model_scoring.import_transformers."""
