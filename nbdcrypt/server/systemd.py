"""systemd integration without libsystemd: readiness notification and socket activation.

sd_notify: a datagram to the unix socket named in $NOTIFY_SOCKET (a path, or an abstract name
when it starts with '@'): READY=1 once the server listens, STOPPING=1 when it begins to shut
down, STATUS=... lines, and WATCHDOG=1 every half $WATCHDOG_USEC when the unit sets WatchdogSec.
Socket activation: when $LISTEN_PID is this process, $LISTEN_FDS sockets start at fd 3, named by
$LISTEN_FDNAMES; the server serves on them instead of its configured addresses, as nbdkit does.
The variables are removed from the environment once read, so child processes do not inherit them.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import MutableMapping
from dataclasses import dataclass

log = logging.getLogger("nbdcrypt.systemd")

LISTEN_FDS_START = 3


class SystemdError(Exception):
    """Socket activation handed over something the server cannot listen on."""


@dataclass(frozen=True, slots=True)
class ActivatedSocket:
    """A listening socket inherited from the service manager."""

    sock: socket.socket
    name: str  # its FileDescriptorName= (systemd's default is the socket unit's name)

    @property
    def label(self) -> str:
        """tcp://HOST:PORT or unix://PATH, as the server's logs name listeners."""
        address = self.sock.getsockname()
        if self.sock.family == socket.AF_UNIX:
            path = address.decode(errors="replace") if isinstance(address, bytes) else address
            return f"unix://{path or '(unnamed)'}"
        host = f"[{address[0]}]" if self.sock.family == socket.AF_INET6 else address[0]
        return f"tcp://{host}:{address[1]}"


def activated_sockets(environ: MutableMapping[str, str] | None = None) -> list[ActivatedSocket]:
    """The sockets systemd passed to this process (none unless $LISTEN_PID is our pid)."""
    env = os.environ if environ is None else environ
    pid, count = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    names = env.get("LISTEN_FDNAMES", "")
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(var, None)
    if pid is None or count is None:
        return []
    if not pid.isdigit() or int(pid) != os.getpid():
        return []  # meant for another process (a parent that did not clear them)
    if not count.isdigit() or int(count) < 1:
        raise SystemdError(f"LISTEN_FDS={count!r}: expected a positive number of sockets")
    labels = names.split(":") if names else []
    found = []
    for i in range(int(count)):
        fd = LISTEN_FDS_START + i
        name = labels[i] if i < len(labels) else f"fd{fd}"
        found.append(ActivatedSocket(_listening_socket(fd, name), name))
    return found


def _listening_socket(fd: int, name: str) -> socket.socket:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise SystemdError(f"socket activation: fd {fd} ({name}): {exc.strerror}") from None
    if sock.type != socket.SOCK_STREAM or sock.family not in (
        socket.AF_INET,
        socket.AF_INET6,
        socket.AF_UNIX,
    ):
        raise SystemdError(
            f"socket activation: fd {fd} ({name}) is not a TCP or unix stream socket "
            "(use ListenStream= in the socket unit)"
        )
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise SystemdError(
            f"socket activation: fd {fd} ({name}) is not listening (Accept=no is required)"
        )
    os.set_inheritable(fd, False)
    sock.setblocking(False)
    return sock


class Notifier:
    """Sends sd_notify messages; does nothing when there is no $NOTIFY_SOCKET."""

    def __init__(self, environ: MutableMapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        target = env.pop("NOTIFY_SOCKET", None)
        self.watchdog_interval = _watchdog_interval(env)
        self._address: str | bytes | None = None
        if target:
            self._address = b"\0" + target[1:].encode() if target.startswith("@") else target

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, *assignments: str) -> bool:
        """Send `KEY=VALUE` lines in one datagram; False (logged once) if it could not go."""
        if self._address is None:
            return False
        message = "\n".join(assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, self._address)
        except OSError as exc:
            log.warning("sd_notify to %r failed: %s; not notifying any more", self._address, exc)
            self._address = None
            return False
        return True


def _watchdog_interval(env: MutableMapping[str, str]) -> float | None:
    """Seconds between WATCHDOG=1 pings: half of $WATCHDOG_USEC, if it is meant for us."""
    usec, pid = env.pop("WATCHDOG_USEC", None), env.pop("WATCHDOG_PID", None)
    if usec is None or not usec.isdigit() or int(usec) == 0:
        return None
    if pid is not None and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6
