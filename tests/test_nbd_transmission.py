"""The transmission codec (nbdcrypt.nbd.transmission): requests in, validated commands out.

Requests are built with struct.pack from the spec's layout (tests/nbdwire.py), and the rules
a request must follow are written here a second time from doc/proto.md ("Request types",
"Error values", "Block size constraints"), so the parser is checked against an independent
oracle. Reply encoders are compared byte for byte with the spec's chunk layouts.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import nbdwire as nw
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdcrypt.nbd.transmission import (
    BadCommand,
    Command,
    Disconnect,
    Event,
    FramingError,
    RequestParser,
    block_status_chunk,
    data_chunk_header,
    error_chunk,
    hole_chunk,
    none_chunk,
    simple_reply,
)

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ALL = (
    nw.HAS_FLAGS
    | nw.SEND_FLUSH
    | nw.SEND_FUA
    | nw.SEND_TRIM
    | nw.SEND_WRITE_ZEROES
    | nw.SEND_DF
    | nw.SEND_CACHE
    | nw.SEND_FAST_ZERO
)
SIZE = 1 << 20
MAX = 1 << 16
HANDLE = 0xFEDCBA9876543210


def parser(
    *,
    size: int = SIZE,
    tflags: int = ALL,
    block_status: bool = True,
    min_block: int = 1,
    max_payload: int = MAX,
) -> RequestParser:
    return RequestParser(
        size=size,
        transmission_flags=tflags,
        block_status=block_status,
        min_block=min_block,
        max_payload=max_payload,
    )


def plain(events: Iterable[Event]) -> list[Event]:
    """Events with write payloads as bytes, so they compare and print plainly."""
    out: list[Event] = []
    for ev in events:
        if isinstance(ev, Command) and ev.payload is not None:
            out.append(ev._replace(payload=bytes(ev.payload)))
        else:
            out.append(ev)
    return out


def feed_all(p: RequestParser, chunks: Iterable[bytes]) -> list[Event]:
    events: list[Event] = []
    for chunk in chunks:
        events += plain(p.feed(chunk))
    return events


def one(p: RequestParser, wire: bytes) -> Event:
    events = plain(p.feed(wire))
    assert len(events) == 1, events
    return events[0]


def refused(ev: Event, cmd: int, error: int, handle: int = HANDLE) -> None:
    assert isinstance(ev, BadCommand), ev
    assert (ev.cmd, ev.handle, ev.error) == (cmd, handle, error), ev
    assert ev.message


def assert_goes_on(p: RequestParser) -> None:
    """The parser is at a request boundary: a FLUSH parses."""
    assert plain(p.feed(nw.request(nw.CMD_FLUSH, handle=99))) == [
        Command(nw.CMD_FLUSH, 0, 99, 0, 0, None)
    ]


# Each command -----------------------------------------------------------------------------------


def test_read() -> None:
    p = parser()
    ev = one(p, nw.request(nw.CMD_READ, handle=HANDLE, offset=4096, length=512))
    assert ev == Command(nw.CMD_READ, 0, HANDLE, 4096, 512, None)


def test_write_whole() -> None:
    p = parser()
    data = bytes(range(256)) * 2
    ev = one(p, nw.request(nw.CMD_WRITE, handle=HANDLE, offset=7, length=512, payload=data))
    assert ev == Command(nw.CMD_WRITE, 0, HANDLE, 7, 512, data)
    assert p.pending_payload == 0


def test_write_payload_is_exactly_its_bytes() -> None:
    p = parser()
    wire = nw.request(nw.CMD_WRITE, length=3, payload=b"abc") + nw.request(nw.CMD_FLUSH)
    first, second = p.feed(wire)
    assert isinstance(first, Command) and first.payload is not None
    assert bytes(first.payload) == b"abc"
    assert second == Command(nw.CMD_FLUSH, 0, 0, 0, 0, None)


SMALL = nw.request(
    nw.CMD_WRITE, flags=nw.CMD_FLAG_FUA, handle=1, offset=3, length=10, payload=b"0123456789"
) + nw.request(nw.CMD_READ, handle=2, offset=5, length=1)
SMALL_EVENTS: list[Event] = [
    Command(nw.CMD_WRITE, nw.CMD_FLAG_FUA, 1, 3, 10, b"0123456789"),
    Command(nw.CMD_READ, 0, 2, 5, 1, None),
]


def test_write_split_at_every_point() -> None:
    for i in range(len(SMALL) + 1):
        assert feed_all(parser(), [SMALL[:i], SMALL[i:]]) == SMALL_EVENTS, i


def test_write_split_at_every_pair_of_points() -> None:
    for i, j in itertools.combinations(range(len(SMALL) + 1), 2):
        got = feed_all(parser(), [SMALL[:i], SMALL[i:j], SMALL[j:]])
        assert got == SMALL_EVENTS, (i, j)


def test_byte_at_a_time() -> None:
    p = parser()
    assert feed_all(p, [SMALL[i : i + 1] for i in range(len(SMALL))]) == SMALL_EVENTS


def test_pending_payload_counts_a_write_in_progress() -> None:
    p = parser()
    wire = nw.request(nw.CMD_WRITE, length=1000, payload=bytes(1000))
    assert p.feed(wire[:100]) == []
    assert p.pending_payload == 1000
    assert len(p.feed(wire[100:])) == 1
    assert p.pending_payload == 0


def test_a_write_whose_payload_the_caller_takes() -> None:
    """unstarted_write names an accepted write none of whose payload arrived; after
    payload_taken (the server spliced it away) the parser reads the next request."""
    p = parser()
    header = nw.request(nw.CMD_WRITE, flags=nw.CMD_FLAG_FUA, handle=HANDLE, offset=512, length=4096)
    assert p.unstarted_write() is None
    assert p.feed(header) == []
    assert p.unstarted_write() == (nw.CMD_WRITE, nw.CMD_FLAG_FUA, HANDLE, 512, 4096)
    assert p.payload_taken() == (nw.CMD_WRITE, nw.CMD_FLAG_FUA, HANDLE, 512, 4096)
    assert p.unstarted_write() is None and p.pending_payload == 0
    assert one(p, nw.request(nw.CMD_READ, handle=2, length=512)) == Command(
        nw.CMD_READ, 0, 2, 0, 512, None
    )


def test_no_unstarted_write_once_its_payload_began_or_for_a_refused_one() -> None:
    p = parser()
    assert p.feed(nw.request(nw.CMD_WRITE, length=4096) + b"x") == []
    assert p.unstarted_write() is None  # one byte of it is in the parser's buffer
    ro = parser(tflags=ALL | nw.READ_ONLY)
    assert ro.feed(nw.request(nw.CMD_WRITE, length=4096)) == []
    assert ro.unstarted_write() is None  # refused: its payload is skipped, never written


def test_close_lets_go_of_the_payload_and_the_recycled_buffers() -> None:
    p = parser()
    p.recycle(bytearray(8192))
    assert p.feed(nw.request(nw.CMD_WRITE, length=4096) + b"x" * 100) == []
    assert p.pending_payload == 4096
    p.close()
    assert p.pending_payload == 0 and p.payload_buffer() is None and p.unstarted_write() is None
    assert p.feed(b"x" * 3996 + nw.request(nw.CMD_FLUSH)) == []  # nothing more is parsed
    assert len(p._buffer(8192)) == 8192 and not p._free  # the recycled one is gone


def test_disc() -> None:
    assert one(parser(), nw.request(nw.CMD_DISC, handle=HANDLE)) == Disconnect(HANDLE)


@pytest.mark.parametrize(
    ("cmd", "flags", "offset", "length"),
    [
        (nw.CMD_FLUSH, 0, 0, 0),
        (nw.CMD_TRIM, 0, 512, 4096),
        (nw.CMD_TRIM, nw.CMD_FLAG_FUA, 0, SIZE),
        (nw.CMD_CACHE, 0, 0, SIZE),
        (nw.CMD_WRITE_ZEROES, 0, 1, SIZE - 1),
        (nw.CMD_WRITE_ZEROES, nw.CMD_FLAG_NO_HOLE, 0, 4096),
        (nw.CMD_WRITE_ZEROES, nw.CMD_FLAG_FAST_ZERO, 0, 4096),
        (
            nw.CMD_WRITE_ZEROES,
            nw.CMD_FLAG_FUA | nw.CMD_FLAG_NO_HOLE | nw.CMD_FLAG_FAST_ZERO,
            SIZE - 1,
            1,
        ),
        (nw.CMD_BLOCK_STATUS, 0, 0, SIZE),
        (nw.CMD_BLOCK_STATUS, nw.CMD_FLAG_REQ_ONE, 4096, 1 << 12),
        (nw.CMD_READ, nw.CMD_FLAG_DF, 0, MAX),
        (nw.CMD_READ, nw.CMD_FLAG_DF | nw.CMD_FLAG_FUA, SIZE - MAX, MAX),
    ],
)
def test_commands_without_payload(cmd: int, flags: int, offset: int, length: int) -> None:
    p = parser()
    wire = nw.request(cmd, flags=flags, handle=HANDLE, offset=offset, length=length)
    assert one(p, wire) == Command(cmd, flags, HANDLE, offset, length, None)
    assert_goes_on(p)


@pytest.mark.parametrize(
    "cmd",
    [
        nw.CMD_READ,
        nw.CMD_WRITE,
        nw.CMD_FLUSH,
        nw.CMD_TRIM,
        nw.CMD_CACHE,
        nw.CMD_WRITE_ZEROES,
        nw.CMD_BLOCK_STATUS,
    ],
)
def test_fua_is_valid_on_every_command_when_advertised(cmd: int) -> None:
    length = 0 if cmd == nw.CMD_FLUSH else 8
    payload = bytes(8) if cmd == nw.CMD_WRITE else b""
    wire = nw.request(cmd, flags=nw.CMD_FLAG_FUA, length=length, payload=payload)
    ev = one(parser(), wire)
    assert isinstance(ev, Command) and ev.flags == nw.CMD_FLAG_FUA


def test_disc_with_fua_still_disconnects() -> None:
    # "NBD_CMD_FLAG_FUA ... valid for all commands, provided NBD_FLAG_SEND_FUA has been
    # negotiated, in which case the server MUST accept all commands with this bit set"
    assert one(parser(), nw.request(nw.CMD_DISC, flags=nw.CMD_FLAG_FUA, handle=5)) == (
        Disconnect(5)
    )


def test_many_requests_in_one_feed_come_out_in_order() -> None:
    wire = b"".join(
        nw.request(nw.CMD_READ, handle=i, offset=i * 512, length=512) for i in range(50)
    )
    assert plain(parser().feed(wire)) == [
        Command(nw.CMD_READ, 0, i, i * 512, 512, None) for i in range(50)
    ]


def test_request_up_to_the_last_byte() -> None:
    wire = nw.request(nw.CMD_WRITE, offset=SIZE - 4, length=4, payload=b"tail")
    assert one(parser(), wire) == Command(nw.CMD_WRITE, 0, 0, SIZE - 4, 4, b"tail")


# Error rules ------------------------------------------------------------------------------------


@pytest.mark.parametrize("cmd", [8, 9, 0x100, 0xFFFF])
def test_unknown_command_is_einval(cmd: int) -> None:
    p = parser()
    refused(one(p, nw.request(cmd, handle=HANDLE, length=512)), cmd, nw.EINVAL)
    assert_goes_on(p)


@pytest.mark.parametrize("bit", [5, 6, 7, 8, 14, 15])
@pytest.mark.parametrize("cmd", [nw.CMD_READ, nw.CMD_WRITE_ZEROES, nw.CMD_FLUSH])
def test_unknown_flag_bits_are_einval(cmd: int, bit: int) -> None:
    p = parser()
    length = 0 if cmd == nw.CMD_FLUSH else 512
    refused(one(p, nw.request(cmd, flags=1 << bit, handle=HANDLE, length=length)), cmd, nw.EINVAL)
    assert_goes_on(p)


@pytest.mark.parametrize(
    ("cmd", "flags", "tflags"),
    [
        (nw.CMD_WRITE, nw.CMD_FLAG_DF, ALL),
        (nw.CMD_WRITE, nw.CMD_FLAG_NO_HOLE, ALL),
        (nw.CMD_READ, nw.CMD_FLAG_REQ_ONE, ALL),
        (nw.CMD_READ, nw.CMD_FLAG_NO_HOLE, ALL),
        (nw.CMD_TRIM, nw.CMD_FLAG_NO_HOLE, ALL),
        (nw.CMD_TRIM, nw.CMD_FLAG_FAST_ZERO, ALL),
        (nw.CMD_CACHE, nw.CMD_FLAG_DF, ALL),
        (nw.CMD_BLOCK_STATUS, nw.CMD_FLAG_DF, ALL),
        (nw.CMD_WRITE_ZEROES, nw.CMD_FLAG_REQ_ONE, ALL),
        (nw.CMD_WRITE_ZEROES, nw.CMD_FLAG_FAST_ZERO, ALL & ~nw.SEND_FAST_ZERO),
        (nw.CMD_READ, nw.CMD_FLAG_DF, ALL & ~nw.SEND_DF),
        (nw.CMD_READ, nw.CMD_FLAG_FUA, ALL & ~nw.SEND_FUA),
        (nw.CMD_WRITE, nw.CMD_FLAG_FUA, ALL & ~nw.SEND_FUA),
        (nw.CMD_FLUSH, nw.CMD_FLAG_FUA, ALL & ~nw.SEND_FUA),
        (nw.CMD_DISC, nw.CMD_FLAG_NO_HOLE, ALL),
    ],
)
def test_flags_not_valid_for_the_command_are_einval(cmd: int, flags: int, tflags: int) -> None:
    p = parser(tflags=tflags)
    length = 0 if cmd in (nw.CMD_FLUSH, nw.CMD_DISC) else 512
    payload = bytes(length) if cmd == nw.CMD_WRITE else b""
    wire = nw.request(cmd, flags=flags, handle=HANDLE, length=length, payload=payload)
    refused(one(p, wire), cmd, nw.EINVAL)
    assert_goes_on(p)


@pytest.mark.parametrize(
    ("cmd", "tflag"),
    [
        (nw.CMD_FLUSH, nw.SEND_FLUSH),
        (nw.CMD_TRIM, nw.SEND_TRIM),
        (nw.CMD_WRITE_ZEROES, nw.SEND_WRITE_ZEROES),
        (nw.CMD_CACHE, nw.SEND_CACHE),
    ],
)
def test_commands_not_advertised_are_einval(cmd: int, tflag: int) -> None:
    p = parser(tflags=ALL & ~tflag)
    length = 0 if cmd == nw.CMD_FLUSH else 512
    refused(one(p, nw.request(cmd, handle=HANDLE, length=length)), cmd, nw.EINVAL)


@pytest.mark.parametrize(
    ("cmd", "error"),
    [
        (nw.CMD_WRITE, nw.ENOSPC),
        (nw.CMD_WRITE_ZEROES, nw.ENOSPC),
        (nw.CMD_READ, nw.EINVAL),
        (nw.CMD_TRIM, nw.EINVAL),
        (nw.CMD_CACHE, nw.EINVAL),
        (nw.CMD_BLOCK_STATUS, nw.EINVAL),
    ],
)
@pytest.mark.parametrize(
    ("offset", "length"),
    [(SIZE - 511, 512), (SIZE, 1), (SIZE + 4096, 512), ((1 << 64) - 1, 1), ((1 << 64) - 512, 512)],
)
def test_past_the_end(cmd: int, error: int, offset: int, length: int) -> None:
    p = parser()
    payload = bytes(length) if cmd == nw.CMD_WRITE else b""
    wire = nw.request(cmd, handle=HANDLE, offset=offset, length=length, payload=payload)
    refused(one(p, wire), cmd, error)
    assert_goes_on(p)


@pytest.mark.parametrize("cmd", [nw.CMD_WRITE, nw.CMD_TRIM, nw.CMD_WRITE_ZEROES])
def test_write_like_commands_on_a_read_only_export_are_eperm(cmd: int) -> None:
    p = parser(tflags=ALL | nw.READ_ONLY)
    payload = b"x" * 512 if cmd == nw.CMD_WRITE else b""
    wire = nw.request(cmd, handle=HANDLE, length=512, payload=payload)
    refused(one(p, wire), cmd, nw.EPERM)
    assert_goes_on(p)


@pytest.mark.parametrize(
    ("cmd", "length"),
    [(nw.CMD_READ, 512), (nw.CMD_FLUSH, 0), (nw.CMD_CACHE, 512), (nw.CMD_BLOCK_STATUS, 512)],
)
def test_a_read_only_export_still_reads(cmd: int, length: int) -> None:
    p = parser(tflags=ALL | nw.READ_ONLY)
    assert one(p, nw.request(cmd, length=length)) == Command(cmd, 0, 0, 0, length, None)


def test_a_refused_write_payload_is_consumed_across_feeds() -> None:
    p = parser(tflags=ALL | nw.READ_ONLY)
    payload = bytes(range(256)) * 40  # 10240 bytes, and it looks nothing like a request
    wire = nw.request(nw.CMD_WRITE, handle=HANDLE, length=len(payload), payload=payload)
    wire += nw.request(nw.CMD_READ, handle=2, length=1)
    for i in range(0, len(wire), 1000):
        events = feed_all(parser(tflags=ALL | nw.READ_ONLY), [wire[:i], wire[i:]])
        assert len(events) == 2
        refused(events[0], nw.CMD_WRITE, nw.EPERM)
        assert events[1] == Command(nw.CMD_READ, 0, 2, 0, 1, None)
    chunks = [wire[i : i + 333] for i in range(0, len(wire), 333)]
    events = feed_all(p, chunks)
    assert len(events) == 2
    refused(events[0], nw.CMD_WRITE, nw.EPERM)
    assert events[1] == Command(nw.CMD_READ, 0, 2, 0, 1, None)


@pytest.mark.parametrize(
    "cmd",
    [
        nw.CMD_READ,
        nw.CMD_WRITE,
        nw.CMD_TRIM,
        nw.CMD_CACHE,
        nw.CMD_WRITE_ZEROES,
        nw.CMD_BLOCK_STATUS,
    ],
)
def test_zero_length_is_einval(cmd: int) -> None:
    p = parser()
    refused(one(p, nw.request(cmd, handle=HANDLE, offset=512, length=0)), cmd, nw.EINVAL)
    assert_goes_on(p)


def test_read_up_to_max_payload() -> None:
    p = parser(max_payload=4096)
    assert one(p, nw.request(nw.CMD_READ, length=4096)) == Command(0, 0, 0, 0, 4096, None)
    refused(one(p, nw.request(nw.CMD_READ, handle=HANDLE, length=4097)), nw.CMD_READ, nw.EINVAL)
    assert_goes_on(p)


@pytest.mark.parametrize("step", [None, 1, 1000])
def test_write_over_max_payload_is_consumed_then_einval(step: int | None) -> None:
    p = parser(max_payload=4096)
    payload = b"\x25\x60\x95\x13" * 2000  # 8000 bytes of request magic, to tempt the parser
    wire = nw.request(nw.CMD_WRITE, handle=HANDLE, length=len(payload), payload=payload)
    wire += nw.request(nw.CMD_READ, handle=3, length=8)
    chunks = [wire] if step is None else [wire[i : i + step] for i in range(0, len(wire), step)]
    events = feed_all(p, chunks)
    assert len(events) == 2, events
    refused(events[0], nw.CMD_WRITE, nw.EINVAL)
    assert events[1] == Command(nw.CMD_READ, 0, 3, 0, 8, None)


def test_refused_write_error_comes_only_after_its_payload() -> None:
    p = parser(max_payload=4096)
    payload = bytes(5000)
    wire = nw.request(nw.CMD_WRITE, handle=HANDLE, length=len(payload), payload=payload)
    # the error may not come before the payload is consumed (replies to a request whose
    # bytes have not all arrived would let the stream and the replies drift apart)
    assert p.feed(wire[:100]) == []
    events = p.feed(wire[100:])
    assert len(events) == 1
    refused(events[0], nw.CMD_WRITE, nw.EINVAL)


def test_block_status_without_a_context_is_einval() -> None:
    p = parser(block_status=False)
    wire = nw.request(nw.CMD_BLOCK_STATUS, handle=HANDLE, length=512)
    refused(one(p, wire), nw.CMD_BLOCK_STATUS, nw.EINVAL)
    assert_goes_on(p)


@pytest.mark.parametrize(
    ("cmd", "offset", "length"),
    [
        (nw.CMD_READ, 100, 512),
        (nw.CMD_READ, 512, 100),
        (nw.CMD_WRITE, 1, 512),
        (nw.CMD_WRITE, 0, 513),
        (nw.CMD_TRIM, 256, 512),
        (nw.CMD_WRITE_ZEROES, 0, 511),
        (nw.CMD_CACHE, 4095, 4096),
        (nw.CMD_BLOCK_STATUS, 0, 1),
    ],
)
def test_misaligned_requests_are_einval(cmd: int, offset: int, length: int) -> None:
    p = parser(min_block=512)
    payload = bytes(length) if cmd == nw.CMD_WRITE else b""
    wire = nw.request(cmd, handle=HANDLE, offset=offset, length=length, payload=payload)
    refused(one(p, wire), cmd, nw.EINVAL)
    assert_goes_on(p)
    aligned = nw.request(cmd, offset=1024, length=2048, payload=bytes(2048) if payload else b"")
    ev = one(p, aligned)
    assert isinstance(ev, Command) and (ev.offset, ev.length) == (1024, 2048)


def test_bad_magic_ends_the_stream() -> None:
    p = parser()
    good = nw.request(nw.CMD_READ, handle=1, length=1)
    bad = nw.request(nw.CMD_READ, handle=2, length=1, magic=0x12560953)  # the historic magic
    events = plain(p.feed(good + bad + good))
    assert events[0] == Command(nw.CMD_READ, 0, 1, 0, 1, None)
    assert len(events) == 2 and isinstance(events[1], FramingError)
    assert p.closed
    assert p.feed(good) == []


def test_bad_magic_after_a_split_write() -> None:
    p = parser()
    wire = nw.request(nw.CMD_WRITE, length=4, payload=b"abcd")
    assert p.feed(wire[:30]) == []
    events = p.feed(wire[30:] + b"\0" * 28)
    assert len(events) == 2 and isinstance(events[1], FramingError)
    assert p.feed(nw.request(nw.CMD_FLUSH)) == []


# Reply encoders ---------------------------------------------------------------------------------


@pytest.mark.parametrize("error", [0, nw.EPERM, nw.EIO, nw.EINVAL, nw.ENOSPC, nw.ESHUTDOWN])
def test_simple_reply(error: int) -> None:
    assert simple_reply(HANDLE, error) == struct.pack(">IIQ", nw.SIMPLE_REPLY_MAGIC, error, HANDLE)
    assert simple_reply(7) == bytes.fromhex("67446698 00000000 0000000000000007")


@pytest.mark.parametrize("done", [True, False])
def test_data_chunk_header(done: bool) -> None:
    flags = nw.REPLY_FLAG_DONE if done else 0
    header = data_chunk_header(HANDLE, 1 << 40, 4096, done=done)
    body = bytes(4096)
    assert header + body == nw.chunk(
        flags, nw.REPLY_TYPE_OFFSET_DATA, HANDLE, struct.pack(">Q", 1 << 40) + body
    )
    assert len(header) == 28


def test_data_chunk_is_done_by_default() -> None:
    assert nw.chunks_of(data_chunk_header(1, 0, 1) + b"x") == [
        (nw.REPLY_FLAG_DONE, nw.REPLY_TYPE_OFFSET_DATA, 1, bytes(8) + b"x")
    ]


@pytest.mark.parametrize("done", [True, False])
def test_hole_chunk(done: bool) -> None:
    flags = nw.REPLY_FLAG_DONE if done else 0
    assert hole_chunk(HANDLE, 512, 1 << 20, done=done) == nw.chunk(
        flags, nw.REPLY_TYPE_OFFSET_HOLE, HANDLE, struct.pack(">QI", 512, 1 << 20)
    )


def test_none_chunk() -> None:
    assert none_chunk(HANDLE) == nw.chunk(nw.REPLY_FLAG_DONE, nw.REPLY_TYPE_NONE, HANDLE, b"")
    assert len(none_chunk(1)) == 20


@pytest.mark.parametrize("message", ["", "bad request", "dé☃"])
def test_error_chunk(message: str) -> None:
    raw = message.encode()
    assert error_chunk(HANDLE, nw.EINVAL, message) == nw.chunk(
        nw.REPLY_FLAG_DONE,
        nw.REPLY_TYPE_ERROR,
        HANDLE,
        struct.pack(">IH", nw.EINVAL, len(raw)) + raw,
    )


def _error_message(encoded: bytes) -> bytes:
    ((flags, rtype, _, payload),) = nw.chunks_of(encoded)
    assert (flags, rtype) == (nw.REPLY_FLAG_DONE, nw.REPLY_TYPE_ERROR)
    err, mlen = struct.unpack_from(">IH", payload)
    assert err != 0
    assert len(payload) == 6 + mlen
    return payload[6:]


def test_error_chunk_message_is_at_most_4096_bytes() -> None:
    message = _error_message(error_chunk(1, nw.EIO, "x" * 10_000))
    assert message == b"x" * nw.MAX_STRING


def test_error_chunk_truncates_on_a_character_boundary() -> None:
    message = _error_message(error_chunk(1, nw.EIO, "€" * 2000))  # 6000 bytes
    assert len(message) <= nw.MAX_STRING
    assert message.decode("utf-8") == "€" * 1365  # cut at the last whole character


@pytest.mark.parametrize(
    "extents",
    [
        [(4096, 0)],
        [(512, nw.STATE_HOLE | nw.STATE_ZERO), (1 << 20, 0), (4096, nw.STATE_ZERO)],
    ],
)
def test_block_status_chunk(extents: list[tuple[int, int]]) -> None:
    body = struct.pack(">I", 1) + b"".join(struct.pack(">II", n, f) for n, f in extents)
    encoded = block_status_chunk(HANDLE, 1, extents)
    assert encoded == nw.chunk(nw.REPLY_FLAG_DONE, nw.REPLY_TYPE_BLOCK_STATUS, HANDLE, body)
    length = struct.unpack_from(">I", encoded, 16)[0]
    assert length == 4 + 8 * len(extents)


# Property: valid requests come back as they were sent -------------------------------------------

SPEC_FLAGS = {  # the command flags the spec documents for each command
    nw.CMD_READ: nw.CMD_FLAG_FUA | nw.CMD_FLAG_DF,
    nw.CMD_WRITE: nw.CMD_FLAG_FUA,
    nw.CMD_DISC: nw.CMD_FLAG_FUA,
    nw.CMD_FLUSH: nw.CMD_FLAG_FUA,
    nw.CMD_TRIM: nw.CMD_FLAG_FUA,
    nw.CMD_CACHE: nw.CMD_FLAG_FUA,
    nw.CMD_WRITE_ZEROES: nw.CMD_FLAG_FUA | nw.CMD_FLAG_NO_HOLE | nw.CMD_FLAG_FAST_ZERO,
    nw.CMD_BLOCK_STATUS: nw.CMD_FLAG_FUA | nw.CMD_FLAG_REQ_ONE,
}
RANGED = {
    nw.CMD_READ,
    nw.CMD_WRITE,
    nw.CMD_TRIM,
    nw.CMD_CACHE,
    nw.CMD_WRITE_ZEROES,
    nw.CMD_BLOCK_STATUS,
}


@dataclass(frozen=True)
class Config:
    size: int
    tflags: int
    block_status: bool
    min_block: int
    max_payload: int

    def parser(self) -> RequestParser:
        return parser(
            size=self.size,
            tflags=self.tflags,
            block_status=self.block_status,
            min_block=self.min_block,
            max_payload=self.max_payload,
        )

    def allowed_flags(self, cmd: int) -> int:
        """The spec's flags for `cmd`, minus those whose transmission flag is not set."""
        allowed = SPEC_FLAGS[cmd]
        for cflag, tflag in (
            (nw.CMD_FLAG_FUA, nw.SEND_FUA),
            (nw.CMD_FLAG_DF, nw.SEND_DF),
            (nw.CMD_FLAG_FAST_ZERO, nw.SEND_FAST_ZERO),
        ):
            if not self.tflags & tflag:
                allowed &= ~cflag
        return allowed

    def advertised(self) -> set[int]:
        cmds = {nw.CMD_READ, nw.CMD_WRITE, nw.CMD_DISC}
        for cmd, tflag in (
            (nw.CMD_FLUSH, nw.SEND_FLUSH),
            (nw.CMD_TRIM, nw.SEND_TRIM),
            (nw.CMD_CACHE, nw.SEND_CACHE),
            (nw.CMD_WRITE_ZEROES, nw.SEND_WRITE_ZEROES),
        ):
            if self.tflags & tflag:
                cmds.add(cmd)
        if self.block_status:
            cmds.add(nw.CMD_BLOCK_STATUS)
        return cmds

    def errors(self, cmd: int, flags: int, offset: int, length: int) -> set[int]:
        """Every error the spec names for this request (empty: the request is valid)."""
        if cmd not in SPEC_FLAGS:
            return {nw.EINVAL}  # "SHOULD return NBD_EINVAL if it receives an unknown command"
        errs: set[int] = set()
        if self.tflags & nw.READ_ONLY and cmd in (nw.CMD_WRITE, nw.CMD_TRIM, nw.CMD_WRITE_ZEROES):
            errs.add(nw.EPERM)
        if cmd not in self.advertised():
            errs.add(nw.EINVAL)
        if flags & ~self.allowed_flags(cmd):
            errs.add(nw.EINVAL)
        if cmd in RANGED:
            if length == 0:
                errs.add(nw.EINVAL)
            if offset + length > self.size:
                write = cmd in (nw.CMD_WRITE, nw.CMD_WRITE_ZEROES)
                errs.add(nw.ENOSPC if write else nw.EINVAL)
            if offset % self.min_block or length % self.min_block:
                errs.add(nw.EINVAL)
            if cmd in (nw.CMD_READ, nw.CMD_WRITE) and length > self.max_payload:
                errs.add(nw.EINVAL)
        return errs


@dataclass(frozen=True)
class Req:
    cmd: int
    flags: int
    handle: int
    offset: int
    length: int
    payload: bytes = b""

    def wire(self) -> bytes:
        return nw.request(
            self.cmd,
            flags=self.flags,
            handle=self.handle,
            offset=self.offset,
            length=self.length,
            payload=self.payload,
        )


def split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


configs = st.builds(
    Config,
    size=st.sampled_from([4096, 65536, 65536 + 512]),
    tflags=st.integers(0, 0xFFF).map(lambda f: f | nw.HAS_FLAGS),
    block_status=st.booleans(),
    min_block=st.sampled_from([1, 1, 512]),
    max_payload=st.sampled_from([512, 4096, 1 << 25]),
)
handles = st.integers(0, (1 << 64) - 1)


@st.composite
def valid_request(draw: st.DrawFn, cfg: Config) -> Req:
    cmds = sorted(cfg.advertised() - {nw.CMD_DISC})
    if cfg.tflags & nw.READ_ONLY:
        cmds = [c for c in cmds if c not in (nw.CMD_WRITE, nw.CMD_TRIM, nw.CMD_WRITE_ZEROES)]
    cmd = draw(st.sampled_from(cmds))
    allowed = cfg.allowed_flags(cmd)
    flags = draw(st.integers(0, 0xFFFF)) & allowed
    handle = draw(handles)
    if cmd == nw.CMD_FLUSH:
        return Req(cmd, flags, handle, 0, 0)
    blocks = cfg.size // cfg.min_block
    limit = blocks
    if cmd in (nw.CMD_READ, nw.CMD_WRITE):
        limit = min(limit, cfg.max_payload // cfg.min_block, 2048 // cfg.min_block or 1)
    nblocks = draw(st.integers(1, limit))
    start = draw(st.integers(0, blocks - nblocks))
    offset, length = start * cfg.min_block, nblocks * cfg.min_block
    payload = draw(st.binary(min_size=length, max_size=length)) if cmd == nw.CMD_WRITE else b""
    return Req(cmd, flags, handle, offset, length, payload)


@SETTINGS
@given(data=st.data(), cfg=configs, cuts=st.lists(st.integers(min_value=0), max_size=40))
def test_valid_requests_round_trip(data: st.DataObject, cfg: Config, cuts: list[int]) -> None:
    reqs = data.draw(st.lists(valid_request(cfg), max_size=20), label="requests")
    disc = data.draw(st.booleans(), label="disc")
    disc_flags = data.draw(st.sampled_from([0, cfg.allowed_flags(nw.CMD_DISC)]), label="flags")
    wire = b"".join(r.wire() for r in reqs)
    if disc:
        wire += nw.request(nw.CMD_DISC, flags=disc_flags, handle=42)
    expected: list[Event] = [
        Command(
            r.cmd,
            r.flags,
            r.handle,
            r.offset,
            r.length,
            r.payload if r.cmd == nw.CMD_WRITE else None,
        )
        for r in reqs
    ]
    if disc:
        expected.append(Disconnect(42))
    p = cfg.parser()
    assert feed_all(p, split(wire, cuts)) == expected
    assert p.pending_payload == 0


# Property: any request gets the spec's answer ---------------------------------------------------


MUTATIONS = ["unknown command", "other command", "flag", "zero", "past end", "misalign", "big"]


@st.composite
def any_request(draw: st.DrawFn, cfg: Config) -> Req:
    """A valid request with a few of its fields broken, so most break exactly one rule."""
    r = draw(valid_request(cfg))
    cmd, flags, offset, length = r.cmd, r.flags, r.offset, r.length
    for mutation in draw(st.lists(st.sampled_from(MUTATIONS), max_size=2)):
        if mutation == "unknown command":
            cmd = draw(st.integers(8, 0xFFFF))
        elif mutation == "other command":
            cmd = draw(st.sampled_from(sorted(SPEC_FLAGS.keys() - {nw.CMD_DISC})))
        elif mutation == "flag":
            flags |= 1 << draw(st.one_of(st.integers(0, 4), st.integers(0, 15)))
        elif mutation == "zero":
            length = 0
        elif mutation == "past end":
            offset = draw(
                st.one_of(
                    st.integers(cfg.size - length + 1, cfg.size + 4096).filter(lambda o: o >= 0),
                    st.just((1 << 64) - 1),
                )
            )
        elif mutation == "misalign" and cfg.min_block > 1:
            if draw(st.booleans()):
                offset += draw(st.integers(1, cfg.min_block - 1))
            else:
                length += draw(st.integers(1, cfg.min_block - 1))
        elif mutation == "big" and cfg.max_payload <= 4096:
            length = cfg.max_payload + draw(st.sampled_from([1, cfg.min_block]))
    offset = min(offset, (1 << 64) - 1)
    # a WRITE's payload is sent whatever the server will make of it
    payload = bytes([r.handle & 0xFF]) * length if cmd == nw.CMD_WRITE else b""
    return Req(cmd, flags, r.handle, offset, length, payload)


@SETTINGS
@given(data=st.data(), cfg=configs, cuts=st.lists(st.integers(min_value=0), max_size=40))
def test_every_request_gets_the_spec_answer(
    data: st.DataObject, cfg: Config, cuts: list[int]
) -> None:
    reqs = data.draw(st.lists(any_request(cfg), min_size=1, max_size=12), label="requests")
    wire = b"".join(r.wire() for r in reqs)
    events = feed_all(cfg.parser(), split(wire, cuts))
    assert len(events) == len(reqs), events
    for r, ev in zip(reqs, events, strict=True):
        errs = cfg.errors(r.cmd, r.flags, r.offset, r.length)
        if not errs:
            payload = r.payload if r.cmd == nw.CMD_WRITE else None
            assert ev == Command(r.cmd, r.flags, r.handle, r.offset, r.length, payload), r
        else:
            assert isinstance(ev, BadCommand), (r, ev, errs)
            assert (ev.cmd, ev.handle) == (r.cmd, r.handle)
            assert ev.error in errs, (r, ev, errs)


# Property: garbage never raises -----------------------------------------------------------------


@st.composite
def garbage(draw: st.DrawFn) -> bytes:
    pieces: list[bytes] = []
    for _ in range(draw(st.integers(0, 10))):
        kind = draw(st.integers(0, 2))
        if kind == 0:
            pieces.append(draw(st.binary(max_size=60)))
        else:  # a header with the right magic and anything else
            cmd = draw(st.integers(0, 0xFFFF) if kind == 1 else st.integers(0, 8))
            length = draw(st.one_of(st.integers(0, 100), st.integers(0, 0xFFFFFFFF)))
            pieces.append(
                nw.request(
                    cmd,
                    flags=draw(st.integers(0, 0xFFFF)),
                    handle=draw(handles),
                    offset=draw(st.integers(0, (1 << 64) - 1)),
                    length=length,
                )
            )
    return b"".join(pieces)


KINDS = (Command, BadCommand, Disconnect, FramingError)


@SETTINGS
@given(
    cfg=configs,
    wire=st.one_of(st.binary(max_size=300), garbage()),
    cuts=st.lists(st.integers(min_value=0), max_size=30),
)
def test_garbage_never_raises(cfg: Config, wire: bytes, cuts: list[int]) -> None:
    p = cfg.parser()
    events: list[Event] = []
    for chunk in split(wire, cuts):
        got = p.feed(chunk)
        if events and isinstance(events[-1], FramingError):
            assert got == [], "events after a framing error"
        events += got
    assert all(isinstance(ev, KINDS) for ev in events)
    for i, ev in enumerate(events):
        if isinstance(ev, FramingError):
            assert i == len(events) - 1
            assert p.closed


def feed_as_a_thread(p: RequestParser, wire: bytes) -> list[Event]:
    """What a connection thread does (server/threaded.py): a write's pending payload goes
    straight into payload_buffer(), every other read takes one 28-byte header into a reused
    buffer with old bytes after it, through feed_header; a short tail goes through feed()."""
    events: list[Event] = []
    view = memoryview(wire)
    reused = bytearray(b"\xee" * 64)
    while view:
        target = p.payload_buffer()
        if target is not None:
            n = min(len(target), len(view))
            target[:n] = view[:n]
            events += plain(p.payload_received(n))
        elif len(view) >= 28:
            n = 28
            reused[:28] = view[:28]
            events += plain(p.feed_header(reused))
        else:
            n = len(view)
            events += plain(p.feed(bytes(view)))
        view = view[n:]
    return events


@SETTINGS
@given(
    data=st.data(),
    cfg=configs,
    wire=st.one_of(st.just(b""), st.binary(max_size=120), garbage()),
)
def test_feed_header_gives_what_feed_gives(data: st.DataObject, cfg: Config, wire: bytes) -> None:
    """The one-header fast path is the same parser: any stream of requests (valid, refused,
    refused writes whose payloads must be skipped, then garbage) gives the same events, and
    leaves the same state, read a header at a time as read whole."""
    reqs = data.draw(st.lists(any_request(cfg), max_size=10), label="requests")
    stream = b"".join(r.wire() for r in reqs) + wire
    whole, by_header = cfg.parser(), cfg.parser()
    assert feed_as_a_thread(by_header, stream) == plain(whole.feed(stream))
    assert (by_header.pending_payload, by_header.closed) == (whole.pending_payload, whole.closed)
