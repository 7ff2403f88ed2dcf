"""`mlxclip serve`: the app on uvicorn, the model loading while `/health` answers 503.

Ctrl-C (SIGINT) and SIGTERM are a clean shutdown: uvicorn stops accepting, lets requests in flight
finish (up to 5 s), stops the model service, and the command returns, exit code 0. uvicorn, once
done, raises the signal it caught again for the handler it found; ours makes that the end.
"""

from __future__ import annotations

import signal
import socket

from mlx_clip.errors import ConfigError
from mlx_clip.serve.service import ServeSettings


def check_port(host: str, port: int) -> None:
    """Refuse a taken port before anything loads (uvicorn would log it and exit 1 after startup)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None


class _Stop(Exception):
    """SIGINT or SIGTERM, outside uvicorn's own handling (before it starts or after it ends)."""


def _stop(signum, frame) -> None:
    raise _Stop(signal.Signals(signum).name)


def serve(settings: ServeSettings, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    import threading

    main = threading.current_thread() is threading.main_thread()  # where Python delivers signals
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        _serve(settings, host=host, port=port, log_level=log_level)
    except _Stop:
        pass  # a shutdown asked for: nothing failed
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve(settings: ServeSettings, *, host: str, port: int, log_level: str) -> None:
    import uvicorn

    from mlx_clip.api import resolve
    from mlx_clip.serve.app import create_app

    resolve(settings.model, allow_pickle=settings.allow_pickle)  # a bad --model fails now, in one line
    if settings.index is not None and not (settings.index / "index.json").is_file():
        raise ConfigError(f"--index {settings.index}: not an index folder (build one with `mlxclip index`)")
    check_port(host, port)
    failure: list[str] = []

    def on_load_failure(message: str) -> None:
        failure.append(message)
        server.should_exit = True

    app = create_app(settings, on_load_failure=on_load_failure)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=5))
    server.run()
    if failure:
        raise ConfigError(failure[0])
