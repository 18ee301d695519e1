"""NBD URIs as libnbd and qemu take them: `nbd://HOST[:PORT]/NAME` and
`nbd+unix:///NAME?socket=PATH` (the export name percent-decoded, the port 10809 by default).

TLS URIs (`nbds://`, `nbds+unix://`) are recognised and refused: the stress tool speaks NBD in
the clear only.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from nbdcrypt.nbd.constants import MAX_STRING

DEFAULT_PORT = 10809


class UriError(ValueError):
    """A URI this tool cannot use; the message names it and says why."""


@dataclass(frozen=True, slots=True)
class NbdUri:
    """Where to connect and which export to ask for."""

    text: str
    export: str
    host: str | None = None  # TCP
    port: int = DEFAULT_PORT
    socket: str | None = None  # unix socket path

    @property
    def is_unix(self) -> bool:
        return self.socket is not None

    def __str__(self) -> str:
        return self.text


def parse_uri(text: str) -> NbdUri:
    """Parse an NBD URI, or raise UriError."""
    try:
        parts = urlsplit(text)
    except ValueError as exc:
        raise UriError(f"{text}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme in ("nbds", "nbds+unix", "nbds+vsock", "nbd+vsock"):
        raise UriError(f"{text}: {scheme}:// is not supported (plain nbd:// and nbd+unix:// only)")
    if scheme not in ("nbd", "nbd+unix"):
        raise UriError(
            f"{text}: not an NBD URI (expected nbd://HOST[:PORT]/EXPORT or "
            "nbd+unix:///EXPORT?socket=PATH)"
        )
    export = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    if "\0" in export or len(export.encode()) > MAX_STRING:
        raise UriError(f"{text}: an export name holds no NUL and at most {MAX_STRING} bytes")
    if parts.fragment:
        raise UriError(f"{text}: a fragment (#...) is not allowed")
    query = _query(parts.query)
    if scheme == "nbd+unix":
        return _unix(text, parts.netloc, export, query)
    unknown = sorted(set(query))
    if unknown:
        raise UriError(f"{text}: unknown query parameter {unknown[0]!r}")
    host, port = _host_port(text, parts.netloc)
    return NbdUri(text, export, host=host, port=port)


def _query(text: str) -> dict[str, list[str]]:
    """Query parameters, percent-decoded (a '+' stays a '+', as in a path)."""
    params: dict[str, list[str]] = {}
    for item in filter(None, text.split("&")):
        key, _, value = item.partition("=")
        params.setdefault(unquote(key), []).append(unquote(value))
    return params


def _unix(text: str, netloc: str, export: str, query: dict[str, list[str]]) -> NbdUri:
    if netloc:
        raise UriError(f"{text}: nbd+unix:// takes no host (nbd+unix:///EXPORT?socket=PATH)")
    unknown = sorted(set(query) - {"socket"})
    if unknown:
        raise UriError(f"{text}: unknown query parameter {unknown[0]!r}")
    sockets = query.get("socket", [])
    if len(sockets) != 1 or not sockets[0]:
        raise UriError(f"{text}: nbd+unix:// needs exactly one ?socket=PATH")
    return NbdUri(text, export, socket=sockets[0])


def _host_port(text: str, netloc: str) -> tuple[str, int]:
    if "@" in netloc:
        raise UriError(f"{text}: a user name is not supported")
    if not netloc:
        raise UriError(f"{text}: missing host (nbd://HOST[:PORT]/EXPORT)")
    if netloc.startswith("["):
        end = netloc.find("]")
        if end < 0:
            raise UriError(f"{text}: missing ']' after the IPv6 address")
        host, rest = netloc[1:end], netloc[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise UriError(f"{text}: invalid IPv6 address {host!r}") from None
        if rest and not rest.startswith(":"):
            raise UriError(f"{text}: unexpected {rest!r} after the IPv6 address")
        port_text = rest[1:] if rest else ""
    else:
        host, _, port_text = netloc.partition(":")
        if not host:
            raise UriError(f"{text}: missing host")
    if not port_text:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise UriError(f"{text}: invalid port {port_text!r}")
    return host, int(port_text)
