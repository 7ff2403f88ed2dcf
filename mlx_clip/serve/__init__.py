"""The inference server: `mlxclip serve` (app.py, service.py, batching.py, inputs.py, metrics.py)."""
