"""Run an ASGI app with uvicorn on 127.0.0.1 in a background thread (tests, benchmarks) or in the
foreground (``python -m include.simulators.<name> --port N``)."""

from __future__ import annotations

import random
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn

EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
PORT_FLOOR = 20000   # ports are picked from here up to just below the kernel's ephemeral range


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux default 32768-60999)."""
    try:
        low, high = (int(v) for v in EPHEMERAL_RANGE_FILE.read_text().split()[:2])
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A loopback port that is free now, for a server started a little later (a simulator, Airflow's API
    server, Postgres, Redis).

    Taken at random below the kernel's ephemeral range: a port the kernel hands out itself (``bind(0)``) lies
    in that range, where any outgoing connection made meanwhile (Airflow's processes open many) can take it
    before the server binds it ("address already in use"); random, so that two test runs on one machine
    rarely pick the same one."""
    low = ephemeral_range()[0]
    if low - PORT_FLOOR >= 1000:
        pick = random.SystemRandom()
        for _ in range(100):
            port = pick.randrange(PORT_FLOOR, low)
            if _bindable(port):
                return port
    with socket.socket() as sock:   # an unusual ephemeral range: the kernel's pick
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
