"""loadtest.ports: a free port that the kernel does not hand out to other processes by itself."""

from __future__ import annotations

import socket

from loadtest import ports


def test_a_free_port_is_below_the_ephemeral_range_and_bindable_now():
    low = ports.ephemeral_low()
    for _ in range(20):
        port = ports.free_port()
        assert ports.LOWEST_PORT <= port < low
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_port_in_use_is_not_handed_out(monkeypatch):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        taken = held.getsockname()[1]
        held.listen()
        picks = iter([taken, taken, taken + 1 if taken + 1 != 65536 else taken - 1])
        monkeypatch.setattr(ports._rng, "randrange", lambda lo, hi: next(picks))
        monkeypatch.setattr(ports, "ephemeral_low", lambda: 65536)
        assert ports.free_port() != taken


def test_the_ephemeral_range_is_read_from_the_kernel_or_defaults(tmp_path):
    f = tmp_path / "range"
    f.write_text("40000\t60999\n")
    assert ports.ephemeral_low(f) == 40000
    assert ports.ephemeral_low(tmp_path / "missing") == ports.DEFAULT_EPHEMERAL_LOW
    f.write_text("garbage\n")
    assert ports.ephemeral_low(f) == ports.DEFAULT_EPHEMERAL_LOW


def test_without_room_below_the_ephemeral_range_the_kernel_picks(monkeypatch):
    monkeypatch.setattr(ports, "ephemeral_low", lambda: ports.LOWEST_PORT + 10)
    port = ports.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
