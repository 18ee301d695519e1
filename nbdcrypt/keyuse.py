"""Which connections use which key on which export, and evicting keys from the inline engines.

A connection that opens an export through a key joins here when transmission starts and leaves
once it has closed and its last request has finished. With `evict: on-idle`, the last connection
using a key on an export takes the key out of every engine below that export as it leaves
(`Device.evict_key`, as the kernel's blk_crypto_evict_key). `nbdcrypt ctl evict-key` asks here
whether a key is busy: a key is in use while any connection using it has requests in flight, or
while a keyslot holding it is held; evicting it then fails with EBUSY and evicts nothing.

Evicting never loses data or breaks a connection: a connection that still has the key open
programs it again with its next request. Eviction only decides what the engines hold.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from nbdcrypt.blkcrypto.engine import InlineCryptoDevice
from nbdcrypt.blkcrypto.key import CryptoKey
from nbdcrypt.device import Device
from nbdcrypt.export import OpenExport

log = logging.getLogger("nbdcrypt.keys")


class KeyHolder(Protocol):
    """A connection, as seen here: how many of its requests are in flight."""

    @property
    def inflight(self) -> int: ...


@dataclass(frozen=True, slots=True)
class KeyBusy:
    """Who keeps a key busy right now (for the EBUSY message)."""

    requests: int  # requests in flight on connections using the key
    connections: int  # connections with requests in flight
    slots: tuple[str, ...]  # engines with a keyslot holding the key in use


class KeyUsers:
    """The connections using each key, per export. Safe to call from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users: dict[CryptoKey, dict[str, set[KeyHolder]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # on-idle evictions under way

    def join(self, view: OpenExport, holder: KeyHolder) -> None:
        """`holder` starts using `view`'s key on its export (nothing to do without a key)."""
        if view.key is None:
            return
        with self._lock:
            self._users.setdefault(view.key, {}).setdefault(view.name, set()).add(holder)

    def leave(self, view: OpenExport, holder: KeyHolder) -> bool:
        """`holder` is done; True if it was the last user of the key on that export."""
        if view.key is None:
            return False
        with self._lock:
            exports = self._users.get(view.key, {})
            holders = exports.get(view.name)
            if holders is None or holder not in holders:
                return False
            holders.discard(holder)
            if holders:
                return False
            del exports[view.name]
            if not exports:
                del self._users[view.key]
            return True

    def _holders(self, key: CryptoKey) -> list[KeyHolder]:
        with self._lock:
            return [h for holders in self._users.get(key, {}).values() for h in holders]

    def connections(self, key: CryptoKey) -> int:
        """Connections that have the key open, busy or not."""
        return len(self._holders(key))

    def busy(self, key: CryptoKey, devices: Iterable[Device] = ()) -> KeyBusy | None:
        """Who keeps `key` in use (None if nobody): requests in flight on connections using
        it, and keyslots holding it that are held (among `devices`)."""
        counts = [holder.inflight for holder in self._holders(key)]
        slots = tuple(
            dev.name
            for dev in devices
            if isinstance(dev, InlineCryptoDevice)
            and dev.keyslots is not None
            and dev.keyslots.in_use(key)
        )
        requests = sum(counts)
        if not requests and not slots:
            return None
        return KeyBusy(requests, sum(1 for n in counts if n), slots)

    def left(self, view: OpenExport, holder: KeyHolder) -> None:
        """A connection has closed and finished its requests: leave, and with `evict: on-idle`
        evict the key below the export if this was its last user there."""
        last = self.leave(view, holder)
        if not (last and view.export.evict_on_idle and view.key is not None):
            return
        task = asyncio.get_running_loop().create_task(self._evict_idle(view))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _in_use_on(self, key: CryptoKey, export: str) -> bool:
        with self._lock:
            return bool(self._users.get(key, {}).get(export))

    async def _evict_idle(self, view: OpenExport) -> None:
        """`evict: on-idle`: take the key of `view` out of every engine below its export,
        unless a new connection has taken it up there meanwhile. If a request of another
        export sharing an engine holds it (EBUSY), it stays: that export's own connections
        decide when it goes."""
        key = view.key
        assert key is not None
        if self._in_use_on(key, view.name):
            return
        try:
            await view.export.device.evict_key(key)
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                log.error("key %s: eviction below export %r failed: %s", key.key_id, view.name, exc)
                return
            log.info(
                "key %s stays programmed below export %r: a request holds it in a keyslot",
                key.key_id,
                view.name,
            )
            return
        log.info(
            "key %s evicted from the engines below export %r: its last connection closed",
            key.key_id,
            view.name,
        )


def engines_holding(devices: Iterable[Device], key: CryptoKey) -> list[InlineCryptoDevice]:
    """The inline engines among `devices` that hold `key` (in a keyslot, or cached raw)."""
    return [dev for dev in devices if isinstance(dev, InlineCryptoDevice) and dev.holds_key(key)]


async def evict_everywhere(key: CryptoKey, devices: list[Device], users: KeyUsers) -> list[str]:
    """`ctl evict-key`: evict `key` from every engine of the server; the names of those that
    held it. OSError(EBUSY), with nothing evicted, while the key is in use."""
    busy = users.busy(key, devices)
    if busy is not None:
        raise OSError(errno.EBUSY, _busy_message(key, busy))
    held = engines_holding(devices, key)
    for dev in held:
        await dev.evict_key(key)
    return [dev.name for dev in held]


def _busy_message(key: CryptoKey, busy: KeyBusy) -> str:
    parts = []
    if busy.requests:
        parts.append(
            f"{busy.requests} request(s) in flight on {busy.connections} connection(s) using it"
        )
    if busy.slots:
        parts.append(f"a keyslot holding it is in use on {', '.join(busy.slots)}")
    return f"key {key.key_id} is in use ({'; '.join(parts)})"
