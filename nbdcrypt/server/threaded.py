"""One connection's transmission phase on its own thread: blocking reads, requests, replies.

Why a thread per connection (docs/ARCHITECTURE.md, "Connection threads"): a unix-socket read
or reply wakes the client thread onto the waker's CPU (a "sync" wake-up, which assumes the
waker is about to sleep). nbdkit's threads do sleep right after; one event loop serving every
connection does not, so it shared one vCPU with the client while the other idled. A thread
that blocks in recv() right after it woke its client is what the scheduler expects.

ThreadTransport stands in for the asyncio transport, so Connection runs unchanged: its
protocol callbacks (get_buffer, buffer_updated, eof_received, resume_writing,
connection_lost) are called on this thread with the server lock held (server/lockedloop.py).
A large write that lands unchanged in a file is spliced there from the socket instead of
being received (Connection.splice_target, server/splice.py); a large encrypted one whose
device allows it (a sealed write) is received, encrypted in place and written by this thread,
all without the lock. Either's reply then leaves from this thread before it takes the lock
again (under the send lock, outside the outbox).
Replies collect in an outbox and are sent after the lock is let go; replies made on the loop
(requests that had to wait) are sent by the loop once the step that made them is over, at once
if the socket takes them, else by an executor thread. The Transport methods are called with
the server lock held, by this thread or another.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from socket import MSG_WAITALL
from typing import TYPE_CHECKING, Any

from nbdcrypt.server.lockedloop import LockedLoop, become_connection_thread
from nbdcrypt.server.poll import SocketPoller, available
from nbdcrypt.server.splice import PayloadSplicer, SpliceTarget

if TYPE_CHECKING:
    from nbdcrypt.device import Sealing
    from nbdcrypt.server.connection import Connection

log = logging.getLogger("nbdcrypt.connection")

Buffer = bytes | bytearray | memoryview

# A sealed write holds its keyslot while its payload arrives only while the client sends on:
# silent this long (ms), or slower than this (bytes per ms), and the slot is given back.
STALL_MS = 10
STREAM_FLOOR = 64 * 1024
_MAX_IOV = 1024  # buffers per sendmsg (IOV_MAX)


class ThreadTransport(asyncio.Transport):
    """The asyncio.Transport a connection uses once a thread runs its transmission phase.

    Replies queue in `_out` (under the server lock) and go out under `_send_lock`, which keeps
    each batch whole on the wire: the thread sends its own after letting go of the server
    lock; replies made elsewhere (the loop, for requests that waited) go out when the loop's
    step that made them is over, at once if the socket takes them, else from an executor
    thread that still holds the send lock the loop took. A batch is only ever taken under
    the server lock, so it holds whole replies, never a header without its data. Queued minus
    sent is the write buffer the connection's cap counts; each counter has one writer at a time.
    """

    def __init__(
        self,
        protocol: Connection,
        sock: socket.socket,
        loop: LockedLoop,
        extra: dict[str, Any],
        high: int,
        *,
        busy_poll: float = 0.0,
    ) -> None:
        super().__init__(extra)
        self._protocol: Connection | None = protocol  # None once told the connection is lost
        self._sock = sock
        self._loop = loop
        self._lock = loop.lock
        self._wake = threading.Condition(loop.lock)  # reading resumed, or closing
        self._send_lock = threading.Lock()
        self._out: list[bytes | bytearray | memoryview] = []
        self._queued = 0  # bytes ever queued (under the server lock)
        self._sent = 0  # bytes ever sent or dropped (under the send lock)
        self._high = high
        self._low = high // 4
        self._write_paused = False
        self._read_paused = False
        self._closing = False
        self._aborted = False
        self._flush_scheduled = False  # the loop will send what was queued off the thread
        self._trailing = b""
        self._ident: int | None = None
        self.poller = SocketPoller(busy_poll, loop) if busy_poll > 0 and available() else None
        self._splicer: PayloadSplicer | None = None  # made at the first spliced write
        self._fileno = sock.fileno()
        self._thread = threading.Thread(target=self._run, name="nbd-connection", daemon=True)

    def start(self, trailing: bytes) -> None:
        """Run the thread; `trailing` is what the client sent after the handshake's last
        option (already read from the socket)."""
        self._trailing = trailing
        self._thread.start()

    # asyncio.Transport ---------------------------------------------------------------------

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None, "the connection is closed"
        return self._protocol

    def is_closing(self) -> bool:
        return self._closing

    def is_reading(self) -> bool:
        return not self._read_paused

    def pause_reading(self) -> None:
        self._read_paused = True

    def resume_reading(self) -> None:
        if self._read_paused:
            self._read_paused = False
            self._wake.notify()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = high if high is not None else self._high
        self._low = low if low is not None else self._high // 4

    def get_write_buffer_size(self) -> int:
        return self._queued - self._sent

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writelines((data,))

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        if self._closing:
            return
        if type(list_of_data) is not list and type(list_of_data) is not tuple:
            list_of_data = list(list_of_data)  # an iterator: it is read twice below
        self._out += list_of_data
        self._queued += sum(map(len, list_of_data))
        if threading.get_ident() != self._ident and not self._flush_scheduled:
            self._flush_scheduled = True  # not the thread, which may sleep in recv: the loop
            self._loop.call_soon(self._send_from_elsewhere)  # sends once the step is done
        if self._queued - self._sent > self._high and not self._write_paused:
            self._write_paused = True
            assert self._protocol is not None  # set until _finish, which sets _closing first
            self._protocol.pause_writing()

    def write_eof(self) -> None:
        raise NotImplementedError("NBD never half-closes")

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        """Send what is queued, then close (the thread does, after its current read)."""
        if not self._closing:
            self._closing = True
            self._wake.notify()
            self._shutdown(socket.SHUT_RD)  # wakes the thread if it waits in recv()

    def abort(self) -> None:
        """Close now; queued replies are dropped."""
        self._closing = self._aborted = True
        self._out.clear()
        self._wake.notify()
        self._shutdown(socket.SHUT_RDWR)

    # The thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        self._ident = threading.get_ident()
        become_connection_thread(self._loop)
        # _finish is called inside each clause, not after with the exception kept in a local:
        # that local would make a cycle (exception -> traceback -> this frame -> exception)
        # holding the connection and its buffers until the cyclic collector happens to run.
        try:
            self._receive()
        except OSError as err:
            self._finish(err)
        except BaseException as err:  # a bug: log it, close the connection, keep the server
            log.exception("connection thread failed")
            self._finish(err)
        else:
            self._finish(None)

    def _receive(self) -> None:
        """Read and run requests, send their replies: the server lock is let go only for the
        socket calls (and, inside the devices, for their own blocking calls)."""
        lock, loop = self._lock, self._loop
        with lock:
            loop.connection_threads += 1
            try:
                self._serve()
            finally:
                loop.connection_threads -= 1

    def _serve(self) -> None:
        """_receive's loop, with the server lock held."""
        protocol, lock, sock, wake = self._protocol, self._lock, self._sock, self._wake
        assert protocol is not None
        poller = self.poller
        if self._trailing:
            protocol.data_received(self._trailing)
        self._trailing = b""
        while True:
            out = self._take()
            while self._read_paused and not self._closing:
                if out:  # the queued replies may be what keeps the connection paused
                    self._send_unlocked(out)
                    self._room()
                    out = self._take()
                else:
                    wake.wait()
            if self._closing:
                self._out[:0] = out
                return
            target = None
            if protocol.splice_ready and (protocol.splices or protocol.seals):
                target = protocol.splice_target()  # a payload to land in its file ourselves
                if target is not None and target.begin is not None:
                    n = self._seal(protocol, target, out)  # -1: the client closed
                    if n == 0 or self._received(protocol, max(n, 0)):
                        continue
                    return
                if target is not None and not self._has_pipe():
                    target = None
            if target is None:
                buf = protocol.get_buffer(-1)
                whole = protocol.reading_payload  # a payload's rest: one call fills it
            else:
                buf = protocol.header_buffer  # where the next header goes, once it landed
            lock.release()
            try:
                if out:
                    self._send(out)
                if target is not None:
                    moved, failed, took = self._splice(target)
                    n, broke = self._chain(target, buf) if moved and not failed else (0, None)
                elif whole:
                    n = sock.recv_into(buf, 0, MSG_WAITALL)
                elif poller is not None and protocol.lone_request:
                    n = poller.recv_into(sock, buf)
                else:
                    n = sock.recv_into(buf)
            finally:
                lock.acquire()
            if out:
                self._room()
            if target is not None and moved:  # the write is done
                protocol.payload_spliced(False, failed, took)
                if broke is not None:
                    raise broke
                if failed:
                    continue  # its error reply is queued: the next read sends it
            if not self._received(protocol, n):
                return

    def _received(self, protocol: Connection, n: int) -> bool:
        """After a read of `n` bytes (0: the client closed), the lock held again: hand them to
        the protocol once reading may go on. False when this thread is done."""
        while self._read_paused and not self._closing:  # paused while in recv():
            self._wake.wait()  # the bytes wait in the protocol's buffer, as asyncio's do
        if self._closing:
            return False
        if n:
            protocol.buffer_updated(n)
        elif protocol.eof_received():  # the client half-closed: replies still go out
            self._read_paused = True
        else:
            self.close()
            return False
        return True

    def _has_pipe(self) -> bool:
        """Whether this thread can splice: its pipe is made at the first large write (at the
        descriptor limit it cannot be, and writes take the ordinary path meanwhile)."""
        if self._splicer is None:
            try:
                self._splicer = PayloadSplicer()
            except OSError as exc:
                log.debug("connection: no pipe to splice with: %s", exc)
                return False
        return True

    def _splice(self, target: SpliceTarget) -> tuple[int, OSError | None, int]:
        """Move a write payload from the socket to its file, with no lock held: (its length,
        or 0 if the client closed first; the file's error, if any; nanoseconds taken)."""
        assert self._splicer is not None  # _has_pipe() said so
        length = target.length
        began = time.monotonic_ns()
        try:
            failed = self._splicer.move(self._fileno, length, target.fd, target.offset)
        except EOFError:
            return 0, None, 0
        return length, failed, time.monotonic_ns() - began

    def _seal(self, protocol: Connection, target: SpliceTarget, out: Sequence[Buffer]) -> int:
        """Land a sealed write, the server lock held but let go for the socket and the cipher.
        Nothing queued to send: begin() takes what the write needs (a keyslot) and the payload
        is encrypted as it arrives (_land). Else, or if the client stalls inside it: send
        `out`, receive the rest; then begin(), and _land encrypts it in place. A write
        begin() refuses takes the ordinary path, payload received. -1 if the client closed
        inside the payload; else the bytes of the next header read after it."""
        buf, begin = target.buffer, target.begin
        assert buf is not None and begin is not None
        length, lock = target.length, self._lock
        began = time.monotonic_ns()
        got, code = 0, 1
        sealing = None if out else begin()
        if sealing is not None:
            got, code, header = self._land(protocol, target, sealing, 0, began)
            if code == 0:
                return header
            if code == 2:
                return -1
            if code < 0:
                raise OSError(-code, os.strerror(-code))
        lock.release()
        try:
            if out:
                self._send(out)
            got = self._recv_whole(buf, length, got)
        finally:
            lock.acquire()
        if out:
            self._room()
        if got < length:
            return -1
        if code == 3:  # the payload is taken whole; the client gets the cipher's EIO
            failed = OSError(errno.EIO, "libcrypto: the cipher failed")
            protocol.payload_spliced(True, failed, time.monotonic_ns() - began)
            return 0
        sealing = begin()
        if sealing is None:
            protocol.payload_arrived(length)
            return 0
        return self._land(protocol, target, sealing, length, began)[2]

    def _land(
        self, protocol: Connection, target: SpliceTarget, sealing: Sealing, got: int, began: int
    ) -> tuple[int, int, int]:
        """With no lock held, one C call (InPlace.land): receive the rest of the payload
        (`got` bytes are in) encrypting it as it arrives, write it to its file, send what of
        its reply goes without waiting (the send lock taken if free) and read what is there
        of the next header; then give back what begin() took and, if the payload is in,
        count the write and send the rest of its reply. (Bytes received; the code, 0 once the
        write is done with; bytes of the next header read.)

        Unless the payload came in whole, what begin() took is given back at once: a client
        that stalls inside a payload for STALL_MS, or sends it slower than STREAM_FLOOR,
        holds no keyslot meanwhile (what was encrypted is decrypted back, the slot still
        held, and the rest is received the ordinary way), and one that reads no replies gets
        the rest of its reply after the slot is back."""
        buf, reply, lock = target.buffer, target.reply, self._lock
        assert buf is not None
        code, err, sent, header, keep = 3, 0, 0, 0, False
        lock.release()
        try:
            sending = self._send_lock.acquire(blocking=False)
            try:
                got, code, err, sent, header = sealing.encrypt.land(
                    buf,
                    got,
                    self._fileno,
                    stall_ms=STALL_MS,
                    within_ms=STALL_MS + len(buf) // STREAM_FLOOR,
                    fd=target.fd,
                    offset=target.offset,
                    reply=reply if sending else b"",
                    header=protocol.header_buffer,
                )
                keep = sending and code == 0 and not err and 0 <= sent < len(reply)
            finally:
                if sending and not keep:
                    self._send_lock.release()
        finally:
            lock.acquire()  # (after the send lock, as _drain takes them)
            sealing.done()
        failed = None
        if code == 3 and got == len(buf):  # the payload is in: the client gets the cipher's EIO
            code, failed = 0, OSError(errno.EIO, "libcrypto: the cipher failed")
        if code:
            return got, code, 0
        if err:
            failed = OSError(err, os.strerror(err))  # the client gets the file's error
        protocol.payload_spliced(True, failed, time.monotonic_ns() - began)
        broke = None
        if sent < 0:
            broke = OSError(-sent, os.strerror(-sent))
        elif not failed and (keep or not sending):
            broke = self._reply_rest(memoryview(reply)[sent:] if keep else reply, keep)
        if broke is not None:
            raise broke
        return got, 0, header

    def _reply_rest(self, rest: Buffer, holding: bool) -> OSError | None:
        """The rest of a sealed write's reply, the server lock let go: under the send lock
        this thread holds (`holding`, let go after) or takes. The socket's error, if any."""
        self._lock.release()
        try:
            if not holding:
                return self._reply(rest)
            try:
                _send_all(self._sock, (rest,))
            finally:
                self._send_lock.release()
        except OSError as exc:
            return exc
        finally:
            self._lock.acquire()
        return None

    def _recv_whole(self, buf: memoryview, length: int, got: int = 0) -> int:
        """Receive `buf[got:length]`: returns `length`, or less if the client closed."""
        sock = self._sock
        if got < length:
            got += sock.recv_into(buf[got:] if got else buf, length - got, MSG_WAITALL)
        while 0 < got < length:  # a signal cut the wait short, or the client closed
            n = sock.recv_into(buf[got:], length - got, MSG_WAITALL)
            if not n:
                break
            got += n
        return got

    def _reply(self, reply: Buffer) -> OSError | None:
        """Send a landed write's reply from this thread, outside the outbox (so not counted in
        the write buffer), under the send lock; the socket's error, if any."""
        try:
            with self._send_lock:
                _send_all(self._sock, (reply,))
        except OSError as exc:
            return exc
        return None

    def _chain(self, target: SpliceTarget, header: memoryview) -> tuple[int, OSError | None]:
        """After a spliced write landed, still without the lock: send its reply (not through
        the outbox, so not counted in the write buffer) and read the next header into
        `header`, which saves a pass under the lock per write. (Bytes read, 0 at EOF; the
        socket's error, raised once the write is accounted for.)"""
        broke = self._reply(target.reply)
        if broke is not None:
            return 0, broke
        try:
            return self._sock.recv_into(header), None
        except OSError as exc:
            return 0, exc

    def _finish(self, exc: BaseException | None) -> None:
        """Send what is left (unless aborted), close the socket, tell the protocol."""
        if not self._aborted:
            with contextlib.suppress(OSError):  # the client is gone: nothing more to send
                self._drain()
        with self._send_lock, self._lock:  # no executor thread is sending any more
            self._closing = True
            self._out.clear()
            self._sent = self._queued
            self._shutdown(socket.SHUT_RDWR)
            self._sock.close()
            if self._splicer is not None:
                self._splicer.close()
            protocol, self._protocol = self._protocol, None  # the cycle with it, broken now:
            assert protocol is not None  # its buffers go when the last request lets go of it
            protocol.connection_lost(exc if isinstance(exc, Exception) else None)

    def _shutdown(self, how: int) -> None:
        with contextlib.suppress(OSError):  # already closed by the client, or not connected
            self._sock.shutdown(how)

    # Sending ----------------------------------------------------------------------------------

    def _take(self) -> Sequence[bytes | bytearray | memoryview]:
        """The queued replies, taken (an empty tuple, never the live outbox, if none: what
        others queue meanwhile must not join a batch already being sent)."""
        out = self._out
        if out:
            self._out = []
            return out
        return ()

    def _send(self, out: Sequence[bytes | bytearray | memoryview]) -> None:
        """Send a batch whole (blocking); the caller does not hold the server lock."""
        with self._send_lock:
            self._sent += _send_all(self._sock, out)

    def _send_unlocked(self, out: Sequence[bytes | bytearray | memoryview]) -> None:
        """Send a batch with the server lock, which this thread holds, let go meanwhile."""
        self._lock.release()
        try:
            self._send(out)
        finally:
            self._lock.acquire()

    def _room(self) -> None:
        """After a send (server lock held): let the protocol go on if it waited for room."""
        protocol = self._protocol
        if protocol is None:
            return
        if self._write_paused and self._queued - self._sent <= self._low:
            self._write_paused = False
            protocol.resume_writing()
        elif self._read_paused and not self._closing:
            protocol.resume_writing()  # the connection's cap counts queued replies

    def _send_from_elsewhere(self) -> None:
        """On the loop, after the step that queued replies off the thread (a reply may be
        queued in several writes, but always within one step under the lock, so `_out` holds
        whole replies now): send what the socket takes and leave the rest, with the send lock,
        to an executor thread."""
        self._flush_scheduled = False
        if self._closing or not self._out:
            return  # closing: the thread's _finish sends what is left
        if not self._send_lock.acquire(blocking=False):
            self._loop.run_in_executor(None, self._drain_logged)  # after the current sender
            return
        out, self._out = self._out, []
        try:
            sent = _send_nowait(self._sock, out)
        except OSError:
            self._send_lock.release()
            return  # the thread sees the socket fail on its next read
        self._sent += sent
        rest = _skip(out, sent)
        if not rest:
            self._send_lock.release()
            return
        self._loop.run_in_executor(None, self._finish_send, rest)

    def _finish_send(self, rest: list[memoryview]) -> None:
        """In an executor thread: the rest of a batch the loop began (its send lock held)."""
        try:
            self._sent += _send_all(self._sock, rest)
        except OSError as exc:
            log.debug("connection: reply send failed: %s", exc)
        finally:
            self._send_lock.release()
        self._drain_logged()

    def _drain(self) -> None:
        """Send everything queued (blocking); for threads that do not hold the server lock."""
        while True:
            with self._send_lock:
                with self._lock:
                    out = self._take()
                if not out:
                    return
                self._sent += _send_all(self._sock, out)
            with self._lock:
                self._room()

    def _drain_logged(self) -> None:
        try:
            self._drain()
        except OSError as exc:
            log.debug("connection: reply send failed: %s", exc)


def _send_all(sock: socket.socket, out: Sequence[bytes | bytearray | memoryview]) -> int:
    """Send every buffer (blocking); return the bytes sent."""
    size = sum(map(len, out))
    total = sock.sendmsg(out[:_MAX_IOV])
    if total == size:  # the usual case: one call took all
        return total
    views = _skip(out, total)
    while views:
        n = sock.sendmsg(views[:_MAX_IOV])
        total += n
        views = _skip(views, n)
    return total


def _send_nowait(sock: socket.socket, out: list[bytes | bytearray | memoryview]) -> int:
    """Send what the socket takes without blocking; return the bytes sent."""
    try:
        return sock.sendmsg(out[:_MAX_IOV], [], socket.MSG_DONTWAIT)
    except BlockingIOError:
        return 0


def _skip(bufs: Sequence[bytes | bytearray | memoryview], n: int) -> list[memoryview]:
    """The buffers left after the first `n` bytes were sent."""
    i = 0
    while i < len(bufs) and n >= len(bufs[i]):
        n -= len(bufs[i])
        i += 1
    rest = [memoryview(b) for b in bufs[i:]]
    if rest and n:
        rest[0] = rest[0][n:]
    return rest


def thread_loop() -> LockedLoop | None:
    """The running loop if connections may run on threads, else None."""
    loop = asyncio.get_running_loop()
    return loop if isinstance(loop, LockedLoop) else None
