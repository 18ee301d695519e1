"""The handshake codec (nbdcrypt.nbd.handshake) against wire bytes written from the spec.

Bytes go in as a client would send them (tests/nbdwire.py builds them with struct.pack from
doc/proto.md), events come out, and what the codec sends back is parsed and compared with the
spec's layouts byte for byte. The codec's own encoders are never used to build expectations.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import nbdwire as nw
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdcrypt.nbd.constants import MAX_OPTION_DATA, Rep
from nbdcrypt.nbd.handshake import (
    NEED_DATA,
    Aborted,
    Event,
    ExportInfoRequest,
    ExportNameRequest,
    ListExports,
    MetaContextRequest,
    OptionAnswered,
    ProtocolError,
    ServerHandshake,
    StartTLSRequest,
    State,
    TransmissionStarted,
)

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

GREETING = nw.greeting(nw.FLAG_FIXED_NEWSTYLE | nw.FLAG_NO_ZEROES)
BOTH = nw.C_FIXED_NEWSTYLE | nw.C_NO_ZEROES
SIZE = 1 << 30
TFLAGS = nw.HAS_FLAGS | nw.SEND_FLUSH | nw.SEND_FUA | nw.SEND_TRIM
BLOCK_SIZES = (1, 4096, 1 << 25)


# Helpers ----------------------------------------------------------------------------------------


EVENT_TYPES = (
    ListExports,
    ExportInfoRequest,
    ExportNameRequest,
    MetaContextRequest,
    StartTLSRequest,
    OptionAnswered,
    Aborted,
    ProtocolError,
)


def next_event(h: ServerHandshake) -> Event | None:
    """The next event, or None for NEED_DATA."""
    ev = h.next_event()
    if ev is NEED_DATA:
        return None
    assert isinstance(ev, EVENT_TYPES), ev  # TransmissionStarted comes from reply_* only
    return ev


def state(h: ServerHandshake) -> State:
    """The state, read through a call so that mypy forgets what an earlier assert narrowed."""
    return h.state


def pump(h: ServerHandshake) -> list[Event]:
    """Every event available now (stops at NEED_DATA, including while a reply is awaited)."""
    out: list[Event] = []
    while (ev := next_event(h)) is not None:
        out.append(ev)
    return out


def send(h: ServerHandshake, data: bytes) -> list[Event]:
    h.receive_data(data)
    return pump(h)


def only(events: Sequence[Event]) -> Event:
    assert len(events) == 1, events
    return events[0]


def new(flags: int = BOTH) -> ServerHandshake:
    """A handshake past the greeting and the client flags, in option haggling."""
    h = ServerHandshake()
    assert h.data_to_send() == GREETING
    assert send(h, nw.client_flags(flags)) == []
    assert state(h) is State.OPTION_HEADER
    return h


def replies(h: ServerHandshake) -> list[nw.OptReply]:
    return nw.parse_opt_replies(h.data_to_send())


def answer_info(
    h: ServerHandshake, *, name: str = "disk", description: str = "a disk"
) -> TransmissionStarted | None:
    return h.reply_info(
        name=name, size=SIZE, flags=TFLAGS, description=description, block_sizes=BLOCK_SIZES
    )


def go(h: ServerHandshake, name: bytes = b"disk", tail: bytes = b"") -> TransmissionStarted:
    """Send GO (plus `tail`), accept it, return what the transmission phase gets."""
    ev = only(send(h, nw.option(nw.OPT_GO, nw.info_data(name)) + tail))
    assert isinstance(ev, ExportInfoRequest) and ev.go
    started = answer_info(h, name=name.decode())
    assert started is not None
    assert state(h) is State.TRANSMISSION
    final = replies(h)[-1]
    assert (final.option, final.rep, final.data) == (nw.OPT_GO, nw.REP_ACK, b"")
    return started


def structured(h: ServerHandshake) -> None:
    ev = only(send(h, nw.option(nw.OPT_STRUCTURED_REPLY)))
    assert ev == OptionAnswered(nw.OPT_STRUCTURED_REPLY, Rep.ACK)
    assert replies(h) == [nw.OptReply(nw.OPT_STRUCTURED_REPLY, nw.REP_ACK, b"")]


def assert_goes_on(h: ServerHandshake) -> None:
    """The handshake still parses options: an unknown one gets ERR_UNSUP."""
    ev = only(send(h, nw.option(0x7777)))
    assert ev == OptionAnswered(0x7777, Rep.ERR_UNSUP)
    (r,) = replies(h)
    assert (r.option, r.rep) == (0x7777, nw.REP_ERR_UNSUP)


def answered(h: ServerHandshake, opt: int, data: bytes, rep: int) -> nw.OptReply:
    """Send an option the codec answers itself; check the event and the single reply."""
    ev = only(send(h, nw.option(opt, data)))
    assert isinstance(ev, OptionAnswered)
    assert (ev.option, ev.reply) == (opt, rep)
    (r,) = replies(h)
    assert (r.option, r.rep) == (opt, rep)
    assert state(h) is State.OPTION_HEADER
    return r


def set_meta(h: ServerHandshake, export: bytes, queries: Iterable[bytes]) -> list[nw.OptReply]:
    ev = only(send(h, nw.option(nw.OPT_SET_META_CONTEXT, nw.meta_data(export, queries))))
    assert isinstance(ev, MetaContextRequest) and ev.select
    h.reply_meta_context()
    return replies(h)


# Greeting and client flags ----------------------------------------------------------------------


def test_greeting_is_fixed_newstyle_with_no_zeroes() -> None:
    h = ServerHandshake()
    out = h.data_to_send()
    assert out == bytes.fromhex("4e42444d4147494349484156454f50540003")
    assert out == GREETING
    assert h.data_to_send() == b""
    assert state(h) is State.CLIENT_FLAGS
    assert next_event(h) is None


@pytest.mark.parametrize("flags", [0, nw.C_FIXED_NEWSTYLE, nw.C_NO_ZEROES, BOTH])
def test_known_client_flags_are_accepted(flags: int) -> None:
    h = new(flags)
    assert h.data_to_send() == b""


def test_client_flags_wait_for_four_bytes() -> None:
    h = ServerHandshake()
    h.data_to_send()
    assert send(h, b"\0\0\0") == []
    assert state(h) is State.CLIENT_FLAGS
    assert send(h, b"\3") == []
    assert state(h) is State.OPTION_HEADER


@pytest.mark.parametrize("flags", [1 << 2, 1 << 31, 0xFFFFFFFF, BOTH | 1 << 16])
def test_unknown_client_flags_close(flags: int) -> None:
    h = ServerHandshake()
    h.data_to_send()
    ev = only(send(h, nw.client_flags(flags) + nw.option(nw.OPT_LIST)))
    assert isinstance(ev, ProtocolError)
    assert state(h) is State.CLOSED
    assert h.data_to_send() == b""
    assert send(h, nw.option(nw.OPT_LIST)) == []


def test_bad_option_magic_closes() -> None:
    h = new()
    bad = struct.pack(">QII", 0x1122334455667788, nw.OPT_LIST, 0)
    ev = only(send(h, bad + nw.option(nw.OPT_LIST)))
    assert isinstance(ev, ProtocolError)
    assert state(h) is State.CLOSED
    assert h.data_to_send() == b""
    assert send(h, nw.option(nw.OPT_LIST)) == []


def test_option_header_waits_for_sixteen_bytes() -> None:
    h = new()
    wire = nw.option(nw.OPT_STRUCTURED_REPLY)
    assert send(h, wire[:15]) == []
    assert h.data_to_send() == b""
    assert only(send(h, wire[15:])) == OptionAnswered(nw.OPT_STRUCTURED_REPLY, Rep.ACK)


def test_option_data_waits_until_complete() -> None:
    h = new()
    wire = nw.option(nw.OPT_INFO, nw.info_data(b"disk", [nw.INFO_NAME]))
    for i in range(len(wire) - 1):
        assert send(h, wire[i : i + 1]) == []
        assert state(h) in (State.OPTION_HEADER, State.OPTION_DATA)
    ev = only(send(h, wire[-1:]))
    assert ev == ExportInfoRequest("disk", frozenset({nw.INFO_NAME}), False)
    assert state(h) is State.AWAIT_REPLY


# NBD_OPT_LIST -----------------------------------------------------------------------------------


def test_list_replies_server_entries_then_ack() -> None:
    h = new()
    assert only(send(h, nw.option(nw.OPT_LIST))) == ListExports()
    assert state(h) is State.AWAIT_REPLY
    assert h.data_to_send() == b""
    h.reply_list([("disk", "a disk"), ("b", ""), ("ünï", "dé")])
    assert h.data_to_send() == (
        nw.opt_reply(nw.OPT_LIST, nw.REP_SERVER, nw.rep_server(b"disk", b"a disk"))
        + nw.opt_reply(nw.OPT_LIST, nw.REP_SERVER, nw.rep_server(b"b"))
        + nw.opt_reply(nw.OPT_LIST, nw.REP_SERVER, nw.rep_server("ünï".encode(), "dé".encode()))
        + nw.opt_reply(nw.OPT_LIST, nw.REP_ACK)
    )
    assert state(h) is State.OPTION_HEADER
    assert_goes_on(h)


def test_list_of_nothing_is_just_ack() -> None:
    h = new()
    send(h, nw.option(nw.OPT_LIST))
    h.reply_list([])
    assert h.data_to_send() == nw.opt_reply(nw.OPT_LIST, nw.REP_ACK)


def test_list_with_data_is_invalid() -> None:
    h = new()
    answered(h, nw.OPT_LIST, b"x", nw.REP_ERR_INVALID)
    assert_goes_on(h)


def test_list_refused_by_the_server() -> None:
    h = new()
    send(h, nw.option(nw.OPT_LIST))
    h.reply_error(Rep.ERR_POLICY, "not here")
    assert h.data_to_send() == nw.opt_reply(nw.OPT_LIST, nw.REP_ERR_POLICY, b"not here")
    assert_goes_on(h)


# NBD_OPT_ABORT ----------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"ignored"])  # the spec: ignore data sent with ABORT
def test_abort_acks_and_closes(data: bytes) -> None:
    h = new()
    ev = only(send(h, nw.option(nw.OPT_ABORT, data) + nw.option(nw.OPT_LIST)))
    assert ev == Aborted()
    assert h.data_to_send() == nw.opt_reply(nw.OPT_ABORT, nw.REP_ACK)
    assert state(h) is State.CLOSED
    assert send(h, nw.option(nw.OPT_LIST)) == []
    assert h.data_to_send() == b""


def test_close_stops_everything() -> None:
    h = new()
    h.close()
    assert state(h) is State.CLOSED
    assert send(h, nw.option(nw.OPT_LIST)) == []


# NBD_OPT_STARTTLS -------------------------------------------------------------------------------


def test_starttls_is_an_event_for_the_server() -> None:
    h = new()
    assert only(send(h, nw.option(nw.OPT_STARTTLS))) == StartTLSRequest()
    assert state(h) is State.AWAIT_REPLY
    h.reply_error(Rep.ERR_POLICY, "no TLS")
    assert h.data_to_send() == nw.opt_reply(nw.OPT_STARTTLS, nw.REP_ERR_POLICY, b"no TLS")
    assert_goes_on(h)


def test_starttls_with_data_is_invalid() -> None:
    h = new()
    answered(h, nw.OPT_STARTTLS, b"\0", nw.REP_ERR_INVALID)
    assert_goes_on(h)


# NBD_OPT_INFO and NBD_OPT_GO: parsing -----------------------------------------------------------


@pytest.mark.parametrize("opt", [nw.OPT_INFO, nw.OPT_GO])
@pytest.mark.parametrize(
    ("name", "requests"),
    [
        ("disk", [nw.INFO_NAME, nw.INFO_DESCRIPTION, nw.INFO_BLOCK_SIZE]),
        ("", []),
        ("ünïcødé ☃", [nw.INFO_BLOCK_SIZE]),
        ("x" * 4096, [0x1234]),  # the longest name a string may be; unknown info kept
    ],
)
def test_info_and_go_are_parsed(opt: int, name: str, requests: list[int]) -> None:
    h = new()
    ev = only(send(h, nw.option(opt, nw.info_data(name.encode(), requests))))
    assert ev == ExportInfoRequest(name, frozenset(requests), opt == nw.OPT_GO)
    assert state(h) is State.AWAIT_REPLY
    assert h.data_to_send() == b""


def _name4(n: int) -> bytes:
    return struct.pack(">I", n)


MALFORMED_INFO = {
    "empty": b"",
    "name length only": _name4(4),
    "name runs past the end": _name4(5) + b"disk",
    "no request count": _name4(4) + b"disk",
    "half a request count": _name4(4) + b"disk\0",
    "count says more than sent": _name4(4) + b"disk" + struct.pack(">HH", 2, nw.INFO_NAME),
    "half a request": _name4(4) + b"disk" + struct.pack(">H", 1) + b"\0",
    "trailing byte": _name4(4) + b"disk" + struct.pack(">H", 0) + b"\0",
    "trailing request": _name4(4) + b"disk" + struct.pack(">HHH", 1, 1, 2),
    "huge name length": _name4(0xFFFFFFFF) + b"disk" + struct.pack(">H", 0),
    "name over 4096 bytes": nw.info_data(b"x" * 4097),
    "NUL in name": nw.info_data(b"di\0sk"),
    "invalid UTF-8": nw.info_data(b"\xff\xfe"),
    "truncated UTF-8": nw.info_data("é".encode()[:1]),
    "UTF-8 surrogate": nw.info_data(b"\xed\xa0\x80"),
}


@pytest.mark.parametrize("opt", [nw.OPT_INFO, nw.OPT_GO])
@pytest.mark.parametrize("data", MALFORMED_INFO.values(), ids=MALFORMED_INFO.keys())
def test_malformed_info_and_go_are_invalid_and_the_handshake_goes_on(opt: int, data: bytes) -> None:
    h = new()
    answered(h, opt, data, nw.REP_ERR_INVALID)
    assert_goes_on(h)
    # and a well-formed GO still works afterwards
    started = go(h)
    assert started.negotiated.export_name == "disk"


# NBD_OPT_INFO and NBD_OPT_GO: replies -----------------------------------------------------------


def _info_replies(opt: int, extra: Sequence[bytes] = ()) -> list[nw.OptReply]:
    infos = [nw.info_export(SIZE, TFLAGS), *extra, nw.info_block_size(*BLOCK_SIZES)]
    return [nw.OptReply(opt, nw.REP_INFO, i) for i in infos]


@pytest.mark.parametrize("opt", [nw.OPT_INFO, nw.OPT_GO])
@pytest.mark.parametrize(
    ("requests", "extra"),
    [
        ([], []),
        ([nw.INFO_BLOCK_SIZE], []),
        ([nw.INFO_NAME], [nw.info_string(nw.INFO_NAME, b"canonical")]),
        ([nw.INFO_DESCRIPTION], [nw.info_string(nw.INFO_DESCRIPTION, "dé".encode())]),
        (
            [nw.INFO_DESCRIPTION, nw.INFO_NAME, 77],
            [
                nw.info_string(nw.INFO_NAME, b"canonical"),
                nw.info_string(nw.INFO_DESCRIPTION, "dé".encode()),
            ],
        ),
    ],
)
def test_reply_info_bytes(opt: int, requests: list[int], extra: list[bytes]) -> None:
    h = new()
    send(h, nw.option(opt, nw.info_data(b"disk", requests)))
    result = answer_info(h, name="canonical", description="dé")
    got = replies(h)
    assert got[-1] == nw.OptReply(opt, nw.REP_ACK, b"")
    # the spec lets INFO replies come in any order; each one must be exactly right
    assert sorted(got[:-1], key=repr) == sorted(_info_replies(opt, extra), key=repr)
    for r in got[:-1]:
        if r.data[:2] == struct.pack(">H", nw.INFO_EXPORT):
            assert len(r.data) == 12
        if r.data[:2] == struct.pack(">H", nw.INFO_BLOCK_SIZE):
            assert len(r.data) == 14
    if opt == nw.OPT_INFO:
        assert result is None
        assert state(h) is State.OPTION_HEADER
        assert_goes_on(h)
    else:
        assert isinstance(result, TransmissionStarted)
        assert state(h) is State.TRANSMISSION


def test_info_without_description_sends_no_empty_description() -> None:
    h = new()
    send(h, nw.option(nw.OPT_INFO, nw.info_data(b"disk", [nw.INFO_DESCRIPTION])))
    answer_info(h, description="")
    kinds = [struct.unpack_from(">H", r.data)[0] for r in replies(h) if r.rep == nw.REP_INFO]
    assert nw.INFO_DESCRIPTION not in kinds
    assert nw.INFO_EXPORT in kinds


def test_info_then_go() -> None:
    h = new()
    send(h, nw.option(nw.OPT_INFO, nw.info_data(b"disk")))
    assert answer_info(h) is None
    assert [r.rep for r in replies(h)] == [nw.REP_INFO, nw.REP_INFO, nw.REP_ACK]
    started = go(h)
    assert started.negotiated.export_name == "disk"


@pytest.mark.parametrize("opt", [nw.OPT_INFO, nw.OPT_GO])
def test_reply_error_on_info_and_go_goes_on(opt: int) -> None:
    h = new()
    # the next option is already buffered when the server answers: it is parsed next
    wire = nw.option(opt, nw.info_data(b"nope")) + nw.option(nw.OPT_STRUCTURED_REPLY)
    assert only(send(h, wire)) == ExportInfoRequest("nope", frozenset(), opt == nw.OPT_GO)
    h.reply_error(Rep.ERR_UNKNOWN, "unknown export")
    assert h.data_to_send() == nw.opt_reply(opt, nw.REP_ERR_UNKNOWN, b"unknown export")
    assert state(h) is State.OPTION_HEADER
    assert only(pump(h)) == OptionAnswered(nw.OPT_STRUCTURED_REPLY, Rep.ACK)
    assert replies(h) == [nw.OptReply(nw.OPT_STRUCTURED_REPLY, nw.REP_ACK, b"")]


def test_go_starts_transmission_and_keeps_trailing_bytes() -> None:
    h = new()
    tail = nw.request(nw.CMD_READ, handle=7, offset=0, length=512) + b"\x25\x60"
    started = go(h, b"disk", tail)
    assert started.trailing == tail
    n = started.negotiated
    assert (n.export_name, n.structured_replies, n.base_allocation, n.no_zeroes) == (
        "disk",
        False,
        False,
        True,
    )
    # GO never sends zero padding, and nothing more comes out of the handshake
    assert h.data_to_send() == b""
    assert send(h, b"more") == []


def test_go_keeps_bytes_that_arrive_while_the_server_decides() -> None:
    h = new()
    ev = only(send(h, nw.option(nw.OPT_GO, nw.info_data(b"disk"))))
    assert isinstance(ev, ExportInfoRequest)
    h.receive_data(b"early")
    assert next_event(h) is None
    h.receive_data(b" bytes")
    started = answer_info(h)
    assert started is not None
    assert started.trailing == b"early bytes"


def test_go_without_no_zeroes_still_sends_no_padding() -> None:
    h = new(nw.C_FIXED_NEWSTYLE)
    send(h, nw.option(nw.OPT_GO, nw.info_data(b"disk")))
    started = answer_info(h)
    assert started is not None and not started.negotiated.no_zeroes
    out = h.data_to_send()
    assert out.endswith(nw.opt_reply(nw.OPT_GO, nw.REP_ACK))


# NBD_OPT_EXPORT_NAME ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "zeroes"), [(BOTH, False), (nw.C_FIXED_NEWSTYLE, True), (0, True)]
)
def test_export_name_reply(flags: int, zeroes: bool) -> None:
    h = new(flags)
    tail = nw.request(nw.CMD_FLUSH, handle=1)
    ev = only(send(h, nw.option(nw.OPT_EXPORT_NAME, "dïsk".encode()) + tail))
    assert ev == ExportNameRequest("dïsk")
    assert state(h) is State.AWAIT_REPLY
    started = h.reply_export_name(size=SIZE, flags=TFLAGS)
    out = h.data_to_send()
    assert out == nw.export_name_reply(SIZE, TFLAGS, zeroes=zeroes)
    assert len(out) == (134 if zeroes else 10)
    assert state(h) is State.TRANSMISSION
    assert started.trailing == tail
    assert started.negotiated.export_name == "dïsk"
    assert started.negotiated.no_zeroes is not zeroes


def test_export_name_empty_is_the_default_export() -> None:
    h = new()
    assert only(send(h, nw.option(nw.OPT_EXPORT_NAME))) == ExportNameRequest("")


def test_export_name_refused_closes_without_a_reply() -> None:
    h = new()
    send(h, nw.option(nw.OPT_EXPORT_NAME, b"nope") + nw.option(nw.OPT_LIST))
    h.reply_error(Rep.ERR_UNKNOWN, "no such export")
    assert state(h) is State.CLOSED
    assert h.data_to_send() == b""
    assert pump(h) == []


@pytest.mark.parametrize(
    "name",
    [b"a\0b", b"\xff", b"x" * 4097],
    ids=["NUL", "invalid UTF-8", "over 4096 bytes"],
)
def test_bad_export_name_closes(name: bytes) -> None:
    # EXPORT_NAME has no error reply: a name that cannot be a string ends the session
    h = new()
    ev = only(send(h, nw.option(nw.OPT_EXPORT_NAME, name)))
    assert isinstance(ev, ProtocolError)
    assert state(h) is State.CLOSED
    assert h.data_to_send() == b""


def test_oversized_export_name_closes_at_once() -> None:
    h = new()
    ev = only(send(h, struct.pack(">QII", nw.IHAVEOPT, nw.OPT_EXPORT_NAME, MAX_OPTION_DATA + 1)))
    assert isinstance(ev, ProtocolError)
    assert state(h) is State.CLOSED


# NBD_OPT_STRUCTURED_REPLY -----------------------------------------------------------------------


def test_structured_reply_acked() -> None:
    h = new()
    assert not h.structured_replies
    structured(h)
    assert h.structured_replies
    assert go(h).negotiated.structured_replies


def test_structured_reply_with_data_is_invalid() -> None:
    h = new()
    answered(h, nw.OPT_STRUCTURED_REPLY, b"\0", nw.REP_ERR_INVALID)
    assert not h.structured_replies
    assert not go(h).negotiated.structured_replies


# LIST/SET_META_CONTEXT --------------------------------------------------------------------------


@pytest.mark.parametrize("opt", [nw.OPT_LIST_META_CONTEXT, nw.OPT_SET_META_CONTEXT])
def test_meta_context_needs_structured_replies(opt: int) -> None:
    h = new()
    answered(h, opt, nw.meta_data(b"disk", [b"base:allocation"]), nw.REP_ERR_INVALID)
    assert_goes_on(h)
    assert not go(h).negotiated.base_allocation


@pytest.mark.parametrize(
    "queries",
    [[], [b"base:"], [b"base:allocation"], [b"x-foo:bar", b"base:"], [b"base:", b"base:"]],
)
def test_list_meta_context_finds_base_allocation(queries: list[bytes]) -> None:
    h = new()
    structured(h)
    ev = only(send(h, nw.option(nw.OPT_LIST_META_CONTEXT, nw.meta_data(b"disk", queries))))
    assert ev == MetaContextRequest("disk", ("base:allocation",), False)
    h.reply_meta_context()
    assert h.data_to_send() == (
        nw.opt_reply(
            nw.OPT_LIST_META_CONTEXT,
            nw.REP_META_CONTEXT,
            nw.rep_meta_context(0, b"base:allocation"),
        )
        + nw.opt_reply(nw.OPT_LIST_META_CONTEXT, nw.REP_ACK)
    )
    assert state(h) is State.OPTION_HEADER
    # LIST selects nothing
    assert not go(h).negotiated.base_allocation


@pytest.mark.parametrize("opt", [nw.OPT_LIST_META_CONTEXT, nw.OPT_SET_META_CONTEXT])
@pytest.mark.parametrize(
    "queries",
    [[b"qemu:dirty-bitmap:b0"], [b"x-foo:"], [b"base:nosuchleaf"], [b":"], ["ünï:cødé".encode()]],
)
def test_unknown_meta_contexts_are_ignored(opt: int, queries: list[bytes]) -> None:
    h = new()
    structured(h)
    ev = only(send(h, nw.option(opt, nw.meta_data(b"disk", queries))))
    assert ev == MetaContextRequest("disk", (), opt == nw.OPT_SET_META_CONTEXT)
    h.reply_meta_context()
    assert h.data_to_send() == nw.opt_reply(opt, nw.REP_ACK)


def test_set_meta_context_selects_base_allocation_for_that_export() -> None:
    h = new()
    structured(h)
    got = set_meta(h, b"disk", [b"x-other:thing", b"base:allocation"])
    assert [r.rep for r in got] == [nw.REP_META_CONTEXT, nw.REP_ACK]
    assert all(r.option == nw.OPT_SET_META_CONTEXT for r in got)
    ctx_id, name = struct.unpack(">I", got[0].data[:4])[0], got[0].data[4:]
    assert name == b"base:allocation"
    assert ctx_id != 0
    assert got[1].data == b""
    n = go(h, b"disk").negotiated
    assert n.base_allocation and n.structured_replies


def test_set_meta_context_with_export_name() -> None:
    h = new()
    structured(h)
    set_meta(h, b"disk", [b"base:allocation"])
    send(h, nw.option(nw.OPT_EXPORT_NAME, b"disk"))
    assert h.reply_export_name(size=SIZE, flags=TFLAGS).negotiated.base_allocation


def test_set_meta_context_for_another_export_does_not_count() -> None:
    h = new()
    structured(h)
    set_meta(h, b"other", [b"base:allocation"])
    assert not go(h, b"disk").negotiated.base_allocation


def test_set_meta_context_twice_the_same_query_gives_one_context() -> None:
    h = new()
    structured(h)
    got = set_meta(h, b"disk", [b"base:allocation", b"base:allocation"])
    assert [r.rep for r in got] == [nw.REP_META_CONTEXT, nw.REP_ACK]


@pytest.mark.parametrize("queries", [[], [b"base:"], [b"x-foo:base:allocation"]])
def test_set_meta_context_that_selects_nothing(queries: list[bytes]) -> None:
    h = new()
    structured(h)
    assert set_meta(h, b"disk", queries) == [nw.OptReply(nw.OPT_SET_META_CONTEXT, nw.REP_ACK, b"")]
    assert not go(h).negotiated.base_allocation


def _selected(h: ServerHandshake) -> None:
    structured(h)
    set_meta(h, b"disk", [b"base:allocation"])


def test_a_later_empty_set_replaces_the_selection() -> None:
    h = new()
    _selected(h)
    set_meta(h, b"disk", [])
    assert not go(h).negotiated.base_allocation


def test_a_refused_set_clears_the_selection() -> None:
    h = new()
    _selected(h)
    send(h, nw.option(nw.OPT_SET_META_CONTEXT, nw.meta_data(b"disk", [b"base:allocation"])))
    h.reply_error(Rep.ERR_UNKNOWN, "no")
    assert replies(h) == [nw.OptReply(nw.OPT_SET_META_CONTEXT, nw.REP_ERR_UNKNOWN, b"no")]
    assert not go(h).negotiated.base_allocation


def test_a_malformed_set_clears_the_selection() -> None:
    h = new()
    _selected(h)
    answered(h, nw.OPT_SET_META_CONTEXT, nw.meta_data(b"disk", [b"nocolon"]), nw.REP_ERR_INVALID)
    assert not go(h).negotiated.base_allocation


def test_a_list_does_not_change_the_selection() -> None:
    h = new()
    _selected(h)
    send(h, nw.option(nw.OPT_LIST_META_CONTEXT, nw.meta_data(b"disk", [b"x-foo:"])))
    h.reply_meta_context()
    h.data_to_send()
    assert go(h).negotiated.base_allocation


def _q(q: bytes) -> bytes:
    return struct.pack(">I", len(q)) + q


MALFORMED_META = {
    "empty": b"",
    "export runs past the end": _name4(9) + b"disk" + struct.pack(">I", 0),
    "no query count": _name4(4) + b"disk",
    "count says more than sent": _name4(4) + b"disk" + struct.pack(">I", 2) + _q(b"base:"),
    "query runs past the end": _name4(4) + b"disk" + struct.pack(">II", 1, 99) + b"base:",
    "trailing byte": nw.meta_data(b"disk", [b"base:allocation"]) + b"\0",
    "query without colon": nw.meta_data(b"disk", [b"base:allocation", b"allocation"]),
    "empty query": nw.meta_data(b"disk", [b""]),
    "NUL in query": nw.meta_data(b"disk", [b"base:\0"]),
    "invalid UTF-8 export": nw.meta_data(b"\xc3", [b"base:allocation"]),
    "query over 4096 bytes": nw.meta_data(b"disk", [b"x-a:" + b"b" * 4093]),
    "huge query count": _name4(4) + b"disk" + struct.pack(">I", 0xFFFFFFFF),
}


@pytest.mark.parametrize("opt", [nw.OPT_LIST_META_CONTEXT, nw.OPT_SET_META_CONTEXT])
@pytest.mark.parametrize("data", MALFORMED_META.values(), ids=MALFORMED_META.keys())
def test_malformed_meta_context_is_invalid(opt: int, data: bytes) -> None:
    h = new()
    structured(h)
    answered(h, opt, data, nw.REP_ERR_INVALID)
    assert_goes_on(h)


def test_meta_context_refused_by_the_server() -> None:
    h = new()
    structured(h)
    send(h, nw.option(nw.OPT_LIST_META_CONTEXT, nw.meta_data(b"nope")))
    h.reply_error(Rep.ERR_UNKNOWN, "unknown export")
    assert h.data_to_send() == nw.opt_reply(
        nw.OPT_LIST_META_CONTEXT, nw.REP_ERR_UNKNOWN, b"unknown export"
    )
    assert_goes_on(h)


# Unknown and oversized options ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("opt", "data"),
    [
        (0, b""),
        (nw.OPT_PEEK_EXPORT, b""),
        (nw.OPT_EXTENDED_HEADERS, b""),
        (12, b"some data"),
        (0xFFFFFFFF, bytes(100)),
        (0x7FFF, bytes(MAX_OPTION_DATA)),  # the largest option that is read rather than drained
    ],
)
def test_unknown_options_are_unsupported_and_the_handshake_goes_on(opt: int, data: bytes) -> None:
    h = new()
    r = answered(h, opt, data, nw.REP_ERR_UNSUP)
    assert len(r.data) <= nw.MAX_STRING
    assert_goes_on(h)
    assert go(h).trailing == b""


@pytest.mark.parametrize("opt", [nw.OPT_INFO, nw.OPT_LIST, 0x4242])
def test_oversized_option_is_drained_then_too_big(opt: int) -> None:
    h = new()
    size = MAX_OPTION_DATA + 1
    assert send(h, struct.pack(">QII", nw.IHAVEOPT, opt, size)) == []
    step = 10_000
    for start in range(0, size - 1, step):
        # the drained data is not parsed: it may look like anything, even another option
        piece = (nw.option(nw.OPT_ABORT) * (step // 16 + 1))[: min(step, size - 1 - start)]
        assert send(h, piece) == []
        assert h.data_to_send() == b""
    ev = only(send(h, b"\0" + nw.option(nw.OPT_STRUCTURED_REPLY)[:5]))
    assert ev == OptionAnswered(opt, Rep.ERR_TOO_BIG)
    (r,) = replies(h)
    assert (r.option, r.rep) == (opt, nw.REP_ERR_TOO_BIG)
    assert only(send(h, nw.option(nw.OPT_STRUCTURED_REPLY)[5:])) == OptionAnswered(
        nw.OPT_STRUCTURED_REPLY, Rep.ACK
    )


# Misuse by the server ---------------------------------------------------------------------------


def test_replies_without_a_pending_option_are_refused() -> None:
    h = new()
    with pytest.raises(RuntimeError):
        h.reply_list([])
    with pytest.raises(RuntimeError):
        h.reply_error(Rep.ERR_POLICY, "x")
    send(h, nw.option(nw.OPT_LIST))
    with pytest.raises(RuntimeError):
        answer_info(h)
    with pytest.raises(RuntimeError):
        h.reply_meta_context()
    h.reply_list([])  # the right reply still works
    assert replies(h) == [nw.OptReply(nw.OPT_LIST, nw.REP_ACK, b"")]


# Error messages are strings ---------------------------------------------------------------------


def _check_message(r: nw.OptReply) -> None:
    assert len(r.data) <= nw.MAX_STRING, f"error message of {len(r.data)} bytes"
    r.data.decode("utf-8")  # a string is UTF-8


def test_codec_error_messages_fit_the_string_limit() -> None:
    # an error message is a string: at most 4096 bytes, even when it quotes a 4096-byte query
    h = new()
    structured(h)
    r = answered(
        h, nw.OPT_LIST_META_CONTEXT, nw.meta_data(b"disk", [b"\x01" * 4096]), nw.REP_ERR_INVALID
    )
    _check_message(r)


def test_reply_error_truncates_on_a_character_boundary() -> None:
    h = new()
    send(h, nw.option(nw.OPT_INFO, nw.info_data(b"disk")))
    h.reply_error(Rep.ERR_UNKNOWN, "€" * 2000)  # 6000 bytes, 4096 is not a multiple of 3
    (r,) = replies(h)
    _check_message(r)
    assert r.data == ("€" * 1365).encode()  # cut at the last whole character


# A whole session, whole or byte by byte ---------------------------------------------------------

EXPORTS = {"": "the default", "disk": "a disk", "ünï": "ünïcødé"}
Answer = Callable[[ServerHandshake, Event], TransmissionStarted | None]


def answer_by_name(h: ServerHandshake, ev: Event) -> TransmissionStarted | None:
    """A server with the exports of EXPORTS: yes to those, ERR_UNKNOWN to the rest."""
    if isinstance(ev, ListExports):
        h.reply_list(EXPORTS.items())
    elif isinstance(ev, StartTLSRequest):
        h.reply_error(Rep.ERR_POLICY, "no TLS")
    elif isinstance(ev, MetaContextRequest):
        if ev.export in EXPORTS:
            h.reply_meta_context()
        else:
            h.reply_error(Rep.ERR_UNKNOWN, "unknown export")
    elif isinstance(ev, ExportInfoRequest):
        if ev.name in EXPORTS:
            return h.reply_info(
                name=ev.name,
                size=SIZE,
                flags=TFLAGS,
                description=EXPORTS[ev.name],
                block_sizes=BLOCK_SIZES,
            )
        h.reply_error(Rep.ERR_UNKNOWN, "unknown export")
    elif isinstance(ev, ExportNameRequest):
        if ev.name in EXPORTS:
            return h.reply_export_name(size=SIZE, flags=TFLAGS)
        h.reply_error(Rep.ERR_UNKNOWN, "")
    return None


@dataclass
class Session:
    events: list[Event] = field(default_factory=list)
    out: bytearray = field(default_factory=bytearray)
    started: TransmissionStarted | None = None
    after: bytearray = field(default_factory=bytearray)  # bytes for the transmission phase
    state: State = State.CLIENT_FLAGS


def run_session(chunks: Iterable[bytes], answer: Answer = answer_by_name) -> Session:
    """Feed chunks the way the server does, answering every event with `answer`."""
    h = ServerHandshake()
    s = Session()
    s.out += h.data_to_send()
    for chunk in chunks:
        if s.started is not None:
            s.after += chunk
            continue
        h.receive_data(chunk)
        while s.started is None and (ev := next_event(h)) is not None:
            s.events.append(ev)
            assert not isinstance(ev, TransmissionStarted)
            s.started = answer(h, ev)
            s.out += h.data_to_send()
            if s.started is not None:
                s.after += s.started.trailing
    s.state = h.state
    return s


def split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


SCRIPT = b"".join(
    [
        nw.client_flags(BOTH),
        nw.option(nw.OPT_LIST),
        nw.option(nw.OPT_STARTTLS),
        nw.option(nw.OPT_LIST_META_CONTEXT, nw.meta_data(b"disk")),
        nw.option(nw.OPT_STRUCTURED_REPLY),
        nw.option(nw.OPT_LIST_META_CONTEXT, nw.meta_data(b"disk", [b"base:"])),
        nw.option(nw.OPT_SET_META_CONTEXT, nw.meta_data(b"disk", [b"base:allocation"])),
        nw.option(nw.OPT_INFO, nw.info_data(b"nope", [nw.INFO_NAME])),
        nw.option(nw.OPT_INFO, nw.info_data(b"disk", [nw.INFO_NAME, nw.INFO_DESCRIPTION])),
        nw.option(nw.OPT_INFO, b"\0\0"),
        nw.option(0x99, b"?" * 40),
        nw.option(0x98, bytes(MAX_OPTION_DATA + 3)),
        nw.option(nw.OPT_GO, nw.info_data(b"disk", [nw.INFO_BLOCK_SIZE])),
    ]
)
AFTER = nw.request(nw.CMD_READ, handle=1, length=4096) + nw.request(nw.CMD_DISC)


def test_script_whole() -> None:
    s = run_session([SCRIPT + AFTER])
    assert s.started is not None
    assert s.started.negotiated.base_allocation
    assert s.after == AFTER
    assert s.state is State.TRANSMISSION
    kinds = [type(e).__name__ for e in s.events]
    assert kinds == [
        "ListExports",
        "StartTLSRequest",
        "OptionAnswered",  # LIST_META before STRUCTURED_REPLY
        "OptionAnswered",  # STRUCTURED_REPLY
        "MetaContextRequest",
        "MetaContextRequest",
        "ExportInfoRequest",
        "ExportInfoRequest",
        "OptionAnswered",  # malformed INFO
        "OptionAnswered",  # unknown option
        "OptionAnswered",  # oversized option
        "ExportInfoRequest",
    ]
    finals = [r for r in nw.parse_opt_replies(bytes(s.out[nw.GREETING_LEN :])) if r.is_final]
    assert [r.rep for r in finals] == [
        nw.REP_ACK,
        nw.REP_ERR_POLICY,
        nw.REP_ERR_INVALID,
        nw.REP_ACK,
        nw.REP_ACK,
        nw.REP_ACK,
        nw.REP_ERR_UNKNOWN,
        nw.REP_ACK,
        nw.REP_ERR_INVALID,
        nw.REP_ERR_UNSUP,
        nw.REP_ERR_TOO_BIG,
        nw.REP_ACK,
    ]


def test_byte_at_a_time_is_the_same_as_one_feed() -> None:
    wire = SCRIPT + AFTER
    whole = run_session([wire])
    bytewise = run_session([wire[i : i + 1] for i in range(len(wire))])
    assert bytewise.events == whole.events
    assert bytewise.out == whole.out
    assert bytewise.after == whole.after == AFTER
    assert bytewise.started is not None and whole.started is not None
    assert bytewise.started.negotiated == whole.started.negotiated
    assert whole.started.trailing == AFTER  # (byte by byte, AFTER comes once GO is answered)


@SETTINGS
@given(cuts=st.lists(st.integers(min_value=0), max_size=30))
def test_any_chunking_is_the_same_as_one_feed(cuts: list[int]) -> None:
    wire = SCRIPT + AFTER
    whole = run_session([wire])
    chunked = run_session(split(wire, cuts))
    assert chunked.events == whole.events
    assert chunked.out == whole.out
    assert chunked.after == whole.after


# Property: garbage never raises -----------------------------------------------------------------


def check_output(s: Session) -> None:
    """What the codec sent is the greeting, option replies, and maybe an EXPORT_NAME answer."""
    out = bytes(s.out)
    assert out[: nw.GREETING_LEN] == GREETING
    out = out[nw.GREETING_LEN :]
    if s.started is not None and isinstance(s.events[-1], ExportNameRequest):
        n = 10 if s.started.negotiated.no_zeroes else 134
        assert out[-n:] == nw.export_name_reply(SIZE, TFLAGS, zeroes=n == 134)
        out = out[:-n]
    for r in nw.parse_opt_replies(out):
        if r.is_error:
            assert len(r.data) <= nw.MAX_STRING
            r.data.decode("utf-8")


def check_events(s: Session) -> None:
    for i, ev in enumerate(s.events):
        if isinstance(ev, ProtocolError | Aborted):
            assert i == len(s.events) - 1, "events after the session ended"
            assert s.state is State.CLOSED
    assert s.state is not State.AWAIT_REPLY, "an event was left unanswered"


def random_answer(data: st.DataObject) -> Answer:
    def answer(h: ServerHandshake, ev: Event) -> TransmissionStarted | None:
        if isinstance(ev, OptionAnswered | Aborted | ProtocolError):
            return None
        if data.draw(st.booleans(), label="accept"):
            return answer_by_name(h, ev)
        h.reply_error(Rep.ERR_POLICY, "no")
        return None

    return answer


CLIENT_FLAGS = st.one_of(st.sampled_from([0, 1, 2, 3]), st.integers(0, 0xFFFFFFFF))
OPTION_NUMBERS = st.one_of(st.integers(0, 12), st.integers(0, 0xFFFFFFFF))


@st.composite
def noisy_options(draw: st.DrawFn) -> bytes:
    """Option frames with arbitrary numbers and data, sometimes lying about their length."""
    opt = draw(OPTION_NUMBERS)
    data = draw(
        st.one_of(
            st.binary(max_size=40),
            st.builds(nw.info_data, st.binary(max_size=12), st.lists(st.integers(0, 5))),
            st.builds(
                nw.meta_data,
                st.binary(max_size=8),
                st.lists(st.sampled_from([b"base:allocation", b"base:", b"x:", b"q"])),
            ),
        )
    )
    length = draw(st.one_of(st.none(), st.integers(0, 64)))
    return nw.option(opt, data, length=length)


@st.composite
def noisy_stream(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return draw(st.binary(max_size=400))
    pieces = [nw.client_flags(draw(CLIENT_FLAGS))]
    pieces += draw(st.lists(st.one_of(noisy_options(), st.binary(max_size=20)), max_size=12))
    return b"".join(pieces)


@SETTINGS
@given(wire=noisy_stream(), cuts=st.lists(st.integers(min_value=0), max_size=20), data=st.data())
def test_garbage_never_raises(wire: bytes, cuts: list[int], data: st.DataObject) -> None:
    s = run_session(split(wire, cuts), random_answer(data))
    check_output(s)
    check_events(s)


# Property: one final reply per well-formed option -----------------------------------------------

NAMES = ["", "disk", "ünï", "nope"]  # "nope" does not exist
QUERIES = [b"base:allocation", b"base:", b"base:other", b"qemu:dirty-bitmap:x", b"x-foo:bar"]


@dataclass(frozen=True)
class ClientOption:
    opt: int
    data: bytes
    name: str = ""
    queries: tuple[bytes, ...] = ()
    requests: tuple[int, ...] = ()


names = st.sampled_from(NAMES)
query_lists = st.lists(st.sampled_from(QUERIES), max_size=4).map(tuple)
info_requests = st.lists(st.integers(0, 4), max_size=4, unique=True).map(tuple)


def _info(opt: int, name: str, reqs: tuple[int, ...]) -> ClientOption:
    return ClientOption(opt, nw.info_data(name.encode(), reqs), name, requests=reqs)


def _meta(opt: int, name: str, queries: tuple[bytes, ...]) -> ClientOption:
    return ClientOption(opt, nw.meta_data(name.encode(), queries), name, queries)


def _export_name(name: str) -> ClientOption:
    return ClientOption(nw.OPT_EXPORT_NAME, name.encode(), name)


middle_options = st.one_of(
    st.just(ClientOption(nw.OPT_LIST, b"")),
    st.just(ClientOption(nw.OPT_LIST, b"junk")),
    st.just(ClientOption(nw.OPT_STARTTLS, b"")),
    st.just(ClientOption(nw.OPT_STRUCTURED_REPLY, b"")),
    st.builds(_info, st.just(nw.OPT_INFO), names, info_requests),
    st.builds(_meta, st.just(nw.OPT_LIST_META_CONTEXT), names, query_lists),
    st.builds(_meta, st.just(nw.OPT_SET_META_CONTEXT), names, query_lists),
    st.builds(
        ClientOption,
        st.sampled_from([0, 4, 11, 12, 4242, 0xFFFFFFFF]),
        st.binary(max_size=20),
    ),
)
last_options = st.one_of(
    st.none(),
    st.builds(_info, st.just(nw.OPT_GO), names, info_requests),
    names.map(_export_name),
    st.just(ClientOption(nw.OPT_ABORT, b"")),
)


@dataclass
class Model:
    """What the spec (and answer_by_name) say must happen, option by option."""

    structured: bool = False
    meta: tuple[str, bool] | None = None  # export of the last good SET, base:allocation chosen

    def expect(self, o: ClientOption) -> tuple[list[int], int]:
        """(non-final reply types, final reply type) for one option."""
        known = o.name in EXPORTS
        if o.opt == nw.OPT_LIST:
            if o.data:
                return [], nw.REP_ERR_INVALID
            return [nw.REP_SERVER] * len(EXPORTS), nw.REP_ACK
        if o.opt == nw.OPT_STARTTLS:
            return [], nw.REP_ERR_POLICY
        if o.opt == nw.OPT_STRUCTURED_REPLY:
            self.structured = True
            return [], nw.REP_ACK
        if o.opt in (nw.OPT_INFO, nw.OPT_GO):
            if not known:
                return [], nw.REP_ERR_UNKNOWN
            # EXPORT and BLOCK_SIZE always, NAME and DESCRIPTION when asked for
            infos = 2 + len({nw.INFO_NAME, nw.INFO_DESCRIPTION} & set(o.requests))
            return [nw.REP_INFO] * infos, nw.REP_ACK
        if o.opt == nw.OPT_ABORT:
            return [], nw.REP_ACK
        if o.opt in (nw.OPT_LIST_META_CONTEXT, nw.OPT_SET_META_CONTEXT):
            select = o.opt == nw.OPT_SET_META_CONTEXT
            if select:
                self.meta = None  # replaced even when the SET fails
            if not self.structured:
                return [], nw.REP_ERR_INVALID
            if not known:
                return [], nw.REP_ERR_UNKNOWN
            if select:
                found = b"base:allocation" in o.queries
                self.meta = (o.name, found)
            else:
                found = not o.queries or bool({b"base:", b"base:allocation"} & set(o.queries))
            return [nw.REP_META_CONTEXT] * found, nw.REP_ACK
        return [], nw.REP_ERR_UNSUP


@SETTINGS
@given(
    flags=st.sampled_from([0, 1, 2, 3]),
    structured_first=st.booleans(),
    middle=st.lists(middle_options, max_size=10),
    last=last_options,
    after=st.binary(max_size=40),
    cuts=st.lists(st.integers(min_value=0), max_size=20),
)
def test_each_option_gets_exactly_one_final_reply(
    *,
    flags: int,
    structured_first: bool,
    middle: list[ClientOption],
    last: ClientOption | None,
    after: bytes,
    cuts: list[int],
) -> None:
    first = [ClientOption(nw.OPT_STRUCTURED_REPLY, b"")] if structured_first else []
    sent = [*first, *middle, *([last] if last is not None else [])]
    transmission = (
        last is not None and last.opt in (nw.OPT_GO, nw.OPT_EXPORT_NAME) and last.name in EXPORTS
    )
    if not transmission:
        after = b""  # else these bytes would be read as more options
    wire = nw.client_flags(flags) + b"".join(nw.option(o.opt, o.data) for o in sent) + after
    s = run_session(split(wire, cuts))
    check_events(s)

    out = bytes(s.out)
    assert out[: nw.GREETING_LEN] == GREETING
    out = out[nw.GREETING_LEN :]
    if transmission and last is not None and last.opt == nw.OPT_EXPORT_NAME:
        reply = nw.export_name_reply(SIZE, TFLAGS, zeroes=not flags & nw.C_NO_ZEROES)
        assert out.endswith(reply)
        out = out[: -len(reply)]
    got = nw.parse_opt_replies(out)

    model = Model()
    pos = 0
    for o in sent:
        if o.opt == nw.OPT_EXPORT_NAME:
            break  # answered outside the option reply framing, checked above
        extra, final = model.expect(o)
        mine = got[pos : pos + len(extra) + 1]
        pos += len(mine)
        assert all(r.option == o.opt for r in mine), (o, mine)
        assert [r.rep for r in mine] == [*extra, final], (o, mine)
        for r in mine:
            if r.rep == nw.REP_META_CONTEXT:
                ctx_id = struct.unpack_from(">I", r.data)[0]
                assert r.data[4:] == b"base:allocation"
                assert (ctx_id != 0) if o.opt == nw.OPT_SET_META_CONTEXT else (ctx_id == 0)
    assert pos == len(got), f"replies nobody asked for: {got[pos:]}"

    if transmission:
        assert last is not None and s.started is not None
        assert s.state is State.TRANSMISSION
        assert s.after == after
        n = s.started.negotiated
        assert n.export_name == last.name
        assert n.structured_replies == model.structured
        assert n.base_allocation == (model.meta == (last.name, True))
        assert n.no_zeroes == bool(flags & nw.C_NO_ZEROES)
    else:
        assert s.started is None
        if last is not None and last.opt in (nw.OPT_ABORT, nw.OPT_EXPORT_NAME):
            assert s.state is State.CLOSED
        else:
            assert s.state is State.OPTION_HEADER
