"""The client codecs (nbdcrypt.nbd.client_handshake, client_transmission) with bytes alone.

Two oracles: nbdcrypt's own server codecs (a client and a server handshake wired together,
requests parsed by the server's RequestParser, replies made by the server's encoders), and
tests/nbdwire.py, the wire format typed in from doc/proto.md, which builds what no nbdcrypt
server sends (old servers, broken replies) and parses what the client sends.
"""

from __future__ import annotations

import itertools
import random
import struct
from collections.abc import Iterable

import nbdwire as nw
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdcrypt.nbd import client_handshake as ch
from nbdcrypt.nbd import handshake as hs
from nbdcrypt.nbd.client_transmission import (
    ClientTransmission,
    ProtocolError,
    Reply,
    encode_request,
)
from nbdcrypt.nbd.constants import Rep
from nbdcrypt.nbd.transmission import (
    Command,
    Disconnect,
    RequestParser,
    data_chunk_header,
    error_chunk,
    hole_chunk,
    none_chunk,
    simple_reply,
)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
GREETING = nw.greeting(nw.FLAG_FIXED_NEWSTYLE | nw.FLAG_NO_ZEROES)
TFLAGS = nw.HAS_FLAGS | nw.SEND_FLUSH | nw.SEND_FUA | nw.SEND_TRIM | nw.SEND_WRITE_ZEROES


def pieces(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """`data` cut at the given positions (taken modulo its length), in order."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def feed_handshake(
    client: ch.ClientHandshake, data: bytes, cuts: Iterable[int] = ()
) -> list[ch.Event]:
    events: list[ch.Event] = []
    for piece in pieces(data, cuts) or [b""]:
        client.receive_data(piece)
        while (event := client.next_event()) is not hs.NEED_DATA:
            assert isinstance(event, ch.HandshakeDone | ch.Refused | ch.ProtocolError)
            events.append(event)
    return events


# Handshake against nbdcrypt's server codec --------------------------------------------------------


def converse(
    client: ch.ClientHandshake, server: hs.ServerHandshake, answer: dict[str, object]
) -> tuple[list[ch.Event], list[hs.Event]]:
    """Pass bytes both ways until neither side has anything to say; the server answers INFO/GO
    with `answer` (or an error, if answer has 'error')."""
    client_events: list[ch.Event] = []
    server_events: list[hs.Event] = []
    for _ in range(20):
        to_client = server.data_to_send()
        client_events += feed_handshake(client, to_client)
        to_server = client.data_to_send()
        if not to_client and not to_server:
            break
        server.receive_data(to_server)
        while (event := server.next_event()) is not hs.NEED_DATA:
            assert not isinstance(event, hs._NeedData)
            server_events.append(event)
            if isinstance(event, hs.ExportInfoRequest):
                if "error" in answer:
                    server.reply_error(Rep.ERR_UNKNOWN, str(answer["error"]))
                else:
                    started = server.reply_info(**answer)  # type: ignore[arg-type]
                    if started is not None:
                        server_events.append(started)
    return client_events, server_events


@SETTINGS
@given(
    name=st.text(st.characters(exclude_characters="\0", exclude_categories=["Cs"]), max_size=40),
    size=st.integers(0, 1 << 62),
    flags=st.integers(0, 0xFFFF).map(lambda f: f | nw.HAS_FLAGS),
    minimum=st.sampled_from([1, 512, 4096, 65536]),
    structured=st.booleans(),
    description=st.text(max_size=20),
)
def test_handshake_round_trip_with_the_server_codec(
    name: str, size: int, flags: int, minimum: int, *, structured: bool, description: str
) -> None:
    client = ch.ClientHandshake(name, structured_replies=structured)
    server = hs.ServerHandshake()
    sizes = (minimum, max(minimum, 4096), 1 << 25)
    answer = {
        "name": name,
        "size": size,
        "flags": flags,
        "description": description,
        "block_sizes": sizes,
    }
    client_events, server_events = converse(client, server, answer)
    assert len(client_events) == 1
    done = client_events[0]
    assert isinstance(done, ch.HandshakeDone)
    info = done.info
    assert (info.name, info.size, info.flags, info.block_sizes) == (name, size, flags, sizes)
    assert info.block_sizes_advertised and info.structured_replies == structured
    assert client.state is ch.ClientState.DONE and done.trailing == b""
    started = [e for e in server_events if isinstance(e, hs.TransmissionStarted)]
    assert len(started) == 1
    negotiated = started[0].negotiated
    assert negotiated.export_name == name and negotiated.no_zeroes
    assert negotiated.structured_replies == structured
    go = [e for e in server_events if isinstance(e, hs.ExportInfoRequest)]
    assert go[0].go and nw.INFO_BLOCK_SIZE in go[0].requests


def test_refused_export_names_the_error_and_aborts() -> None:
    client = ch.ClientHandshake("missing")
    server = hs.ServerHandshake()
    client_events, server_events = converse(client, server, {"error": "no export 'missing'"})
    assert client_events == [ch.Refused(nw.REP_ERR_UNKNOWN, "no export 'missing'")]
    assert str(client_events[0]) == "ERR_UNKNOWN: no export 'missing'"
    assert any(isinstance(e, hs.Aborted) for e in server_events)  # the soft disconnect


# Handshake against servers built from the spec ---------------------------------------------


def test_client_sends_what_the_spec_says() -> None:
    client = ch.ClientHandshake("disk")
    feed_handshake(client, GREETING)
    sent = client.data_to_send()
    flags = nw.client_flags(nw.C_FIXED_NEWSTYLE | nw.C_NO_ZEROES)
    assert sent == flags + nw.option(nw.OPT_STRUCTURED_REPLY)
    feed_handshake(client, nw.opt_reply(nw.OPT_STRUCTURED_REPLY, nw.REP_ACK))
    assert client.data_to_send() == nw.option(
        nw.OPT_GO, nw.info_data(b"disk", [nw.INFO_BLOCK_SIZE])
    )


def test_without_no_zeroes_the_client_does_not_ask_for_it() -> None:
    client = ch.ClientHandshake("disk", structured_replies=False)
    feed_handshake(client, nw.greeting(nw.FLAG_FIXED_NEWSTYLE))
    sent = client.data_to_send()
    assert sent[:4] == nw.client_flags(nw.C_FIXED_NEWSTYLE)
    assert sent[4:] == nw.option(nw.OPT_GO, nw.info_data(b"disk", [nw.INFO_BLOCK_SIZE]))


@pytest.mark.parametrize("zeroes", [False, True])
def test_old_server_falls_back_to_export_name(zeroes: bool) -> None:
    """ERR_UNSUP to STRUCTURED_REPLY and to GO: EXPORT_NAME, with 124 zeroes unless NO_ZEROES."""
    client = ch.ClientHandshake("old")
    greeting = nw.greeting(nw.FLAG_FIXED_NEWSTYLE | (0 if zeroes else nw.FLAG_NO_ZEROES))
    server_bytes = (
        greeting
        + nw.opt_reply(nw.OPT_STRUCTURED_REPLY, nw.REP_ERR_UNSUP)
        + nw.opt_reply(nw.OPT_GO, nw.REP_ERR_UNSUP)
        + nw.export_name_reply(1 << 30, nw.HAS_FLAGS | nw.SEND_FLUSH, zeroes=zeroes)
        + b"TRAIL"
    )
    events = feed_handshake(client, server_bytes, cuts=range(0, len(server_bytes) - 5, 7))
    assert len(events) == 1 and isinstance(events[0], ch.HandshakeDone)
    info = events[0].info
    assert info.size == 1 << 30 and not info.structured_replies
    assert info.block_sizes == (1, 4096, 1 << 25) and not info.block_sizes_advertised
    assert events[0].trailing == b"TRAIL"
    assert client.data_to_send().endswith(nw.option(nw.OPT_EXPORT_NAME, b"old"))


def test_plain_newstyle_server_gets_export_name_at_once() -> None:
    client = ch.ClientHandshake("x")
    feed_handshake(client, nw.greeting(0))
    assert client.data_to_send() == nw.client_flags(0) + nw.option(nw.OPT_EXPORT_NAME, b"x")
    events = feed_handshake(client, nw.export_name_reply(4096, nw.HAS_FLAGS, zeroes=True))
    assert isinstance(events[0], ch.HandshakeDone) and events[0].info.size == 4096


def test_export_name_refusal_is_a_close() -> None:
    client = ch.ClientHandshake("x")
    feed_handshake(client, nw.greeting(0))
    event = client.connection_lost()
    assert isinstance(event, ch.Refused) and "no export 'x'" in event.message


GO_INFO = nw.opt_reply(nw.OPT_GO, nw.REP_INFO, nw.info_export(1 << 20, nw.HAS_FLAGS))


@pytest.mark.parametrize(
    ("server_bytes", "reason"),
    [
        (b"X" * 18, "not an NBD server"),
        (struct.pack(">QQ", nw.NBDMAGIC, 0x00420281861253) + b"\0\0", "oldstyle"),
        (GREETING + nw.opt_reply(nw.OPT_GO, nw.REP_ACK), "a reply to option 7"),
        (GREETING + b"\0" * 20, "bad option reply magic"),
        (GREETING + nw.opt_reply(nw.OPT_STRUCTURED_REPLY, nw.REP_SERVER), "reply type 0x2"),
    ],
)
def test_handshake_protocol_errors_before_go(server_bytes: bytes, reason: str) -> None:
    client = ch.ClientHandshake("d")
    events = feed_handshake(client, server_bytes)
    assert len(events) == 1 and isinstance(events[0], ch.ProtocolError)
    assert reason in events[0].reason
    assert client.state is ch.ClientState.CLOSED


@pytest.mark.parametrize(
    ("go_replies", "reason"),
    [
        (nw.opt_reply(nw.OPT_GO, nw.REP_ACK), "without NBD_INFO_EXPORT"),
        (
            nw.opt_reply(nw.OPT_GO, nw.REP_INFO, nw.info_export(1, 1) + b"x"),
            "NBD_INFO_EXPORT of 13",
        ),
        (nw.opt_reply(nw.OPT_GO, nw.REP_INFO, b"\0"), "shorter than its type"),
        (
            GO_INFO + nw.opt_reply(nw.OPT_GO, nw.REP_INFO, nw.info_block_size(3, 4096, 1 << 20)),
            "power of 2",
        ),
        (
            GO_INFO + nw.opt_reply(nw.OPT_GO, nw.REP_INFO, nw.info_block_size(512, 256, 1 << 20)),
            "preferred",
        ),
        (
            GO_INFO + nw.opt_reply(nw.OPT_GO, nw.REP_INFO, nw.info_block_size(512, 4096, 1000)),
            "maximum",
        ),
        (GO_INFO + nw.opt_reply(nw.OPT_GO, nw.REP_SERVER, nw.rep_server(b"x")), "reply type 0x2"),
        (
            nw.opt_reply(nw.OPT_GO, nw.REP_INFO, nw.info_export(1, nw.SEND_FLUSH))
            + nw.opt_reply(nw.OPT_GO, nw.REP_ACK),
            "NBD_FLAG_HAS_FLAGS",
        ),
    ],
)
def test_handshake_protocol_errors_in_go(go_replies: bytes, reason: str) -> None:
    client = ch.ClientHandshake("d", structured_replies=False)
    events = feed_handshake(client, GREETING + go_replies)
    assert len(events) == 1 and isinstance(events[0], ch.ProtocolError), events
    assert reason in events[0].reason


def test_unknown_info_and_name_are_ignored() -> None:
    client = ch.ClientHandshake("d", structured_replies=False)
    replies = (
        nw.opt_reply(nw.OPT_GO, nw.REP_INFO, nw.info_string(nw.INFO_NAME, b"d"))
        + nw.opt_reply(nw.OPT_GO, nw.REP_INFO, struct.pack(">H", 99) + b"future")
        + nw.opt_reply(nw.OPT_GO, nw.REP_INFO, nw.info_string(nw.INFO_DESCRIPTION, b"about"))
        + GO_INFO
        + nw.opt_reply(nw.OPT_GO, nw.REP_ACK)
    )
    events = feed_handshake(client, GREETING + replies)
    assert isinstance(events[0], ch.HandshakeDone)
    assert events[0].info.description == "about" and events[0].info.size == 1 << 20


def test_names_the_spec_forbids_are_refused_before_sending() -> None:
    with pytest.raises(ValueError, match="NUL"):
        ch.ClientHandshake("a\0b")
    with pytest.raises(ValueError, match="longer than 4096"):
        ch.ClientHandshake("x" * 4097)
    with pytest.raises(ValueError, match="not valid Unicode"):
        ch.ClientHandshake("\ud800")  # no UTF-8 for a lone surrogate: never a traceback


def test_connection_lost_in_the_middle_is_a_protocol_error() -> None:
    client = ch.ClientHandshake("d")
    feed_handshake(client, GREETING[:5])
    assert isinstance(client.connection_lost(), ch.ProtocolError)


# Requests ---------------------------------------------------------------------------------------


@SETTINGS
@given(
    requests=st.lists(
        st.tuples(
            st.sampled_from(
                [nw.CMD_READ, nw.CMD_WRITE, nw.CMD_FLUSH, nw.CMD_TRIM, nw.CMD_WRITE_ZEROES]
            ),
            st.integers(0, 1 << 19),
            st.integers(1, 4096),
            st.booleans(),
        ),
        max_size=20,
    ),
    cuts=st.lists(st.integers(0, 1 << 20), max_size=10),
)
def test_requests_round_trip_through_the_server_parser(
    requests: list[tuple[int, int, int, bool]], cuts: list[int]
) -> None:
    codec = ClientTransmission(structured_replies=True)
    wire = b""
    expected = []
    for cmd, where, size, fua in requests:
        offset, length = (0, 0) if cmd == nw.CMD_FLUSH else (where, size)
        flags = nw.CMD_FLAG_FUA if fua else 0
        handle, header = codec.request(cmd, offset, length, flags)
        payload = random.Random(handle).randbytes(length) if cmd == nw.CMD_WRITE else None
        assert header == nw.request(cmd, flags=flags, handle=handle, offset=offset, length=length)
        wire += header + (payload or b"")
        expected.append(Command(cmd, flags, handle, offset, length, payload))
    wire += codec.disconnect()
    parser = RequestParser(
        size=1 << 20, transmission_flags=TFLAGS | nw.SEND_FUA, block_status=False
    )
    events = []
    for piece in pieces(wire, cuts):
        events += parser.feed(piece)
    got = [
        e._replace(payload=bytes(e.payload)) if isinstance(e, Command) and e.payload else e
        for e in events
    ]
    assert got == [*expected, Disconnect(0)]
    assert codec.in_flight == len(requests)


def test_handles_are_unique_and_an_explicit_duplicate_is_refused() -> None:
    codec = ClientTransmission(structured_replies=False)
    handles = {codec.request(nw.CMD_FLUSH)[0] for _ in range(100)}
    assert len(handles) == 100
    with pytest.raises(ValueError, match="already in flight"):
        codec.request(nw.CMD_FLUSH, handle=5)
    assert encode_request(nw.CMD_READ, 1, 2, 3, 4) == nw.request(
        nw.CMD_READ, flags=1, handle=2, offset=3, length=4
    )


# Replies ----------------------------------------------------------------------------------------


def take(
    codec: ClientTransmission, data: bytes, cuts: Iterable[int] = ()
) -> list[Reply | ProtocolError]:
    out: list[Reply | ProtocolError] = []
    for piece in pieces(data, cuts) or [b""]:
        codec.receive_data(piece)
        while (event := codec.next_event()) is not hs.NEED_DATA:
            assert isinstance(event, Reply | ProtocolError)
            out.append(event)
    return out


@SETTINGS
@given(
    data=st.binary(min_size=1, max_size=3000),
    error=st.sampled_from([0, nw.EIO, nw.EINVAL]),
    cuts=st.lists(st.integers(0, 5000), max_size=8),
)
def test_simple_replies(data: bytes, error: int, cuts: list[int]) -> None:
    codec = ClientTransmission(structured_replies=False)
    read, _ = codec.request(nw.CMD_READ, 100, len(data))
    write, _ = codec.request(nw.CMD_WRITE, 0, 10)
    wire = simple_reply(write, error) + nw.simple_reply(read, error) + (b"" if error else data)
    replies = take(codec, wire, cuts)
    assert [(r.handle, r.error) for r in replies if isinstance(r, Reply)] == [
        (write, error),
        (read, error),
    ]
    last = replies[1]
    assert isinstance(last, Reply)
    assert last.data == (None if error else data) and (last.offset, last.length) == (100, len(data))
    assert codec.in_flight == 0


@st.composite
def read_reply(draw: st.DrawFn) -> tuple[int, bytes, list[tuple[int, int, bool]], bool]:
    """A READ's length, data, its split into (start, end, is_hole) pieces in sending order, and
    whether a NONE chunk ends it."""
    length = draw(st.integers(1, 5000))
    points = sorted(
        set(draw(st.lists(st.integers(1, length - 1), max_size=6))) if length > 1 else set()
    )
    bounds = [0, *points, length]
    parts = []
    data = bytearray(draw(st.binary(min_size=length, max_size=length)))
    for a, b in itertools.pairwise(bounds):
        hole = draw(st.booleans())
        if hole:
            data[a:b] = bytes(b - a)
        parts.append((a, b, hole))
    order = draw(st.permutations(parts))
    return length, bytes(data), list(order), draw(st.booleans())


@SETTINGS
@given(read=read_reply(), cuts=st.lists(st.integers(0, 10000), max_size=10), spec=st.booleans())
def test_structured_reads_are_assembled(
    read: tuple[int, bytes, list[tuple[int, int, bool]], bool], cuts: list[int], spec: bool
) -> None:
    """Chunks made by the server's encoders or from the spec's layout, in any order."""
    length, data, parts, none_last = read
    offset = 1 << 30
    codec = ClientTransmission(structured_replies=True)
    handle, _ = codec.request(nw.CMD_READ, offset, length)
    wire = b""
    for i, (a, b, hole) in enumerate(parts):
        done = not none_last and i == len(parts) - 1
        if spec:
            flags = nw.REPLY_FLAG_DONE if done else 0
            if hole:
                wire += nw.chunk(
                    flags, nw.REPLY_TYPE_OFFSET_HOLE, handle, struct.pack(">QI", offset + a, b - a)
                )
            else:
                payload = struct.pack(">Q", offset + a) + data[a:b]
                wire += nw.chunk(flags, nw.REPLY_TYPE_OFFSET_DATA, handle, payload)
        elif hole:
            wire += hole_chunk(handle, offset + a, b - a, done=done)
        else:
            wire += data_chunk_header(handle, offset + a, b - a, done=done) + data[a:b]
    if none_last:
        wire += (
            none_chunk(handle)
            if not spec
            else nw.chunk(nw.REPLY_FLAG_DONE, nw.REPLY_TYPE_NONE, handle, b"")
        )
    replies = take(codec, wire, cuts)
    assert len(replies) == 1
    reply = replies[0]
    assert isinstance(reply, Reply)
    assert reply.error == 0 and reply.data is not None and bytes(reply.data) == data
    assert reply.hole_bytes == sum(b - a for a, b, hole in parts if hole)
    assert reply.chunks == len(parts) + none_last


def test_structured_errors_and_other_commands() -> None:
    codec = ClientTransmission(structured_replies=True)
    read, _ = codec.request(nw.CMD_READ, 0, 4096)
    write, _ = codec.request(nw.CMD_WRITE, 0, 512)
    flush, _ = codec.request(nw.CMD_FLUSH)
    trim, _ = codec.request(nw.CMD_TRIM, 4096, 4096)
    future, _ = codec.request(nw.CMD_WRITE, 0, 512)
    wire = (
        data_chunk_header(read, 0, 512, done=False)
        + bytes(512)
        + error_chunk(read, nw.EIO, "bad sector")
        + simple_reply(write)
        + none_chunk(flush)
        + nw.chunk(
            nw.REPLY_FLAG_DONE,
            nw.REPLY_TYPE_ERROR_OFFSET,
            trim,
            struct.pack(">IH", nw.ENOSPC, 2) + b"no" + struct.pack(">Q", 5000),
        )
        + nw.chunk(
            nw.REPLY_FLAG_DONE, (1 << 15) + 99, future, struct.pack(">IH", nw.EPERM, 0) + b"ignored"
        )
    )
    replies = {r.handle: r for r in take(codec, wire) if isinstance(r, Reply)}
    assert (replies[read].error, replies[read].message, replies[read].data) == (
        nw.EIO,
        "bad sector",
        None,
    )
    assert replies[write].error == 0 and replies[flush].error == 0
    assert (replies[trim].error, replies[trim].message, replies[trim].error_offset) == (
        nw.ENOSPC,
        "no",
        5000,
    )
    assert replies[future].error == nw.EPERM  # an unknown error type errs the request, no more
    assert codec.in_flight == 0


def broken(structured: bool, make: object) -> str:
    codec = ClientTransmission(structured_replies=structured)
    read, _ = codec.request(nw.CMD_READ, 1000, 100)
    write, _ = codec.request(nw.CMD_WRITE, 0, 100)
    assert callable(make)
    events = take(codec, make(read, write))
    assert isinstance(events[-1], ProtocolError), events
    assert codec.closed and take(codec, none_chunk(write)) == []
    return events[-1].reason


DONE = nw.REPLY_FLAG_DONE


def data_at(h: int, offset: int, n: int, flags: int = DONE) -> bytes:
    return nw.chunk(flags, nw.REPLY_TYPE_OFFSET_DATA, h, struct.pack(">Q", offset) + bytes(n))


@pytest.mark.parametrize(
    ("structured", "make", "reason"),
    [
        (True, lambda r, w: b"\x12\x34\x56\x78" + bytes(20), "bad reply magic"),
        (False, lambda r, w: nw.simple_reply(77), "handle 77"),
        (True, lambda r, w: nw.chunk(DONE, 0, 77, b""), "handle 77"),
        (True, lambda r, w: nw.simple_reply(r), "a simple reply to a READ"),
        (False, lambda r, w: nw.chunk(DONE, 0, w, b""), "not negotiated"),
        (True, lambda r, w: nw.chunk(0, nw.REPLY_TYPE_NONE, w, b""), "without NBD_REPLY_FLAG_DONE"),
        (True, lambda r, w: nw.chunk(DONE, nw.REPLY_TYPE_NONE, w, b"x"), "payload"),
        (True, lambda r, w: nw.chunk(DONE, 7, w, b""), "unknown type 7"),
        (True, lambda r, w: data_at(w, 0, 100), "content chunk in the reply to command 1"),
        (True, lambda r, w: data_at(r, 999, 10), "outside the READ"),
        (True, lambda r, w: data_at(r, 1095, 10), "outside the READ"),
        (True, lambda r, w: data_at(r, 1000, 50, 0) + data_at(r, 1040, 10), "overlap at 1040"),
        (True, lambda r, w: data_at(r, 1040, 50, 0) + data_at(r, 1000, 41), "overlap at 1040"),
        (True, lambda r, w: data_at(r, 1000, 99), "ended successfully with 99 bytes"),
        (
            True,
            lambda r, w: nw.chunk(DONE, nw.REPLY_TYPE_OFFSET_DATA, r, bytes(8)),
            "OFFSET_DATA chunk of 8",
        ),
        (
            True,
            lambda r, w: nw.chunk(DONE, nw.REPLY_TYPE_OFFSET_HOLE, r, struct.pack(">QI", 1000, 0)),
            "0 bytes",
        ),
        (
            True,
            lambda r, w: nw.chunk(DONE, nw.REPLY_TYPE_OFFSET_HOLE, r, bytes(13)),
            "OFFSET_HOLE chunk of 13",
        ),
        (
            True,
            lambda r, w: nw.chunk(DONE, nw.REPLY_TYPE_ERROR, w, struct.pack(">IH", 0, 0)),
            "error 0",
        ),
        (
            True,
            lambda r, w: nw.chunk(DONE, nw.REPLY_TYPE_ERROR, w, struct.pack(">IH", 5, 9)),
            "9 bytes",
        ),
        (True, lambda r, w: nw.chunk(DONE, nw.REPLY_TYPE_ERROR, w, b"\0\0"), "error chunk of 2"),
        (
            True,
            lambda r, w: nw.chunk(
                DONE, nw.REPLY_TYPE_ERROR_OFFSET, r, struct.pack(">IHQ", 5, 0, 10)
            ),
            "outside the request",
        ),
        (
            True,
            lambda r, w: nw.chunk(DONE, nw.REPLY_TYPE_ERROR_OFFSET, r, struct.pack(">IH", 5, 0)),
            "ERROR_OFFSET",
        ),
    ],
)
def test_broken_replies_are_protocol_errors(structured: bool, make: object, reason: str) -> None:
    assert reason in broken(structured, make)
