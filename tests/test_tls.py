"""NBD over TLS (NBD_OPT_STARTTLS with X.509), through real clients and a raw socket.

libnbd (nbdinfo, nbdcopy: `nbds://` and `nbds+unix://` with `tls-certificates=DIR`) and qemu
(`tls-creds-x509`) talk to a real `nbdcrypt serve` with certificates made by certtool
(tests/tlscerts.py). What is checked: data written over TLS is on disk and reads back; require
mode refuses plain clients (ERR_TLS_REQD for every option, a closed session for EXPORT_NAME);
allow mode serves both; a certificate from another CA, or none when one is required, fails the
TLS handshake; the client certificate's subject is the connection's identity; plaintext sent
after STARTTLS is dropped; failures neither stop the server nor leak connection slots.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import time
import warnings
from pathlib import Path

import nbdwire as nw
import pytest
from clients import rawnbd as rn
from conftest import RunningServer, StartServer, require_tool, run
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from tlscerts import SUBJECTS, Pki, make_openssl_pki

from nbdcrypt.tls import peer_names

MIB = 1 << 20


def config(
    pki: Pki,
    mode: str = "require",
    *,
    client_certificate: str = "required",
    limits: str = "{handshake_timeout: 5s}",
) -> str:
    ca = f"    ca: {pki.ca_cert}\n" if client_certificate != "none" else ""
    return (
        "server:\n"
        "  tls:\n"
        f"    mode: {mode}\n"
        f"    certificate: {pki.server_cert}\n"
        f"    private_key: {pki.server_key}\n"
        f"{ca}"
        f"    client_certificate: {client_certificate}\n"
        f"  limits: {limits}\n"
        "devices:\n"
        "  disk0: {file: disk0.img, size: 16M}\n"
        "exports:\n"
        "  disk: {device: disk0, description: the disk}\n"
    )


def nbds(server: RunningServer, certs: Path, export: str = "disk", *, unix: bool = False) -> str:
    """A libnbd TLS URI with a certificates directory."""
    if unix:
        return f"nbds+unix:///{export}?socket={server.socket_path}&tls-certificates={certs}"
    return f"nbds://127.0.0.1:{server.port}/{export}?tls-certificates={certs}"


def nbdinfo(uri: str, *args: str, check: bool = True, debug: bool = False) -> tuple[int, str, str]:
    env = {**os.environ, "LIBNBD_DEBUG": "1" if debug else "0"}
    proc = run([require_tool("nbdinfo"), *args, uri], check=check, env=env)
    return proc.returncode, proc.stdout, proc.stderr


def info_json(uri: str) -> dict[str, object]:
    info: dict[str, object] = json.loads(nbdinfo(uri, "--json")[1])
    return info


def qemu_tls(certs: Path, *options: str) -> list[str]:
    """qemu's arguments for an NBD image over TLS with the client certificates in `certs`."""
    opts = ",".join(["driver=nbd", "export=disk", "tls-creds=tls0", *options])
    obj = f"tls-creds-x509,id=tls0,dir={certs},endpoint=client"
    return ["--object", obj, "--image-opts", opts]


def qemu_io(certs: Path, options: tuple[str, ...], *commands: str) -> str:
    args = [require_tool("qemu-io"), *qemu_tls(certs, *options)]
    for command in commands:
        args += ["-c", command]
    out = run(args).stdout
    assert "fail" not in out.lower() and "error" not in out.lower(), out
    return out


def tls_context(pki: Pki, who: str | None = "alice") -> ssl.SSLContext:
    """A Python client context: trusts the test CA, shows `who`'s certificate."""
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    if who is not None:
        ctx.load_cert_chain(pki.client_cert(who), pki.client_key(who))
    return ctx


def starttls(c: rn.RawNBD, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    """STARTTLS on a raw client past its flags; its socket becomes the TLS socket."""
    (ack,) = c.option(rn.OPT_STARTTLS)
    assert ack.type == rn.REP_ACK, ack
    tls = ctx.wrap_socket(c.sock, server_hostname="localhost")
    c.sock = tls
    return tls


def closed(c: rn.RawNBD, timeout: float = 30.0) -> bytes:
    """What arrives before the server closes the connection (EOF, reset, or TLS EOF)."""
    try:
        return c.wait_closed(timeout)
    except ssl.SSLError:
        return b""


def log_has(server: RunningServer, text: str, wait: float = 10.0) -> bool:
    """Whether the server logged `text`, waiting up to `wait` seconds for it (a client may see
    the connection close a moment before the server's line about it is written)."""
    deadline = time.monotonic() + wait
    while text not in server.log:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# Real clients over TLS ------------------------------------------------------------------------


def test_nbdcopy_writes_over_tls_and_reads_back(
    tmp_path: Path, pki: Pki, start_server: StartServer
) -> None:
    server = start_server(config(pki))
    data = os.urandom(4 * MIB)
    src, out = tmp_path / "src.bin", tmp_path / "out.bin"
    src.write_bytes(data)
    nbdcopy = require_tool("nbdcopy")
    run([nbdcopy, str(src), nbds(server, pki.clients["alice"])])
    run([nbdcopy, nbds(server, pki.clients["bob"], unix=True), str(out)])
    assert out.read_bytes()[: len(data)] == data
    assert (tmp_path / "disk0.img").read_bytes()[: len(data)] == data
    assert log_has(server, "tls(CN=alice,O=tenant A)")
    assert log_has(server, "tls(CN=bob,OU=storage,O=tenant B)")
    assert server.stop() == 0


@pytest.mark.parametrize("unix", [False, True])
def test_nbdinfo_sees_tls(pki: Pki, start_server: StartServer, unix: bool) -> None:
    server = start_server(config(pki))
    info = info_json(nbds(server, pki.clients["alice"], unix=unix))
    assert info["TLS"] is True
    exports = info["exports"]
    assert isinstance(exports, list)
    (export,) = exports
    assert export["export-size"] == 16 * MIB
    assert export["description"] == "the disk"


def test_qemu_writes_over_tls_tcp_and_reads_over_tls_unix(
    tmp_path: Path, pki: Pki, start_server: StartServer
) -> None:
    server = start_server(config(pki))
    certs = pki.clients["bob"]
    tcp = ("host=127.0.0.1", f"port={server.port}")
    unix = (f"path={server.socket_path}", "tls-hostname=localhost")  # no host name to check
    qemu_io(certs, tcp, "write -P 0x5a 1M 2M")
    out = qemu_io(certs, unix, "read -P 0x5a 1M 2M", "read -P 0 0 1M")
    assert "read 2097152/2097152 bytes at offset 1048576" in out
    on_disk = (tmp_path / "disk0.img").read_bytes()
    assert on_disk[MIB : 3 * MIB] == b"\x5a" * (2 * MIB)
    img = run([require_tool("qemu-img"), "info", *qemu_tls(certs, *tcp)]).stdout
    assert "virtual size: 16 MiB (16777216 bytes)" in img


# Require mode: plain clients are refused ------------------------------------------------------


def test_require_refuses_plain_nbdinfo(pki: Pki, start_server: StartServer) -> None:
    server = start_server(config(pki))
    code, out, err = nbdinfo(server.uri("disk", tcp=True), check=False, debug=True)
    assert code != 0
    assert "server replied with error to opt_go request" in err
    assert "TLS is required: send NBD_OPT_STARTTLS first" in err  # our message, in debug
    assert "without TLS" in out
    code, _, err = nbdinfo(server.uri("disk"), "--list", check=False)
    assert code != 0
    assert "disk" not in err
    info_json(nbds(server, pki.clients["alice"]))  # still serving TLS clients


def test_require_answers_tls_reqd_until_starttls(pki: Pki, start_server: StartServer) -> None:
    server = start_server(config(pki))
    with rn.RawNBD.tcp(server.port) as c:
        c.start()
        for opt, data in [
            (rn.OPT_LIST, b""),
            (rn.OPT_INFO, c.info_data("disk")),
            (rn.OPT_GO, c.info_data("disk")),
            (rn.OPT_STRUCTURED_REPLY, b""),
            (rn.OPT_SET_META_CONTEXT, c.meta_data("disk", ("base:allocation",))),
            (0x4242, b""),
        ]:
            (r,) = c.option(opt, data)
            assert r.type == rn.REP_ERR_TLS_REQD, (opt, r)
            assert b"STARTTLS" in r.data
        # then the client upgrades, and the same options work
        starttls(c, tls_context(pki))
        assert c.opt_list() == [("disk", "the disk")]
        assert c.opt_info("disk").size == 16 * MIB
        c.opt_structured_reply()
        c.opt_go("disk")
        reply = c.call(rn.CMD_READ, 0, 4096)
        assert reply.errno == 0
        c.disconnect()


def test_require_closes_export_name_without_tls(pki: Pki, start_server: StartServer) -> None:
    server = start_server(config(pki))
    for client in (rn.RawNBD.tcp(server.port), rn.RawNBD.unix(server.socket_path)):
        with client as c:
            c.start()
            c.send_option(rn.OPT_EXPORT_NAME, b"disk")
            assert closed(c) == b""  # no size, no flags: the session just ends
    assert log_has(server, "EXPORT_NAME before STARTTLS, and TLS is required")
    assert info_json(nbds(server, pki.clients["alice"]))["TLS"] is True


def test_starttls_twice_or_with_data_is_invalid(pki: Pki, start_server: StartServer) -> None:
    server = start_server(config(pki))
    with rn.RawNBD.tcp(server.port) as c:
        c.start()
        (r,) = c.option(rn.OPT_STARTTLS, b"x")
        assert r.type == rn.REP_ERR_INVALID
        starttls(c, tls_context(pki))
        (r,) = c.option(rn.OPT_STARTTLS)
        assert r.type == rn.REP_ERR_INVALID
        assert c.opt_list() == [("disk", "the disk")]  # TLS goes on
        c.option(rn.OPT_ABORT)


def test_export_name_over_tls(tmp_path: Path, pki: Pki, start_server: StartServer) -> None:
    """Once TLS runs, require mode serves even the oldest way into transmission."""
    server = start_server(config(pki))
    with rn.RawNBD.unix(server.socket_path) as c:
        c.start()
        starttls(c, tls_context(pki, "bob"))
        assert c.export_name("disk")[0] == 16 * MIB
        assert c.call(rn.CMD_WRITE, 4096, 4096, data=b"\xee" * 4096).errno == 0
        assert c.call(rn.CMD_FLUSH).errno == 0
        assert c.read(4096, 4096) == b"\xee" * 4096
        c.disconnect()
    assert (tmp_path / "disk0.img").read_bytes()[4096:8192] == b"\xee" * 4096


def test_sigterm_with_tls_clients_exits_cleanly(pki: Pki, start_server: StartServer) -> None:
    """SIGTERM while one client is in transmission over TLS and another is halfway through its
    TLS handshake: both are closed, everything is flushed, exit status 0."""
    server = start_server(config(pki, limits="{handshake_timeout: 60s}"))
    with rn.RawNBD.tcp(server.port) as busy, rn.RawNBD.tcp(server.port) as halfway:
        busy.start()
        starttls(busy, tls_context(pki))
        busy.opt_go("disk")
        assert busy.call(rn.CMD_WRITE, 0, 512, data=b"\x11" * 512).errno == 0
        halfway.start()
        (ack,) = halfway.option(rn.OPT_STARTTLS)
        assert ack.type == rn.REP_ACK
        halfway.send(b"\x16\x03\x01")
        server.proc.send_signal(signal.SIGTERM)
        assert closed(halfway) == b""
        assert closed(busy) == b""  # close_notify after the grace for its DISC
    assert server.stop() == 0
    assert "closed during the TLS handshake" in server.log
    assert "still busy at the shutdown timeout" not in server.log
    assert "stopped" in server.log


def _read_until_ack(obj: ssl.SSLObject, inb: ssl.MemoryBIO, sock: socket.socket) -> bytes:
    got = b""
    while True:
        replies = nw.parse_opt_replies(got) if len(got) >= 20 else []
        if replies and replies[-1].rep == nw.REP_ACK:
            return got
        try:
            got += obj.read(65536)
        except ssl.SSLWantReadError:
            data = sock.recv(65536)
            assert data, "the server closed the connection"
            inb.write(data)


def test_options_right_behind_the_tls_finished(pki: Pki, start_server: StartServer) -> None:
    """The client's first option in the same packet as its TLS Finished: it must be answered
    (uvloop hands it over just after the upgrade returns; the connection would hold it if it
    came before), not lost or taken for plaintext."""
    server = start_server(config(pki))
    with rn.RawNBD.tcp(server.port) as c:
        c.start()
        (ack,) = c.option(rn.OPT_STARTTLS)
        assert ack.type == rn.REP_ACK
        inb, outb = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = tls_context(pki).wrap_bio(inb, outb, server_hostname="localhost")
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                c.sock.sendall(outb.read())
                data = c.sock.recv(65536)
                assert data
                inb.write(data)
        obj.write(nw.option(nw.OPT_LIST))  # queued behind the client's Finished
        c.sock.sendall(outb.read())  # one send: Finished and the first option
        replies = nw.parse_opt_replies(_read_until_ack(obj, inb, c.sock))
        assert [(r.option, r.rep) for r in replies] == [
            (nw.OPT_LIST, nw.REP_SERVER),
            (nw.OPT_LIST, nw.REP_ACK),
        ]
        assert replies[0].data == nw.rep_server(b"disk", b"the disk")
    assert log_has(server, "tls(CN=alice,O=tenant A)")


def test_plaintext_after_starttls_is_dropped(pki: Pki, start_server: StartServer) -> None:
    """Options a man in the middle appends to STARTTLS are not answered, before or after TLS:
    had the injected STRUCTURED_REPLY and GO counted, LIST would not be the next reply."""
    server = start_server(config(pki, "allow"))
    with rn.RawNBD.tcp(server.port) as c:
        c.start()
        injected = nw.option(nw.OPT_STRUCTURED_REPLY) + nw.option(nw.OPT_GO, nw.info_data(b"disk"))
        c.send(nw.option(nw.OPT_STARTTLS) + injected)
        ack = c.recv_option_reply()
        assert (ack.option, ack.type) == (rn.OPT_STARTTLS, rn.REP_ACK)
        c.sock = tls_context(pki).wrap_socket(c.sock, server_hostname="localhost")
        assert c.opt_list() == [("disk", "the disk")]  # the first reply over TLS is LIST's
        info = c.opt_go("disk")
        assert info.size == 16 * MIB
        reply = c.call(rn.CMD_READ, 0, 512)  # simple reply: structured replies were not kept
        assert not reply.structured and reply.data == bytes(512)
        c.disconnect()
    assert log_has(server, f"dropped {len(injected)} plaintext bytes sent after STARTTLS")


# Allow and off ---------------------------------------------------------------------------------


def test_allow_serves_plain_and_tls_clients(
    tmp_path: Path, pki: Pki, start_server: StartServer
) -> None:
    server = start_server(config(pki, "allow"))
    plain, secure = server.uri("disk", tcp=True), nbds(server, pki.clients["alice"])
    assert info_json(plain)["TLS"] is False
    assert info_json(secure)["TLS"] is True
    data = os.urandom(MIB)
    (tmp_path / "a.bin").write_bytes(data)
    nbdcopy = require_tool("nbdcopy")
    run([nbdcopy, str(tmp_path / "a.bin"), secure])
    run([nbdcopy, plain, str(tmp_path / "b.bin")])
    assert (tmp_path / "b.bin").read_bytes()[:MIB] == data
    with rn.RawNBD.unix(server.socket_path) as c:  # never ERR_TLS_REQD in allow mode
        c.start()
        assert c.opt_list() == [("disk", "the disk")]
        c.option(rn.OPT_ABORT)


def test_off_refuses_starttls(pki: Pki, start_server: StartServer) -> None:
    server = start_server(config(pki, "off"))
    code, _, err = nbdinfo(nbds(server, pki.clients["alice"]), check=False, debug=True)
    assert code != 0  # nbds:// insists on TLS: libnbd 1.14 aborts, "connection is closed"
    assert "server error message: TLS is not configured on this server" in err
    with rn.RawNBD.tcp(server.port) as c:
        c.start()
        (r,) = c.option(rn.OPT_STARTTLS)
        assert r.type == rn.REP_ERR_POLICY
        assert r.data == b"TLS is not configured on this server"
        assert c.opt_list() == [("disk", "the disk")]
        c.option(rn.OPT_ABORT)


# Who may complete TLS ---------------------------------------------------------------------------


def test_certificate_from_another_ca_is_refused(pki: Pki, start_server: StartServer) -> None:
    """mallory's certificate says CN=alice,O=tenant A too, but the test CA did not sign it."""
    server = start_server(config(pki, "allow", limits="{max_connections: 2}"))
    for _ in range(4):  # more than max_connections: failed handshakes must free their slot
        code, out, err = nbdinfo(nbds(server, pki.clients["mallory"]), check=False)
        assert code != 0, out
        assert "gnutls" in err.lower() or "tls" in err.lower()
    assert log_has(server, "TLS handshake failed: client certificate refused")
    assert "tls(CN=alice" not in server.log
    with rn.RawNBD.tcp(server.port) as c:  # a Python client with that certificate: no options
        c.start()
        with pytest.raises((ssl.SSLError, rn.ClosedError, ConnectionError)):
            starttls(c, tls_context(pki, "mallory"))
            c.opt_list()
    assert info_json(nbds(server, pki.clients["alice"]))["TLS"] is True
    assert log_has(server, "tls(CN=alice,O=tenant A)")


def test_no_certificate_is_refused_when_required(pki: Pki, start_server: StartServer) -> None:
    server = start_server(config(pki, limits="{max_connections: 2}"))
    for _ in range(3):
        code, _, _ = nbdinfo(nbds(server, pki.clients["nocert"]), check=False)
        assert code != 0
    assert log_has(server, "TLS handshake failed: PEER_DID_NOT_RETURN_A_CERTIFICATE")
    assert info_json(nbds(server, pki.clients["bob"]))["TLS"] is True


def test_no_certificate_is_anonymous_when_optional(pki: Pki, start_server: StartServer) -> None:
    server = start_server(config(pki, client_certificate="optional"))
    assert info_json(nbds(server, pki.clients["nocert"]))["TLS"] is True
    assert log_has(server, "tls(no client certificate)")
    assert info_json(nbds(server, pki.clients["alice"]))["TLS"] is True
    assert log_has(server, "tls(CN=alice,O=tenant A)")
    code, _, _ = nbdinfo(nbds(server, pki.clients["mallory"]), check=False)
    assert code != 0  # optional does not mean unverified
    assert log_has(server, "client certificate refused")


def test_client_certificates_not_asked_for(pki: Pki, start_server: StartServer) -> None:
    server = start_server(config(pki, client_certificate="none"))
    assert info_json(nbds(server, pki.clients["mallory"]))["TLS"] is True
    assert log_has(server, "tls(no client certificate)")
    assert "CN=alice" not in server.log


def test_tls_versions(pki: Pki, start_server: StartServer) -> None:
    """TLS 1.3 when the client has it, 1.2 accepted, 1.1 refused; no compression."""
    server = start_server(config(pki, "allow"))
    for version, expect in [(None, "TLSv1.3"), (ssl.TLSVersion.TLSv1_2, "TLSv1.2")]:
        ctx = tls_context(pki)
        if version is not None:
            ctx.maximum_version = version
        with rn.RawNBD.tcp(server.port) as c:
            c.start()
            tls = starttls(c, ctx)
            assert tls.version() == expect
            assert tls.compression() is None
            assert c.opt_list() == [("disk", "the disk")]
            c.option(rn.OPT_ABORT)
    old = tls_context(pki)
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():  # TLS 1.1 is deprecated: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    with rn.RawNBD.tcp(server.port) as c:
        c.start()
        with pytest.raises((ssl.SSLError, ConnectionError)):
            starttls(c, old)
    assert log_has(server, "TLS handshake failed")
    assert info_json(server.uri("disk", tcp=True))["TLS"] is False  # still serving


def test_handshake_timeout_covers_the_tls_handshake(pki: Pki, start_server: StartServer) -> None:
    """A client that never starts TLS after the ACK, or stops halfway, is closed at the
    handshake timeout, and its slot is freed."""
    server = start_server(config(pki, limits="{handshake_timeout: 1s, max_connections: 2}"))
    with rn.RawNBD.tcp(server.port) as silent, rn.RawNBD.tcp(server.port) as halfway:
        for c in (silent, halfway):
            c.start()
            (ack,) = c.option(rn.OPT_STARTTLS)
            assert ack.type == rn.REP_ACK
        halfway.send(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello, never finished
        assert closed(silent) == b""
        assert closed(halfway) == b""
    assert info_json(nbds(server, pki.clients["alice"]))["TLS"] is True


def test_garbage_instead_of_a_client_hello(pki: Pki, start_server: StartServer) -> None:
    server = start_server(config(pki))
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        c = rn.RawNBD(s)
        c.start()
        (ack,) = c.option(rn.OPT_STARTTLS)
        assert ack.type == rn.REP_ACK
        c.send(nw.option(nw.OPT_LIST))  # plaintext, where the client's TLS hello belongs
        assert closed(c) == b""
    assert log_has(server, "TLS handshake failed")
    assert info_json(nbds(server, pki.clients["bob"]))["TLS"] is True


def test_certificates_made_with_openssl(tmp_path: Path, start_server: StartServer) -> None:
    """The openssl commands of docs/TLS.md make a PKI that works as well as certtool's."""
    require_tool("openssl")
    (tmp_path / "pki").mkdir()
    ca, cert, key, alice = make_openssl_pki(tmp_path / "pki")
    assert key.stat().st_mode & 0o077 == 0  # openssl 3 writes keys private
    text = (
        f"server:\n  tls: {{mode: require, certificate: {cert}, private_key: {key}, ca: {ca}}}\n"
        "devices:\n  d: {memory: 1M}\nexports:\n  disk: {device: d}\n"
    )
    server = start_server(text)
    for unix in (False, True):
        assert info_json(nbds(server, alice, unix=unix))["TLS"] is True
    assert log_has(server, "tls(CN=alice,O=tenant A)")


# Identity ---------------------------------------------------------------------------------------


def test_peer_names_of_the_test_certificates(pki: Pki) -> None:
    def names(who: str) -> tuple[str | None, tuple[str, ...]]:
        cert = x509.load_pem_x509_certificate(pki.client_cert(who).read_bytes())
        return peer_names(cert.public_bytes(Encoding.DER))

    assert names("alice") == (SUBJECTS["alice"], ("email:alice@example.com",))
    subject, sans = names("bob")
    assert subject == SUBJECTS["bob"]
    assert sorted(sans) == ["DNS:bob.example.com", "IP:10.0.0.2", "URI:spiffe://example.com/bob"]
    assert peer_names(None) == (None, ())
