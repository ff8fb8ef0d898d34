"""math layer: pure functions on tensors. No files, no printing."""
