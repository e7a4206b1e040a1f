"""The test harness's free ports: a port picked for a server that starts later is nobody
else's meanwhile, neither another test process's (xdist) nor one the kernel hands out."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from support import CLI_TIMEOUT_S, TEST_PORTS, free_port

HERE = Path(__file__).resolve().parent
#: A test process that takes every port of a range it can, prints them, and holds them until
#: its stdin closes.
HOLD_EVERY_PORT = """
import sys
from support import free_port
held = []
while True:
    try:
        held.append(free_port(ports=range({start}, {stop})))
    except OSError:
        break
print(*held, flush=True)
sys.stdin.read()
"""


class TestFreePort:
    def test_a_port_is_outside_the_range_the_kernel_hands_out(self) -> None:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        ports = [free_port() for _ in range(50)]

        assert all(port < low or port > high for port in ports), (low, high, ports)
        assert len(set(ports)) == len(ports)

    def test_a_port_another_process_holds_is_never_given(self) -> None:
        """Given another test process holding every port of a small range it could take (as
        a running session holds its servers' ports), this process is given none of them;
        once that process has exited, one of them."""
        mine = free_port()
        start = mine + 1 if mine + 9 <= TEST_PORTS.stop else mine - 8
        ports = range(start, start + 8)
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLD_EVERY_PORT.format(start=ports.start, stop=ports.stop)],
            cwd=HERE, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        try:
            assert holder.stdout is not None
            held = {int(port) for port in holder.stdout.readline().split()}
            assert held and held <= set(ports)

            with pytest.raises(OSError, match="no free port"):
                free_port(ports=ports)
        finally:
            holder.communicate("", timeout=CLI_TIMEOUT_S)

        assert free_port(ports=ports) in held

    def test_a_port_something_listens_on_is_never_given(self) -> None:
        with socket.socket() as listening:
            listening.bind(("127.0.0.1", 0))
            listening.listen()
            taken = listening.getsockname()[1]

            with pytest.raises(OSError, match="no free port"):
                free_port(ports=range(taken, taken + 1))
