"""The YAML configuration loader: what valid files become, and where bad ones are reported."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdcrypt.config.loader import ConfigError, load_config, parse_listen, parse_size
from nbdcrypt.config.model import (
    Config,
    ExportConfig,
    FileDeviceConfig,
    Limits,
    ListenAddress,
    MemoryDeviceConfig,
    ServerConfig,
)
from nbdcrypt.config.units import parse_bytes, parse_duration

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20

SERVER = "server:\n  listen: tcp://127.0.0.1:10809\n"  # lines 1-2
DEVICES = "devices:\n  mem:\n    memory: 1M\n"  # lines 3-5 after SERVER
EXPORTS = "exports:\n  a:\n    device: mem\n"  # lines 6-8 after SERVER + DEVICES


def write(directory: Path, text: str | bytes, name: str = "c.yaml") -> Path:
    path = directory / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def error(path: Path, **kw: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, **kw)
    return info.value


# --- valid configurations --------------------------------------------------------------------


def test_full_config(tmp_path: Path) -> None:
    (tmp_path / "old.img").write_bytes(b"\0" * MIB)
    path = write(
        tmp_path,
        """\
server:
  listen:
    - tcp://127.0.0.1:10809
    - tcp://[::1]
    - tcp://nbd.example.com:0
    - unix:///run/nbdcrypt/nbd.sock
    - unix://var/nbd.sock
  limits:
    max_connections: 4
    handshake_timeout: 500ms
    max_inflight_bytes: 1_048_576
    shutdown_timeout: 0
  tls: {mode: off}
devices:
  old: {file: old.img}
  new:
    file: var/new.img
    size: 2G
  disk.1-x_y:
    memory: 64MiB
exports:
  demo:
    device: old
    description: "the old disk"
    default: true
  "ro scratch":
    device: disk.1-x_y
    readonly: true
    multi_conn: false
  é: {device: new}
""",
    )
    assert load_config(path) == Config(
        source=path,
        server=ServerConfig(
            listen=(
                ListenAddress("tcp", "127.0.0.1", 10809),
                ListenAddress("tcp", "::1", 10809),
                ListenAddress("tcp", "nbd.example.com", 0),
                ListenAddress("unix", path=Path("/run/nbdcrypt/nbd.sock")),
                ListenAddress("unix", path=tmp_path / "var/nbd.sock"),
            ),
            limits=Limits(4, 0.5, MIB, 0.0),
        ),
        devices={
            "old": FileDeviceConfig("old", tmp_path / "old.img", MIB, create=False),
            "new": FileDeviceConfig("new", tmp_path / "var/new.img", 2 << 30, create=True),
            "disk.1-x_y": MemoryDeviceConfig("disk.1-x_y", 64 * MIB),
        },
        exports={
            "demo": ExportConfig("demo", "old", description="the old disk", default=True),
            "ro scratch": ExportConfig("ro scratch", "disk.1-x_y", readonly=True, multi_conn=False),
            "é": ExportConfig("é", "new"),
        },
    )


def test_minimal_config_gets_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, SERVER + DEVICES + EXPORTS))
    assert config.server == ServerConfig((ListenAddress("tcp", "127.0.0.1", 10809),), Limits())
    assert config.devices == {"mem": MemoryDeviceConfig("mem", MIB)}
    assert config.exports == {"a": ExportConfig("a", "mem")}
    assert config.default_export is None


def test_existing_file_with_matching_size(tmp_path: Path) -> None:
    (tmp_path / "d.img").write_bytes(b"\0" * 4096)
    text = SERVER + "devices:\n  mem: {file: d.img, size: 4K}\n" + EXPORTS
    config = load_config(write(tmp_path, text))
    assert config.devices["mem"] == FileDeviceConfig("mem", tmp_path / "d.img", 4096, False)


def test_relative_config_path_gives_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub", SERVER + "devices:\n  mem: {file: d.img, size: 1M}\n" + EXPORTS)
    monkeypatch.chdir(tmp_path)
    config = load_config(Path("sub/c.yaml"))
    assert config.source == tmp_path / "sub/c.yaml"
    device = config.devices["mem"]
    assert isinstance(device, FileDeviceConfig)
    assert device.path == tmp_path / "sub/d.img"
    assert device.create
    assert not (tmp_path / "sub/d.img").exists()  # the loader never creates anything


def test_listen_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    urls = ["unix://s.sock", "tcp://0.0.0.0:1234"]
    expected = (
        ListenAddress("unix", path=tmp_path / "s.sock"),
        ListenAddress("tcp", "0.0.0.0", 1234),
    )
    with_server = write(tmp_path, SERVER + DEVICES + EXPORTS, "a.yaml")
    assert load_config(with_server, listen_override=urls).server.listen == expected
    without_server = write(tmp_path, DEVICES + EXPORTS, "b.yaml")
    assert load_config(without_server, listen_override=urls).server == ServerConfig(expected)
    no_listen = write(tmp_path, "server: {limits: {max_connections: 2}}\n" + DEVICES + EXPORTS)
    config = load_config(no_listen, listen_override=urls)
    assert config.server == ServerConfig(expected, Limits(max_connections=2))


def test_listen_override_errors(tmp_path: Path) -> None:
    path = write(tmp_path, SERVER + DEVICES + EXPORTS)
    err = error(path, listen_override=["tcp://h:99999"])
    assert str(err) == "--listen: tcp://h:99999: invalid port '99999' (expected 0 to 65535)"
    assert (err.file, err.line, err.path) == (None, None, "--listen")
    err = error(path, listen_override=["tcp://h", "tcp://h:10809"])
    assert str(err) == "--listen: tcp://h:10809: given twice"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("tcp://localhost", ListenAddress("tcp", "localhost", 10809)),
        ("TCP://a-b.example.:65535", ListenAddress("tcp", "a-b.example.", 65535)),
        ("tcp://10.0.0.1:0", ListenAddress("tcp", "10.0.0.1", 0)),
        ("tcp://[fe80::1%eth0]:99", ListenAddress("tcp", "fe80::1%eth0", 99)),
        ("tcp://[::]", ListenAddress("tcp", "::", 10809)),
        ("unix:///a/b.sock", ListenAddress("unix", path=Path("/a/b.sock"))),
        ("unix://b.sock", ListenAddress("unix", path=Path("/base/b.sock"))),
    ],
)
def test_parse_listen(url: str, expected: ListenAddress) -> None:
    assert parse_listen(url, base=Path("/base")) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            "localhost:10809",
            "invalid address 'localhost:10809': expected tcp://HOST:PORT or unix://PATH",
        ),
        ("nbd://h", "unsupported scheme 'nbd' (expected tcp:// or unix://)"),
        ("tcp://", "missing host (use 0.0.0.0 or [::] to listen on all addresses)"),
        ("tcp://:10809", "missing host (use 0.0.0.0 or [::] to listen on all addresses)"),
        ("tcp://h:", "invalid port '' (expected 0 to 65535)"),
        ("tcp://h:-1", "invalid port '-1' (expected 0 to 65535)"),
        ("tcp://h:65536", "invalid port '65536' (expected 0 to 65535)"),
        ("tcp://h:10809/x", "invalid port '10809/x' (expected 0 to 65535)"),
        ("tcp://h/x", "invalid host name 'h/x'"),
        ("tcp://-h", "invalid host name '-h'"),
        ("tcp://1.2.3.256", "invalid IPv4 address '1.2.3.256'"),
        ("tcp://::1", "an IPv6 address must be in brackets: tcp://[::1]:10809"),
        ("tcp://[::g]", "invalid IPv6 address '::g'"),
        ("tcp://[::1]x", "expected tcp://[IPV6]:PORT"),
        ("tcp://[::1", "missing ']' after the IPv6 address"),
        ("unix://", "expected unix:///ABSOLUTE/PATH or unix://RELATIVE/PATH to a socket"),
        ("unix:///run/", "expected unix:///ABSOLUTE/PATH or unix://RELATIVE/PATH to a socket"),
        ("unix:///a\0b", "socket path contains a NUL character"),
        (
            "unix:///" + "x" * 107,
            f"socket path /{'x' * 107} is 108 bytes, unix sockets allow at most 107",
        ),
    ],
)
def test_parse_listen_errors(url: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_listen(url, base=Path("/base"))
    assert str(info.value) == message


def test_listen_address_str_round_trips() -> None:
    for url in ["tcp://h:1", "tcp://[::1]:10809", "unix:///x/y.sock"]:
        assert str(parse_listen(url)) == url
        assert parse_listen(str(parse_listen(url))) == parse_listen(url)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (512, 512),
        ("4096", 4096),
        ("1k", 1024),
        ("64M", 64 * MIB),
        ("64 MiB", 64 * MIB),
        ("1gib", 1 << 30),
        (" 2T ", 2 << 40),
        ("3TiB", 3 << 40),
        ("1_048_576", MIB),
    ],
)
def test_parse_size(value: int | str, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (1000, "1000 is not a multiple of 512 bytes"),
        ("1000", "1000 is not a multiple of 512 bytes"),
        (0, "size must be greater than 0, got 0"),
        (-512, "size must be greater than 0, got -512"),
        ("0M", "size must be greater than 0, got 0"),
        (1 << 63, f"{1 << 63} bytes is too large (at most {(1 << 63) - 512}, just under 8 EiB)"),
        (
            "1.5G",
            "invalid size '1.5G' (expected bytes, or a whole number with K, M, G, T, "
            "KiB, MiB, GiB or TiB)",
        ),
        (
            "1KB",
            "invalid size '1KB' (expected bytes, or a whole number with K, M, G, T, "
            "KiB, MiB, GiB or TiB)",
        ),
        (
            "",
            "invalid size '' (expected bytes, or a whole number with K, M, G, T, "
            "KiB, MiB, GiB or TiB)",
        ),
        ("9" * 40, f"invalid integer '{'9' * 40}'"),
        (True, "expected a size, got bool"),
    ],
)
def test_parse_size_errors(value: Any, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(value)
    assert str(info.value) == message


def test_parse_bytes_and_duration() -> None:
    assert parse_bytes(1000) == 1000
    assert parse_duration(3) == 3.0
    assert parse_duration(0.25) == 0.25
    assert parse_duration("500ms") == 0.5
    assert parse_duration("1.5 s") == 1.5
    assert parse_duration("2m") == 120.0
    assert parse_duration("1H") == 3600.0
    assert parse_duration(".5") == 0.5
    for bad in ["10x", "-1", "1e3", "", "s"]:
        with pytest.raises(ValueError, match="invalid duration"):
            parse_duration(bad)
    for bad_value in [-1, float("nan"), float("inf")]:
        with pytest.raises(ValueError, match="must be a finite number >= 0"):
            parse_duration(bad_value)
    too_long: list[int | str] = [86401, "25h", 10**400]
    for long in too_long:
        with pytest.raises(ValueError, match="is too long"):
            parse_duration(long)


# --- errors: file, line, key path, message ---------------------------------------------------

ERRORS = [
    # the file and YAML as such
    ("empty", "", "1: the configuration is empty"),
    ("only-comment", "# nothing\n", "1: the configuration is empty"),
    ("top-list", "- a\n", "1: expected a mapping, got a list"),
    (
        "syntax",
        "server:\n  listen: [a\ndevices: {}\n",
        "3: YAML syntax error: while parsing a flow sequence (line 2); expected ',' or ']', but "
        "got ':'",
    ),
    (
        "syntax-quote",
        "a: 'b\n",
        "2: YAML syntax error: while scanning a quoted scalar (line 1); found unexpected end of "
        "stream",
    ),
    (
        "two-documents",
        "a: 1\n---\nb: 2\n",
        "2: YAML syntax error: expected a single document in the stream (line 1); but found "
        "another document",
    ),
    (
        "control-char",
        "a: \x01\n",
        "1: YAML syntax error: character #x0001: special characters are not allowed",
    ),
    ("undefined-alias", "a: *x\n", "1: YAML syntax error: found undefined alias 'x'"),
    # the top level
    (
        "unknown-top",
        SERVER + DEVICES + EXPORTS + "colour: blue\n",
        "9: colour: unknown key (allowed: server, keys, devices, exports, clients)",
    ),
    (
        "key-unknown-mode",
        SERVER + DEVICES + EXPORTS + "keys:\n  k: {mode: sm4-xts, data_unit_size: 512}\n",
        "10: keys.k.mode: mode 'sm4-xts' is not supported: SM4-XTS is not implemented "
        "(OpenSSL's SM4 is not reachable through cryptography)",
    ),
    (
        "key-bad-unit",
        SERVER + DEVICES + EXPORTS + "keys:\n  k: {mode: aes-256-xts, data_unit_size: 8192}\n",
        "10: keys.k.data_unit_size: a data unit size is one of 512, 1024, 2048, 4096, not 8192",
    ),
    (
        "export-unknown-key",
        SERVER + DEVICES + "exports:\n  a: {device: mem, key: nope}\n",
        "7: exports.a.key: unknown key 'nope' (keys: none)",
    ),
    (
        "clients-empty",
        SERVER + DEVICES + EXPORTS + "clients: []\n",
        "9: clients: expected at least one rule (leave clients out to let anyone open any export)",
    ),
    (
        "duplicate-top",
        SERVER + DEVICES + EXPORTS + "server: {}\n",
        "9: server: duplicate key (first at line 1)",
    ),
    (
        "missing-server",
        DEVICES + EXPORTS,
        "1: missing key 'server' (the server must listen somewhere; or give --listen)",
    ),
    ("missing-devices", SERVER + EXPORTS, "1: missing key 'devices'"),
    ("missing-exports", SERVER + DEVICES, "1: missing key 'exports'"),
    ("merge-key", "<<: {server: {}}\n", "1: YAML merge keys (<<) are not supported"),
    # server
    (
        "server-list",
        "server: []\n" + DEVICES + EXPORTS,
        "1: server: expected a mapping, got a list",
    ),
    ("server-null", "server:\n" + DEVICES + EXPORTS, "1: server: expected a mapping, got null"),
    (
        "server-unknown",
        "server:\n  listen: tcp://h\n  port: 1\n" + DEVICES + EXPORTS,
        "3: server.port: unknown key "
        "(allowed: listen, limits, tls, control, metrics, io, busy_poll)",
    ),
    (
        "missing-listen",
        "server:\n\n  limits: {}\n" + DEVICES + EXPORTS,
        "1: server: missing key 'listen' (the server must listen somewhere; or give --listen)",
    ),
    (
        "listen-empty",
        "server:\n  listen: []\n" + DEVICES + EXPORTS,
        "2: server.listen: expected at least one address",
    ),
    (
        "listen-int",
        "server:\n  listen: 10809\n" + DEVICES + EXPORTS,
        "2: server.listen: expected a string, got an integer '10809' (put it in quotes)",
    ),
    (
        "listen-scheme",
        "server:\n  listen: nbd://h\n" + DEVICES + EXPORTS,
        "2: server.listen: unsupported scheme 'nbd' (expected tcp:// or unix://)",
    ),
    (
        "listen-item",
        "server:\n  listen:\n    - tcp://h\n    - tcp://h:70000\n" + DEVICES + EXPORTS,
        "4: server.listen[1]: invalid port '70000' (expected 0 to 65535)",
    ),
    (
        "listen-nested",
        "server:\n  listen: [[tcp://h]]\n" + DEVICES + EXPORTS,
        "2: server.listen[0]: expected a string, got a list",
    ),
    (
        "listen-duplicate",
        "server:\n  listen:\n    - tcp://h\n    - tcp://h:10809\n" + DEVICES + EXPORTS,
        "4: server.listen[1]: duplicate address (first at line 3)",
    ),
    (
        "control-tcp",
        SERVER + "  control: tcp://127.0.0.1:9\n" + DEVICES + EXPORTS,
        "3: server.control: the control socket must be a unix socket: unix:///PATH",
    ),
    (
        "metrics",
        SERVER + "  metrics: {}\n" + DEVICES + EXPORTS,
        "3: server.metrics: expected a string, got a mapping",
    ),
    (
        "tls-require",
        SERVER + "  tls: {mode: require}\n" + DEVICES + EXPORTS,
        "3: server.tls: missing key 'certificate' (mode require needs the server's certificate "
        "and key)",
    ),
    (
        "tls-ca-unused",
        SERVER + "  tls: {mode: off, client_certificate: none, ca: c.pem}\n" + DEVICES + EXPORTS,
        "3: server.tls.ca: not used with client_certificate: none (remove it, or ask clients "
        "for certificates)",
    ),
    (
        "tls-bad-mode",
        SERVER + "  tls: {mode: on}\n" + DEVICES + EXPORTS,
        "3: server.tls.mode: expected off, allow or require, got 'on'",
    ),
    (
        "tls-no-mode",
        SERVER + "  tls: {}\n" + DEVICES + EXPORTS,
        "3: server.tls: missing key 'mode'",
    ),
    (
        "limits-unknown",
        SERVER + "  limits:\n    max_conns: 1\n" + DEVICES + EXPORTS,
        "4: server.limits.max_conns: unknown key (allowed: max_connections, handshake_timeout, "
        "max_inflight_bytes, shutdown_timeout)",
    ),
    (
        "max-connections-0",
        SERVER + "  limits:\n    max_connections: 0\n" + DEVICES + EXPORTS,
        "4: server.limits.max_connections: must be at least 1, got 0",
    ),
    (
        "max-connections-str",
        SERVER + "  limits:\n    max_connections: '10'\n" + DEVICES + EXPORTS,
        "4: server.limits.max_connections: expected an integer, got a string '10'",
    ),
    (
        "max-connections-hex",
        SERVER + "  limits:\n    max_connections: 0x10\n" + DEVICES + EXPORTS,
        "4: server.limits.max_connections: invalid integer '0x10'",
    ),
    (
        "handshake-0",
        SERVER + "  limits: {handshake_timeout: 0ms}\n" + DEVICES + EXPORTS,
        "3: server.limits.handshake_timeout: must be greater than 0",
    ),
    (
        "handshake-unit",
        SERVER + "  limits: {handshake_timeout: 10x}\n" + DEVICES + EXPORTS,
        "3: server.limits.handshake_timeout: invalid duration '10x' (expected seconds, or a "
        "number with a unit: us, ms, s, m, h)",
    ),
    (
        "handshake-inf",
        SERVER + "  limits: {handshake_timeout: .inf}\n" + DEVICES + EXPORTS,
        "3: server.limits.handshake_timeout: expected a number of seconds, got a number '.inf'",
    ),
    (
        "handshake-bool",
        SERVER + "  limits: {handshake_timeout: no}\n" + DEVICES + EXPORTS,
        "3: server.limits.handshake_timeout: expected a duration such as 10, 2.5, 500ms, 10s or "
        "2m, got the boolean no",
    ),
    (
        "shutdown-negative",
        SERVER + "  limits: {shutdown_timeout: -1.5}\n" + DEVICES + EXPORTS,
        "3: server.limits.shutdown_timeout: invalid duration -1.5 (must be a finite number >= 0)",
    ),
    (
        "inflight-small",
        SERVER + "  limits: {max_inflight_bytes: 512K}\n" + DEVICES + EXPORTS,
        "3: server.limits.max_inflight_bytes: 524288 bytes is too small (at least 1M)",
    ),
    # devices
    (
        "devices-list",
        SERVER + "devices: []\n" + EXPORTS,
        "3: devices: expected a mapping, got a list",
    ),
    (
        "devices-empty",
        SERVER + "devices: {}\n" + EXPORTS,
        "3: devices: expected at least one device",
    ),
    (
        "device-name",
        SERVER + "devices:\n  -x: {memory: 1M}\n" + EXPORTS,
        "4: devices.-x: invalid device name (letters, digits, '_', '.' and '-'; first a letter "
        "or digit)",
    ),
    (
        "device-name-space",
        SERVER + "devices:\n  a b: {memory: 1M}\n" + EXPORTS,
        "4: devices.\"a b\": invalid device name (letters, digits, '_', '.' and '-'; first a "
        "letter or digit)",
    ),
    (
        "device-duplicate",
        SERVER + "devices:\n  mem: {memory: 1M}\n  mem: {memory: 2M}\n" + EXPORTS,
        "5: devices.mem: duplicate key (first at line 4)",
    ),
    (
        "device-not-mapping",
        SERVER + "devices:\n  mem: 1M\n" + EXPORTS,
        "4: devices.mem: expected a mapping, got a string '1M'",
    ),
    (
        "device-no-kind",
        SERVER + "devices:\n  mem:\n    size: 1M\n" + EXPORTS,
        "4: devices.mem: missing the device kind: 'file: PATH', 'memory: SIZE', "
        "'table: [LINE, ...]' or 'luks: {file: PATH, passphrase_file: PATH}'",
    ),
    (
        "device-two-kinds",
        SERVER + "devices:\n  mem:\n    file: x.img\n    memory: 1M\n" + EXPORTS,
        "6: devices.mem.memory: a device has one kind; this one is already a file (line 5)",
    ),
    (
        "device-unknown-key",
        SERVER + "devices:\n  mem:\n    memory: 1M\n    sparse: true\n" + EXPORTS,
        "6: devices.mem.sparse: unknown key "
        "(allowed: file, size, memory, table, luks, allow_overlap, inline_crypto)",
    ),
    (
        "memory-size",
        SERVER + "devices:\n  mem:\n    memory: 1M\n    size: 1M\n" + EXPORTS,
        "6: devices.mem.size: only for file devices (write the size as the value: memory: 64M)",
    ),
    (
        "memory-1000",
        SERVER + "devices:\n  mem:\n    memory: 1000\n" + EXPORTS,
        "5: devices.mem.memory: 1000 is not a multiple of 512 bytes",
    ),
    (
        "table-unknown-device",
        SERVER + DEVICES + "  pool:\n    table: ['0 8 linear nope 0']\n" + EXPORTS,
        "7: devices.pool.table[0]: unknown device 'nope' (known: mem, pool)",
    ),
    (
        "luks",
        SERVER + DEVICES + "  pool: {luks: mem}\n" + EXPORTS,
        "6: devices.pool.luks: expected a mapping, got a string 'mem'",
    ),
    (
        "inline-crypto-no-modes",
        SERVER + DEVICES + "  pool: {memory: 1M, inline_crypto: {keyslots: 4}}\n" + EXPORTS,
        "6: devices.pool.inline_crypto: missing key 'modes'",
    ),
    (
        "size-1000",
        SERVER + "devices:\n  disk0:\n    file: new.img\n    size: 1000\n" + EXPORTS,
        "6: devices.disk0.size: 1000 is not a multiple of 512 bytes",
    ),
    (
        "size-0",
        SERVER + "devices:\n  disk0: {file: new.img, size: 0}\n" + EXPORTS,
        "4: devices.disk0.size: size must be greater than 0, got 0",
    ),
    (
        "size-fraction",
        SERVER + "devices:\n  disk0: {file: new.img, size: 1.5G}\n" + EXPORTS,
        "4: devices.disk0.size: invalid size '1.5G' (expected bytes, or a whole number with K, "
        "M, G, T, KiB, MiB, GiB or TiB)",
    ),
    (
        "size-bool",
        SERVER + "devices:\n  disk0: {file: new.img, size: true}\n" + EXPORTS,
        "4: devices.disk0.size: expected a size such as 4096, 64M or 1G, got the boolean true",
    ),
    (
        "size-float",
        SERVER + "devices:\n  disk0: {file: new.img, size: 1.0}\n" + EXPORTS,
        "4: devices.disk0.size: expected a size such as 4096, 64M or 1G, got a number '1.0'",
    ),
    (
        "file-int",
        SERVER + "devices:\n  disk0: {file: 12, size: 1M}\n" + EXPORTS,
        "4: devices.disk0.file: expected a string, got an integer '12' (put it in quotes)",
    ),
    (
        "file-empty",
        SERVER + "devices:\n  disk0: {file: '', size: 1M}\n" + EXPORTS,
        "4: devices.disk0.file: expected a file path",
    ),
    (
        "file-null",
        SERVER + "devices:\n  disk0: {file: , size: 1M}\n" + EXPORTS,
        "4: devices.disk0.file: expected a string, got null",
    ),
    (
        "file-nul",
        SERVER + 'devices:\n  disk0: {file: "a\\0b", size: 1M}\n' + EXPORTS,
        "4: devices.disk0.file: expected a file path without NUL characters",
    ),
    (
        "file-timestamp",
        SERVER + "devices:\n  disk0: {file: 2024-01-01, size: 1M}\n" + EXPORTS,
        "4: devices.disk0.file: expected a string, got a timestamp '2024-01-01' (put it in quotes)",
    ),
    (
        "file-tagged",
        SERVER + "devices:\n  disk0: {file: !x a, size: 1M}\n" + EXPORTS,
        "4: devices.disk0.file: expected a string, got a value tagged !x 'a' (put it in quotes)",
    ),
    (
        "file-dev-null",
        SERVER + "devices:\n  disk0: {file: /dev/null}\n" + EXPORTS,
        "4: devices.disk0.file: /dev/null is a special file, not a regular file or block device",
    ),
    # exports
    (
        "exports-empty",
        SERVER + DEVICES + "exports: {}\n",
        "6: exports: expected at least one export",
    ),
    (
        "exports-list",
        SERVER + DEVICES + "exports: [a]\n",
        "6: exports: expected a mapping, got a list",
    ),
    (
        "export-duplicate",
        SERVER + DEVICES + "exports:\n  demo:\n    device: mem\n  demo:\n    device: mem\n",
        "9: exports.demo: duplicate key (first at line 7)",
    ),
    (
        "export-missing-device",
        SERVER + DEVICES + "exports:\n  a:\n    readonly: true\n",
        "7: exports.a: missing key 'device'",
    ),
    (
        "export-unknown-device",
        SERVER + DEVICES + "  disk: {memory: 1M}\nexports:\n  a:\n    device: dsk\n",
        "9: exports.a.device: unknown device 'dsk' (known: mem, disk)",
    ),
    (
        "export-unknown-key",
        SERVER + DEVICES + "exports:\n  a: {device: mem, readOnly: true}\n",
        "7: exports.a.readOnly: unknown key (allowed: device, readonly, description, "
        "multi_conn, default, key, encryption, evict)",
    ),
    (
        "export-encryption",
        SERVER + DEVICES + "exports:\n  a: {device: mem, encryption: per-connection}\n",
        "7: exports.a.encryption: expected per-client, got 'per-connection' (a fixed key is "
        "'key: NAME'; for no key leave both out)",
    ),
    (
        "readonly-yes",
        SERVER + DEVICES + EXPORTS + "    readonly: yes\n",
        "9: exports.a.readonly: expected true or false, got 'yes' (yes/no/on/off are not accepted)",
    ),
    (
        "readonly-quoted",
        SERVER + DEVICES + EXPORTS + "    readonly: 'true'\n",
        "9: exports.a.readonly: expected true or false, got a string 'true'",
    ),
    (
        "multi-conn-int",
        SERVER + DEVICES + EXPORTS + "    multi_conn: 1\n",
        "9: exports.a.multi_conn: expected true or false, got an integer '1'",
    ),
    (
        "description-int",
        SERVER + DEVICES + EXPORTS + "    description: 2024\n",
        "9: exports.a.description: expected a string, got an integer '2024' (put it in quotes)",
    ),
    (
        "description-long",
        SERVER + DEVICES + EXPORTS + f"    description: {'é' * 2049}\n",
        "9: exports.a.description: description is 4098 bytes in UTF-8, at most 4096 allowed",
    ),
    (
        "description-surrogate",
        SERVER + DEVICES + EXPORTS + '    description: "\\ud800"\n',
        "9: exports.a.description: description is not valid Unicode (a lone surrogate)",
    ),
    (
        "export-name-empty",
        SERVER + DEVICES + "exports:\n  '': {device: mem}\n",
        '7: exports."": an export name must not be empty (use default: true for the empty name)',
    ),
    (
        "export-name-null",
        SERVER + DEVICES + "exports:\n  ? \n  : {device: mem}\n",
        '7: exports."": an export name must not be empty (use default: true for the empty name)',
    ),
    (
        "export-name-long",
        SERVER + DEVICES + f"exports:\n  ? {'x' * 4097}\n  : {{device: mem}}\n",
        f'7: exports."{"x" * 37}...": export name is 4097 bytes in UTF-8, at most 4096 allowed',
    ),
    (
        "export-name-newline",
        SERVER + DEVICES + 'exports:\n  "a\\nb": {device: nope}\n',
        "7: exports.\"a\\nb\".device: unknown device 'nope' (known: mem)",
    ),
    (
        "export-key-list",
        SERVER + DEVICES + "exports:\n  ? [a]\n  : {device: mem}\n",
        "7: exports: a key must be a name, got a list",
    ),
    (
        "two-defaults",
        SERVER
        + DEVICES
        + "exports:\n  a: {device: mem, default: true}\n  b:\n    device: mem\n    default: true\n",
        "10: exports.b.default: more than one default export (also 'a', line 7)",
    ),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in ERRORS], ids=[c[0] for c in ERRORS])
def test_errors(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    assert str(error(path)) == f"{path}:{expected}"


def test_error_attributes(tmp_path: Path) -> None:
    path = write(
        tmp_path, SERVER + "devices:\n  disk0:\n    file: new.img\n    size: 1000\n" + EXPORTS
    )
    err = error(path)
    assert (err.file, err.line, err.path) == (str(path), 6, "devices.disk0.size")
    assert err.message == "1000 is not a multiple of 512 bytes"
    assert str(err) == f"{path}:6: devices.disk0.size: 1000 is not a multiple of 512 bytes"
    assert str(ConfigError("f", None, "", "m")) == "f: m"
    assert str(ConfigError(None, None, "a.b", "m\nn")) == "a.b: m\\x0an"


def test_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    assert (
        str(error(missing))
        == f"{missing}: cannot read the configuration: No such file or directory"
    )
    assert str(error(tmp_path)) == f"{tmp_path}: cannot read the configuration: Is a directory"
    bad = write(tmp_path, b"exports:\n  \xff: x\n")
    assert str(error(bad)) == f"{bad}:2: not valid UTF-8 (byte 0xff at offset 11)"
    deep = write(tmp_path, "[" * 5000)
    assert str(error(deep)).startswith(f"{deep}:")


def test_backing_file_errors(tmp_path: Path) -> None:
    (tmp_path / "1m.img").write_bytes(b"\0" * MIB)
    (tmp_path / "odd.img").write_bytes(b"\0" * 1000)

    def check(device: str, expected: str) -> None:
        path = write(tmp_path, SERVER + f"devices:\n  d:\n{device}" + EXPORTS.replace("mem", "d"))
        assert str(error(path)) == f"{path}:{expected}"

    check(
        "    file: new.img\n",
        f"4: devices.d: missing key 'size' (required because {tmp_path}/new.img does not exist "
        f"yet)",
    )
    check(
        "    file: 1m.img\n    size: 2M\n",
        "6: devices.d.size: existing file is 1048576 bytes, config says 2097152",
    )
    check(
        "    file: odd.img\n",
        f"5: devices.d.file: existing file {tmp_path}/odd.img is 1000 bytes, not a positive "
        f"multiple of 512",
    )
    check(
        "    file: odd.img\n    size: 512\n",
        "6: devices.d.size: existing file is 1000 bytes, config says 512",
    )
    check(
        "    file: .\n",
        f"5: devices.d.file: {tmp_path} is a directory, not a regular file or block device",
    )
    check(
        "    file: odd.img/x\n    size: 1M\n",
        f"5: devices.d.file: cannot use {tmp_path}/odd.img/x: a parent is not a directory",
    )
    check(
        f"    file: {'x' * 300}\n    size: 1M\n",
        f"5: devices.d.file: cannot use {tmp_path}/{'x' * 300}: File name too long",
    )


def test_booleans_only_true_false(tmp_path: Path) -> None:
    for word, value in [("true", True), ("false", False), ("True", True), ("FALSE", False)]:
        path = write(tmp_path, SERVER + DEVICES + EXPORTS + f"    readonly: {word}\n")
        assert load_config(path).exports["a"].readonly is value
    for word in ["yes", "no", "on", "off", "y"]:
        path = write(tmp_path, SERVER + DEVICES + EXPORTS + f"    readonly: {word}\n")
        assert "exports.a.readonly: expected true or false" in str(error(path))


# --- the demo --------------------------------------------------------------------------------


def test_demo_config_in_place() -> None:
    path = ROOT / "configs/demo.yaml"
    config = load_config(path)
    var = ROOT / "configs/var"
    assert config.server.listen == (
        ListenAddress("tcp", "127.0.0.1", 10809),
        ListenAddress("unix", path=var / "nbdcrypt.sock"),
    )
    demo = config.exports["demo"]
    assert demo.default and demo.description and config.default_export == demo
    disk = config.devices[demo.device]
    assert isinstance(disk, FileDeviceConfig)
    assert (disk.path, disk.size) == (var / "demo.img", 1 << 30)
    assert disk.create == (not disk.path.exists())
    assert config.devices[config.exports["scratch"].device] == MemoryDeviceConfig(
        config.exports["scratch"].device, 64 * MIB
    )


def test_demo_config_fresh_copy(tmp_path: Path) -> None:
    path = tmp_path / "demo.yaml"
    shutil.copy(ROOT / "configs/demo.yaml", path)
    config = load_config(path)
    disk = config.devices[config.exports["demo"].device]
    assert disk == FileDeviceConfig(disk.name, tmp_path / "var/demo.img", 1 << 30, create=True)
    assert not (tmp_path / "var").exists()


# --- no input gives anything but a ConfigError -----------------------------------------------

VOCABULARY = [
    "server",
    "listen",
    "limits",
    "tls",
    "mode",
    "control",
    "keys",
    "clients",
    "devices",
    "exports",
    "file",
    "size",
    "memory",
    "table",
    "inline_crypto",
    "device",
    "readonly",
    "description",
    "multi_conn",
    "default",
    "max_connections",
    "handshake_timeout",
    "max_inflight_bytes",
    "shutdown_timeout",
    "d",
    "e",
    "<<",
]
INTERESTING = [
    "1G",
    "64M",
    "1000",
    "512",
    "0",
    "-1",
    "10s",
    "500ms",
    "off",
    "yes",
    "tcp://127.0.0.1:0",
    "tcp://[::1]",
    "tcp://",
    "unix://s.sock",
    "unix:///",
    "img",
    "sub/img",
    "/dev/null",
    ".",
    "..",
    "x/../y",
    "",
    "é",
    "\ud800",
    "a\0b",
]
words = st.sampled_from(VOCABULARY) | st.text(max_size=6)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.sampled_from(INTERESTING)
    | st.text(max_size=12)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(words, inner, max_size=3),
    max_leaves=12,
)
shaped = st.fixed_dictionaries(
    {},
    optional={
        "server": st.dictionaries(
            st.sampled_from(["listen", "limits", "tls", "x"]), values, max_size=3
        ),
        "devices": st.dictionaries(words, st.dictionaries(words, scalars, max_size=3), max_size=3),
        "exports": st.dictionaries(words, st.dictionaries(words, scalars, max_size=4), max_size=3),
        "other": values,
    },
)
VALID = SERVER + DEVICES + EXPORTS + "    description: hi\n    default: true\n"


@pytest.fixture(scope="module")
def scratch_dir() -> Iterator[Path]:
    """A directory for generated configs (tmp_path is per test, hypothesis runs many examples)."""
    with tempfile.TemporaryDirectory() as name:
        (Path(name) / "img").write_bytes(b"\0" * 4096)
        yield Path(name)


def assert_only_config_error(directory: Path, text: str | bytes) -> None:
    path = write(directory, text)
    try:
        load_config(path)
    except ConfigError as e:
        assert str(e).startswith(str(path)) and "\n" not in str(e)
        lines = path.read_text(errors="replace").splitlines()  # YAML's line breaks, incl. U+2028
        assert e.line is None or 1 <= e.line <= len(lines) + 1
    assert sorted(os.listdir(directory)) == ["c.yaml", "img"]  # nothing created


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(
    text=st.text(
        alphabet=st.characters(codec="utf-8") | st.sampled_from("{}[]:-,'\"&*!|>#?\n\t "),
        max_size=200,
    )
)
def test_fuzz_text(scratch_dir: Path, text: str) -> None:
    assert_only_config_error(scratch_dir, text)


@FUZZ
@given(data=shaped | values, flow=st.sampled_from([None, True, False]))
def test_fuzz_structures(scratch_dir: Path, data: Any, flow: bool | None) -> None:
    assert_only_config_error(
        scratch_dir, yaml.safe_dump(data, default_flow_style=flow, allow_unicode=True)
    )


@FUZZ
@given(
    edits=st.lists(
        st.tuples(
            st.integers(0, len(VALID)),
            st.integers(0, 8),
            st.text(alphabet=":-[]{},'\"&*!|>#?~\n\t 0123456789abcxyz\\", max_size=6),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_fuzz_edits_of_a_valid_config(scratch_dir: Path, edits: list[tuple[int, int, str]]) -> None:
    text = VALID
    for at, cut, insert in edits:
        text = text[:at] + insert + text[at + cut :]
    assert_only_config_error(scratch_dir, text)
