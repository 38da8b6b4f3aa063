"""A free TCP port on 127.0.0.1 for a server this process is about to start.

Asking the kernel for port 0 and closing the socket leaves a race: that port comes from the
ephemeral range (`net.ipv4.ip_local_port_range`), the same range every outgoing connection's
local port and every "any port" listener (Ray starts dozens) is drawn from, so between the close
and the server's bind another process may take it (seen: Ray Serve's HAProxy failing to bind its
Prometheus port, "Address already in use").  `free_port` picks a port below the ephemeral range
instead, which the kernel never hands out by itself, and checks that it is free now.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

PORT_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST_PORT = 20000  # below this: registered services more often
DEFAULT_EPHEMERAL_LOW = 32768  # Linux's default lower bound
_rng = random.Random()


def ephemeral_low(path: Path = PORT_RANGE_FILE) -> int:
    """The lowest port of the kernel's ephemeral range (Linux; its default elsewhere)."""
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return DEFAULT_EPHEMERAL_LOW


def _bindable(port: int, host: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1", attempts: int = 200) -> int:
    """A port on `host` that is free now and outside the ephemeral range (random, so that
    concurrent callers rarely pick the same one); the kernel's own pick if none is found."""
    high = ephemeral_low()
    if high - LOWEST_PORT >= 100:
        for _ in range(attempts):
            port = _rng.randrange(LOWEST_PORT, high)
            if _bindable(port, host):
                return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
