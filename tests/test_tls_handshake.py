"""The handshake codec's TLS states (NBD_OPT_STARTTLS), against wire bytes written from the spec.

Bytes go in as a client sends them (tests/nbdwire.py), events and reply bytes come out. What the
spec's TLS section asks of a server: ACK then TLS; nothing negotiated before STARTTLS survives
it; plaintext pipelined after it is never parsed; STARTTLS twice or with data is ERR_INVALID;
in FORCEDTLS (`tls_required`) every option but STARTTLS and ABORT is ERR_TLS_REQD and
EXPORT_NAME ends the session, and once TLS runs ERR_TLS_REQD is never sent.
"""

from __future__ import annotations

import itertools
import struct

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
    ListExports,
    MetaContextRequest,
    OptionAnswered,
    ProtocolError,
    ServerHandshake,
    StartTLSRequest,
    State,
    _NeedData,
)

BOTH = nw.C_FIXED_NEWSTYLE | nw.C_NO_ZEROES
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def pump(h: ServerHandshake) -> list[Event]:
    out: list[Event] = []
    while True:
        ev = h.next_event()
        if isinstance(ev, _NeedData):
            return out
        out.append(ev)


def send(h: ServerHandshake, data: bytes) -> list[Event]:
    h.receive_data(data)
    return pump(h)


def state(h: ServerHandshake) -> State:
    return h.state


def new(*, required: bool = False, flags: int = BOTH) -> ServerHandshake:
    h = ServerHandshake(tls_required=required)
    h.data_to_send()  # the greeting
    assert send(h, nw.client_flags(flags)) == []
    return h


def replies(h: ServerHandshake) -> list[nw.OptReply]:
    return nw.parse_opt_replies(h.data_to_send())


def starttls(h: ServerHandshake, tail: bytes = b"") -> None:
    """STARTTLS (plus pipelined `tail`), accepted by the server: exactly one ACK goes out."""
    assert send(h, nw.option(nw.OPT_STARTTLS) + tail) == [StartTLSRequest()]
    h.reply_starttls()
    assert h.data_to_send() == nw.opt_reply(nw.OPT_STARTTLS, nw.REP_ACK)
    assert state(h) is State.TLS_HANDSHAKE


def go(h: ServerHandshake, name: bytes = b"disk") -> ExportInfoRequest:
    (ev,) = send(h, nw.option(nw.OPT_GO, nw.info_data(name)))
    assert isinstance(ev, ExportInfoRequest) and ev.go
    return ev


def answer_go(h: ServerHandshake, name: str = "disk") -> None:
    started = h.reply_info(
        name=name, size=1 << 20, flags=nw.HAS_FLAGS, description="", block_sizes=(1, 4096, 1 << 25)
    )
    assert started is not None


# Allow mode (SELECTIVETLS with every export open either way) --------------------------------


def test_starttls_acks_and_waits_for_the_tls_handshake() -> None:
    h = new()
    starttls(h)
    assert h.next_event() is NEED_DATA
    assert not h.tls_active
    h.tls_established()
    assert h.tls_active and state(h) is State.OPTION_HEADER
    assert send(h, nw.option(nw.OPT_LIST)) == [ListExports()]


def test_plaintext_pipelined_after_starttls_is_never_parsed() -> None:
    """A man in the middle could append options to the client's STARTTLS: they must not count,
    neither those in the same read nor those arriving before the TLS handshake ends."""
    h = new()
    injected = nw.option(nw.OPT_STRUCTURED_REPLY) + nw.option(nw.OPT_GO, nw.info_data(b"disk"))
    starttls(h, injected[:30])
    assert h.next_event() is NEED_DATA
    h.receive_data(injected[30:])
    assert h.next_event() is NEED_DATA
    assert h.data_to_send() == b""
    assert h.discarded == len(injected)
    h.tls_established()
    assert pump(h) == []  # nothing left over: the injected GO is gone
    ev = go(h)
    assert ev.name == "disk"
    answer_go(h)
    assert state(h) is State.TRANSMISSION


def test_negotiation_before_starttls_is_forgotten() -> None:
    h = new()
    assert send(h, nw.option(nw.OPT_STRUCTURED_REPLY)) == [
        OptionAnswered(nw.OPT_STRUCTURED_REPLY, Rep.ACK)
    ]
    (meta,) = send(
        h, nw.option(nw.OPT_SET_META_CONTEXT, nw.meta_data(b"disk", [b"base:allocation"]))
    )
    assert isinstance(meta, MetaContextRequest)
    h.reply_meta_context()
    h.data_to_send()
    assert h.structured_replies
    starttls(h)
    h.tls_established()
    assert not h.structured_replies
    # meta contexts need structured replies again, which must be renegotiated over TLS
    (ev,) = send(h, nw.option(nw.OPT_SET_META_CONTEXT, nw.meta_data(b"disk", [b"base:"])))
    assert ev == OptionAnswered(nw.OPT_SET_META_CONTEXT, Rep.ERR_INVALID)
    h.data_to_send()
    go(h)
    started = h.reply_info(
        name="disk", size=1 << 20, flags=nw.HAS_FLAGS, description="", block_sizes=(1, 4096, 1)
    )
    assert started is not None
    assert not started.negotiated.structured_replies
    assert not started.negotiated.base_allocation


def test_structured_replies_negotiated_over_tls_count() -> None:
    h = new()
    starttls(h)
    h.tls_established()
    send(h, nw.option(nw.OPT_STRUCTURED_REPLY))
    h.data_to_send()
    assert h.structured_replies


@pytest.mark.parametrize("required", [False, True])
def test_second_starttls_is_invalid(required: bool) -> None:
    h = new(required=required)
    starttls(h)
    h.tls_established()
    assert send(h, nw.option(nw.OPT_STARTTLS)) == [OptionAnswered(nw.OPT_STARTTLS, Rep.ERR_INVALID)]
    (r,) = replies(h)
    assert (r.option, r.rep) == (nw.OPT_STARTTLS, nw.REP_ERR_INVALID)
    assert r.data  # a message for the user
    assert state(h) is State.OPTION_HEADER and h.tls_active


@pytest.mark.parametrize("required", [False, True])
@pytest.mark.parametrize("tls_first", [False, True])
def test_starttls_with_data_is_invalid(required: bool, tls_first: bool) -> None:
    h = new(required=required)
    if tls_first:
        starttls(h)
        h.tls_established()
    assert send(h, nw.option(nw.OPT_STARTTLS, b"\0")) == [
        OptionAnswered(nw.OPT_STARTTLS, Rep.ERR_INVALID)
    ]
    (r,) = replies(h)
    assert r.rep == nw.REP_ERR_INVALID
    assert h.tls_active is tls_first


def test_refused_starttls_keeps_plaintext_going() -> None:
    """TLS off: the server answers the event with ERR_POLICY and haggling goes on in clear."""
    h = new()
    send(h, nw.option(nw.OPT_STARTTLS) + nw.option(nw.OPT_LIST))
    h.reply_error(Rep.ERR_POLICY, "TLS is not configured")
    (r,) = replies(h)
    assert (r.option, r.rep) == (nw.OPT_STARTTLS, nw.REP_ERR_POLICY)
    assert pump(h) == [ListExports()]  # the pipelined LIST was kept
    assert h.discarded == 0


def test_starttls_needs_fixed_newstyle() -> None:
    h = new(flags=nw.C_NO_ZEROES)
    assert send(h, nw.option(nw.OPT_STARTTLS)) == [OptionAnswered(nw.OPT_STARTTLS, Rep.ERR_POLICY)]
    (r,) = replies(h)
    assert r.rep == nw.REP_ERR_POLICY


def test_allow_mode_never_sends_tls_reqd() -> None:
    h = new()
    send(h, nw.option(0x7777) + nw.option(nw.OPT_LIST, b"x"))
    assert {r.rep for r in replies(h)} == {nw.REP_ERR_UNSUP, nw.REP_ERR_INVALID}


# Require mode (FORCEDTLS) ---------------------------------------------------------------------

REFUSED_BEFORE_TLS = [
    (nw.OPT_LIST, b""),
    (nw.OPT_LIST, b"junk"),  # malformed: TLS_REQD still comes first
    (nw.OPT_INFO, nw.info_data(b"disk")),
    (nw.OPT_GO, nw.info_data(b"disk")),
    (nw.OPT_GO, nw.info_data(b"no such export")),
    (nw.OPT_STRUCTURED_REPLY, b""),
    (nw.OPT_LIST_META_CONTEXT, nw.meta_data(b"disk", [b"base:"])),
    (nw.OPT_SET_META_CONTEXT, nw.meta_data(b"disk", [b"base:allocation"])),
    (nw.OPT_PEEK_EXPORT, b""),
    (nw.OPT_EXTENDED_HEADERS, b""),
    (0x7777, b"unknown option"),
]


@pytest.mark.parametrize(("opt", "data"), REFUSED_BEFORE_TLS)
def test_required_tls_refuses_options_before_starttls(opt: int, data: bytes) -> None:
    h = new(required=True)
    assert send(h, nw.option(opt, data)) == [OptionAnswered(opt, Rep.ERR_TLS_REQD)]
    (r,) = replies(h)
    assert (r.option, r.rep) == (opt, nw.REP_ERR_TLS_REQD)
    assert b"STARTTLS" in r.data
    assert state(h) is State.OPTION_HEADER  # the client may still upgrade


def test_required_tls_drains_oversized_options_then_refuses() -> None:
    h = new(required=True)
    big = MAX_OPTION_DATA + 1
    header = struct.pack(">QII", nw.IHAVEOPT, nw.OPT_LIST, big)
    assert send(h, header + bytes(big - 1)) == []
    assert send(h, b"\0") == [OptionAnswered(nw.OPT_LIST, Rep.ERR_TLS_REQD)]
    (r,) = replies(h)
    assert r.rep == nw.REP_ERR_TLS_REQD


def test_required_tls_export_name_ends_the_session() -> None:
    h = new(required=True)
    (ev,) = send(h, nw.option(nw.OPT_EXPORT_NAME, b"disk"))
    assert isinstance(ev, ProtocolError)
    assert "TLS" in ev.reason
    assert state(h) is State.CLOSED
    assert h.data_to_send() == b""  # EXPORT_NAME has no error reply


def test_required_tls_allows_abort() -> None:
    h = new(required=True)
    assert send(h, nw.option(nw.OPT_ABORT)) == [Aborted()]
    assert replies(h) == [nw.OptReply(nw.OPT_ABORT, nw.REP_ACK, b"")]


def test_required_tls_closes_clients_without_fixed_newstyle() -> None:
    h = ServerHandshake(tls_required=True)
    h.data_to_send()
    (ev,) = send(h, nw.client_flags(nw.C_NO_ZEROES))
    assert isinstance(ev, ProtocolError)
    assert state(h) is State.CLOSED


@pytest.mark.parametrize(("opt", "data"), REFUSED_BEFORE_TLS)
def test_required_tls_serves_everything_once_tls_runs(opt: int, data: bytes) -> None:
    h = new(required=True)
    starttls(h)
    h.tls_established()
    send(h, nw.option(nw.OPT_STRUCTURED_REPLY))
    h.data_to_send()
    events = send(h, nw.option(opt, data))
    assert len(events) == 1
    ev = events[0]
    assert not (isinstance(ev, OptionAnswered) and ev.reply is Rep.ERR_TLS_REQD)
    if opt == nw.OPT_STRUCTURED_REPLY:
        assert ev == OptionAnswered(opt, Rep.ACK)
    elif isinstance(ev, OptionAnswered):
        assert ev.reply in (Rep.ERR_UNSUP, Rep.ERR_INVALID)
    else:
        assert isinstance(ev, ListExports | ExportInfoRequest | MetaContextRequest)


def test_api_misuse_is_an_error() -> None:
    h = new()
    with pytest.raises(RuntimeError):
        h.tls_established()
    with pytest.raises(RuntimeError):
        h.reply_starttls()
    send(h, nw.option(nw.OPT_LIST))
    with pytest.raises(RuntimeError):
        h.reply_starttls()  # the pending option is LIST


# Hypothesis: whatever a client sends before TLS in require mode, and whatever arrives between
# the ACK and the TLS handshake ---------------------------------------------------------------

plain_options = st.lists(
    st.tuples(
        st.sampled_from(
            [nw.OPT_LIST, nw.OPT_INFO, nw.OPT_GO, nw.OPT_STRUCTURED_REPLY, 9, 10, 11, 4242]
        ),
        st.binary(max_size=40),
    ),
    max_size=8,
)


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@SETTINGS
@given(plain_options, st.lists(st.integers(min_value=0), max_size=6))
def test_required_tls_refuses_any_option_sequence(
    options: list[tuple[int, bytes]], cuts: list[int]
) -> None:
    h = new(required=True)
    wire = b"".join(nw.option(o, d) for o, d in options) + nw.option(nw.OPT_STARTTLS)
    events: list[Event] = []
    for part in _chunks(wire, cuts):
        events += send(h, part)
    assert events[:-1] == [OptionAnswered(o, Rep.ERR_TLS_REQD) for o, _ in options]
    assert events[-1] == StartTLSRequest()
    assert [r.rep for r in replies(h)] == [nw.REP_ERR_TLS_REQD] * len(options)


@SETTINGS
@given(st.binary(max_size=300), st.lists(st.integers(min_value=0), max_size=6))
def test_bytes_between_ack_and_tls_are_dropped(junk: bytes, cuts: list[int]) -> None:
    h = new()
    parts = _chunks(junk, cuts)
    starttls(h, parts[0] if parts else b"")
    for part in parts[1:]:
        assert send(h, part) == []
    assert h.data_to_send() == b""
    assert h.discarded == len(junk)
    h.tls_established()
    assert pump(h) == []
    assert send(h, nw.option(nw.OPT_LIST)) == [ListExports()]
