"""The running server: builds devices and exports from a Config, listens, and shuts down cleanly.

Shutdown (SIGTERM/SIGINT): stop accepting; every connection refuses new requests with
ESHUTDOWN, finishes what is in flight and closes (after the client's DISC or a short grace);
then every device is flushed to stable storage and closed. Exit status 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import signal
import socket
import ssl
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import CollectorRegistry

from nbdcrypt.backends.file import BackingFileError, FileDevice
from nbdcrypt.backends.memory import MemoryDevice
from nbdcrypt.blkcrypto.engine import InlineCryptoDevice
from nbdcrypt.blkcrypto.key import CryptoKey
from nbdcrypt.clients import ExportAccess
from nbdcrypt.config.loader import ConfigError
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
from nbdcrypt.control.commands import ControlError, Controller, resume_suspended
from nbdcrypt.control.server import ControlServer
from nbdcrypt.crypto import libcrypto
from nbdcrypt.device import Device
from nbdcrypt.dm.device import MappedDevice
from nbdcrypt.dm.table import Table, TableError
from nbdcrypt.export import Export
from nbdcrypt.keyring import KeyFileError, load_key, wipe_keys
from nbdcrypt.keyuse import KeyUsers
from nbdcrypt.luks import LuksError
from nbdcrypt.luks.device import LuksDevice, open_luks
from nbdcrypt.metrics.collector import ServerCollector
from nbdcrypt.metrics.counters import Counters
from nbdcrypt.metrics.endpoint import MetricsEndpoint
from nbdcrypt.server import poll
from nbdcrypt.server.connection import Connection
from nbdcrypt.server.lockedloop import LockedLoop
from nbdcrypt.server.reload import ReloadError
from nbdcrypt.server.reload import plan as reload_plan
from nbdcrypt.server.systemd import ActivatedSocket, Notifier
from nbdcrypt.tls import TlsFileError, server_context

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
    counters: Counters = field(default_factory=Counters)  # the metrics' counters, by export name
    busy_poll: float = 0.0  # seconds a connection thread may poll for its next request
    access: ExportAccess = field(init=False)  # the exports as each client may see them

    def __post_init__(self) -> None:
        self.access = ExportAccess(self.exports, self.default_export, self.rules, self.keys)

    def replace(
        self,
        *,
        exports: dict[str, Export],
        default_export: str | None,
        limits: Limits,
        tls: ssl.SSLContext | None,
        tls_required: bool,
        rules: tuple[ClientRule, ...] | None,
    ) -> None:
        """A reload: what new connections find from now on (open ones keep what they have)."""
        self.exports, self.default_export, self.limits = exports, default_export, limits
        self.tls, self.tls_required, self.rules = tls, tls_required, rules
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


def _load_keys(config: Config, current: dict[str, CryptoKey]) -> dict[str, CryptoKey]:
    """The keyring of `config` (LUKS volume keys come with their devices). A key whose
    definition and bytes did not change stays the same object, so inline engines that hold it
    keep it programmed across a reload."""
    keys: dict[str, CryptoKey] = {}
    for name, cfg in config.keys.items():
        if isinstance(cfg.source, KeyLuks):
            if name in current and name in config.devices:
                keys[name] = current[name]  # its device stays open (or a reload refuses)
            continue
        key = load_key(cfg)
        old = current.get(name)
        if old is not None and _same_key(old, key):
            key.wipe()
            key = old
        keys[name] = key
    return keys


def _same_key(a: CryptoKey, b: CryptoKey) -> bool:
    return (a.mode, a.data_unit_size, a.dun_bytes) == (
        b.mode,
        b.data_unit_size,
        b.dun_bytes,
    ) and hmac.compare_digest(a.raw, b.raw)


def _open_devices(
    which: Mapping[str, DeviceConfig],
    existing: Mapping[str, Device],
    keys: dict[str, CryptoKey],
) -> dict[str, Device]:
    """Open the devices `which` names (in config order) over `existing`; LUKS volume keys join
    `keys`. On an error the ones opened here are closed again."""
    opened: dict[str, Device] = {}
    try:
        for name, cfg in which.items():
            opened[name] = device = open_device(cfg, {**existing, **opened})
            if isinstance(device, LuksDevice) and device.volume_key is not None:
                keys[name] = device.volume_key
    except BaseException:
        for device in opened.values():
            device.close()
        raise
    return opened


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
        reread: Callable[[], Config] | None = None,
    ) -> None:
        self.config = config
        self.reread = reread  # reads the config file again, as at startup (SIGHUP, ctl reload)
        self._reloading = asyncio.Lock()
        self._retired: list[Device] = []  # removed by a reload, closed once no client has them
        self._retired_keys: list[CryptoKey] = []  # replaced by a reload, wiped at shutdown
        self.activated = list(activated)  # sockets from systemd: served instead of server.listen
        self.notifier = notifier if notifier is not None else Notifier({})
        self.devices: dict[str, Device] = {}
        self._listeners: dict[str, asyncio.Server] = {}  # by the listen address's text
        self._unix_paths: list[str] = []
        self._stop = asyncio.Event()
        self.control: ControlServer | None = None
        self.flush_failed = False  # the final flush failed: writes may not be durable
        self.keys = _load_keys(config, {})
        tls_context = self._tls_context(config.server.tls)
        try:
            self.devices.update(_open_devices(config.devices, self.devices, self.keys))
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
            busy_poll=config.server.busy_poll,
        )
        self.controller = Controller(
            self.devices,
            self.keys,
            self.state.key_users,
            self._reload_for_ctl if reread else None,
            self._export_keys,
        )
        self.state.counters.configure(self.state.exports)
        self.metrics_registry = self._metrics_registry()
        self.metrics: MetricsEndpoint | None = None  # serving server.metrics once started

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

    def _export_keys(self) -> list[str]:
        """`ctl status`: per export, each key its connections may carry, inline or fallback."""
        state, lines = self.state, []
        for name, export in state.exports.items():
            keys = [export.key] if export.key is not None else []
            if export.per_client_key:
                keys += [
                    state.keys[rule.key]
                    for rule in state.rules or ()
                    if rule.key is not None and name in rule.exports and rule.key in state.keys
                ]
            for key in dict.fromkeys(keys):
                inline = export.device.crypto_caps.supports(key)
                path = "inline" if inline else "blk-crypto fallback (software, at the export)"
                lines.append(
                    f"export {name}: key {key.key_id} ({key.mode.value}, "
                    f"{key.data_unit_size}-byte data units): {path}"
                )
        return lines

    def _metrics_registry(self) -> CollectorRegistry:
        """This server's own registry (never prometheus-client's global one): its counters,
        devices and connections, and the process's CPU, memory and file descriptors."""
        registry = CollectorRegistry()
        registry.register(
            ServerCollector(
                self.state.counters,
                devices=self.devices.values,  # the same dict across reloads
                connections=lambda: self.state.connections,
            )
        )
        ProcessCollector(registry=registry)
        return registry

    async def start(self) -> None:
        if self.config.server.control is not None:  # first: ready for ctl once clients can come
            control = ControlServer(self.controller, self.config.server.control)
            await control.start()
            self.control = control
        if self.config.server.metrics is not None:
            metrics = MetricsEndpoint(self.metrics_registry, self.config.server.metrics)
            await metrics.start()
            self.metrics = metrics
        if self.activated:
            if self.config.server.listen:
                log.info("socket activation: serving the inherited sockets, not server.listen")
            for inherited in self.activated:
                self._listeners[inherited.label] = await self._adopt(inherited)
                log.info("listening on %s (socket activation: %s)", inherited.label, inherited.name)
            return
        for address in self.config.server.listen:
            self._listeners[str(address)] = await self._listen(address)
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
        for server in self._listeners.values():
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
        if self.reread is not None:
            loop.add_signal_handler(signal.SIGHUP, self._reload_on_signal)
        await self.start()
        log.info("ready: %d export(s): %s", len(self.state.exports), ", ".join(self.state.exports))
        threads = isinstance(loop, LockedLoop)  # io: threads, as the command line runs it
        log.info("connections run %s", "on threads" if threads else "on the event loop")
        if threads and self.config.server.busy_poll and not poll.available():
            log.warning("busy polling: no C module built (nbdcrypt/server/_spin.c); it is off")
        if not libcrypto.native():
            log.warning("ciphers: no C module built; encryption runs the slower Python paths")
        self.notifier.send("READY=1", f"STATUS=serving {len(self.state.exports)} export(s)")
        watchdog = self._start_watchdog(loop)
        await self._stop.wait()
        if watchdog is not None:
            watchdog.cancel()
        if self.reread is not None:
            loop.remove_signal_handler(signal.SIGHUP)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a late SIGHUP must not kill the exit
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
        for server in self._listeners.values():
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
        wipe_keys([*self.keys.values(), *self._retired_keys])
        if self.metrics is not None:  # last: scrapes see the connections drain
            await self.metrics.close()
        log.info("stopped")

    async def _flush_devices(self) -> None:
        for name, device in [*self.devices.items(), *((d.name, d) for d in self._retired)]:
            try:
                await device.flush()
            except OSError as exc:
                log.error("device %s: final flush failed: %s", name, exc)
                self.flush_failed = True

    def close_devices(self) -> None:
        for device in [*self.devices.values(), *self._retired]:
            device.close()
        self._retired.clear()

    # Reload -----------------------------------------------------------------------------------

    def _reload_on_signal(self) -> None:
        async def run() -> None:
            with contextlib.suppress(ReloadError):  # logged; the running configuration stays
                await self.reload()

        asyncio.get_running_loop().create_task(run())

    async def _reload_for_ctl(self) -> str:
        try:
            return await self.reload()
        except ReloadError as exc:
            raise ControlError(f"reload refused, the running configuration stays: {exc}") from None

    async def reload(self) -> str:
        """Read the config file again and apply it; ReloadError (logged) leaves all as it was.

        New exports appear; removed ones refuse new clients while open connections go on with
        the export they opened; changed tables go through load -> suspend -> resume with the
        capability check; keys, client rules, limits, TLS and listen addresses are replaced
        for new connections. See server/reload.py for what needs a restart.
        """
        assert self.reread is not None
        async with self._reloading:
            log.info("reloading %s", self.config.source)
            usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            self.notifier.send("RELOADING=1", f"MONOTONIC_USEC={usec}")
            try:
                summary = await self._reload()
            except ReloadError as exc:
                log.error("reload refused, the running configuration stays: %s", exc)
                raise
            finally:
                self.notifier.send("READY=1", f"STATUS=serving {len(self.state.exports)} export(s)")
            log.info("reloaded %s: %s", self.config.source, summary)
            return f"reloaded {self.config.source}: {summary}"

    async def _reload(self) -> str:
        assert self.reread is not None
        old = self.config
        try:
            new = self.reread()
        except (ConfigError, OSError, ValueError) as exc:  # ConfigError names file:line
            raise ReloadError(str(exc)) from None
        change = reload_plan(old, new, socket_activated=bool(self.activated))
        try:
            keys = _load_keys(new, self.keys)
            tls = self._tls_context(new.server.tls)
        except (*_RELOAD_ERRORS, KeyFileError, TlsFileError) as exc:
            raise ReloadError(str(exc)) from None
        added = {name: new.devices[name] for name in change.added}
        listeners: dict[str, asyncio.Server] = {}
        staged: list[MappedDevice] = []
        opened: dict[str, Device] = {}
        metrics: MetricsEndpoint | None = None  # a new server.metrics address, listening
        try:
            opened = _open_devices(added, self.devices, keys)
            staged = self._stage_tables(new, change.retabled, {**self.devices, **opened})
            for address in change.listen_added:
                listeners[str(address)] = await self._listen(address)
            metrics = await self._metrics_moved(new)
        except (*_RELOAD_ERRORS, BackingFileError, LuksError) as exc:  # a device, table, address
            for server in listeners.values():
                server.close()
            for dev in staged:
                dev.clear()
            for device in opened.values():
                device.close()
            raise ReloadError(str(exc)) from None
        # Nothing below refuses: the new configuration takes over.
        self.devices.update(opened)
        for dev in staged:
            await self.controller.resume(dev.name)
        self._retire_devices(change.removed)
        self._replace_keys(keys)
        self._replace_listeners(listeners, change.listen_removed)
        if new.server.metrics != old.server.metrics:
            if self.metrics is not None:
                await self.metrics.close()
            self.metrics = metrics
        self.config = new
        default = new.default_export
        self.state.replace(
            exports=build_exports(new, self.devices, self.keys),
            default_export=default.name if default else None,
            limits=new.server.limits,
            tls=tls,
            tls_required=new.server.tls.mode is TlsMode.REQUIRE,
            rules=new.clients,
        )
        self.state.busy_poll = new.server.busy_poll  # for connections opened from now on
        self.state.counters.configure(self.state.exports)  # counters stay, keyed by name
        return change.summary(old, new)

    async def _metrics_moved(self, new: Config) -> MetricsEndpoint | None:
        """A reload that changes server.metrics: the new endpoint, listening (the old one
        closes once the reload cannot fail any more); None if it is unchanged or removed."""
        address = new.server.metrics
        if address is None or address == self.config.server.metrics:
            return None
        metrics = MetricsEndpoint(self.metrics_registry, address)
        await metrics.start()
        return metrics

    def _stage_tables(
        self, new: Config, names: Sequence[str], devices: dict[str, Device]
    ) -> list[MappedDevice]:
        """Load each changed table as its device's inactive table (the capability check runs
        here); all or none: a failure clears the ones already staged."""
        staged: list[MappedDevice] = []
        try:
            for name in names:
                cfg, dev = new.devices[name], self.devices[name]
                assert isinstance(cfg, TableDeviceConfig) and isinstance(dev, MappedDevice)
                dev.load(Table.build(cfg.lines, devices))
                staged.append(dev)
                if dev.inactive is not None and dev.inactive.size < dev.size and dev.openers:
                    raise TableError(
                        f"device {name}: the new table is smaller than the live one and "
                        f"{dev.openers} client(s) have it open"
                    )
        except BaseException:
            for dev in staged:
                dev.clear()
            raise
        return staged

    def _retire_devices(self, names: Sequence[str]) -> None:
        """Devices gone from the config: closed now if nobody has them open, else later."""
        for name in names:
            self._retired.append(self.devices.pop(name))
        self._close_idle_retired()

    def _close_idle_retired(self) -> None:
        users = {d for dev in self.devices.values() if isinstance(dev, MappedDevice)
                 for d in dev.lower}  # fmt: skip
        still = []
        for device in self._retired:
            if device.openers or device in users:
                still.append(device)
            else:
                device.close()
                log.info("device %s closed (removed from the config)", device.name)
        self._retired = still

    def _replace_keys(self, keys: dict[str, CryptoKey]) -> None:
        """The keyring becomes `keys`; keys no longer in it are wiped at shutdown (open
        connections may still use them until they close)."""
        kept = {id(k) for k in keys.values()}
        self._retired_keys += [k for k in self.keys.values() if id(k) not in kept]
        self.keys.clear()
        self.keys.update(keys)  # the same dict the controller and the state hold

    def _replace_listeners(
        self, added: dict[str, asyncio.Server], removed: Sequence[ListenAddress]
    ) -> None:
        for address in removed:
            server = self._listeners.pop(str(address), None)
            if server is not None:
                server.close()
                if address.path is not None:
                    _remove_stale_socket(str(address.path))
                    self._unix_paths = [p for p in self._unix_paths if p != str(address.path)]
                log.info("stopped listening on %s", address)
        for label, server in added.items():
            self._listeners[label] = server
            log.info("listening on %s", label)


_RELOAD_ERRORS = (OSError, ValueError)  # and each step's own error types, named where caught


def _remove_stale_socket(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
