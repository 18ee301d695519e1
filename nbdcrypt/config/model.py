"""The resolved configuration: plain, validated data the rest of the server is built from.

The loader (loader.py) turns YAML into these values and is the only place that knows YAML;
everything here is already checked (sizes are multiples of 512, names resolve, paths are absolute).
Later sections (dm tables, keys, TLS, client rules) are added as new fields and new device kinds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

from nbdcrypt.blkcrypto.key import CryptoMode
from nbdcrypt.blkcrypto.profile import CryptoCaps
from nbdcrypt.dm.table import TableLine
from nbdcrypt.luks.header import LuksHeader

SECTOR = 512
MAX_PAYLOAD = 32 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """`tcp://HOST:PORT` or `unix:///PATH`."""

    scheme: str  # "tcp" | "unix"
    host: str = ""
    port: int = 0
    path: Path | None = None

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-server and per-connection bounds."""

    max_connections: int = 128
    handshake_timeout: float = 10.0  # seconds from accept to the end of option haggling
    max_inflight_bytes: int = 64 * 1024 * 1024  # per connection: request payloads + pending replies
    shutdown_timeout: float = 10.0  # seconds SIGTERM waits for in-flight requests


DEFAULT_BUSY_POLL = 100e-6  # server/poll.py: worth it up to a VM's wake-up cost, and no more
MAX_BUSY_POLL = 0.01  # longer polls burn a CPU for clients that are not coming back soon


class IoMode(Enum):
    """Where a connection's requests run once its handshake is done (docs/ARCHITECTURE.md)."""

    THREADS = "threads"  # a thread per connection, blocking socket calls, one lock for state
    LOOP = "loop"  # every connection on the one uvloop event loop thread


class TlsMode(Enum):
    """NBD_OPT_STARTTLS policy: refused, offered, or required before any other option."""

    OFF = "off"
    ALLOW = "allow"
    REQUIRE = "require"


class ClientCertificate(Enum):
    """What a TLS client must show: a certificate from the CA, optionally one, or none."""

    REQUIRED = "required"  # no certificate, or one the CA did not sign: the TLS handshake fails
    OPTIONAL = "optional"  # none: TLS completes anonymously; a bad one still fails
    NONE = "none"  # not asked for: every TLS client is anonymous


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """`server.tls`: the mode and where the PEM files are (never their contents)."""

    mode: TlsMode = TlsMode.OFF
    certificate: Path | None = None  # the server's certificate chain, leaf first
    private_key: Path | None = None  # its key, unencrypted, refused if group/world-accessible
    ca: Path | None = None  # the CA certificate(s) client certificates are verified against
    client_certificate: ClientCertificate = ClientCertificate.REQUIRED


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: tuple[ListenAddress, ...]
    limits: Limits = field(default_factory=Limits)
    control: Path | None = None  # the control socket `nbdcrypt ctl` talks to (unix, 0600)
    tls: TlsConfig = field(default_factory=TlsConfig)
    metrics: ListenAddress | None = None  # where Prometheus scrapes GET /metrics (tcp or unix)
    io: IoMode = IoMode.THREADS  # how connections run (read at startup; a reload keeps it)
    busy_poll: float = DEFAULT_BUSY_POLL  # seconds a connection thread polls before sleeping


@dataclass(frozen=True, slots=True)
class InlineCryptoConfig:
    """An inline-encryption engine in front of a device: what it can do and its keyslots."""

    keyslots: int  # 0: no keyslots, the engine takes the raw key with every request
    caps: CryptoCaps


@dataclass(frozen=True, slots=True)
class KeyFile:
    """`source: {file: PATH}`: raw bytes or hex; refused if group- or world-accessible."""

    path: Path
    create: bool = False  # make a random key file (mode 0600) if it is missing

    def describe(self) -> str:
        return f"file {self.path}"


@dataclass(frozen=True, slots=True)
class KeyEnv:
    """`source: {env: VAR}`: hex in an environment variable, removed once read."""

    variable: str

    def describe(self) -> str:
        return f"environment variable {self.variable}"


@dataclass(frozen=True, slots=True)
class KeyCredential:
    """`source: {credential: NAME}`: a systemd credential, $CREDENTIALS_DIRECTORY/NAME."""

    name: str

    def describe(self) -> str:
        return f"systemd credential {self.name}"


@dataclass(frozen=True, slots=True)
class KeyLuks:
    """The volume key of a `luks` device, in the keyring under the device's name."""

    device: str

    def describe(self) -> str:
        return f"volume key of luks device {self.device}"


KeySource = KeyFile | KeyEnv | KeyCredential | KeyLuks


@dataclass(frozen=True, slots=True)
class KeyConfig:
    """A key of the keyring: what it is for and where its bytes come from (never the bytes)."""

    name: str
    mode: CryptoMode
    data_unit_size: int
    dun_bytes: int
    source: KeySource


@dataclass(frozen=True, slots=True)
class FileDeviceConfig:
    """A backing file; created sparse with `size` when missing."""

    name: str
    path: Path
    size: int  # bytes, a multiple of 512
    create: bool  # the file did not exist at load time and will be created
    inline_crypto: InlineCryptoConfig | None = None


@dataclass(frozen=True, slots=True)
class MemoryDeviceConfig:
    """A sparse in-memory device; its contents vanish with the process."""

    name: str
    size: int
    inline_crypto: InlineCryptoConfig | None = None


@dataclass(frozen=True, slots=True)
class TableDeviceConfig:
    """A mapped device built from dmsetup-syntax table lines over other devices of the config."""

    name: str
    lines: tuple[TableLine, ...]  # parsed and checked (nbdcrypt.dm.table)
    size: int  # the end of the last line, in bytes
    allow_overlap: bool = False  # its lines may map regions another table maps too


@dataclass(frozen=True, slots=True)
class LuksDeviceConfig:
    """A LUKS1/LUKS2 image whose payload is served decrypted, as `cryptsetup open` maps it."""

    name: str
    header: LuksHeader  # read and checked at load time; header.path is the image
    passphrase_file: Path  # used whole, as cryptsetup --key-file; must be private (0600)
    keyslot: int | None  # the keyslot to try, or None: every one that opens the data
    size: int  # bytes of the payload

    @property
    def path(self) -> Path:
        return self.header.path


DeviceConfig = FileDeviceConfig | MemoryDeviceConfig | TableDeviceConfig | LuksDeviceConfig


class Evict(Enum):
    """When an export's keys leave the inline engines below it (`evict:`)."""

    NEVER = "never"  # they stay programmed until the keyslot LRU or `ctl evict-key` drops them
    ON_IDLE = "on-idle"  # when the last connection using the key on this export closes


@dataclass(frozen=True, slots=True)
class ExportConfig:
    name: str
    device: str  # a key of Config.devices
    readonly: bool = False
    description: str = ""
    multi_conn: bool = True  # advertised only if the device can honour it
    default: bool = False  # served for the empty export name
    key: str | None = None  # a key of Config.keys every connection's requests carry
    per_client_key: bool = False  # `encryption: per-client`: the key of the client's rule
    evict: Evict = Evict.NEVER  # when the engines below drop its keys


@dataclass(frozen=True, slots=True)
class ClientMatch:
    """Who a client rule is for: every criterion given must hold; `anonymous` is anyone."""

    anonymous: bool = False
    tls_subject: str | None = None  # the verified certificate's subject (RFC 4514), exactly
    tls_san: str | None = None  # one of its subjectAltNames: "DNS:x", "IP:x", "email:x", "URI:x"
    address: IPv4Network | IPv6Network | None = None  # the TCP peer's address is in this network
    unix_uid: int | None = None  # the unix socket peer's uid (SO_PEERCRED)
    unix_gid: int | None = None  # the unix socket peer's primary gid (SO_PEERCRED)


@dataclass(frozen=True, slots=True)
class ClientRule:
    """One entry of `clients:`: who, which exports (name -> read-only?), with which key."""

    index: int  # its position in the list, from 0 (clients[N] in messages and logs)
    match: ClientMatch
    exports: dict[str, bool]  # export name -> granted read-only
    key: str | None = None  # the key ID of its requests on exports with `encryption: per-client`


@dataclass(frozen=True, slots=True)
class Config:
    source: Path  # the YAML file this came from
    server: ServerConfig
    devices: dict[str, DeviceConfig]  # every device after the devices its table names
    exports: dict[str, ExportConfig]
    keys: dict[str, KeyConfig] = field(default_factory=dict)
    clients: tuple[ClientRule, ...] | None = None  # None: no `clients:`, anyone opens anything

    @property
    def default_export(self) -> ExportConfig | None:
        return next((e for e in self.exports.values() if e.default), None)
