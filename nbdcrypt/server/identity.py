"""Who is on the other end of a connection: what client rules match on.

Filled in from the socket when the connection is accepted (peer address, or the unix socket
peer's credentials from SO_PEERCRED) and, after NBD_OPT_STARTTLS, from the verified client
certificate (subject and subjectAltNames). Plain data: no key material ever lives here.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """The facts known about a client; fields that do not apply are None or empty."""

    transport: str  # "tcp" or "unix"
    address: str | None = None  # tcp: the peer's IP address, IPv6 without brackets
    port: int | None = None  # tcp: the peer's port
    pid: int | None = None  # unix: the peer process, from SO_PEERCRED
    uid: int | None = None
    gid: int | None = None
    tls: bool = False  # the session runs over TLS (after STARTTLS)
    tls_subject: str | None = None  # the verified client certificate's subject, RFC 4514
    tls_sans: tuple[str, ...] = ()  # its subjectAltNames, as "DNS:x", "IP:x", "email:x", "URI:x"

    def describe(self) -> str:
        """A short label for logs: never anything secret, bounded in length."""
        if self.transport == "unix":
            where = f"unix uid={self.uid} pid={self.pid}" if self.uid is not None else "unix"
        else:
            host = f"[{self.address}]" if self.address and ":" in self.address else self.address
            where = f"{host}:{self.port}"
        if self.tls:
            who = self.tls_subject or "no client certificate"
            return f"{where} tls({who[:120]})"
        return where


def identify(sock: socket.socket | None) -> PeerIdentity:
    """The identity a freshly accepted socket shows, before any TLS."""
    if sock is None:
        return PeerIdentity("unix")
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        peer = sock.getpeername()
        return PeerIdentity("tcp", address=str(peer[0]), port=int(peer[1]))
    if sock.family == socket.AF_UNIX:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        except OSError:
            return PeerIdentity("unix")
        pid, uid, gid = _UCRED.unpack(raw)
        return PeerIdentity("unix", pid=pid, uid=uid, gid=gid)
    return PeerIdentity("unix")
