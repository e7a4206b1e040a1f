"""The test harness's free ports: a port picked for a server that starts later is nobody
else's meanwhile, neither another test process's (xdist) nor one the kernel hands out."""

from __future__ import annotations

import os
import select
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from support import (
    CLI_TIMEOUT_S,
    RESERVATIONS,
    SERVICE_PORTS,
    TEST_PORTS,
    free_port,
    port_range_for,
)

HERE = Path(__file__).resolve().parent
#: A test process starts and takes a few ports in well under a second; a minute means it hung.
HOLDER_TIMEOUT_S = 60
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
#: A test process under a soft limit of 64 file descriptors that asks for 200 ports, one
#: after another as a long session does, and prints how many it was given.
MANY_PORTS_FEW_DESCRIPTORS = """
import resource
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
from support import free_port
print(len([free_port() for _ in range(200)]), flush=True)
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
            ready, _, _ = select.select([holder.stdout], [], [], HOLDER_TIMEOUT_S)
            assert ready, f"the holding process printed nothing in {HOLDER_TIMEOUT_S} s"
            held = {int(port) for port in holder.stdout.readline().split()}
            assert held and held <= set(ports)

            with pytest.raises(OSError, match="no free port"):
                free_port(ports=ports)
        finally:
            try:
                holder.communicate("", timeout=HOLDER_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                holder.kill()
                holder.communicate(timeout=HOLDER_TIMEOUT_S)
                raise

        assert free_port(ports=ports) in held

    def test_a_port_something_listens_on_is_never_given(self) -> None:
        with socket.socket() as listening:
            listening.bind(("127.0.0.1", 0))
            listening.listen()
            taken = listening.getsockname()[1]

            with pytest.raises(OSError, match="no free port"):
                free_port(ports=range(taken, taken + 1))

    @pytest.mark.parametrize("port", sorted(SERVICE_PORTS))
    def test_a_port_of_a_service_is_never_given(self, port: int) -> None:
        """Even when the service is not running here (its port free to bind)."""
        with pytest.raises(OSError, match="no free port"):
            free_port(ports=range(port, port + 1))

    def test_a_long_session_never_runs_out_of_file_descriptors(self) -> None:
        """Each reservation holds a descriptor: a process is given more ports than its limit
        of descriptors allows it to hold, the oldest reservations let go."""
        done = subprocess.run(
            [sys.executable, "-c", MANY_PORTS_FEW_DESCRIPTORS], cwd=HERE, capture_output=True,
            text=True, timeout=CLI_TIMEOUT_S, check=False,
        )

        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.split() == ["200"]


class TestThePortRange:
    def test_it_ends_where_the_kernels_ephemeral_range_starts(self) -> None:
        assert port_range_for("40000\t60999\n") == range(20000, 40000)
        assert port_range_for("32768\t60999\n") == range(20000, 32768)

    @pytest.mark.parametrize("text", [None, "", "garbage", "32768"])
    def test_without_a_readable_range_it_ends_at_linuxs_default(self, text: str | None) -> None:
        assert port_range_for(text) == range(20000, 32768)

    def test_a_range_tuned_to_start_low_leaves_the_ports_above_it(self) -> None:
        """A kernel handing out 10000-60000 (a tuned machine, a container) leaves the
        ports above 60000: the suite still runs, on those."""
        assert port_range_for("10000\t60000\n") == range(60001, 65536)

    def test_a_range_that_leaves_nothing_falls_back_with_a_warning(self) -> None:
        with pytest.warns(UserWarning, match="ip_local_port_range"):
            assert port_range_for("1024\t65535\n") == range(20000, 32768)


class TestTheReservations:
    def test_they_are_kept_in_a_directory_only_this_user_may_enter(self) -> None:
        """Per user, so a second user on the machine is not locked out by the first's files."""
        free_port()

        status = RESERVATIONS.lstat()
        assert stat.S_ISDIR(status.st_mode)
        assert status.st_uid == os.getuid()
        assert stat.S_IMODE(status.st_mode) == 0o700
        assert RESERVATIONS.name.endswith(f"-{os.getuid()}")

    def test_a_symlink_in_place_of_the_directory_is_refused(self, tmp_path: Path) -> None:
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir(mode=0o700)
        link = tmp_path / "ports"
        link.symlink_to(elsewhere)

        with pytest.raises(RuntimeError, match="symlink"):
            free_port(reservations=link)
        assert list(elsewhere.iterdir()) == []

    def test_a_directory_others_may_write_in_is_refused(self, tmp_path: Path) -> None:
        shared = tmp_path / "ports"
        shared.mkdir()
        shared.chmod(0o777)

        with pytest.raises(RuntimeError, match="world writable"):
            free_port(reservations=shared)
        assert list(shared.iterdir()) == []

    @pytest.mark.skipif(os.getuid() != 0, reason="only root can give a directory away")
    def test_another_users_directory_is_refused(self, tmp_path: Path) -> None:
        theirs = tmp_path / "ports"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 65534, 65534)

        with pytest.raises(RuntimeError, match="another user's"):
            free_port(reservations=theirs)

    def test_a_symlink_in_place_of_a_lock_file_is_not_followed(self, tmp_path: Path) -> None:
        """The port whose lock file is a symlink is not given, and its target is not created;
        the port beside it, whose lock file is a plain one, is (the positive control)."""
        private = tmp_path / "ports"
        private.mkdir(mode=0o700)
        port = free_port()  # free of listeners; its reservation is in another directory
        target = tmp_path / "target"
        (private / str(port)).symlink_to(target)

        with pytest.raises(OSError, match="no free port"):
            free_port(ports=range(port, port + 1), reservations=private)
        assert not target.exists()

        (private / str(port)).unlink()
        assert free_port(ports=range(port, port + 1), reservations=private) == port
