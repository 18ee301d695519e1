"""Read the YAML configuration and turn it into the checked dataclasses of model.py.

This is the only module that knows YAML. It walks the node graph of `yaml.compose` (never the
constructed Python values), so duplicate keys are seen and every error names the file, the line
and the key path: `FILE:LINE: devices.disk0.size: message`. Any bad input is a ConfigError.
The loader reads and stats, and never writes: the server creates missing backing files.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import stat
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, TypeVar

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from nbdcrypt.blkcrypto.key import DATA_UNIT_SIZES, CryptoMode, parse_mode
from nbdcrypt.blkcrypto.profile import CryptoCaps
from nbdcrypt.clients import canonical_san
from nbdcrypt.dm.table import TableError, TableLine, check_lines, parse_line, table_size
from nbdcrypt.luks import LuksError
from nbdcrypt.luks.header import LuksHeader, read_header
from nbdcrypt.luks.mapping import keyring_mode
from nbdcrypt.luks.unlock import passphrase_file_problem
from nbdcrypt.tls import TlsFileError, check_credentials

from .model import (
    DEFAULT_BUSY_POLL,
    MAX_BUSY_POLL,
    SECTOR,
    ClientCertificate,
    ClientMatch,
    ClientRule,
    Config,
    DeviceConfig,
    Evict,
    ExportConfig,
    FileDeviceConfig,
    InlineCryptoConfig,
    IoMode,
    KeyConfig,
    KeyCredential,
    KeyEnv,
    KeyFile,
    KeyLuks,
    KeySource,
    Limits,
    ListenAddress,
    LuksDeviceConfig,
    MemoryDeviceConfig,
    ServerConfig,
    TableDeviceConfig,
    TlsConfig,
    TlsMode,
)
from .units import MAX_SIZE, MIB, parse_bytes, parse_duration, parse_int, parse_size

__all__ = ["DEFAULT_PORT", "ConfigError", "load_config", "parse_listen", "parse_size"]

DEFAULT_PORT = 10809
MAX_NAME_BYTES = 4096  # NBD's limit for export names and descriptions
MAX_SUN_PATH = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux

_T = TypeVar("_T")
_A = TypeVar("_A")
_TAG = "tag:yaml.org,2002:"
_DEVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")
_HOST_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_PLANNED = "not supported yet (planned)"
_CONTROL = {c: f"\\x{c:02x}" for c in [*range(32), 127]}
_EXPORT_KEYS = (
    "device",
    "readonly",
    "description",
    "multi_conn",
    "default",
    "key",
    "encryption",
    "evict",
)
_DEVICE_KEYS = ("file", "size", "memory", "table", "luks", "allow_overlap", "inline_crypto")
_LUKS_KEYS = ("file", "passphrase_file", "keyslot")
_KEY_KEYS = ("mode", "data_unit_size", "dun_bytes", "source")
_KEY_SOURCES = ("file", "create", "env", "credential")
_RULE_KEYS = ("match", "exports", "key")
_MATCH_KEYS = ("tls_subject", "tls_san", "address", "unix_uid", "unix_gid")
_ACCESS = {"rw": False, "ro": True}  # -> read-only
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_TLS_KEYS = ("mode", "certificate", "private_key", "ca", "client_certificate")
_KINDS = {
    "file": "a file",
    "memory": "a memory device",
    "table": "a table",
    "luks": "a LUKS device",
}
_LINE_PREFIX = re.compile(r"line ([0-9]+): ")
_BREAKS = re.compile("\r\n|[\n\r\x85\u2028\u2029]")  # what PyYAML counts as a new line


class ConfigError(Exception):
    """A bad configuration: `FILE:LINE: KEY.PATH: message` (parts that are unknown are left out)."""

    def __init__(self, file: str | None, line: int | None, path: str, message: str) -> None:
        super().__init__(file, line, path, message)
        self.file = file
        self.line = line
        self.path = path
        self.message = message

    def __str__(self) -> str:
        where = [] if self.file is None else [self.file]
        if self.file is not None and self.line is not None:
            where = [f"{self.file}:{self.line}"]
        text = ": ".join([*where, *([self.path] if self.path else []), self.message])
        return text.translate(_CONTROL)  # one line, whatever the input held


# --- walking the node graph ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Source:
    file: str  # as the user named it, for messages
    base: Path  # absolute directory that relative paths are resolved against


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _describe(node: Node) -> str:
    """What a node is, for `expected X, got Y`."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    kind = node.tag.removeprefix(_TAG)
    names = {"null": "null", "str": "a string", "int": "an integer", "float": "a number"}
    if kind == "null":
        return "null"
    if kind == "bool":
        return f"the boolean {node.value}"
    name = names.get(kind, f"a {kind}" if node.tag.startswith(_TAG) else f"a value tagged {kind}")
    return f"{name} {_short(node.value)}"


def _join(path: str, key: str) -> str:
    """`path.key`, quoting keys that are not plain words so the path stays unambiguous."""
    if len(key) > 40:
        key = key[:37] + "..."
    if not _PLAIN_KEY.match(key):
        key = json.dumps(key, ensure_ascii=False)
    return f"{path}.{key}" if path else key


@dataclass(frozen=True, slots=True)
class _Item:
    """A YAML node and the key path that led to it; typed accessors raise located ConfigErrors."""

    src: _Source
    node: Node
    path: str
    key_line: int | None = None  # line of the key this is the value of

    @property
    def line(self) -> int:
        return int(self.node.start_mark.line) + 1

    def fail(self, message: str) -> NoReturn:
        raise ConfigError(self.src.file, self.line, self.path, message)

    def fail_whole(self, message: str) -> NoReturn:
        """An error about a mapping as a whole (a key it lacks): at the line of its key."""
        raise ConfigError(self.src.file, self.key_line or self.line, self.path, message)

    def expect(self, what: str) -> NoReturn:
        self.fail(f"expected {what}, got {_describe(self.node)}")

    def convert(self, parse: Callable[[_A], _T], value: _A) -> _T:
        """parse(value), with its ValueError reported at this node."""
        try:
            return parse(value)
        except ValueError as e:
            self.fail(str(e))

    def scalar(self, tags: Collection[str], what: str) -> str:
        if not isinstance(self.node, ScalarNode) or self.node.tag not in tags:
            self.expect(what)
        return str(self.node.value)

    def string(self) -> str:
        node = self.node
        if isinstance(node, ScalarNode) and node.tag not in (_TAG + "str", _TAG + "null"):
            self.fail(f"expected a string, got {_describe(node)} (put it in quotes)")
        return self.scalar((_TAG + "str",), "a string")

    def boolean(self) -> bool:
        text = self.scalar((_TAG + "bool",), "true or false")
        if text.lower() not in ("true", "false"):
            self.fail(
                f"expected true or false, got {_short(text)} (yes/no/on/off are not accepted)"
            )
        return text.lower() == "true"

    def integer(self) -> int:
        return self.convert(parse_int, self.scalar((_TAG + "int",), "an integer"))

    def size(self, parse: Callable[[int | str], int] = parse_size) -> int:
        """A size: an integer, or a string with a unit ("64M")."""
        text = self.scalar((_TAG + "int", _TAG + "str"), "a size such as 4096, 64M or 1G")
        value: int | str = self.integer() if self.node.tag == _TAG + "int" else text
        return self.convert(parse, value)

    def duration(self) -> float:
        """Seconds: a number, or a string with a unit ("500ms", "10s", "2m")."""
        tags = (_TAG + "int", _TAG + "float", _TAG + "str")
        text = self.scalar(tags, "a duration such as 10, 2.5, 500ms, 10s or 2m")
        if self.node.tag == _TAG + "int":
            return self.convert(parse_duration, self.integer())
        if self.node.tag == _TAG + "float":
            try:
                seconds = float(text.replace("_", ""))
            except ValueError:
                self.expect("a number of seconds")
            return self.convert(parse_duration, seconds)
        return self.convert(parse_duration, text)

    def items(self) -> list[_Item]:
        """The entries of a list, or this node alone if it is not a list."""
        if not isinstance(self.node, SequenceNode):
            return [self]
        return [_Item(self.src, n, f"{self.path}[{i}]") for i, n in enumerate(self.node.value)]

    def pairs(self) -> Iterator[tuple[str, _Item, _Item]]:
        """(key text, key item, value item) of a mapping; duplicate and odd keys are errors."""
        if not isinstance(self.node, MappingNode):
            self.expect("a mapping")
        seen: dict[str, int] = {}
        for key_node, value_node in self.node.value:
            key = _Item(self.src, key_node, self.path)
            if not isinstance(key_node, ScalarNode):
                key.fail(f"a key must be a name, got {_describe(key_node)}")
            if key_node.tag == _TAG + "merge":
                key.fail("YAML merge keys (<<) are not supported")
            text = str(key_node.value)
            key = _Item(self.src, key_node, _join(self.path, text))
            if text in seen:
                key.fail(f"duplicate key (first at line {seen[text]})")
            seen[text] = key.line
            yield text, key, _Item(self.src, value_node, key.path, key.line)

    def fields(self, allowed: Sequence[str], planned: Collection[str] = ()) -> _Fields:
        return _Fields(self, allowed, planned)


class _Fields:
    """A mapping with a fixed set of keys: unknown ones are errors, planned ones are refused."""

    def __init__(self, item: _Item, allowed: Sequence[str], planned: Collection[str]) -> None:
        self.item = item
        self._fields: dict[str, tuple[_Item, _Item]] = {}
        for name, key, value in item.pairs():
            if name in planned:
                key.fail(_PLANNED)
            if name not in allowed:
                key.fail(f"unknown key (allowed: {', '.join(allowed)})")
            self._fields[name] = (key, value)

    def __contains__(self, name: str) -> bool:
        return name in self._fields

    def key(self, name: str) -> _Item:
        return self._fields[name][0]

    def get(self, name: str) -> _Item | None:
        field = self._fields.get(name)
        return field[1] if field else None

    def require(self, name: str, why: str = "") -> _Item:
        value = self.get(name)
        if value is None:
            self.item.fail_whole(f"missing key '{name}'{why}")
        return value

    def opt(self, name: str, convert: Callable[[_Item], _T], default: _T) -> _T:
        value = self.get(name)
        return default if value is None else convert(value)


# --- reading ---------------------------------------------------------------------------------


def _read(src: _Source, path: Path) -> str:
    try:
        data = path.read_bytes()
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(src.file, None, "", f"cannot read the configuration: {reason}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        message = f"not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})"
        raise ConfigError(src.file, line, "", message) from None


def _yaml_message(e: yaml.MarkedYAMLError) -> str:
    parts = [e.context or "", e.problem or ""]
    cmark, pmark = e.context_mark, e.problem_mark
    if e.context and cmark and pmark and cmark.line != pmark.line:
        parts[0] += f" (line {cmark.line + 1})"
    text = "; ".join(p for p in parts if p) or "invalid YAML"
    return "YAML syntax error: " + " ".join(text.split())


def _compose(src: _Source, text: str) -> _Item:
    """The document's root node; YAML errors become ConfigErrors at the line PyYAML reports."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        raise ConfigError(src.file, line, "", _yaml_message(e)) from None
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        message = f"YAML syntax error: character #x{e.character:04x}: {e.reason}"
        raise ConfigError(src.file, line, "", message) from None
    except yaml.YAMLError as e:
        message = "YAML syntax error: " + " ".join(str(e).split())
        raise ConfigError(src.file, None, "", message) from None
    except RecursionError:
        raise ConfigError(src.file, None, "", "YAML nested too deeply") from None
    if node is None:
        raise ConfigError(src.file, 1, "", "the configuration is empty")
    return _Item(src, node, "")


# --- listen addresses ------------------------------------------------------------------------


def _parse_host(host: str) -> str:
    if not host:
        raise ValueError("missing host (use 0.0.0.0 or [::] to listen on all addresses)")
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"invalid IPv4 address {_short(host)}") from None
    elif len(host) > 253 or not all(
        _HOST_LABEL.match(p) for p in host.removesuffix(".").split(".")
    ):
        raise ValueError(f"invalid host name {_short(host)}")
    return host


def _parse_tcp(rest: str) -> ListenAddress:
    if rest.startswith("["):
        host, bracket, tail = rest[1:].partition("]")
        if not bracket:
            raise ValueError("missing ']' after the IPv6 address")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid IPv6 address {_short(host)}") from None
        if tail and not tail.startswith(":"):
            raise ValueError("expected tcp://[IPV6]:PORT")
        port = tail[1:] if tail else None
    else:
        if rest.count(":") > 1:
            raise ValueError("an IPv6 address must be in brackets: tcp://[::1]:10809")
        host, colon, port_text = rest.partition(":")
        host = _parse_host(host)
        port = port_text if colon else None
    if port is None:
        return ListenAddress("tcp", host, DEFAULT_PORT)
    if not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
        raise ValueError(f"invalid port {_short(port)} (expected 0 to 65535)")
    return ListenAddress("tcp", host, int(port))


def _parse_unix(rest: str, base: Path | None) -> ListenAddress:
    if not rest or rest.endswith("/"):
        raise ValueError("expected unix:///ABSOLUTE/PATH or unix://RELATIVE/PATH to a socket")
    if "\0" in rest:
        raise ValueError("socket path contains a NUL character")
    path = Path(rest) if rest.startswith("/") else (base or Path.cwd()) / rest
    try:
        length = len(os.fsencode(path))
    except UnicodeEncodeError:
        raise ValueError("socket path cannot be encoded for the file system") from None
    if length > MAX_SUN_PATH:
        raise ValueError(
            f"socket path {path} is {length} bytes, unix sockets allow at most {MAX_SUN_PATH}"
        )
    return ListenAddress("unix", path=path)


def parse_listen(url: str, *, base: Path | None = None) -> ListenAddress:
    """`tcp://HOST[:PORT]` (HOST a name, IPv4 or [IPv6]) or `unix://PATH`; ValueError if bad.

    A relative unix path (`unix://run/x.sock`) is taken relative to base (default: the
    current directory); the result always holds an absolute path.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"invalid address {_short(url)}: expected tcp://HOST:PORT or unix://PATH")
    if scheme.lower() == "tcp":
        return _parse_tcp(rest)
    if scheme.lower() == "unix":
        return _parse_unix(rest, base)
    raise ValueError(f"unsupported scheme {_short(scheme)} (expected tcp:// or unix://)")


def _listen_overrides(urls: Sequence[str]) -> tuple[ListenAddress, ...]:
    result: list[ListenAddress] = []
    for url in urls:
        try:
            address = parse_listen(url)
        except ValueError as e:
            raise ConfigError(None, None, "--listen", f"{url}: {e}") from None
        if address in result:
            raise ConfigError(None, None, "--listen", f"{url}: given twice")
        result.append(address)
    return tuple(result)


def _listen(item: _Item) -> tuple[ListenAddress, ...]:
    entries = item.items()
    if not entries:
        item.fail("expected at least one address")
    seen: dict[ListenAddress, int] = {}
    base = item.src.base
    for entry in entries:
        address = entry.convert(lambda u: parse_listen(u, base=base), entry.string())
        if address in seen:
            entry.fail(f"duplicate address (first at line {seen[address]})")
        seen[address] = entry.line
    return tuple(seen)


# --- sections --------------------------------------------------------------------------------


def _tls_mode(item: _Item) -> TlsMode:
    text = item.scalar((_TAG + "bool", _TAG + "str"), "off, allow or require")
    try:
        return TlsMode(text.lower())
    except ValueError:
        item.fail(f"expected off, allow or require, got {_short(text)}")


def _client_certificate(item: _Item) -> ClientCertificate:
    text = item.string()
    try:
        return ClientCertificate(text)
    except ValueError:
        item.fail(f"expected required, optional or none, got {_short(text)}")


def _pem_path(item: _Item) -> Path:
    text = item.string()
    if not text or "\0" in text:
        item.fail("expected a file path" + (" without NUL characters" if text else ""))
    return item.src.base / text


def _tls(item: _Item) -> TlsConfig:
    """`tls: {mode: off|allow|require, certificate, private_key, ca, client_certificate}`; with
    TLS on, the PEM files are read and checked here so that their errors have a line."""
    fields = item.fields(_TLS_KEYS)
    mode = _tls_mode(fields.require("mode"))
    certificate, private_key, ca = (fields.opt(k, _pem_path, None) for k in _TLS_KEYS[1:4])
    client = fields.opt("client_certificate", _client_certificate, ClientCertificate.REQUIRED)
    cfg = TlsConfig(mode, certificate, private_key, ca, client)
    if client is ClientCertificate.NONE and ca is not None:
        fields.key("ca").fail(
            "not used with client_certificate: none (remove it, or ask clients for certificates)"
        )
    if mode is TlsMode.OFF:
        return cfg
    why = f" (mode {mode.value} needs the server's certificate and key)"
    fields.require("certificate", why)
    fields.require("private_key", why)
    if client is not ClientCertificate.NONE:
        fields.require(
            "ca", " (client certificates are verified against it; or set client_certificate: none)"
        )
    try:
        check_credentials(cfg)
    except TlsFileError as exc:
        fields.require(exc.key).fail(exc.message)
    return cfg


def _at_least_one(item: _Item) -> int:
    value = item.integer()
    if value < 1:
        item.fail(f"must be at least 1, got {value}")
    return value


def _timeout(item: _Item) -> float:
    seconds = item.duration()
    if seconds <= 0:
        item.fail("must be greater than 0")
    return seconds


def _inflight(item: _Item) -> int:
    value = item.size(parse_bytes)
    if value < MIB:
        item.fail(f"{value} bytes is too small (at least 1M)")
    return value


def _limits(item: _Item | None) -> Limits:
    if item is None:
        return Limits()
    names = ("max_connections", "handshake_timeout", "max_inflight_bytes", "shutdown_timeout")
    fields = item.fields(names)
    default = Limits()
    return Limits(
        max_connections=fields.opt(names[0], _at_least_one, default.max_connections),
        handshake_timeout=fields.opt(names[1], _timeout, default.handshake_timeout),
        max_inflight_bytes=fields.opt(names[2], _inflight, default.max_inflight_bytes),
        shutdown_timeout=fields.opt(names[3], _Item.duration, default.shutdown_timeout),
    )


def _server(
    top: _Fields, override: tuple[ListenAddress, ...], listen_required: bool
) -> ServerConfig:
    why = " (the server must listen somewhere; or give --listen)"
    item = top.get("server")
    if item is None:
        if not override and listen_required:
            top.require("server", why)
        return ServerConfig(override)
    fields = item.fields(("listen", "limits", "tls", "control", "metrics", "io", "busy_poll"))
    tls = fields.opt("tls", _tls, TlsConfig())
    no_listen: tuple[ListenAddress, ...] = ()
    listen = fields.opt("listen", _listen, no_listen)
    if not override and listen_required:
        fields.require("listen", why)
    control = fields.opt("control", _control, None)
    metrics = _metrics_apart(fields.get("metrics"), override or listen, control)
    return ServerConfig(
        override or listen,
        _limits(fields.get("limits")),
        control,
        tls,
        metrics=metrics,
        io=fields.opt("io", _io_mode, IoMode.THREADS),
        busy_poll=fields.opt("busy_poll", _busy_poll, DEFAULT_BUSY_POLL),
    )


def _busy_poll(item: _Item) -> float:
    """`busy_poll: 100us`: how long a connection thread may poll for its next request; 0: off."""
    seconds = item.duration()
    if seconds > MAX_BUSY_POLL:
        item.fail(f"{_short(str(item.node.value))} is too long (at most {MAX_BUSY_POLL * 1e3:g}ms)")
    return seconds


def _io_mode(item: _Item) -> IoMode:
    """`io: threads` (the default) or `io: loop`."""
    text = item.string()
    try:
        return IoMode(text.lower())
    except ValueError:
        item.fail(f"unknown io mode {_short(text)}: expected threads or loop")


def _metrics(item: _Item) -> ListenAddress:
    """`metrics: HOST:PORT` (or tcp://HOST:PORT, [IPV6]:PORT, unix:///PATH): where Prometheus
    scrapes. The port must be given: NBD's default port would be the wrong one."""
    text = item.string()
    url = text if "://" in text else f"tcp://{text}"
    address = item.convert(lambda u: parse_listen(u, base=item.src.base), url)
    if address.scheme == "tcp" and not re.search(r":[0-9]+\Z", text):
        item.fail(
            f"missing port in {_short(text)}: expected HOST:PORT (127.0.0.1:10810), "
            "tcp://HOST:PORT or unix:///PATH"
        )
    return address


def _metrics_apart(
    item: _Item | None, listen: tuple[ListenAddress, ...], control: Path | None
) -> ListenAddress | None:
    """`server.metrics`, checked against the NBD listen addresses and the control socket."""
    if item is None:
        return None
    address = _metrics(item)
    if address in listen:
        item.fail(f"{address} is also an NBD listen address; metrics need their own")
    if address.path is not None and address.path == control:
        item.fail(f"{address.path} is also the control socket; metrics need their own")
    return address


def _control(item: _Item) -> Path:
    """`control: unix:///PATH` (or unix://relative): the control socket's path."""
    address = item.convert(lambda url: parse_listen(url, base=item.src.base), item.string())
    if address.scheme != "unix" or address.path is None:
        item.fail("the control socket must be a unix socket: unix:///PATH")
    return address.path


def _existing(path: Path) -> tuple[str, int] | None:
    """("file" | "block device", size in bytes) of what is at path, or None if nothing is."""
    try:
        st = os.stat(path)
        if stat.S_ISBLK(st.st_mode):
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                return "block device", os.lseek(fd, 0, os.SEEK_END)
            finally:
                os.close(fd)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise ValueError(f"cannot use {path}: a parent is not a directory") from None
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ValueError(f"cannot use {path}: {reason}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a special file"
        raise ValueError(f"{path} is {kind}, not a regular file or block device")
    return "file", st.st_size


def _file_device(name: str, fields: _Fields) -> FileDeviceConfig:
    item = fields.require("file")
    text = item.string()
    if not text or "\0" in text:
        item.fail("expected a file path" + (" without NUL characters" if text else ""))
    path = item.src.base / text
    size_item = fields.get("size")
    size = size_item.size() if size_item else None
    existing = item.convert(_existing, path)
    if existing is None:
        if size is None:
            fields.item.fail_whole(
                f"missing key 'size' (required because {path} does not exist yet)"
            )
        return FileDeviceConfig(name, path, size, create=True, inline_crypto=_engine(fields))
    kind, actual = existing
    if size_item is not None and size != actual:
        size_item.fail(f"existing {kind} is {actual} bytes, config says {size}")
    if actual == 0 or actual % SECTOR:
        item.fail(f"existing {kind} {path} is {actual} bytes, not a positive multiple of {SECTOR}")
    return FileDeviceConfig(name, path, actual, create=False, inline_crypto=_engine(fields))


# --- keys and inline encryption ----------------------------------------------------------------


def _mode(item: _Item) -> CryptoMode:
    return item.convert(parse_mode, item.string())


def _data_unit_size(item: _Item) -> int:
    size = item.integer()
    if size not in DATA_UNIT_SIZES:
        item.fail(f"a data unit size is one of {', '.join(map(str, DATA_UNIT_SIZES))}, not {size}")
    return size


def _dun_bytes(item: _Item) -> int:
    value = item.integer()
    if not 1 <= value <= 8:
        item.fail(f"expected 1 to 8 bytes, got {value}")
    return value


def _engine(fields: _Fields) -> InlineCryptoConfig | None:
    """`inline_crypto: {keyslots: N, modes: {MODE: [UNIT, ...]}, max_dun_bytes: N}`."""
    item = fields.get("inline_crypto")
    if item is None:
        return None
    engine = item.fields(("keyslots", "modes", "max_dun_bytes"))
    keyslots = engine.require("keyslots").integer()
    if not 0 <= keyslots <= 1024:
        engine.require("keyslots").fail(f"expected 0 to 1024 keyslots, got {keyslots}")
    modes: dict[CryptoMode, tuple[int, ...]] = {}
    for _, key, units in engine.require("modes").pairs():
        sizes = tuple(_data_unit_size(unit) for unit in units.items())
        if not isinstance(units.node, SequenceNode) or not sizes:
            units.expect("a list of data unit sizes such as [512, 4096]")
        modes[_mode(key)] = sizes
    if not modes:
        engine.require("modes").fail("expected at least one mode")
    return InlineCryptoConfig(
        keyslots, CryptoCaps.of(modes, _dun_bytes(engine.require("max_dun_bytes")))
    )


def _key(name: str, item: _Item) -> KeyConfig:
    fields = item.fields(_KEY_KEYS)
    mode = _mode(fields.require("mode"))
    unit = _data_unit_size(fields.require("data_unit_size"))
    dun_bytes = fields.opt("dun_bytes", _dun_bytes, 8)
    return KeyConfig(name, mode, unit, dun_bytes, _key_source(fields.require("source")))


def _key_source(item: _Item) -> KeySource:
    """`{file: PATH, create: BOOL}`, `{env: VAR}` or `{credential: NAME}`."""
    fields = item.fields(_KEY_SOURCES)
    kinds = [kind for kind in ("file", "env", "credential") if kind in fields]
    if not kinds:
        item.fail_whole("missing the source: 'file: PATH', 'env: VARIABLE' or 'credential: NAME'")
    if len(kinds) > 1:
        fields.key(kinds[1]).fail(f"a key has one source; this one is already {kinds[0]}")
    if "create" in fields and kinds[0] != "file":
        fields.key("create").fail("only for key files (it makes a missing file)")
    where = fields.require(kinds[0])
    text = where.string()
    if kinds[0] == "env":
        if not _ENV_NAME.match(text):
            where.fail(f"invalid environment variable name {_short(text)}")
        return KeyEnv(text)
    if kinds[0] == "credential":
        if not text or "/" in text or "\0" in text or text in (".", ".."):
            where.fail(f"invalid credential name {_short(text)} (a file name, no '/')")
        return KeyCredential(text)
    if not text or "\0" in text:
        where.fail("expected a file path")
    return KeyFile(where.src.base / text, fields.opt("create", _Item.boolean, False))


def _keys(item: _Item | None) -> dict[str, KeyConfig]:
    if item is None:
        return {}
    keys = {}
    for name, key, value in item.pairs():
        if not _DEVICE_NAME.match(name):
            key.fail(
                "invalid key name (letters, digits, '_', '.' and '-'; first a letter or digit)"
            )
        keys[name] = _key(name, value)
    return keys


# --- dm tables -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _At:
    """Where a table line is written: a literal block holds several in one YAML node."""

    src: _Source
    line: int
    path: str  # devices.NAME.table[i]

    def fail(self, message: str) -> NoReturn:
        raise ConfigError(self.src.file, self.line, self.path, message)


@dataclass(frozen=True, slots=True)
class _Entry:
    """One parsed table line of the file, and where it is written."""

    at: _At
    table_line: TableLine

    @property
    def line(self) -> int:
        return self.at.line

    @property
    def path(self) -> str:
        return self.at.path

    def fail(self, message: str) -> NoReturn:
        self.at.fail(message)


@dataclass(frozen=True, slots=True)
class _Table:
    """A table device as written, before the references between devices are checked."""

    name: str
    entries: tuple[_Entry, ...]
    allow_overlap: bool

    @property
    def size(self) -> int:
        return table_size([entry.table_line for entry in self.entries])


@dataclass(frozen=True, slots=True)
class _Region:
    """A region of a device that one table line maps (bytes), for the overlap check."""

    device: str
    start: int
    end: int
    table: _Table
    entry: _Entry
    order: tuple[int, int, int]  # (table, line, reference) in the order of the file


def _sectors(start: int, end: int) -> str:
    return f"sectors {start // SECTOR}..{end // SECTOR}"


def _string_lines(item: _Item) -> list[tuple[str, int]]:
    """(text without comment, YAML line) of each table line in a string: a literal block
    (`|`) holds one per line, any other string exactly one."""
    text = item.string()
    node = item.node
    assert isinstance(node, ScalarNode)
    if node.style == "|":
        first, raw = item.line + 1, _BREAKS.split(text)
    elif node.style == ">":
        item.fail("a folded block (>) joins its lines into one; write a literal block (|)")
    elif _BREAKS.search(text.rstrip("\n")):
        item.fail("several table lines must be a list, or a literal block (table: |)")
    else:
        first, raw = item.line, [text]
    lines = []
    for number, line in enumerate(raw):
        code = line.split("#", 1)[0].strip()
        if code:
            lines.append((code, first + number))
    return lines


def _table_texts(item: _Item) -> list[tuple[str, int, str]]:
    """(text, YAML line, key path) of each table line: a list of strings, one line each, or
    one string (a literal block `table: |` for several lines; blank and comment lines skipped)."""
    node = item.node
    if isinstance(node, SequenceNode):
        texts = []
        for entry in item.items():
            lines = _string_lines(entry)
            if not lines:
                entry.fail("empty table line")
            if len(lines) > 1:
                entry.fail("one table line per list item")
            texts.append((*lines[0], entry.path))
    elif isinstance(node, ScalarNode) and node.tag == _TAG + "str":
        lines = _string_lines(item)
        texts = [(text, line, f"{item.path}[{i}]") for i, (text, line) in enumerate(lines)]
    else:
        item.expect("a list of table lines, or a literal block of them (table: |)")
    if not texts:
        item.fail("expected at least one table line")
    return texts


def _table_entries(item: _Item) -> tuple[_Entry, ...]:
    """The table lines of a device, each parsed; then checked against each other."""
    entries: list[_Entry] = []
    for number, (text, line, path) in enumerate(_table_texts(item), 1):
        at = _At(item.src, line, path)
        bad = next((c for c in text if not c.isascii()), None)
        if bad is not None:
            at.fail(f"unexpected character {bad!r} (table lines are ASCII)")
        try:
            parsed = parse_line(text, number)
        except TableError as e:
            at.fail(str(e).removeprefix(f"line {number}: "))
        except ValueError as e:  # a number Python will not convert (thousands of digits)
            at.fail(f"invalid table line: {e}")
        entries.append(_Entry(at, parsed))
    try:
        check_lines([entry.table_line for entry in entries])
    except TableError as e:
        match = _LINE_PREFIX.match(str(e))
        if match and 1 <= int(match[1]) <= len(entries):
            entries[int(match[1]) - 1].fail(str(e)[match.end() :])
        item.fail(str(e))
    for entry in entries:
        end = entry.table_line.start + entry.table_line.length
        if end * SECTOR > MAX_SIZE:
            entry.fail(
                f"ends at sector {end}, beyond the largest device size "
                f"({MAX_SIZE // SECTOR} sectors, just under 8 EiB)"
            )
    return tuple(entries)


def _dependency_order(deps: dict[str, list[tuple[str, _Entry]]]) -> list[str]:
    """Every device after the devices its table names; a reference cycle is an error."""
    done: set[str] = set()
    order: list[str] = []
    for root, names in deps.items():
        if root in done:
            continue
        path = [root]
        stack = [iter(names)]
        while stack:
            for below, entry in stack[-1]:
                if below in path:
                    cycle = [*path[path.index(below) :], below]
                    entry.fail(f"reference cycle: {' -> '.join(cycle)}")
                if below not in done:
                    path.append(below)
                    stack.append(iter(deps[below]))
                    break
            else:
                stack.pop()
                done.add(path[-1])
                order.append(path.pop())
    return order


def _check_overlaps(tables: Sequence[_Table]) -> None:
    """No region of a device is mapped twice, unless a table involved allows it.

    Identical regions named by one line (delay's read and write legs) count once.
    The error is reported at the line, in file order, that first completes an overlap.
    """
    by_device: dict[str, list[_Region]] = {}
    for t, table in enumerate(tables):
        for e, entry in enumerate(table.entries):
            for r, ref in enumerate(dict.fromkeys(entry.table_line.refs())):
                region = _Region(
                    ref.device, ref.offset, ref.offset + ref.length, table, entry, (t, e, r)
                )
                by_device.setdefault(ref.device, []).append(region)
    worst: tuple[_Region, _Region] | None = None  # (later, earlier)
    for regions in by_device.values():
        active: list[_Region] = []
        for region in sorted(regions, key=lambda r: (r.start, r.end, r.order)):
            active = [other for other in active if other.end > region.start]
            for other in active:
                if other.table.allow_overlap or region.table.allow_overlap:
                    continue
                later, earlier = sorted((region, other), key=lambda r: r.order, reverse=True)
                if worst is None or (later.order, earlier.order) < (worst[0].order, worst[1].order):
                    worst = (later, earlier)
            active.append(region)
    if worst is None:
        return
    later, earlier = worst
    target = later.entry.table_line.target
    if later.entry is earlier.entry:
        both = f"{earlier.start // SECTOR}..{earlier.end // SECTOR} and {later.start // SECTOR}"
        problem = f"{target} maps sectors {both}..{later.end // SECTOR} of {later.device}"
        problem += ", which overlap"
    else:
        problem = (
            f"{target} maps {_sectors(later.start, later.end)} of {later.device}, overlapping "
            f"{_sectors(earlier.start, earlier.end)} mapped by {earlier.entry.path} "
            f"(line {earlier.entry.line})"
        )
    names = dict.fromkeys([earlier.table.name, later.table.name])
    later.entry.fail(
        f"{problem}; set allow_overlap: true on {' or '.join(names)} if that is intended"
    )


def _resolve_tables(devices: dict[str, DeviceConfig | _Table]) -> dict[str, DeviceConfig]:
    """Check what tables name (known devices, no cycles, within bounds, no overlaps) and
    order the devices so that each comes after the devices its table names."""
    tables = [device for device in devices.values() if isinstance(device, _Table)]
    deps: dict[str, list[tuple[str, _Entry]]] = {name: [] for name in devices}
    for table in tables:
        for entry in table.entries:
            for ref in entry.table_line.refs():
                if ref.device not in devices:
                    known = ", ".join(devices)
                    entry.fail(f"unknown device {_short(ref.device)} (known: {known})")
                deps[table.name].append((ref.device, entry))
    order = _dependency_order(deps)
    for table in tables:
        for entry in table.entries:
            for ref in entry.table_line.refs():
                size = devices[ref.device].size
                if ref.offset + ref.length > size:
                    entry.fail(
                        f"{entry.table_line.target} maps "
                        f"{_sectors(ref.offset, ref.offset + ref.length)} of {ref.device}, "
                        f"which has only {size // SECTOR} sectors"
                    )
    _check_overlaps(tables)
    resolved: dict[str, DeviceConfig] = {}
    for name in order:
        device = devices[name]
        if isinstance(device, _Table):
            lines = tuple(entry.table_line for entry in device.entries)
            device = TableDeviceConfig(name, lines, device.size, device.allow_overlap)
        resolved[name] = device
    return resolved


def _device(name: str, item: _Item) -> DeviceConfig | _Table:
    fields = item.fields(_DEVICE_KEYS)
    kinds = [kind for kind in _KINDS if kind in fields]
    if not kinds:
        item.fail_whole(
            "missing the device kind: 'file: PATH', 'memory: SIZE', 'table: [LINE, ...]' or "
            "'luks: {file: PATH, passphrase_file: PATH}'"
        )
    if len(kinds) > 1:
        first = fields.key(kinds[0]).line
        fields.key(kinds[1]).fail(
            f"a device has one kind; this one is already {_KINDS[kinds[0]]} (line {first})"
        )
    if "allow_overlap" in fields and kinds[0] != "table":
        fields.key("allow_overlap").fail("only for table devices")
    if "inline_crypto" in fields and kinds[0] == "table":
        fields.key("inline_crypto").fail(
            "a table device passes through what the devices below it can do (set it there)"
        )
    if kinds[0] == "luks":
        return _luks_device(name, fields)
    if kinds[0] == "file":
        return _file_device(name, fields)
    if "size" in fields:
        if kinds[0] == "table":
            fields.key("size").fail(
                "only for file devices (a table's size is where its last line ends)"
            )
        fields.key("size").fail("only for file devices (write the size as the value: memory: 64M)")
    if kinds[0] == "table":
        entries = _table_entries(fields.require("table"))
        return _Table(name, entries, fields.opt("allow_overlap", _Item.boolean, False))
    return MemoryDeviceConfig(name, fields.require("memory").size(), _engine(fields))


def _luks_path(item: _Item) -> Path:
    text = item.string()
    if not text or "\0" in text:
        item.fail("expected a file path" + (" without NUL characters" if text else ""))
    return item.src.base / text


def _passphrase_file(path: Path) -> Path:
    """A passphrase file that exists and is private (read again, and checked, at open)."""
    try:
        st = os.lstat(path)
    except OSError as e:
        raise ValueError(f"cannot use {path}: {e.strerror}") from None
    problem = passphrase_file_problem(st)
    if problem:
        raise ValueError(f"{path}: {problem}")
    return path


def _luks_keyslot(item: _Item, header: LuksHeader) -> int:
    number = item.integer()
    openers = ", ".join(
        str(k.number) for k in header.keyslots if k.number in header.digest.keyslots
    )
    if header.keyslot(number) is None:
        item.fail(f"keyslot {number} is not active in {header.path} (active: {openers})")
    if number not in header.digest.keyslots:
        item.fail(f"keyslot {number} of {header.path} does not open the data segment")
    return number


def _luks_device(name: str, fields: _Fields) -> LuksDeviceConfig:
    """`luks: {file: PATH, passphrase_file: PATH, keyslot: N}`: the header is read and checked
    here, so that a file that is not LUKS, or not supported, is an error with a line."""
    for other in ("size", "inline_crypto"):
        if other in fields:
            fields.key(other).fail(
                "not for luks devices (its size is the payload's, and it does its own encryption)"
            )
    luks = fields.require("luks").fields(_LUKS_KEYS)
    file_item = luks.require("file")
    try:
        header = read_header(_luks_path(file_item))
    except LuksError as e:
        file_item.fail(str(e))
    passphrase = luks.require("passphrase_file")
    passphrase_file = passphrase.convert(_passphrase_file, _luks_path(passphrase))
    keyslot = luks.opt("keyslot", lambda item: _luks_keyslot(item, header), None)
    return LuksDeviceConfig(name, header, passphrase_file, keyslot, header.payload_size)


def _luks_keys(devices: Mapping[str, DeviceConfig]) -> dict[str, KeyConfig]:
    """The volume keys of luks devices that have a blk-crypto mode, as keys of the keyring."""
    keys = {}
    for name, device in devices.items():
        if not isinstance(device, LuksDeviceConfig):
            continue
        segment = device.header.segment
        mode = keyring_mode(segment.cipher, device.header.key_size)
        if mode is not None:
            keys[name] = KeyConfig(name, mode, segment.sector_size, 8, KeyLuks(name))
    return keys


def _devices(item: _Item, keys: Mapping[str, KeyConfig]) -> dict[str, DeviceConfig]:
    devices: dict[str, DeviceConfig | _Table] = {}
    for name, key, value in item.pairs():
        if not _DEVICE_NAME.match(name):
            key.fail(
                "invalid device name (letters, digits, '_', '.' and '-'; first a letter or digit)"
            )
        devices[name] = _device(name, value)
        if isinstance(devices[name], LuksDeviceConfig) and name in keys:
            key.fail(
                f"keys.{name} exists too: a luks device's volume key joins the keyring under "
                "the device's name (rename one of them)"
            )
    if not devices:
        item.fail("expected at least one device")
    return _resolve_tables(devices)


def _text(what: str) -> Callable[[str], str]:
    """A check that a string is valid Unicode and at most 4096 bytes in UTF-8."""

    def check(text: str) -> str:
        try:
            length = len(text.encode())
        except UnicodeEncodeError:
            raise ValueError(f"{what} is not valid Unicode (a lone surrogate)") from None
        if length > MAX_NAME_BYTES:
            raise ValueError(f"{what} is {length} bytes in UTF-8, at most {MAX_NAME_BYTES} allowed")
        return text

    return check


def _export(
    name: str,
    fields: _Fields,
    devices: dict[str, DeviceConfig],
    keys: dict[str, KeyConfig],
    has_clients: bool,
) -> ExportConfig:
    device = fields.require("device")
    key = fields.get("key")
    if key is not None and key.string() not in keys:
        key.fail(f"unknown key {_short(key.string())} (keys: {', '.join(keys) or 'none'})")
    if device.string() not in devices:
        known = ", ".join(devices) or "none"
        device.fail(f"unknown device {_short(device.string())} (known: {known})")
    if key is not None:
        misfit = _key_misfit(keys[key.string()], devices[device.string()].size)
        if misfit:
            key.fail(misfit)
    per_client = _encryption(fields, has_clients)
    evict = _evict(fields, keyed=key is not None or per_client)
    describe = _text("description")
    return ExportConfig(
        name=name,
        device=device.string(),
        readonly=fields.opt("readonly", _Item.boolean, False),
        description=fields.opt("description", lambda i: i.convert(describe, i.string()), ""),
        multi_conn=fields.opt("multi_conn", _Item.boolean, True),
        default=fields.opt("default", _Item.boolean, False),
        key=key.string() if key is not None else None,
        per_client_key=per_client,
        evict=evict,
    )


def _encryption(fields: _Fields, has_clients: bool) -> bool:
    """`encryption: per-client`: True; the export then has no `key:` of its own."""
    item = fields.get("encryption")
    if item is None:
        return False
    text = item.string()
    if text != "per-client":
        item.fail(
            f"expected per-client, got {_short(text)} (a fixed key is 'key: NAME'; "
            f"for no key leave both out)"
        )
    if "key" in fields:
        fields.key("key").fail(
            "an export has a fixed key or takes the client's (encryption: per-client), not both"
        )
    if not has_clients:
        item.fail("per-client keys come from client rules: add a clients: section")
    return True


def _evict(fields: _Fields, *, keyed: bool) -> Evict:
    item = fields.get("evict")
    if item is None:
        return Evict.NEVER
    text = item.string()
    try:
        evict = Evict(text)
    except ValueError:
        item.fail(f"expected on-idle or never, got {_short(text)}")
    if not keyed:
        fields.key("evict").fail(
            "the export has no key to evict (key: NAME or encryption: per-client)"
        )
    return evict


def _key_misfit(key: KeyConfig, size: int) -> str | None:
    """Why `key` cannot cover a device of `size` bytes, or None: whole data units, and a DUN
    for each within the key's dun_bytes."""
    unit = key.data_unit_size
    if size % unit:
        return (
            f"key {key.name} has {unit}-byte data units; the device's {size} bytes are not a "
            f"whole number of them"
        )
    if size // unit > 1 << (8 * key.dun_bytes):
        return (
            f"key {key.name} has {key.dun_bytes}-byte DUNs, enough for {1 << (8 * key.dun_bytes)}"
            f" data units; the device has {size // unit}"
        )
    return None


def _exports(
    item: _Item, devices: dict[str, DeviceConfig], keys: dict[str, KeyConfig], has_clients: bool
) -> dict[str, ExportConfig]:
    exports: dict[str, ExportConfig] = {}
    default: tuple[str, int] | None = None
    for name, key, value in item.pairs():
        if not name:
            key.fail("an export name must not be empty (use default: true for the empty name)")
        key.convert(_text("export name"), name)
        fields = value.fields(_EXPORT_KEYS)
        export = exports[name] = _export(name, fields, devices, keys, has_clients)
        if export.default and default:
            again = f"more than one default export (also {_short(default[0])}, line {default[1]})"
            fields.require("default").fail(again)
        if export.default:
            default = (name, fields.require("default").line)
    if not exports:
        item.fail("expected at least one export")
    return exports


# --- clients ---------------------------------------------------------------------------------


def _clients(
    item: _Item | None,
    exports: dict[str, ExportConfig],
    keys: dict[str, KeyConfig],
    devices: dict[str, DeviceConfig],
) -> tuple[ClientRule, ...] | None:
    """`clients:`, a list of rules, first match wins; None when the section is left out."""
    if item is None:
        return None
    if not isinstance(item.node, SequenceNode):
        item.expect("a list of client rules")
    rules = tuple(_rule(i, entry, exports, keys, devices) for i, entry in enumerate(item.items()))
    if not rules:
        item.fail("expected at least one rule (leave clients out to let anyone open any export)")
    return rules


def _rule(
    index: int,
    item: _Item,
    exports: dict[str, ExportConfig],
    keys: dict[str, KeyConfig],
    devices: dict[str, DeviceConfig],
) -> ClientRule:
    fields = item.fields(_RULE_KEYS)
    match = _match(fields.require("match"))
    grants = _grants(fields.require("exports"), exports)
    key = fields.get("key")
    if key is not None and key.string() not in keys:
        key.fail(f"unknown key {_short(key.string())} (keys: {', '.join(keys) or 'none'})")
    per_client = [name for name in grants if exports[name].per_client_key]
    if key is None:
        for name in per_client:
            grants[name][1].fail(
                f"export {_short(name)} takes its key from the client's rule "
                f"(encryption: per-client), and this rule has no key"
            )
    elif not per_client:
        key.fail(
            "none of this rule's exports takes its key from the rule (encryption: per-client); "
            "an export's fixed key is its own key: NAME"
        )
    else:
        for name in per_client:
            misfit = _key_misfit(keys[key.string()], devices[exports[name].device].size)
            if misfit:
                key.fail(f"{misfit} (export {_short(name)})")
    return ClientRule(
        index,
        match,
        {name: readonly for name, (readonly, _) in grants.items()},
        key.string() if key is not None else None,
    )


def _match(item: _Item) -> ClientMatch:
    """`anonymous`, or a mapping whose criteria must all hold."""
    node = item.node
    what = f"anonymous, or a mapping of what to match ({', '.join(_MATCH_KEYS)})"
    if isinstance(node, ScalarNode) and node.tag == _TAG + "str":
        if node.value != "anonymous":
            item.fail(f"expected {what}, got {_short(node.value)}")
        return ClientMatch(anonymous=True)
    if not isinstance(node, MappingNode):
        item.expect(what)
    fields = item.fields(_MATCH_KEYS)
    if not node.value:
        item.fail(f"expected at least one of {', '.join(_MATCH_KEYS)} (or match: anonymous)")
    address = fields.opt("address", _network, None)
    unix = next((name for name in ("unix_uid", "unix_gid") if name in fields), None)
    if address is not None and unix is not None:
        fields.key(unix).fail(
            "address matches TCP clients and unix_uid/unix_gid unix socket clients: no client "
            "has both (write two rules)"
        )
    return ClientMatch(
        tls_subject=fields.opt("tls_subject", _subject, None),
        tls_san=fields.opt("tls_san", _san, None),
        address=address,
        unix_uid=fields.opt("unix_uid", _unix_id, None),
        unix_gid=fields.opt("unix_gid", _unix_id, None),
    )


def _subject(item: _Item) -> str:
    text = item.convert(_text("a certificate subject"), item.string())
    if not text.strip() or "=" not in text:
        item.fail(f'expected a subject such as "CN=alice,O=Example", got {_short(text)}')
    return text


def _san(item: _Item) -> str:
    """TYPE:VALUE, kept in the canonical form matching compares (nbdcrypt.clients)."""
    return item.convert(canonical_san, item.convert(_text("a subjectAltName"), item.string()))


def _network(item: _Item) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    text = item.string()
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        item.fail(f"expected an IP address or network such as 10.0.0.0/8 or ::1: {e}")


def _unix_id(item: _Item) -> int:
    value = item.integer()
    if not 0 <= value < 0xFFFFFFFF:
        item.fail(f"expected a uid or gid from 0 to {0xFFFFFFFF - 1}, got {value}")
    return value


def _grants(item: _Item, exports: dict[str, ExportConfig]) -> dict[str, tuple[bool, _Item]]:
    """`exports: {NAME: rw | ro, ...}` -> name -> (read-only, the value's item)."""
    if not isinstance(item.node, MappingNode):
        item.expect("a mapping of export names to rw or ro, such as {vault: rw, demo: ro}")
    grants: dict[str, tuple[bool, _Item]] = {}
    for name, key, value in item.pairs():
        if name not in exports:
            key.fail(f"unknown export {_short(name)} (exports: {', '.join(exports)})")
        text = value.scalar((_TAG + "str",), "rw or ro")
        if text not in _ACCESS:
            value.fail(f"expected rw (read-write) or ro (read-only), got {_short(text)}")
        if exports[name].readonly and not _ACCESS[text]:
            value.fail(f"export {_short(name)} is readonly: grant it ro")
        grants[name] = (_ACCESS[text], value)
    if not grants:
        item.fail("expected at least one export")
    return grants


def load_config(
    path: Path, *, listen_override: Sequence[str] = (), listen_required: bool = True
) -> Config:
    """Read and check the configuration at path; `listen_override` replaces server.listen.
    Without `listen_required` (socket activation) server.listen may be missing."""
    override = _listen_overrides(listen_override)
    source = path.absolute()
    src = _Source(str(path), source.parent)
    top = _compose(src, _read(src, path)).fields(
        ("server", "keys", "devices", "exports", "clients")
    )
    server = _server(top, override, listen_required)
    keys = _keys(top.get("keys"))
    devices = _devices(top.require("devices"), keys)
    keys = {**keys, **_luks_keys(devices)}
    exports = _exports(top.require("exports"), devices, keys, "clients" in top)
    clients = _clients(top.get("clients"), exports, keys, devices)
    return Config(source, server, devices, exports, keys, clients)
