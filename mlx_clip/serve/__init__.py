"""The inference server, `mlxclip serve`: routes (app.py) behind a gate (gate.py), request bodies
(bodies.py) and their checks (inputs.py, formats.py, limits.py), the model service and its thread
pools (service.py, batching.py), errors in our shape and OpenAI's (error_shapes.py), server_metrics.py, and the
uvicorn process (server.py)."""
