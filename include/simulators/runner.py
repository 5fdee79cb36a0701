"""Run an ASGI app with uvicorn on 127.0.0.1 in a background thread (tests, benchmarks) or in the
foreground (``python -m include.simulators.<name> --port N``)."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import uvicorn


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    url: str
    port: int
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_in_thread(
    app,
    port: int = 0,
    *,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    startup_timeout: float = 15.0,
) -> RunningServer:
    """Start ``app`` on 127.0.0.1:``port`` (0 = a free port) and wait until it accepts connections."""
    port = port or free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        timeout_keep_alive=30,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"sim-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"simulator did not start on 127.0.0.1:{port}")
        time.sleep(0.02)
    scheme = "https" if ssl_certfile else "http"
    return RunningServer(url=f"{scheme}://127.0.0.1:{port}", port=port, server=server, thread=thread)


def serve_forever(app, port: int, *, ssl_certfile: str | None = None, ssl_keyfile: str | None = None) -> None:
    """Run ``app`` in the foreground on 127.0.0.1:``port`` until interrupted."""
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)
