"""The running server: builds devices and exports from a Config, listens, and shuts down cleanly.

Shutdown (SIGTERM/SIGINT): stop accepting; every connection refuses new requests with
ESHUTDOWN, finishes what is in flight and closes (after the client's DISC or a short grace);
then every device is flushed to stable storage and closed. Exit status 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import ssl
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field

from nbdcrypt.backends.file import FileDevice
from nbdcrypt.backends.memory import MemoryDevice
from nbdcrypt.blkcrypto.engine import InlineCryptoDevice
from nbdcrypt.blkcrypto.key import CryptoKey
from nbdcrypt.clients import ExportAccess
from nbdcrypt.config.model import (
    ClientRule,
    Config,
    DeviceConfig,
    Evict,
    FileDeviceConfig,
    KeyLuks,
    Limits,
    ListenAddress,
    LuksDeviceConfig,
    MemoryDeviceConfig,
    TableDeviceConfig,
    TlsConfig,
    TlsMode,
)
from nbdcrypt.control.commands import Controller, resume_suspended
from nbdcrypt.control.server import ControlServer
from nbdcrypt.device import Device
from nbdcrypt.dm.device import MappedDevice
from nbdcrypt.dm.table import Table
from nbdcrypt.export import Export
from nbdcrypt.keyring import load_key, wipe_keys
from nbdcrypt.keyuse import KeyUsers
from nbdcrypt.luks.device import LuksDevice, open_luks
from nbdcrypt.server.connection import Connection
from nbdcrypt.server.systemd import ActivatedSocket, Notifier
from nbdcrypt.tls import server_context

log = logging.getLogger("nbdcrypt.server")


@dataclass
class ServerState:
    """What every connection shares: the exports, the limits, and who is connected."""

    exports: dict[str, Export]
    default_export: str | None
    limits: Limits
    connections: set[Connection] = field(default_factory=set)
    serial: int = 0  # connections accepted so far, to tell unix-socket peers apart in logs
    tls: ssl.SSLContext | None = None  # NBD_OPT_STARTTLS upgrades with it; None: TLS is off
    tls_required: bool = False  # no option but STARTTLS and ABORT before TLS
    rules: tuple[ClientRule, ...] | None = None  # `clients:`; None: anyone opens any export
    keys: dict[str, CryptoKey] = field(default_factory=dict)  # the keyring, by key ID
    key_users: KeyUsers = field(default_factory=KeyUsers)  # who uses which key (eviction)
    access: ExportAccess = field(init=False)  # the exports as each client may see them

    def __post_init__(self) -> None:
        self.access = ExportAccess(self.exports, self.default_export, self.rules, self.keys)

    def next_serial(self) -> int:
        self.serial += 1
        return self.serial

    def find_export(self, name: str) -> Export | None:
        if name == "" and self.default_export is not None:
            name = self.default_export
        return self.exports.get(name)

    def register(self, conn: Connection) -> bool:
        """Track a new connection; False if it is over the connection limit."""
        self.connections.add(conn)
        return len(self.connections) <= self.limits.max_connections

    def unregister(self, conn: Connection) -> None:
        self.connections.discard(conn)


def open_device(cfg: DeviceConfig, opened: dict[str, Device]) -> Device:
    """Open one configured device; `opened` holds the devices it may stand on."""
    if isinstance(cfg, FileDeviceConfig | MemoryDeviceConfig):
        raw: Device = (
            FileDevice(cfg.name, cfg.path, cfg.size, create=cfg.create)
            if isinstance(cfg, FileDeviceConfig)
            else MemoryDevice(cfg.name, cfg.size)
        )
        engine = cfg.inline_crypto
        return raw if engine is None else InlineCryptoDevice(raw, engine.caps, engine.keyslots)
    if isinstance(cfg, TableDeviceConfig):
        return MappedDevice(cfg.name, Table.build(cfg.lines, opened))
    if isinstance(cfg, LuksDeviceConfig):
        return open_luks(cfg.name, cfg.header, cfg.passphrase_file, cfg.keyslot)
    raise TypeError(f"unknown device kind {type(cfg).__name__}")


def build_exports(
    config: Config, devices: dict[str, Device], keys: dict[str, CryptoKey]
) -> dict[str, Export]:
    return {
        name: Export(
            name=name,
            device=devices[e.device],
            readonly=e.readonly,
            description=e.description,
            multi_conn=e.multi_conn,
            key=keys[e.key] if e.key is not None else None,
            per_client_key=e.per_client_key,
            evict_on_idle=e.evict is Evict.ON_IDLE,
        )
        for name, e in config.exports.items()
    }


class Server:
    """Owns the devices, listeners and connections of one configuration."""

    def __init__(
        self,
        config: Config,
        *,
        activated: Sequence[ActivatedSocket] = (),
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self.activated = list(activated)  # sockets from systemd: served instead of server.listen
        self.notifier = notifier if notifier is not None else Notifier({})
        self.devices: dict[str, Device] = {}
        self._listeners: list[asyncio.Server] = []
        self._unix_paths: list[str] = []
        self._stop = asyncio.Event()
        self.control: ControlServer | None = None
        self.flush_failed = False  # the final flush failed: writes may not be durable
        self.keys = {
            name: load_key(key_cfg)
            for name, key_cfg in config.keys.items()
            if not isinstance(key_cfg.source, KeyLuks)  # added as its luks device opens
        }
        tls_context = self._tls_context(config.server.tls)
        try:
            for name, dev_cfg in config.devices.items():
                self.devices[name] = device = open_device(dev_cfg, self.devices)
                if isinstance(device, LuksDevice) and device.volume_key is not None:
                    self.keys[name] = device.volume_key
        except BaseException:
            self.close_devices()
            raise
        default = config.default_export
        self.state = ServerState(
            exports=build_exports(config, self.devices, self.keys),
            default_export=default.name if default else None,
            limits=config.server.limits,
            tls=tls_context,
            tls_required=config.server.tls.mode is TlsMode.REQUIRE,
            rules=config.clients,
            keys=self.keys,
        )

    @staticmethod
    def _tls_context(cfg: TlsConfig) -> ssl.SSLContext | None:
        if cfg.mode is TlsMode.OFF:
            return None
        context, found = server_context(cfg)
        log.info(
            "TLS %s: certificate %s (expires %s), client certificates %s",
            cfg.mode.value,
            found.subject,
            f"{found.not_after:%Y-%m-%d}",
            cfg.client_certificate.value,
        )
        return context

    async def start(self) -> None:
        if self.config.server.control is not None:  # first: ready for ctl once clients can come
            controller = Controller(self.devices, self.keys, self.state.key_users)
            control = ControlServer(controller, self.config.server.control)
            await control.start()
            self.control = control
        if self.activated:
            if self.config.server.listen:
                log.info("socket activation: serving the inherited sockets, not server.listen")
            for inherited in self.activated:
                self._listeners.append(await self._adopt(inherited))
                log.info("listening on %s (socket activation: %s)", inherited.label, inherited.name)
            return
        for address in self.config.server.listen:
            self._listeners.append(await self._listen(address))
            log.info("listening on %s", address)

    async def _adopt(self, inherited: ActivatedSocket) -> asyncio.Server:
        """Serve on a listening socket systemd made (it stays systemd's: never unlinked here)."""
        loop = asyncio.get_running_loop()
        label = inherited.label

        def factory() -> Connection:
            return Connection(self.state, label)

        if inherited.sock.family == socket.AF_UNIX:
            return await loop.create_unix_server(factory, sock=inherited.sock)
        return await loop.create_server(factory, sock=inherited.sock)

    async def _listen(self, address: ListenAddress) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        label = str(address)
        backlog = min(self.state.limits.max_connections, 1024)

        def factory() -> Connection:
            return Connection(self.state, label)

        if address.scheme == "unix":
            assert address.path is not None
            path = str(address.path)
            _remove_stale_socket(path)
            address.path.parent.mkdir(parents=True, exist_ok=True)
            server = await loop.create_unix_server(factory, path, backlog=backlog)
            self._unix_paths.append(path)
            return server
        return await loop.create_server(
            factory, address.host or None, address.port, backlog=backlog, reuse_address=True
        )

    @property
    def addresses(self) -> list[str]:
        """Where the server listens, with real port numbers (for port 0)."""
        found = []
        for server in self._listeners:
            for sock in server.sockets:
                name = sock.getsockname()
                if isinstance(name, tuple):
                    found.append(f"tcp://{name[0]}:{name[1]}")
                else:
                    found.append(f"unix://{name}")
        return found

    def request_stop(self) -> None:
        self._stop.set()

    async def serve_until_stopped(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        await self.start()
        log.info("ready: %d export(s): %s", len(self.state.exports), ", ".join(self.state.exports))
        self.notifier.send("READY=1", f"STATUS=serving {len(self.state.exports)} export(s)")
        watchdog = self._start_watchdog(loop)
        await self._stop.wait()
        if watchdog is not None:
            watchdog.cancel()
        self.notifier.send("STOPPING=1", "STATUS=shutting down")
        await self.shutdown()
        for sig in (signal.SIGTERM, signal.SIGINT):
            # Already stopping: another signal while the process exits must not kill it and
            # turn a clean stop into a death by signal (closing the loop would restore SIG_DFL).
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)

    def _start_watchdog(self, loop: asyncio.AbstractEventLoop) -> asyncio.Task[None] | None:
        """WATCHDOG=1 at half the unit's WatchdogSec, from the event loop: a stuck loop stops
        the pings and systemd restarts the service."""
        interval = self.notifier.watchdog_interval
        if interval is None or not self.notifier.enabled:
            return None

        async def ping() -> None:
            while self.notifier.send("WATCHDOG=1"):
                await asyncio.sleep(interval)

        return loop.create_task(ping())

    async def shutdown(self) -> None:
        log.info("shutting down: %d connection(s) open", len(self.state.connections))
        for server in self._listeners:
            server.close()
        for path in self._unix_paths:
            _remove_stale_socket(path)
        if self.control is not None:
            await self.control.close()
        resume_suspended(self.devices)  # I/O held by a suspended device finishes before the end
        conns = list(self.state.connections)
        for conn in conns:
            conn.begin_shutdown()
        if conns:
            await asyncio.wait(
                [asyncio.ensure_future(c.wait_closed()) for c in conns],
                timeout=self.state.limits.shutdown_timeout,
            )
            for conn in list(self.state.connections):
                log.warning("%s: still busy at the shutdown timeout, closing", conn.peer)
                if conn.transport is not None:
                    conn.transport.abort()
        await self._flush_devices()
        self.close_devices()
        wipe_keys(self.keys.values())
        log.info("stopped")

    async def _flush_devices(self) -> None:
        for name, device in self.devices.items():
            try:
                await device.flush()
            except OSError as exc:
                log.error("device %s: final flush failed: %s", name, exc)
                self.flush_failed = True

    def close_devices(self) -> None:
        for device in self.devices.values():
            device.close()


def _remove_stale_socket(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
