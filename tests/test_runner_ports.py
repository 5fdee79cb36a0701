"""Ports for the servers a test or the demo starts: picked below the kernel's ephemeral range, so an outgoing
connection made between the pick and the server's bind cannot take the port (a live test failed once with
"address already in use" that way)."""

from __future__ import annotations

import socket

from include.simulators import runner


def test_ports_are_free_and_below_the_ephemeral_range():
    low, _ = runner.ephemeral_range()
    ports = {runner.free_port() for _ in range(50)}
    assert all(runner.PORT_FLOOR <= p < low for p in ports), sorted(ports)
    assert len(ports) > 10   # random: concurrent runs rarely pick the same port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports.pop()))


def test_a_taken_port_is_not_handed_out(monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", runner.free_port()))
        busy = taken.getsockname()[1]
        picks = iter([busy, busy])

        class Rigged:
            def randrange(self, low, high):
                return next(picks, None) or runner.random.randrange(low, high)

        monkeypatch.setattr(runner.random, "SystemRandom", Rigged)
        assert runner.free_port() != busy
        assert next(picks, None) is None   # the taken port was tried (twice) and skipped


def test_an_unusual_ephemeral_range_falls_back_to_the_kernel_s_pick(monkeypatch):
    monkeypatch.setattr(runner, "ephemeral_range", lambda: (1024, 65535))
    port = runner.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
