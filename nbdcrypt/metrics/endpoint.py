"""The HTTP endpoint Prometheus scrapes: `GET /metrics` on the address of `server.metrics`.

A few lines of HTTP/1.x on the server's own event loop, not prometheus-client's threaded
server: a scrape then reads the counters between two requests of the loop, never while a
connection is changing them, and the endpoint starts and stops with the server (unix sockets
too). One request per connection (answered with `Connection: close`); GET and HEAD of
`/metrics` only. The exposition format follows the scraper's Accept header (Prometheus text,
or OpenMetrics when asked for). A client that sends no complete request head within
`timeout` seconds, or one larger than MAX_HEAD bytes, is answered 408/431 and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from dataclasses import dataclass

from prometheus_client.exposition import choose_encoder, generate_latest
from prometheus_client.registry import CollectorRegistry

from nbdcrypt.config.model import ListenAddress

log = logging.getLogger("nbdcrypt.metrics")

MAX_HEAD = 8192  # bytes of request line and headers
TIMEOUT = 10.0  # seconds to send them
PATH = "/metrics"
PLAIN = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest() writes


@dataclass(frozen=True, slots=True)
class Response:
    status: str  # "200 OK"
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    allow: str | None = None


def answer(registry: CollectorRegistry, head: bytes) -> tuple[Response, bool]:
    """The response to a request head (request line and headers), and whether it was a HEAD."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return Response("400 Bad Request", b"expected an HTTP/1.x request line\n"), False
    method, target, _ = parts
    if method not in ("GET", "HEAD"):
        return Response("405 Method Not Allowed", b"only GET\n", allow="GET, HEAD"), False
    if target.split("?", 1)[0] != PATH:
        return Response("404 Not Found", f"the metrics are at {PATH}\n".encode()), method == "HEAD"
    accept = ""
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "accept":
            accept = value.strip()
    body, content_type = _encode(registry, accept)
    return Response("200 OK", body, content_type), method == "HEAD"


def _encode(registry: CollectorRegistry, accept: str) -> tuple[bytes, str]:
    """The exposition in the format the Accept header asks for, or Prometheus text."""
    try:
        encoder, content_type = choose_encoder(accept)
        return encoder(registry), content_type
    except (TypeError, ValueError):  # a version or escaping prometheus-client cannot read
        return generate_latest(registry), PLAIN


def _render(response: Response, head_only: bool) -> bytes:
    lines = [
        f"HTTP/1.1 {response.status}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Connection: close",
    ]
    if response.allow is not None:
        lines.append(f"Allow: {response.allow}")
    out = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return out if head_only else out + response.body


class MetricsEndpoint:
    """Serves `registry` over HTTP on `address` (tcp or unix) until closed."""

    def __init__(
        self, registry: CollectorRegistry, address: ListenAddress, *, timeout: float = TIMEOUT
    ) -> None:
        self.registry = registry
        self.address = address
        self.timeout = timeout
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen (OSError if the address is in use or cannot be bound)."""
        if self.address.scheme == "unix":
            assert self.address.path is not None
            _remove_stale_socket(str(self.address.path))
            self.address.path.parent.mkdir(parents=True, exist_ok=True)
            self._server = await asyncio.start_unix_server(
                self._client, str(self.address.path), limit=MAX_HEAD
            )
        else:
            self._server = await asyncio.start_server(
                self._client,
                self.address.host or None,
                self.address.port,
                limit=MAX_HEAD,
                reuse_address=True,
            )
        log.info("metrics at %s", ", ".join(self.urls))

    @property
    def urls(self) -> list[str]:
        """Where Prometheus scrapes, with real port numbers (for port 0)."""
        found = []
        for sock in self._server.sockets if self._server is not None else ():
            name = sock.getsockname()
            if isinstance(name, tuple):
                host = f"[{name[0]}]" if ":" in name[0] else name[0]
                found.append(f"http://{host}:{name[1]}{PATH}")
            else:
                found.append(f"unix://{name} {PATH}")
        return found

    async def close(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        for task in list(self._clients):
            task.cancel()
        if self._clients:
            await asyncio.gather(*self._clients, return_exceptions=True)
        if self.address.scheme == "unix" and self.address.path is not None:
            _remove_stale_socket(str(self.address.path))

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._clients.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                head = await reader.readuntil(b"\r\n\r\n")
        except TimeoutError:
            response, head_only = Response("408 Request Timeout", b"no request\n"), False
        except asyncio.LimitOverrunError:
            response, head_only = Response("431 Request Header Fields Too Large", b""), False
        except asyncio.IncompleteReadError:
            return  # the client left before it asked anything
        else:
            try:
                response, head_only = answer(self.registry, head[:-4])
            except Exception:  # a bug in a collector: logged, the scraper sees a 500
                log.exception("metrics: scrape failed")
                response, head_only = Response("500 Internal Server Error", b"see the log\n"), False
        writer.write(_render(response, head_only))
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(self.timeout):
                await writer.drain()


def _remove_stale_socket(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
