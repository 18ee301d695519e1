"""What the control commands do to a running server's devices, as dmsetup does it to dm devices.

`Controller.execute` takes a checked request and returns the text `nbdcrypt ctl` prints, or
raises ControlError with the one line it prints instead. No sockets here.

`load` checks a new table against the devices that run now, before building anything: every
device it names exists, none is the device itself or has it below (a loop), every region lies
within its device, and no other table maps a region of the device past the new table's end.
The same end check runs again at `resume`, since other tables may have been loaded since.

Suspend and resume of one device are serialized (the kernel's per-device suspend lock): a
`resume` waits for a `suspend` that is still draining. A `resume` with an inactive table on a
device that is not suspended suspends it first, so the swap never happens under in-flight I/O.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence

from nbdcrypt.backends.file import FileDevice
from nbdcrypt.backends.memory import MemoryDevice
from nbdcrypt.blkcrypto.engine import InlineCryptoDevice
from nbdcrypt.blkcrypto.key import CryptoKey
from nbdcrypt.control.protocol import ControlRequest
from nbdcrypt.device import Device
from nbdcrypt.dm.device import MappedDevice
from nbdcrypt.dm.table import Table, TableError, TableLine, parse_table, table_size
from nbdcrypt.dm.target import SECTOR, DeviceRef
from nbdcrypt.keyuse import KeyUsers, evict_everywhere

log = logging.getLogger("nbdcrypt.control")


_LinesOf = Callable[[MappedDevice], Sequence[str]]


class ControlError(Exception):
    """A command that failed; the message is the reply's error (one line)."""


def device_kind(device: Device) -> str:
    if isinstance(device, InlineCryptoDevice):
        return device_kind(device.inner) + " with inline crypto"
    if isinstance(device, MappedDevice):
        return "table"
    if isinstance(device, FileDevice):
        return "file"
    if isinstance(device, MemoryDevice):
        return "memory"
    return type(device).__name__


def crypto_status(dev: Device) -> str:
    """One line: the device's inline-crypto profile and where it comes from."""
    profile = dev.crypto_caps.describe()
    if isinstance(dev, InlineCryptoDevice):
        slots = (
            "no keyslots (raw keys)"
            if dev.keyslots is None
            else f"{dev.keyslots.num_slots} keyslots"
        )
        return f"{profile}; {slots}"
    if isinstance(dev, MappedDevice):
        return f"{profile} (passthrough)" if dev.crypto_caps else profile
    return profile


def _crypto_rows(dev: Device) -> list[tuple[str, str]]:
    """Inline-crypto profile, keyslot counters and fallback bytes of a device."""
    kind = "passthrough" if isinstance(dev, MappedDevice) else "engine"
    rows = [("Inline crypto", f"{dev.crypto_caps.describe()} ({kind})")]
    if isinstance(dev, InlineCryptoDevice):
        if dev.keyslots is None:
            rows.append(("Keyslots", f"none (raw keys), {dev.requests} requests"))
        else:
            s = dev.keyslots.stats
            rows.append(
                (
                    "Keyslots",
                    f"{dev.keyslots.num_slots}: {s.hits} hits, {s.programs} programs, "
                    f"{s.evictions} evictions, {s.waits} waits ({s.wait_seconds:.3f} s)",
                )
            )
    rows.append(("Fallback bytes", str(dev.fallback_bytes)))
    return rows


def _sectors(size: int) -> str:
    return f"{size // SECTOR} sectors ({size} bytes)"


class Controller:
    """Carries out control requests on `devices` (the server's own dict, by name)."""

    def __init__(
        self,
        devices: Mapping[str, Device],
        keys: Mapping[str, CryptoKey] | None = None,
        key_users: KeyUsers | None = None,
        reload: Callable[[], Awaitable[str]] | None = None,
        export_keys: Callable[[], list[str]] | None = None,
    ) -> None:
        self.devices = devices
        self.export_keys = export_keys  # `ctl status`: each export's keys, inline or fallback
        self.reload = reload  # the server's config reload, for `ctl reload`
        self.keys = keys if keys is not None else {}  # the keyring, by key ID
        self.key_users = key_users if key_users is not None else KeyUsers()
        self._locks: dict[str, asyncio.Lock] = {}

    async def execute(self, req: ControlRequest) -> str:
        if req.command == "ls":
            return self.ls()
        if req.command == "status":
            return self.status(req.device)
        if req.command == "table":
            return self._each_mapped(req.device, lambda d: _table_lines(d, req.inactive))
        if req.command == "info":
            return self.info(req.device)
        if req.command == "reload":
            if self.reload is None:
                raise ControlError("reload: this server cannot reload its configuration")
            return await self.reload()
        if req.command == "evict-key":
            assert req.key is not None  # the protocol requires it
            return await self.evict_key(req.key)
        assert req.device is not None  # the protocol requires it for the rest
        if req.command == "load":
            assert req.table is not None
            return self.load(req.device, req.table)
        if req.command == "suspend":
            return await self.suspend(req.device)
        if req.command == "resume":
            return await self.resume(req.device)
        if req.command == "clear":
            return self.clear(req.device)
        raise ControlError(f"unknown command {req.command!r}")

    # Looking ---------------------------------------------------------------------------------

    def ls(self) -> str:
        width = max((len(name) for name in self.devices), default=0)
        return "\n".join(
            f"{name:<{width}}  {device_kind(dev)}" for name, dev in self.devices.items()
        )

    def status(self, name: str | None) -> str:
        """`dmsetup status` lines of the table devices, then every device's inline-crypto
        profile and, for the exports with keys, whether each key is inline or the fallback.
        With a table device: its status lines only; with another device: its profile."""
        if name is not None:  # a table device: its dmsetup status lines only, as scripts expect
            dev = self.device(name)
            if isinstance(dev, MappedDevice):
                return "\n".join(dev.status())
            return f"crypto: {crypto_status(dev)}"
        tables = self._each_mapped(None, MappedDevice.status)
        crypto = [f"{n}: crypto: {crypto_status(d)}" for n, d in self.devices.items()]
        exports = self.export_keys() if self.export_keys is not None else []
        return "\n".join(line for line in (tables, *crypto, *exports) if line)

    def info(self, name: str | None) -> str:
        names = [name] if name is not None else list(self.devices)
        return "\n\n".join(self._info_one(self.device(n)) for n in names)

    def _info_one(self, dev: Device) -> str:
        if isinstance(dev, MappedDevice):
            state = "SUSPENDED" if dev.suspended else "ACTIVE"
            tables = "LIVE & INACTIVE" if dev.inactive is not None else "LIVE"
            below = ", ".join(d.name for d in dev.lower) or "none"
        else:
            state, tables, below = "ACTIVE", "none", "none"
        above = ", ".join(self._holders(dev.name)) or "none"
        rows = [
            ("Name", dev.name),
            ("Kind", device_kind(dev)),
            ("State", state),
            ("Tables present", tables),
            ("Open count", str(dev.openers)),
            ("Size", _sectors(dev.size)),
            ("Devices below", below),
            ("Used by", above),
            *_crypto_rows(dev),
        ]
        return "\n".join(f"{key + ':':<18}{value}" for key, value in rows)

    def _each_mapped(self, name: str | None, lines: _LinesOf) -> str:
        if name is not None:
            return "\n".join(lines(self.mapped(name)))
        out = []
        for dev in self.devices.values():
            if isinstance(dev, MappedDevice):
                out += [f"{dev.name}: {line}" for line in lines(dev)]
        return "\n".join(out)

    # Changing --------------------------------------------------------------------------------

    def load(self, name: str, text: Sequence[str]) -> str:
        dev = self.mapped(name)
        try:
            lines = parse_table(text)
        except TableError as exc:
            raise ControlError(f"load {name}: {exc}") from None
        self._check_refs(name, lines, _line_numbers(text))
        size = table_size(lines)
        if size < dev.size and dev.openers:
            raise ControlError(
                f"load {name}: the new table has {size // SECTOR} sectors, fewer than the live "
                f"table's {dev.size // SECTOR}, and {dev.openers} client(s) have {name} open; "
                f"shrink it after they disconnect"
            )
        self._check_holders(name, size, f"load {name}")
        try:
            dev.load(Table.build(lines, self.devices))
        except (ValueError, OSError) as exc:  # TableError, TargetError, a target's own
            raise ControlError(f"load {name}: {exc}") from None
        log.info("loaded an inactive table into %s (%s)", name, _sectors(size))
        return ""

    async def suspend(self, name: str) -> str:
        dev = self.mapped(name)
        async with self._lock(name):
            await dev.suspend()
        log.info("suspended %s", name)
        return ""

    async def resume(self, name: str) -> str:
        dev = self.mapped(name)
        async with self._lock(name):
            if dev.inactive is not None and not dev.suspended:
                self._check_swap(dev)  # refuse before holding any I/O
                await dev.suspend()  # as dm does: never swap under in-flight I/O
            if dev.inactive is not None:
                self._check_swap(dev)  # again: a load may have come while it drained
            swapped = dev.resume()
        if swapped:
            log.info("resumed %s with its new table (%s)", name, _sectors(dev.size))
            return f"{name}: resumed with the new table, {_sectors(dev.size)}"
        log.info("resumed %s", name)
        return f"{name}: resumed, no inactive table was loaded (the live table stays)"

    def _check_swap(self, dev: MappedDevice) -> None:
        """The inactive table may replace the live one now (openers, other tables' regions)."""
        assert dev.inactive is not None
        size, name = dev.inactive.size, dev.name
        stays = "stays suspended" if dev.suspended else "keeps its live table"
        if size < dev.size and dev.openers:
            raise ControlError(
                f"resume {name}: cannot shrink from {dev.size // SECTOR} to {size // SECTOR} "
                f"sectors while {dev.openers} client(s) have it open; {name} {stays} (clear "
                f"drops the inactive table)"
            )
        self._check_holders(name, size, f"resume {name}", f"; {name} {stays}")

    async def evict_key(self, key_id: str) -> str:
        """Evict a key from every inline engine; EBUSY (nothing evicted) while it is in use."""
        key = self.keys.get(key_id)
        if key is None:
            known = ", ".join(self.keys) or "none"
            raise ControlError(f"evict-key: unknown key {key_id[:100]!r} (keys: {known})")
        try:
            held = await evict_everywhere(key, list(self.devices.values()), self.key_users)
        except OSError as exc:
            raise ControlError(
                f"evict-key {key_id}: {exc.strerror} (EBUSY); nothing evicted"
            ) from None
        users = self.key_users.connections(key)
        again = f"; {users} connection(s) using it program it again at their next request"
        tail = again if users else ""
        if not held:
            return f"{key_id}: not programmed in any inline engine{tail}"
        log.info("evicted key %s from %s", key_id, ", ".join(held))
        return f"{key_id}: evicted from {', '.join(held)}{tail}"

    def clear(self, name: str) -> str:
        self.mapped(name).clear()
        log.info("cleared the inactive table of %s", name)
        return ""

    # Checks ----------------------------------------------------------------------------------

    def device(self, name: str) -> Device:
        dev = self.devices.get(name)
        if dev is None:
            known = ", ".join(self.devices)
            raise ControlError(f"unknown device {name[:100]!r} (known: {known})")
        return dev

    def mapped(self, name: str) -> MappedDevice:
        dev = self.device(name)
        if not isinstance(dev, MappedDevice):
            raise ControlError(f"{name!r} is a {device_kind(dev)} device, not a table device")
        return dev

    def _check_refs(self, name: str, lines: Sequence[TableLine], numbers: Sequence[int]) -> None:
        """Every device a new table for `name` maps exists, is no loop, and is big enough."""
        for line, number in zip(lines, numbers, strict=True):
            where = f"load {name}: line {number}"
            for ref in line.refs():
                lower = self.devices.get(ref.device)
                if lower is None:
                    known = ", ".join(self.devices)
                    raise ControlError(f"{where}: unknown device {ref.device!r} (known: {known})")
                if ref.device == name:
                    raise ControlError(f"{where}: a table cannot map its own device {name!r}")
                if name in self._below(ref.device):
                    raise ControlError(
                        f"{where}: {ref.device!r} has {name!r} below it; mapping it would make "
                        f"a loop"
                    )
                end = ref.offset + ref.length
                if end > lower.size:
                    raise ControlError(
                        f"{where}: maps sectors {ref.offset // SECTOR}-{end // SECTOR - 1} of "
                        f"{ref.device!r}, which has only {lower.size // SECTOR} sectors"
                    )

    def _check_holders(self, name: str, size: int, what: str, tail: str = "") -> None:
        """No other table (live or inactive) maps `name` past `size` bytes."""
        for holder, which, number, ref in self._refs_to(name):
            if ref.offset + ref.length > size:
                raise ControlError(
                    f"{what}: {holder!r} maps sectors up to {(ref.offset + ref.length) // SECTOR}"
                    f" of {name!r} (line {number} of its {which} table), past the new end at "
                    f"{size // SECTOR} sectors{tail}"
                )

    def _tables(self, dev: Device) -> Iterator[tuple[str, Table]]:
        if isinstance(dev, MappedDevice):
            yield "live", dev.live
            if dev.inactive is not None:
                yield "inactive", dev.inactive

    def _refs_to(self, name: str) -> Iterator[tuple[str, str, int, DeviceRef]]:
        for holder, dev in self.devices.items():
            if holder == name:
                continue
            for which, table in self._tables(dev):
                for number, line in enumerate(table.lines, 1):
                    for ref in line.refs():
                        if ref.device == name:
                            yield holder, which, number, ref

    def _holders(self, name: str) -> list[str]:
        """Devices whose live table maps `name`."""
        return list(dict.fromkeys(h for h, which, _, _ in self._refs_to(name) if which == "live"))

    def _below(self, name: str) -> set[str]:
        """Every device below `name` through live and inactive tables (an inactive table is a
        stack that a resume may make real)."""
        seen: set[str] = set()
        todo = [name]
        while todo:
            dev = self.devices.get(todo.pop())
            if dev is None:
                continue
            for _, table in self._tables(dev):
                for line in table.lines:
                    for ref in line.refs():
                        if ref.device not in seen:
                            seen.add(ref.device)
                            todo.append(ref.device)
        return seen

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())


def _table_lines(dev: MappedDevice, inactive: bool) -> list[str]:
    table = dev.inactive if inactive else dev.live
    return [line.text() for line in table.lines] if table is not None else []


def _line_numbers(text: Sequence[str]) -> list[int]:
    """The 1-based numbers of the lines parse_table keeps (it skips blanks and # comments)."""
    return [n for n, raw in enumerate(text, 1) if raw.split("#", 1)[0].strip()]


def resume_suspended(devices: Mapping[str, Device]) -> None:
    """At shutdown: let I/O held by suspended devices finish, on their live tables."""
    for dev in devices.values():
        if isinstance(dev, MappedDevice) and dev.suspended:
            log.warning(
                "device %s is suspended at shutdown: resuming it on its live table", dev.name
            )
            dev.clear()
            dev.resume()
