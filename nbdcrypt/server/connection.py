"""One client connection: bytes between socket and NBD codec, requests to the export.

It is an asyncio Protocol, not a stream: requests are parsed in data_received and each is run
with server/eager.py, so a request that never waits costs no task. Replies go out in
completion order. Memory is bounded by pausing reads while the payloads held plus the replies
queued for the socket exceed the connection's cap.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Coroutine
from functools import partial
from typing import TYPE_CHECKING, Any, cast

from nbdcrypt.metrics.counters import (
    PACK,
    ROW_BITS,
    SHIFT,
    ExportCounters,
    command_slot,
    identity_class,
    new_histogram,
    record,
    requests_in,
)
from nbdcrypt.nbd import handshake as hs
from nbdcrypt.nbd.constants import (
    STATE_ZERO,
    Cmd,
    CmdFlag,
    Errno,
    Rep,
    wire_errno,
)
from nbdcrypt.nbd.transmission import (
    REQUEST_SIZE,
    BadCommand,
    Command,
    Disconnect,
    FramingError,
    RequestParser,
    block_status_chunk,
    data_chunk_header,
    error_chunk,
    hole_chunk,
    simple_reply,
)
from nbdcrypt.request import Extent, Op, ReqFlag, Request
from nbdcrypt.server import eager, threaded
from nbdcrypt.server.identity import PeerIdentity, identify
from nbdcrypt.server.splice import SpliceTarget
from nbdcrypt.tls import describe_tls_error, peer_names

if TYPE_CHECKING:
    from nbdcrypt.device import Device
    from nbdcrypt.export import Export, OpenExport
    from nbdcrypt.server.app import ServerState
    from nbdcrypt.server.lockedloop import LockedLoop

log = logging.getLogger("nbdcrypt.connection")

SPARSE_READ_MIN = 64 * 1024  # structured reads this large report holes as OFFSET_HOLE chunks
_SHUTDOWN_GRACE = 2.0  # seconds a shutting-down connection waits for the client's DISC
_TLS_CLOSE_TIMEOUT = 5.0  # seconds a closing TLS connection waits to flush and for close_notify
_OP_READ = Op.READ
_OP_WRITE = Op.WRITE
_PASS_FLAGS = int(ReqFlag.FUA | ReqFlag.NO_HOLE | ReqFlag.FAST_ZERO)
# ReqFlag(n) costs a microsecond (enum's composite lookup): one per request, looked up instead
_REQ_FLAGS = tuple(ReqFlag(n & _PASS_FLAGS) for n in range(_PASS_FLAGS + 1))


READ_BUFFER = 256 * 1024  # per connection: what one read from the socket can take
DIRECT_PAYLOAD = 64 * 1024  # write payloads this large are read from the socket in place
# A unix socket's send buffer (default 208 KiB) holds less than one 256 KiB read reply, so
# every large reply would leave in two sends with an epoll round in between while the client
# waits. 4 MiB (the kernel doubles it, and caps it at net.core.wmem_max) holds many. TCP is
# left to the kernel's autotuning, which setting SO_SNDBUF would turn off.
UNIX_SEND_BUFFER = 4 * 1024 * 1024


class Connection(asyncio.BufferedProtocol):
    """The server side of one NBD session.

    A BufferedProtocol: the socket is read into a buffer this connection owns, and the rest of
    a large write payload is read straight into the payload's own buffer, so its bytes are
    copied once (kernel to payload) before they go to the device.
    """

    _device: Device  # the export's top device, set when transmission starts
    _transport: asyncio.Transport  # set in connection_made

    def __init__(self, state: ServerState, listener: str) -> None:
        self.state = state
        self.listener = listener
        self.peer = "?"
        self.identity = PeerIdentity("unix")  # set in connection_made; TLS adds to it
        self.export: Export | None = None
        self.view: OpenExport | None = None  # the export as this client opened it (key, access)
        self._key_view: OpenExport | None = None  # in transmission: the key context it uses
        self.transport: asyncio.Transport | None = None
        self._handshake: hs.ServerHandshake | None = hs.ServerHandshake(
            tls_required=state.tls_required
        )
        self._tls_early: bytearray | None = None  # upgrading: decrypted bytes that came early
        self._tls_task: asyncio.Task[None] | None = None
        self._parser: RequestParser | None = None
        self._structured = False
        self._handlers: dict[int, Callable[[Command], Coroutine[Any, Any, None]]] = {}
        self._sparse_read_min = 1 << 64
        self._inflight = 0
        self._held = 0  # payload bytes held by requests in flight
        self._reading_paused = False
        self._writing_paused = False
        self._disconnecting = False
        self._shutting_down = False
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._timer: asyncio.TimerHandle | None = None
        self._opened = time.monotonic()
        self._read_view = memoryview(bytearray(READ_BUFFER))
        # The last get_buffer() gave the rest of a write payload (the connection threads fill
        # it whole, then call buffer_updated once).
        self.reading_payload = False
        # The last read brought one whole request, small: the client may wait for its reply
        # before it sends more (server/poll.py polls for the next request only then).
        self.lone_request = False
        # After a large write payload, read only the next request's header, so that its payload
        # (likely large too) goes straight into its own buffer instead of through _read_view.
        self._header_only = False
        self._header_view = self._read_view[:REQUEST_SIZE]
        self.latency = new_histogram()  # requests that finished at once (metrics/counters.py)
        self._late = 0  # requests that finished in a task (counted in the export's histogram)
        self._counters: ExportCounters | None = None  # the export's, from transmission on
        self._attached = False  # its counts are read from here (until closed and idle)
        self._counted = False  # in the connections total (once its identity is settled)
        self._aborted = False  # the client ended the handshake with NBD_OPT_ABORT
        self._refused: str | None = None  # the handshake's last refusal, for the metrics
        self.bytes_read = 0
        self.bytes_written = 0
        self.spliced = 0  # writes whose payloads went from the socket to the file by splice
        self.sealed = 0  # encrypted writes the connection thread landed itself
        self.seals = False  # the export's device may hand encrypted writes over (seal_target)
        self.splices = False  # the export's device may take payloads by splice (splice_target)
        # The last read left a large write's payload to come: splice_target may have a place.
        self.splice_ready = False
        self.over_limit = False
        # While a received batch runs, replies collect here and leave in one writev.
        self._batch: list[bytes | bytearray | memoryview] | None = None
        self._batch_bytes = 0
        self._queue: deque[Any] = deque()  # parsed events not yet run (over the cap)
        self._cap = state.limits.max_inflight_bytes

    # asyncio callbacks ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport = self._transport = transport
        sock = transport.get_extra_info("socket")
        self.identity = identify(sock)
        if self.identity.transport == "tcp":
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.peer = self.identity.describe()
        else:
            self.peer = f"{self.listener}#{self.state.next_serial()}"
            if sock is not None and sock.family == socket.AF_UNIX:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SEND_BUFFER)
        transport.set_write_buffer_limits(high=self.state.limits.max_inflight_bytes // 2)
        self.over_limit = not self.state.register(self)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.state.limits.handshake_timeout, self._handshake_expired)
        assert self._handshake is not None
        transport.write(self._handshake.data_to_send())
        log.debug("%s: connected", self.peer)

    def get_buffer(self, sizehint: int) -> memoryview:
        parser = self._parser
        if parser is not None:
            target = parser.payload_buffer()
            if target is not None:
                self.reading_payload = True
                return target
        self.reading_payload = False
        return self._header_view if self._header_only else self._read_view

    def buffer_updated(self, nbytes: int) -> None:
        parser = self._parser
        if self.reading_payload:
            assert parser is not None
            events = parser.payload_received(nbytes)
            self.lone_request = self.splice_ready = False
            if events:  # a payload is complete; big ones come in runs (sequential writes)
                self._header_only = cast(Command, events[0]).length >= DIRECT_PAYLOAD
                self._on_events(events)
        elif parser is not None:
            if nbytes == REQUEST_SIZE:  # one header (a depth-1 client, or header-only reads)
                events = parser.feed_header(self._read_view)
            else:
                events = parser.feed(self._read_view[:nbytes], reused=True)
            pending = parser.pending_payload
            self._header_only = self.splice_ready = pending >= DIRECT_PAYLOAD
            self.lone_request = len(events) == 1 and not pending and nbytes < DIRECT_PAYLOAD
            if events:
                self._on_events(events)
            elif self._held:  # only a payload began: the cap may count it (_update_reading)
                self._update_reading()
        else:
            self.data_received(self._read_view[:nbytes].tobytes())

    def splice_target(self) -> SpliceTarget | None:
        """Where the payload next on the wire can go straight from the socket
        (server/splice.py), or None if it must be read into its buffer. Only a large write
        without flags, with nothing queued before it, whose bytes land unchanged in one file
        or (sealed) whose device lets the thread encrypt them and write them to one file; the
        connection thread moves it, then calls payload_spliced."""
        parser = self._parser
        header = parser.unstarted_write() if parser is not None else None
        if header is None or header[1] or header[4] < DIRECT_PAYLOAD:
            return None
        if self._queue or self._shutting_down:
            return None
        if self.seals:
            assert parser is not None
            sealed = self._device.seal_target(header[3], header[4])
            if sealed is None:
                return None
            reply = simple_reply(header[2])
            buffer = parser.payload_buffer()
            return SpliceTarget(header[4], sealed.fd, sealed.offset, reply, buffer, sealed.begin)
        target = self._device.splice_target(header[3], header[4])
        if target is None:
            return None
        return SpliceTarget(header[4], target[0], target[1], simple_reply(header[2]))

    def payload_spliced(self, sealed: bool, error: OSError | None, nanoseconds: int) -> None:
        """The thread moved splice_target()'s payload to the file (`sealed`: encrypted it on
        the way): the write is done. A failed one's error reply is queued as _write's would
        be; a successful one's reply (`target.reply`) the thread sent itself, with no lock
        held, before it read the next header (or could not: then the connection is gone)."""
        assert self._parser is not None
        cmd, flags, handle, offset, length = self._parser.payload_taken()
        self._header_only = True  # the next payload is likely large too
        self.lone_request = self.splice_ready = self.reading_payload = False
        if sealed:
            self.sealed += 1
        else:
            self.spliced += 1
        if error is None:
            self.bytes_written += length
        else:
            self._fail(Command(cmd, flags, handle, offset, length, None), error)
        record(self.latency, cmd, nanoseconds)

    def payload_arrived(self, nbytes: int) -> None:
        """splice_target()'s payload was received whole into its buffer, but its write must
        take the ordinary path after all (its keyslot only after a wait)."""
        self.reading_payload = True
        self.buffer_updated(nbytes)

    @property
    def header_buffer(self) -> memoryview:
        """Where the next request's header is read after a spliced write (get_buffer's
        answer once payload_spliced has run, known before it runs)."""
        return self._header_view

    def data_received(self, data: bytes) -> None:
        """Bytes that arrived outside the read buffer (the handshake's leftovers, and tests)."""
        parser = self._parser
        if parser is not None:
            self._on_events(parser.feed(data))
        elif self._handshake is not None:
            if self._tls_early is not None:  # options decrypted before start_tls returned:
                self._tls_early += data  # held until the upgrade is done and identity known
                return
            self._handshake.receive_data(data)
            self._drive_handshake()

    def eof_received(self) -> bool | None:
        self._disconnecting = True
        self._close_when_idle()
        if self.identity.tls:
            return None  # TLS closes the transport after EOF whatever we say
        return True  # keep the write side open until in-flight replies are sent

    def connection_lost(self, exc: Exception | None) -> None:
        if self._closed.done():  # already called (after a failed TLS handshake)
            return
        self._disconnecting = True
        if self._timer is not None:
            self._timer.cancel()
        self.state.unregister(self)
        self._count_connection()
        if self._parser is not None and self.view is not None:
            self.view.export.device.openers -= 1
            self._parser.close()  # its half-received payload can never complete
        elif self._refused or not self._aborted:  # NBD_OPT_ABORT after a refusal counts too
            failures = self.state.counters.connections.handshake_failures
            failures[self._refused or "disconnected"] += 1
        if not self._closed.done():
            self._closed.set_result(None)
        if self.view is not None:
            seconds = time.monotonic() - self._opened
            requests = self.requests
            poller = getattr(self._transport, "poller", None)  # threads only: server/poll.py
            polled = poller.hits if poller is not None else 0
            log.info(
                "%s: %s closed export %r (%s) after %.1fs: %d requests, %d bytes read, "
                "%d written%s%s%s%s",
                self.peer,
                self.identity.describe(),
                self.view.name,
                _key_label(self.view),
                seconds,
                requests,
                self.bytes_read,
                self.bytes_written,
                f", {polled} received by busy polling" if polled else "",
                f", {self.spliced} spliced" if self.spliced else "",
                f", {self.sealed} sealed" if self.sealed else "",
                f" ({exc})" if exc else "",
                extra=self._log_fields(
                    self.view,
                    "close",
                    seconds=round(seconds, 3),
                    requests=requests,
                    bytes_read=self.bytes_read,
                    bytes_written=self.bytes_written,
                    busy_polled=polled,
                    spliced=self.spliced,
                    sealed=self.sealed,
                    error=str(exc) if exc else None,
                ),
            )
        else:
            log.debug("%s: closed during the handshake%s", self.peer, f" ({exc})" if exc else "")
        self._close_when_idle()  # leaves the key context now, or after the last request
        # The handlers are bound methods: a reference cycle that kept every closed connection,
        # and the payload buffers it held, alive until the cyclic GC ran (hundreds of MiB with
        # clients that vanish mid-write). Requests still running need them no more.
        self._handlers = {}

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._update_reading()

    # Handshake ------------------------------------------------------------------------------

    def _drive_handshake(self) -> None:
        machine = self._handshake
        assert machine is not None and self.transport is not None
        while True:
            event = machine.next_event()
            if event is hs.NEED_DATA:
                break
            started = self._on_option(machine, event)
            out = machine.data_to_send()
            if out:
                self.transport.write(out)
            if started is not None:
                self._enter_transmission(started)
                return
            if machine.state is hs.State.CLOSED:
                self.transport.close()
                return
            if machine.state is hs.State.TLS_HANDSHAKE:
                self._start_tls()
                return

    def _on_option(
        self, machine: hs.ServerHandshake, event: object
    ) -> hs.TransmissionStarted | None:
        if isinstance(event, hs.ProtocolError):
            self._refused = "protocol"
            log.info("%s: handshake refused: %s", self.peer, event.reason)
            return None
        if isinstance(event, hs.Aborted):
            self._aborted = True
            return None
        if isinstance(event, hs.OptionAnswered):
            return None
        if self.over_limit or self._shutting_down:
            self._refused = "shutdown" if self._shutting_down else "limit"
            why = "the server is shutting down" if self._shutting_down else "too many connections"
            rep = Rep.ERR_SHUTDOWN if self._shutting_down else Rep.ERR_POLICY
            machine.reply_error(rep, why)
            return None
        if isinstance(event, hs.ListExports):
            listed = self.state.access.listed(self.identity)
            machine.reply_list((e.name, e.description) for e in listed)
        elif isinstance(event, hs.StartTLSRequest):
            if self.state.tls is None:
                machine.reply_error(Rep.ERR_POLICY, "TLS is not configured on this server")
            else:
                machine.reply_starttls()
        elif isinstance(event, hs.MetaContextRequest):
            if self.state.access.open(self.identity, event.export) is None:
                machine.reply_error(Rep.ERR_UNKNOWN, f"unknown export {event.export!r}")
            else:
                machine.reply_meta_context()
        elif isinstance(event, hs.ExportInfoRequest):
            return self._on_info(machine, event)
        elif isinstance(event, hs.ExportNameRequest):
            view = self._open(event.name)
            if view is None:
                log.info("%s: EXPORT_NAME %r: no such export, closing", self.peer, event.name)
                machine.reply_error(Rep.ERR_UNKNOWN, "")
                return None
            self.view, self.export = view, view.export
            flags = view.transmission_flags(structured=machine.structured_replies)
            return machine.reply_export_name(size=view.size, flags=flags)
        return None

    def _open(self, name: str) -> OpenExport | None:
        """This client's view of export `name` (its key context), or None: no such export, or
        none its client rule grants (answered alike: other tenants' exports stay unseen)."""
        view = self.state.access.open(self.identity, name)
        if view is None:
            self._refused = "unknown_export"
        if view is None and self.state.access.find(name) is not None:
            self._refused = "denied"
            who = self.identity.describe()
            log.info("%s: %s may not open %r: no client rule grants it", self.peer, who, name)
        return view

    def _on_info(
        self, machine: hs.ServerHandshake, event: hs.ExportInfoRequest
    ) -> hs.TransmissionStarted | None:
        view = self._open(event.name)
        if view is None:
            machine.reply_error(Rep.ERR_UNKNOWN, f"unknown export {event.name!r}")
            return None
        if event.go:
            self.view, self.export = view, view.export
        return machine.reply_info(
            name=view.name,
            size=view.size,
            flags=view.transmission_flags(structured=machine.structured_replies),
            description=view.export.description,
            block_sizes=view.block_sizes,
        )

    def _enter_transmission(self, started: hs.TransmissionStarted) -> None:
        view = self.view
        assert view is not None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._handshake = None
        neg = started.negotiated
        self._structured = neg.structured_replies
        self._parser = RequestParser(
            size=view.size,
            transmission_flags=view.transmission_flags(structured=neg.structured_replies),
            block_status=neg.base_allocation,
            min_block=view.block_sizes[0],
        )
        self._device = view.io
        self.splices = view.io.splices
        self.seals = view.io.seals
        view.export.device.openers += 1
        self.state.key_users.join(view, self)
        self._key_view = view
        self._counters = self.state.counters.export(view.name)
        self._counters.attach(self)
        self._attached = True
        self._count_connection()
        # Holes are worth looking for only where they read as zeroes: not through a key.
        sparse = neg.structured_replies and view.sparse_reads
        self._sparse_read_min = SPARSE_READ_MIN if sparse else 1 << 64
        device = self._device
        self._handlers = {
            Cmd.READ: self._read,
            Cmd.WRITE: self._write,
            Cmd.FLUSH: self._flush,
            Cmd.TRIM: partial(self._ranged, Op.TRIM, device.trim),
            Cmd.WRITE_ZEROES: partial(self._ranged, Op.WRITE_ZEROES, device.write_zeroes),
            Cmd.CACHE: partial(self._ranged, Op.CACHE, device.cache),
            Cmd.BLOCK_STATUS: self._block_status,
        }
        log.info(
            "%s: %s opened export %r with %s (%s, %d bytes%s%s)",
            self.peer,
            self.identity.describe(),
            view.name,
            _key_label(view),
            "read-only" if view.readonly else "read-write",
            view.size,
            ", structured replies" if neg.structured_replies else "",
            ", base:allocation" if neg.base_allocation else "",
            extra=self._log_fields(view, "open", readonly=view.readonly, size=view.size),
        )
        loop = threaded.thread_loop()
        if loop is not None and not self.identity.tls and self._hand_to_thread(loop, started):
            return
        if started.trailing:
            self.data_received(started.trailing)

    def _hand_to_thread(self, loop: LockedLoop, started: hs.TransmissionStarted) -> bool:
        """Run the transmission phase on a thread of its own (server/threaded.py): the socket
        leaves the loop's transport for a blocking one the thread owns. False if it cannot."""
        old = self._transport
        raw = old.get_extra_info("socket")
        if raw is None or old.get_write_buffer_size() or old.is_closing():
            return False  # the handshake's last reply is still queued: stay on the loop
        sock = socket.socket(fileno=os.dup(raw.fileno()))
        old.set_protocol(_Detached())
        old.abort()  # closes the loop's descriptor, not the socket: the thread holds a dup
        sock.setblocking(True)
        extra = {"socket": sock}
        thread = threaded.ThreadTransport(
            self,
            sock,
            loop,
            extra,
            high=self.state.limits.max_inflight_bytes // 2,
            busy_poll=self.state.busy_poll,
        )
        self.transport = self._transport = thread
        thread.start(started.trailing)
        return True

    # TLS ------------------------------------------------------------------------------------

    def _start_tls(self) -> None:
        """STARTTLS was acked (plaintext after it was dropped): stop reading from the socket,
        whose next bytes are the client's TLS hello, and upgrade the transport."""
        self._transport.pause_reading()
        if self._handshake is not None and self._handshake.discarded:
            log.info(
                "%s: dropped %d plaintext bytes sent after STARTTLS",
                self.peer,
                self._handshake.discarded,
            )
        self._tls_early = bytearray()
        self._tls_task = asyncio.get_running_loop().create_task(self._upgrade(self._transport))

    async def _upgrade(self, raw: asyncio.Transport) -> None:
        """Run the TLS handshake (within the handshake timeout), take the client's certificate
        names into the identity, and go on haggling over TLS."""
        context = self.state.tls
        assert context is not None
        loop = asyncio.get_running_loop()
        try:
            secure = await loop.start_tls(
                raw,
                self,
                context,
                server_side=True,
                ssl_handshake_timeout=self.state.limits.handshake_timeout,
                ssl_shutdown_timeout=_TLS_CLOSE_TIMEOUT,
            )
            # closed during the handshake (a timeout, a shutdown): uvloop returns a dead transport
            tls = secure.get_extra_info("ssl_object") if secure is not None else None
            if secure is None or tls is None or secure.is_closing():
                raise ConnectionError("the connection closed during the TLS handshake")
            subject, sans = peer_names(tls.getpeercert(binary_form=True))
        except Exception as exc:  # the client's fault or its network's: one line, then close
            self._refused = "tls"
            log.info("%s: TLS handshake failed: %s", self.peer, describe_tls_error(exc))
            raw.abort()
            self.connection_lost(None)
            return
        self.transport = self._transport = secure
        secure.set_write_buffer_limits(high=self.state.limits.max_inflight_bytes // 2)
        self.identity = dataclasses.replace(
            self.identity, tls=True, tls_subject=subject, tls_sans=sans
        )
        log.info("%s: %s established: %s", self.peer, tls.version(), self.identity.describe())
        machine, early = self._handshake, self._tls_early
        self._tls_early = None
        if machine is None or machine.state is not hs.State.TLS_HANDSHAKE:
            return
        machine.tls_established()
        if early:
            self.data_received(bytes(early))

    def _handshake_expired(self) -> None:
        self._timer = None
        if self._parser is None and self.transport is not None:
            self._refused = self._refused or "timeout"
            log.info("%s: handshake not finished in time, closing", self.peer)
            self.transport.abort()

    # Transmission ---------------------------------------------------------------------------

    def _on_events(self, events: list[Any]) -> None:
        """Queue parsed events and run as many as the memory cap allows."""
        self._queue.extend(events)
        self._run_queue()

    def _run_queue(self) -> None:
        """Run queued events until the queue is empty or the connection holds its cap in
        replies and payloads; replies made meanwhile leave in one writev.

        Each request's duration (from the end of the one before it in this batch, or the
        batch's start, to its own end) goes into the connection's latency histogram, inlining
        metrics.counters.record: one clock read and one list item per request.
        """
        queue, handlers, transport, cap = self._queue, self._handlers, self._transport, self._cap
        hist, clock, pack = self.latency, time.monotonic_ns, PACK
        batch: list[bytes | bytearray | memoryview] = []
        self._batch = batch
        self._batch_bytes = 0
        ending = None
        then = clock()
        try:
            while queue:
                if self._batch_bytes + self._held + transport.get_write_buffer_size() >= cap:
                    break
                event = queue.popleft()
                if type(event) is Command:
                    cmd = event.cmd
                    if self._shutting_down:
                        self._send_error(cmd, event.handle, Errno.ESHUTDOWN, "shutting down")
                    else:
                        coro = handlers[cmd](event)
                        try:  # eager.start, inlined: most requests finish without waiting
                            yielded = coro.send(None)
                        except StopIteration:
                            pass
                        except Exception:  # a bug below us: fail the request, keep serving
                            log.exception("%s: request %s failed", self.peer, event[:5])
                            self._send_error(cmd, event.handle, Errno.EIO, "internal error")
                        else:
                            self._finish_in_task(coro, yielded, cmd, then)
                            then = clock()
                            continue
                    now = clock()
                    spent = now - then
                    hist[cmd << ROW_BITS | (spent >> SHIFT).bit_length()] += spent + pack
                    then = now
                elif type(event) is BadCommand:
                    log.debug("%s: refused %s", self.peer, event)
                    self._send_error(event.cmd, event.handle, event.error, event.message)
                    now = clock()
                    record(hist, command_slot(event.cmd), now - then)
                    then = now
                else:  # Disconnect or FramingError: nothing after it counts
                    ending = event
                    queue.clear()
        finally:
            self._batch = None
            if batch and not transport.is_closing():
                transport.writelines(batch)
        if ending is not None:
            self._end_session(ending)
        else:
            self._update_reading()

    def _finish_in_task(
        self, coro: Coroutine[Any, Any, None], yielded: object, cmd: int, started: int
    ) -> None:
        """A request that has to wait: a task finishes it, and its duration goes straight into
        the export's histogram (its connection may be closed and counted in by then)."""
        self._late += 1
        counters = self._counters
        assert counters is not None

        def done() -> None:
            record(counters.latency, cmd, time.monotonic_ns() - started)

        eager.finish_in_task(coro, yielded, done)

    def _end_session(self, event: Disconnect | FramingError) -> None:
        self._disconnecting = True
        if isinstance(event, FramingError):
            log.info("%s: %s, closing", self.peer, event.reason)
            self._transport.abort()
            return
        self._transport.pause_reading()
        self._close_when_idle()

    def _send(self, data: bytes | bytearray | memoryview) -> None:
        out = self._batch
        if out is not None:
            out.append(data)
            self._batch_bytes += len(data)
        elif not self._transport.is_closing():
            self._transport.write(data)

    def _send_error(self, cmd: int, handle: int, error: int, message: str) -> None:
        if self._counters is not None:
            self._counters.errors[error] += 1
        if self._structured:
            self._send(error_chunk(handle, error, message))
        else:  # a failed READ's simple reply carries no data, as the client expects
            self._send(simple_reply(handle, error))

    def _fail(self, c: Command, exc: BaseException) -> None:
        if isinstance(exc, OSError):
            err = wire_errno(exc.errno)
            log.debug("%s: %s failed: %s", self.peer, Cmd(c.cmd).name, exc)
            self._send_error(c.cmd, c.handle, err, exc.strerror or str(exc))
        else:
            log.error("%s: %s failed", self.peer, Cmd(c.cmd).name, exc_info=exc)
            self._send_error(c.cmd, c.handle, Errno.EIO, "internal error")

    def _begin(self, held: int = 0) -> None:
        self._inflight += 1
        self._held += held

    def _end(self, held: int = 0) -> None:
        self._inflight -= 1
        if held:
            self._held -= held
            if self._batch is None:  # else _run_queue does, once its batch is done
                self._update_reading()
        if self._inflight == 0 and (self._disconnecting or self._shutting_down):
            self._close_when_idle()

    async def _read(self, c: Command) -> None:
        self._inflight += 1  # _begin(), inlined on the hottest path
        try:
            _, _, handle, offset, length, _ = c
            if length >= self._sparse_read_min:
                await self._read_sparse(c)
                return
            data = await self._device.read(Request(_OP_READ, offset, length))
            self.bytes_read += length
            if self._structured:
                header = data_chunk_header(handle, offset, length)
            else:
                header = simple_reply(handle)
            out = self._batch
            if out is not None:
                out += header, data
                self._batch_bytes += length
            elif not self._transport.is_closing():
                self._transport.writelines((header, data))
        except Exception as exc:
            self._fail(c, exc)
        finally:
            self._end()

    async def _read_sparse(self, c: Command) -> None:
        """A structured read that sends holes as OFFSET_HOLE chunks instead of zeroes."""
        device = self._device
        extents = await self._extents_covering(c.offset, c.length)
        segments = _merge_zero_runs(c.offset, extents)
        if c.flags & CmdFlag.DF and len(segments) > 1:
            segments = [(c.offset, c.length, False)]
        last = len(segments) - 1
        for i, (offset, length, zero) in enumerate(segments):
            if zero:
                self._send(hole_chunk(c.handle, offset, length, done=i == last))
                continue
            data = await device.read(Request(Op.READ, offset, length))
            self._send(data_chunk_header(c.handle, offset, length, done=i == last))
            self._send(data)
        self.bytes_read += c.length

    async def _extents_covering(self, offset: int, length: int) -> list[Extent]:
        device = self._device
        extents: list[Extent] = []
        pos, end = offset, offset + length
        while pos < end:
            got = await device.block_status(Request(Op.BLOCK_STATUS, pos, end - pos))
            if not got:
                extents.append(Extent(end - pos, 0))
                break
            for ext in got:
                take = min(ext.length, end - pos)
                extents.append(Extent(take, ext.flags))
                pos += take
                if pos >= end:
                    break
        return extents

    async def _write(self, c: Command) -> None:
        _, flags, handle, offset, length, payload = c
        self._inflight += 1  # _begin(length), inlined
        self._held += length
        try:
            req = Request(_OP_WRITE, offset, length, _REQ_FLAGS[flags & _PASS_FLAGS], payload)
            await self._device.write(req)
            self.bytes_written += length
            self._send(simple_reply(handle))
        except Exception as exc:
            self._fail(c, exc)
        finally:
            if type(payload) is bytearray and self._parser is not None:
                self._parser.recycle(payload)  # devices keep no reference after write()
            self._end(length)

    async def _flush(self, c: Command) -> None:
        self._begin()
        try:
            await self._device.flush()
            self._send(simple_reply(c.handle))
        except Exception as exc:
            self._fail(c, exc)
        finally:
            self._end()

    async def _ranged(
        self, op: Op, run: Callable[[Request], Coroutine[Any, Any, None]], c: Command
    ) -> None:
        """TRIM, WRITE_ZEROES, CACHE: a range, no data, a simple reply."""
        self._begin()
        try:
            await run(Request(op, c.offset, c.length, _REQ_FLAGS[c.flags & _PASS_FLAGS]))
            self._send(simple_reply(c.handle))
        except Exception as exc:
            self._fail(c, exc)
        finally:
            self._end()

    async def _block_status(self, c: Command) -> None:
        self._begin()
        try:
            device = self._device
            if device.caps.can_extents:
                extents = await device.block_status(Request(Op.BLOCK_STATUS, c.offset, c.length))
            else:
                extents = [Extent(c.length, 0)]
            if c.flags & CmdFlag.REQ_ONE:
                first = extents[0]
                extents = [Extent(min(first.length, c.length), first.flags)]
            self._send(block_status_chunk(c.handle, hs.BASE_ALLOCATION_ID, extents))
        except Exception as exc:
            self._fail(c, exc)
        finally:
            self._end()

    # Flow control and closing ---------------------------------------------------------------

    def _update_reading(self) -> None:
        """Read from the socket only while under the cap; run queued events when room appears."""
        if self._disconnecting or self._parser is None:
            return
        held = self._held
        if not (held or self._queue or self._reading_paused or self._writing_paused):
            return  # the usual case: nothing held, nothing waits, nothing to change
        room = held + self._transport.get_write_buffer_size() < self._cap
        if self._queue and room and not self._writing_paused and self._batch is None:
            self._run_queue()
            return
        # A partly received payload alone never stops reading: it is at most MAX_PAYLOAD, and
        # only its rest completes it. Stopping there deadlocked a WRITE larger than the cap, and
        # a connection that reads nothing never sees its client go (it leaked its buffers).
        over = held > 0 and held + self._parser.pending_payload >= self._cap
        pause = bool(self._queue) or self._writing_paused or over
        if pause and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()
        elif not pause and self._reading_paused:
            self._reading_paused = False
            self._transport.resume_reading()

    def _close_when_idle(self) -> None:
        if self._inflight:
            return
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        if self._closed.done() and self._key_view is not None:
            view, self._key_view = self._key_view, None  # closed and idle: leave its key, once
            self.state.key_users.left(view, self)
        if self._closed.done() and self._attached and self._counters is not None:
            self._attached = False  # closed and idle: its counts join the export's, once
            self._counters.detach(self)

    @property
    def inflight(self) -> int:
        """Requests of this connection in flight (for `ctl evict-key`'s EBUSY, and metrics)."""
        return self._inflight

    @property
    def requests(self) -> int:
        """Requests this connection has run or refused (finished, or handed to a task)."""
        return requests_in(self.latency) + self._late

    def _count_connection(self) -> None:
        """Count this connection once in the metrics, when its identity is settled: at the
        start of transmission, or when it closes before that."""
        if not self._counted:
            self._counted = True
            key = (self.identity.transport, identity_class(self.identity))
            self.state.counters.connections.total[key] += 1

    def _log_fields(self, view: OpenExport, event: str, **more: object) -> dict[str, object]:
        """The structured fields of the open and close lines (`--log-format json`): who, which
        export, which key ID (never key bytes)."""
        return {
            "event": event,
            "peer": self.peer,
            "identity": self.identity.describe(),
            "transport": self.identity.transport,
            "export": view.name,
            "key_id": view.key_id,
            **more,
        }

    def begin_shutdown(self) -> None:
        """Refuse new requests with ESHUTDOWN; close when idle after DISC or a short grace."""
        self._shutting_down = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._parser is None:
            self._refused = "shutdown"
            transport.close()  # still haggling: nothing acknowledged to protect
            return
        asyncio.get_running_loop().call_later(_SHUTDOWN_GRACE, self._force_close_when_idle)

    def _force_close_when_idle(self) -> None:
        self._disconnecting = True
        self._close_when_idle()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)


class _Detached(asyncio.Protocol):
    """What the loop's transport reports to once its socket went to a connection thread."""


def _key_label(view: OpenExport) -> str:
    """`key alice` or `no key`, for the open and close log lines (the key ID, never bytes)."""
    return "no key" if view.key_id is None else f"key {view.key_id}"


def _merge_zero_runs(offset: int, extents: list[Extent]) -> list[tuple[int, int, bool]]:
    """Extents -> (offset, length, reads-as-zero) segments with neighbours of one kind joined."""
    segments: list[tuple[int, int, bool]] = []
    pos = offset
    for ext in extents:
        zero = ext.flags & STATE_ZERO == STATE_ZERO
        if segments and segments[-1][2] == zero:
            start, length, _ = segments[-1]
            segments[-1] = (start, length + ext.length, zero)
        else:
            segments.append((pos, ext.length, zero))
        pos += ext.length
    return segments
