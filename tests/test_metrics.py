"""Metrics (`server.metrics`): Prometheus text on GET /metrics, scraped after real clients.

Every number is checked against what the clients did: libnbd sends an exact list of requests
(including refused ones), nbdcopy and qemu-io move known byte counts, keys go through a 2-slot
engine in a known order, a request is held in flight by a suspended table. The exposition is
parsed with prometheus_client's own parsers, and must never show a key, a client's certificate
subject or anything else unbounded.
"""

from __future__ import annotations

import bisect
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import nbd
import pytest
from conftest import ROOT, RunningServer, StartServer, free_tcp_port, require_tool, run
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry
from tlscerts import SUBJECTS, Pki

from nbdcrypt.config.loader import ConfigError, load_config
from nbdcrypt.metrics.counters import (
    BUCKETS,
    COMMAND_LABELS,
    ERRNO_LABELS,
    SHIFT,
    new_histogram,
    record,
    requests_in,
    unpack_row,
)
from nbdcrypt.metrics.endpoint import answer

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
KiB, MiB = 1024, 1024 * 1024
COMMANDS = list(COMMAND_LABELS.values())
SYSTEM_PATH = {"PATH": "/usr/bin:/bin:" + os.environ.get("PATH", "")}  # nbdsh runs `python3`


# --- scraping --------------------------------------------------------------------------------


def scrape_text(port: int, path: str = "/metrics", accept: str | None = None) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if accept is not None:
        request.add_header("Accept", accept)
    with urllib.request.urlopen(request, timeout=30) as reply:
        assert reply.status == 200
        body: bytes = reply.read()
        return body.decode()


def parse(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, by name and labels (parsed by
    prometheus_client, which raises on anything malformed)."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = s.value
    return samples


def scrape(port: int) -> Samples:
    return parse(scrape_text(port))


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"no sample {name}{labels}"
    return samples[key]


def requests(samples: Samples, export: str) -> dict[str, float]:
    return {
        c: value(samples, "nbdcrypt_export_requests_total", export=export, command=c)
        for c in COMMANDS
    }


def errors(samples: Samples, export: str) -> dict[str, float]:
    return {
        e: value(samples, "nbdcrypt_export_errors_total", export=export, errno=e)
        for e in ERRNO_LABELS.values()
    }


def check_histograms(samples: Samples, export: str) -> None:
    """Each command's histogram counts exactly its requests, and its buckets are cumulative."""
    name = "nbdcrypt_export_request_duration_seconds"
    for command in COMMANDS:
        count = value(samples, f"{name}_count", export=export, command=command)
        assert count == value(
            samples, "nbdcrypt_export_requests_total", export=export, command=command
        ), command
        buckets = sorted(
            (float(dict(labels)["le"]), v)
            for (n, labels), v in samples.items()
            if n == f"{name}_bucket"
            and dict(labels)["export"] == export
            and dict(labels)["command"] == command
        )
        assert len(buckets) == BUCKETS + 1
        assert [v for _, v in buckets] == sorted(v for _, v in buckets)
        assert buckets[-1] == (float("inf"), count)
        total = value(samples, f"{name}_sum", export=export, command=command)
        assert (total > 0) == (count > 0)


def metrics_config(body: str, port: int, extra: str = "") -> str:
    return f"server:\n  metrics: 127.0.0.1:{port}\n{extra}{body}"


def wait_until(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def connect(server: RunningServer, export: str, *, strict: bool = True) -> nbd.NBD:
    h = nbd.NBD()
    if not strict:
        h.set_strict_mode(0)  # let libnbd send requests the server must refuse
    h.add_meta_context("base:allocation")
    h.set_export_name(export)
    h.connect_unix(str(server.socket_path))
    return h


def refused(call: Callable[[], object]) -> None:
    with pytest.raises(nbd.Error):
        call()


# --- tests -----------------------------------------------------------------------------------

MEMORY = "devices:\n  m: {memory: 1M}\nexports:\n  m: {device: m}\n"
DISK = """\
devices:
  a: {file: a.img, size: 16M}
exports:
  disk: {device: a}
  ro: {device: a, readonly: true}
"""


def test_requests_bytes_and_errors_add_up_exactly(start_server: StartServer) -> None:
    port = free_tcp_port()
    server = start_server(metrics_config(DISK, port))
    before = scrape(port)
    assert requests(before, "disk") == dict.fromkeys(COMMANDS, 0)
    size = 16 * MiB

    h = connect(server, "disk", strict=False)
    for i in range(3):
        h.pwrite(b"\xab" * 4096, i * 4096)
    for _ in range(2):
        assert h.pread(8192, 0) == b"\xab" * 8192
    h.flush()
    h.trim(4096, 1 * MiB)
    h.zero(4096, 2 * MiB)
    h.cache(4096, 0)
    h.block_status(65536, 0, lambda *_: 0)
    refused(lambda: h.pread(4096, size))  # past the end: EINVAL
    refused(lambda: h.pwrite(b"x" * 4096, size))  # past the end: ENOSPC
    during = scrape(port)
    assert value(during, "nbdcrypt_export_connections", export="disk") == 1
    assert value(during, "nbdcrypt_connections_open", transport="unix", identity="plain") == 1
    h.shutdown()

    ro = connect(server, "ro", strict=False)
    refused(lambda: ro.pwrite(b"y" * 4096, 0))  # a read-only export: EPERM
    assert ro.pread(4096, 0) == b"\xab" * 4096
    ro.shutdown()

    # a request of nbdsh's that fails: a write to the read-only export (strict mode off)
    script = (
        "h.set_strict_mode(0)\n"
        "try:\n    h.zero(4096, 0)\nexcept nbd.Error as e:\n    print(e.errnum)"
    )
    out = run(
        [require_tool("nbdsh"), "-u", server.uri("ro"), "-c", script],
        env={**os.environ, **SYSTEM_PATH},
    ).stdout
    assert out.strip() == "1", out  # EPERM

    wait_until(
        lambda: scrape(port)[("nbdcrypt_export_connections", frozenset({("export", "ro")}))] == 0,
        "ro closed",
    )
    after = scrape(port)
    assert requests(after, "disk") == {
        "READ": 3,
        "WRITE": 4,
        "FLUSH": 1,
        "TRIM": 1,
        "WRITE_ZEROES": 1,
        "CACHE": 1,
        "BLOCK_STATUS": 1,
        "other": 0,
    }
    assert value(after, "nbdcrypt_export_read_bytes_total", export="disk") == 2 * 8192
    assert value(after, "nbdcrypt_export_written_bytes_total", export="disk") == 3 * 4096
    assert errors(after, "disk") == {
        **dict.fromkeys(ERRNO_LABELS.values(), 0),
        "EINVAL": 1,
        "ENOSPC": 1,
    }
    assert requests(after, "ro") == {
        **dict.fromkeys(COMMANDS, 0),
        "WRITE": 1,
        "READ": 1,
        "WRITE_ZEROES": 1,
    }
    assert errors(after, "ro") == {**dict.fromkeys(ERRNO_LABELS.values(), 0), "EPERM": 2}
    assert value(after, "nbdcrypt_export_read_bytes_total", export="ro") == 4096
    for export in ("disk", "ro"):
        check_histograms(after, export)
        assert value(after, "nbdcrypt_export_requests_in_flight", export=export) == 0
        assert value(after, "nbdcrypt_export_connections", export=export) == 0
    assert value(after, "nbdcrypt_connections_total", transport="unix", identity="plain") == 3
    assert value(after, "nbdcrypt_connections_open", transport="unix", identity="plain") == 0
    assert value(after, "nbdcrypt_device_open_count", device="a") == 0
    assert server.stop() == 0


def test_nbdcopy_and_qemu_io_bytes(start_server: StartServer, tmp_path: Path) -> None:
    port = free_tcp_port()
    server = start_server(
        metrics_config("devices:\n  m: {memory: 4M}\nexports:\n  m: {device: m}\n", port)
    )
    base = scrape(port)
    source = tmp_path / "source.img"
    source.write_bytes(os.urandom(4 * MiB))
    run([require_tool("nbdcopy"), str(source), server.uri("m")])
    copy = tmp_path / "copy.img"
    run([require_tool("nbdcopy"), server.uri("m"), str(copy)])
    assert copy.read_bytes() == source.read_bytes()
    run([require_tool("qemu-io"), "-f", "raw", server.uri("m", tcp=True), "-c", "read 0 64k"])
    samples = scrape(port)
    assert value(samples, "nbdcrypt_export_written_bytes_total", export="m") == 4 * MiB
    assert value(samples, "nbdcrypt_export_read_bytes_total", export="m") == 4 * MiB + 64 * KiB
    assert requests(samples, "m")["WRITE"] >= 1 and requests(samples, "m")["READ"] >= 2
    assert sum(errors(samples, "m").values()) == 0
    check_histograms(samples, "m")
    # nbdcopy opens several connections (multi-conn); qemu-io came over TCP
    assert value(samples, "nbdcrypt_connections_total", transport="unix", identity="plain") >= 2
    tcp = ("nbdcrypt_connections_total", frozenset({("transport", "tcp"), ("identity", "plain")}))
    assert samples[tcp] - base[tcp] >= 1  # and conftest's readiness probe, if not yet in base
    assert server.stop() == 0


def keyslot_config(port: int) -> str:
    def key(name: str, unit: int) -> str:
        source = f"{{file: {name}.key, create: true}}"
        return f"  {name}: {{mode: aes-256-xts, data_unit_size: {unit}, source: {source}}}\n"

    keys = "".join(key(f"k{i}", 512) for i in (1, 2, 3)) + key("big", 4096)
    exports = "".join(f"  e{i}: {{device: a, key: k{i}}}\n" for i in (1, 2, 3))
    engine = "{keyslots: 2, modes: {aes-256-xts: [512]}, max_dun_bytes: 8}"
    return metrics_config(
        f"keys:\n{keys}devices:\n  a: {{file: a.img, size: 16M, inline_crypto: {engine}}}\n"
        f"exports:\n{exports}  fb: {{device: a, key: big}}\n",
        port,
    )


def test_keyslot_and_fallback_counters_on_a_two_slot_engine(
    start_server: StartServer, tmp_path: Path
) -> None:
    port = free_tcp_port()
    server = start_server(keyslot_config(port))
    # Three keys through two slots, one connection after another, a write then a read each:
    # e1 programs k1, e2 programs k2, e3 evicts k1 for k3, e1 again evicts k2 for k1;
    # each connection's read finds its key in its slot.
    for export in ("e1", "e2", "e3", "e1"):
        h = connect(server, export)
        h.pwrite(b"\x5a" * 4096, 0)
        assert h.pread(4096, 0) == b"\x5a" * 4096
        h.shutdown()
    # a key of 4096-byte units the engine cannot do: the blk-crypto fallback, at the export
    h = connect(server, "fb")
    h.pwrite(b"\xc3" * 8192, 65536)
    assert h.pread(4096, 65536) == b"\xc3" * 4096
    h.shutdown()
    text = scrape_text(port)
    samples = parse(text)
    assert value(samples, "nbdcrypt_device_keyslots", device="a") == 2
    assert value(samples, "nbdcrypt_device_keyslot_programs_total", device="a") == 4
    assert value(samples, "nbdcrypt_device_keyslot_evictions_total", device="a") == 2
    assert value(samples, "nbdcrypt_device_keyslot_hits_total", device="a") == 4
    assert value(samples, "nbdcrypt_device_keyslot_waits_total", device="a") == 0
    assert value(samples, "nbdcrypt_device_keyslot_wait_seconds_total", device="a") == 0
    assert value(samples, "nbdcrypt_device_inline_requests_total", device="a") == 8
    assert value(samples, "nbdcrypt_device_fallback_bytes_total", device="a") == 8192 + 4096
    assert value(samples, "nbdcrypt_export_written_bytes_total", export="e1") == 2 * 4096
    # no key material, in any form the key files hold it
    for name in ("k1", "k2", "k3", "big"):
        raw = (tmp_path / f"{name}.key").read_bytes()
        for form in (
            raw.hex(),
            raw.hex().upper(),
            raw.decode("latin-1"),
            raw.strip().decode("latin-1"),
        ):
            assert form not in text
    assert server.stop() == 0


TABLE = """\
devices:
  a: {file: a.img, size: 16M}
  t: {table: ["0 32768 linear a 0"]}
exports:
  t: {device: t}
"""


def test_in_flight_while_a_table_is_suspended_then_back_to_zero(
    start_server: StartServer, tmp_path: Path
) -> None:
    port = free_tcp_port()
    control = tmp_path / "control.sock"
    server = start_server(metrics_config(TABLE, port), "--control", str(control))
    h = connect(server, "t")

    def ctl(*args: str) -> None:
        run([sys.executable, "-m", "nbdcrypt", "ctl", "-s", str(control), *args], cwd=ROOT)

    def in_flight() -> float:
        return value(scrape(port), "nbdcrypt_export_requests_in_flight", export="t")

    ctl("suspend", "t")
    cookies = [
        h.aio_pread(nbd.Buffer(4096), 0),
        h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b"z" * 4096)), 8192),
    ]
    wait_until(lambda: in_flight() == 2, "two requests in flight")
    ctl("resume", "t")
    for cookie in cookies:
        while not h.aio_command_completed(cookie):
            h.poll(-1)
    wait_until(lambda: in_flight() == 0, "no request in flight")
    samples = scrape(port)
    assert requests(samples, "t")["READ"] == 1 and requests(samples, "t")["WRITE"] == 1
    check_histograms(samples, "t")
    h.shutdown()
    assert server.stop() == 0


RELOAD_BEFORE = """\
devices:
  a: {memory: 16M}
exports:
  one: {device: a, description: first}
  two: {device: a}
"""
RELOAD_AFTER = """\
devices:
  a: {memory: 16M}
exports:
  one: {device: a, description: changed}
  three: {device: a}
"""


def test_counters_survive_a_sighup_reload(start_server: StartServer) -> None:
    port = free_tcp_port()
    server = start_server(metrics_config(RELOAD_BEFORE, port))
    h = connect(server, "one")
    for i in range(5):
        h.pwrite(b"r" * 512, i * 512)
    other = connect(server, "two")  # stays open across the reload that removes `two`
    other.pread(512, 0)
    before = scrape(port)
    assert requests(before, "one")["WRITE"] == 5

    new_port = free_tcp_port()
    server.config_path.write_text(metrics_config(RELOAD_AFTER, new_port))
    server.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reloaded" in server.log, "the reload")
    with pytest.raises(urllib.error.URLError):
        scrape(port)  # server.metrics moved with the reload
    port = new_port
    after = scrape(port)
    assert requests(after, "one") == requests(before, "one")
    assert value(after, "nbdcrypt_export_written_bytes_total", export="one") == 5 * 512
    assert requests(after, "three") == dict.fromkeys(COMMANDS, 0)
    assert requests(after, "two")["READ"] == 1  # removed, but a connection still has it

    h.pwrite(b"s" * 512, 0)  # the connection opened before the reload
    h2 = connect(server, "one")  # one opened after it (a new Export object)
    h2.pread(1024, 0)
    other.pread(512, 0)
    for handle in (h, h2, other):
        handle.shutdown()
    wait_until(
        lambda: value(scrape(port), "nbdcrypt_export_connections", export="one") == 0, "closed"
    )
    final = scrape(port)
    assert requests(final, "one")["WRITE"] == 6 and requests(final, "one")["READ"] == 1
    assert value(final, "nbdcrypt_export_written_bytes_total", export="one") == 6 * 512
    assert value(final, "nbdcrypt_export_read_bytes_total", export="one") == 1024
    assert requests(final, "two")["READ"] == 2  # kept until the next reload
    check_histograms(final, "one")

    server.proc.send_signal(signal.SIGHUP)  # the same file again: `two` has no users now
    wait_until(lambda: server.log.count("reloaded") == 2, "the second reload")
    assert ("nbdcrypt_export_connections", frozenset({("export", "two")})) not in scrape(port)
    assert requests(scrape(port), "one")["WRITE"] == 6
    assert server.stop() == 0


TLS_CONFIG = """\
server:
  metrics: 127.0.0.1:{port}
  tls:
    mode: allow
    certificate: {pki.server_cert}
    private_key: {pki.server_key}
    ca: {pki.ca_cert}
    client_certificate: optional
devices:
  m: {{memory: 1M}}
exports:
  m: {{device: m}}
"""


def test_connections_by_identity_class_never_the_subject(
    start_server: StartServer, pki: Pki
) -> None:
    port = free_tcp_port()
    server = start_server(TLS_CONFIG.format(port=port, pki=pki))
    nbdinfo = require_tool("nbdinfo")
    base = scrape(port)  # clients come over the unix socket: conftest probes the TCP port

    def tls_uri(who: str, export: str = "m") -> str:
        certs = pki.clients[who]
        return f"nbds+unix:///{export}?socket={server.socket_path}&tls-certificates={certs}"

    run([nbdinfo, tls_uri("alice")])
    run([nbdinfo, tls_uri("bob")])
    run([nbdinfo, tls_uri("nocert")])
    run([nbdinfo, server.uri("m")])
    failed = run([nbdinfo, tls_uri("mallory")], check=False)  # another CA: the handshake fails
    assert failed.returncode != 0
    run([nbdinfo, "--list", server.uri()])  # ends with NBD_OPT_ABORT: no failure
    unknown = run([nbdinfo, server.uri("nosuch")], check=False)
    assert unknown.returncode != 0
    text = scrape_text(port)
    samples = parse(text)

    def total(identity: str) -> float:
        name, labels = "nbdcrypt_connections_total", {"transport": "unix", "identity": identity}
        return value(samples, name, **labels) - value(base, name, **labels)

    assert total("tls-client-cert") == 2
    assert total("tls") == 1
    assert total("plain") == 4  # nbdinfo plain, mallory (no TLS established), --list, nosuch
    name = "nbdcrypt_handshake_failures_total"
    reasons = ("tls", "unknown_export", "protocol", "timeout")  # `disconnected`: TCP probes
    failures = {r: value(samples, name, reason=r) - value(base, name, reason=r) for r in reasons}
    assert failures == {"tls": 1, "unknown_export": 1, "protocol": 0, "timeout": 0}
    for secret in (*SUBJECTS.values(), "alice", "bob", "example.com", "uid=", "pid="):
        assert secret not in text
    assert server.stop() == 0


def test_openmetrics_unix_socket_and_http_errors(start_server: StartServer, tmp_path: Path) -> None:
    port = free_tcp_port()
    server = start_server(metrics_config(MEMORY, port))
    text = scrape_text(port, accept="application/openmetrics-text; version=1.0.0")
    names = {f.name for f in openmetrics_families(text)}  # type: ignore[no-untyped-call]
    assert {
        "nbdcrypt_export_requests",
        "nbdcrypt_export_request_duration_seconds",
        "process_resident_memory_bytes",
    } <= names
    for path, status in (("/", 404), ("/metrics/x", 404)):
        with pytest.raises(urllib.error.HTTPError) as err:
            scrape_text(port, path)
        assert err.value.code == status
    post = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(post, timeout=30)
    assert err.value.code == 405
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"nonsense\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 400 ")
    assert server.stop() == 0

    sock_path = tmp_path / "metrics.sock"
    server = start_server(f"server:\n  metrics: unix://{sock_path}\n{MEMORY}", name="unix")
    wait_until(sock_path.exists, "the metrics socket")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(sock_path))
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: nbdcrypt\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert value(parse(body.decode()), "nbdcrypt_export_connections", export="m") == 0
    assert server.stop() == 0
    assert not sock_path.exists()


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        ("127.0.0.1", "missing port in '127.0.0.1': expected HOST:PORT"),
        ("tcp://[::1]", "missing port in 'tcp://[::1]'"),
        ("127.0.0.1:99999", "invalid port '99999' (expected 0 to 65535)"),
        ("http://127.0.0.1:9", "unsupported scheme 'http' (expected tcp:// or unix://)"),
        ("::1:9", "an IPv6 address must be in brackets"),
        ("{port: 9}", "expected a string, got a mapping"),
        ("9100", "expected a string, got an integer '9100' (put it in quotes)"),
        ("tcp://127.0.0.1:10809", "tcp://127.0.0.1:10809 is also an NBD listen address"),
        ("unix:///run/c.sock", "/run/c.sock is also the control socket"),
    ],
)
def test_config_errors(tmp_path: Path, metrics: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "server:\n  listen: tcp://127.0.0.1:10809\n  control: unix:///run/c.sock\n"
        f"  metrics: {metrics}\ndevices: {{m: {{memory: 1M}}}}\nexports: {{m: {{device: m}}}}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}:4: server.metrics: {message}"), str(err.value)


def test_config_forms(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    for text, expected in (
        ("127.0.0.1:10810", "tcp://127.0.0.1:10810"),
        ("tcp://[::1]:0", "tcp://[::1]:0"),
        ("localhost:9", "tcp://localhost:9"),
        ("unix://m.sock", f"unix://{tmp_path}/m.sock"),
    ):
        path.write_text(
            f"server: {{listen: tcp://127.0.0.1, metrics: '{text}'}}\n"
            "devices: {m: {memory: 1M}}\nexports: {m: {device: m}}\n"
        )
        assert str(load_config(path).server.metrics) == expected


def test_check_prints_the_metrics_address(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(
        "server: {listen: tcp://127.0.0.1, metrics: '127.0.0.1:10810'}\n"
        "devices: {m: {memory: 1M}}\nexports: {m: {device: m}}\n"
    )
    out = run([sys.executable, "-m", "nbdcrypt", "check", "-c", str(path)], cwd=ROOT).stdout
    assert "metrics: http://127.0.0.1:10810/metrics" in out


def test_address_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "c.yaml"
        path.write_text(
            metrics_config(
                "devices: {m: {memory: 1M}}\nexports: {m: {device: m}}\n",
                port,
                extra=f"  listen: unix://{tmp_path}/nbd.sock\n",
            )
        )
        proc = subprocess.run(
            [sys.executable, "-m", "nbdcrypt", "serve", "-c", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            check=False,
        )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "cannot listen" in proc.stderr and str(port) in proc.stderr


# --- the packed histogram and the HTTP request parser, alone ----------------------------------


@given(st.lists(st.tuples(st.sampled_from(sorted(COMMAND_LABELS)), st.integers(0, 1 << 40))))
def test_packed_histogram_counts_and_sums(observations: list[tuple[int, int]]) -> None:
    histogram = new_histogram()
    for slot, ns in observations:
        record(histogram, slot, ns)
    assert requests_in(histogram) == len(observations)
    bounds = [1 << (SHIFT + b) for b in range(BUCKETS)]  # bucket b: below 2**(SHIFT + b) ns
    for slot in COMMAND_LABELS:
        mine = [ns for s, ns in observations if s == slot]
        row = unpack_row(histogram, slot)
        expected = [0] * (BUCKETS + 1)
        for ns in mine:
            expected[bisect.bisect_right(bounds, ns)] += 1
        assert list(row.counts) == expected
        assert row.requests == len(mine)
        assert round(row.seconds * 1e9) == sum(mine)


HEADS = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda method, path, version, rest: f"{method} {path} {version}{rest}".encode("latin-1"),
        st.sampled_from(["GET", "HEAD", "POST", "get", "", "GET GET"]),
        st.sampled_from(["/metrics", "/metrics?x=1", "/", "/metricsx", "", "*"]),
        st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2", "", "http/1.1"]),
        st.one_of(
            st.text(st.characters(max_codepoint=255), max_size=40),
            st.builds(
                "\r\nAccept: {}/{}; version={}; escaping={}".format,
                st.sampled_from(["application", "text", "*"]),
                st.sampled_from(["openmetrics-text", "plain", "*"]),
                st.sampled_from(["1.0.0", "0.0.4", "abc", "", "2", "1.0.0.0"]),
                st.sampled_from(["underscores", "values", "dots", "allow-utf-8", "zz", ""]),
            ),
        ),
    ),
)


@given(HEADS)
def test_any_request_head_gets_an_answer(head: bytes) -> None:
    response, head_only = answer(CollectorRegistry(), head)
    status = int(response.status.split(" ")[0])
    assert status in {200, 400, 404, 405}
    if status == 200:
        assert head.startswith((b"GET /metrics", b"HEAD /metrics"))
    assert head_only == (status in {200, 404} and head.startswith(b"HEAD "))
