"""Run the inspection app with uvicorn, under the binding rules: loopback freely, anything else with a token.

``serve`` blocks (the ``inspect`` command); ``running_server`` runs the app in a background
thread on an already-bound socket (port 0 picks a free one) and yields its base URL, for
scripts, notebooks and tests.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from spectransfer.inspect import InspectError
from spectransfer.loopback import is_loopback

log = logging.getLogger(__name__)


def check_bind(host: str, token: str | None) -> None:
    """Refuse to bind a non-loopback address without a token."""
    if not is_loopback(host) and not token:
        raise InspectError(f"--host {host} exposes the page beyond this machine: give --token (or set SPECTRANSFER_TOKEN)")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InspectError(f"cannot bind {host}:{port} ({exc.strerror or exc})") from exc
    sock.listen(128)
    return sock


def _config(app: Any, log_level: str) -> Any:
    import uvicorn

    return uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="off", timeout_graceful_shutdown=2)


def url_for(host: str, port: int, token: str | None = None) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


def serve(
    app: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    on_ready: Any = None,
    log_level: str = "warning",
) -> None:
    """Serve ``app`` until interrupted; ``on_ready(url)`` is called once the socket is bound."""
    import uvicorn

    check_bind(host, token)
    sock = _bind(host, port)
    server = uvicorn.Server(_config(app, log_level))
    if on_ready is not None:
        on_ready(url_for(host, sock.getsockname()[1], token))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


@contextmanager
def running_server(app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> Iterator[str]:
    """Run ``app`` in a daemon thread; yield ``http://host:port``; stop it on exit."""
    import uvicorn

    sock = _bind(host, port)
    server = uvicorn.Server(_config(app, log_level))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="spectransfer-inspect")
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise InspectError("the inspection server did not start")
            time.sleep(0.02)
        yield url_for(host, sock.getsockname()[1]).rstrip("/")
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
