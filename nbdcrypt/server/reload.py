"""What a configuration reload changes, decided before anything is touched.

`plan(old, new)` compares two checked configurations and says which devices appear, which go,
and which tables change (those go through load -> suspend -> resume, with the usual capability
check); exports, keys, client rules, limits, TLS and listen addresses are simply rebuilt for new
connections. A change that cannot be made under running clients (a backing file's path or size,
a device's kind or inline-crypto engine, the control socket) makes the whole reload fail with a
message that names it, and the running configuration stays as it is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from nbdcrypt.config.model import (
    Config,
    DeviceConfig,
    FileDeviceConfig,
    ListenAddress,
    LuksDeviceConfig,
    MemoryDeviceConfig,
    TableDeviceConfig,
)


class ReloadError(Exception):
    """The new configuration cannot replace the running one; nothing was changed."""


@dataclass
class ReloadPlan:
    """The device-level changes of a reload (everything else is rebuilt wholesale)."""

    added: list[str] = field(default_factory=list)  # devices to open, in dependency order
    removed: list[str] = field(default_factory=list)  # devices no longer configured
    retabled: list[str] = field(default_factory=list)  # mapped devices with new table lines
    listen_added: list[ListenAddress] = field(default_factory=list)
    listen_removed: list[ListenAddress] = field(default_factory=list)

    def summary(self, old: Config, new: Config) -> str:
        """One line for the log and for `ctl reload`."""
        exports_added = [n for n in new.exports if n not in old.exports]
        exports_removed = [n for n in old.exports if n not in new.exports]
        exports_changed = [
            n for n in new.exports if n in old.exports and new.exports[n] != old.exports[n]
        ]
        parts = [
            _changes("exports", exports_added, exports_removed, exports_changed),
            _changes("devices", self.added, self.removed, []),
            _changes("tables swapped", [], [], self.retabled),
            _changes(
                "listening",
                [str(a) for a in self.listen_added],
                [str(a) for a in self.listen_removed],
                [],
            ),
        ]
        if new.keys.keys() != old.keys.keys():
            keys_added = [k for k in new.keys if k not in old.keys]
            keys_removed = [k for k in old.keys if k not in new.keys]
            parts.append(_changes("keys", keys_added, keys_removed, []))
        if new.clients != old.clients:
            parts.append("client rules replaced")
        said = [p for p in parts if p]
        return "; ".join(said) if said else "no changes"


def _changes(what: str, added: list[str], removed: list[str], changed: list[str]) -> str:
    words = [f"+{n}" for n in added] + [f"-{n}" for n in removed] + [f"~{n}" for n in changed]
    return f"{what} {' '.join(words)}" if words else ""


def plan(old: Config, new: Config, *, socket_activated: bool = False) -> ReloadPlan:
    """The changes from `old` to `new`; ReloadError if one cannot be made while serving."""
    if new.server.control != old.server.control:
        raise ReloadError(
            f"server.control changed ({old.server.control} -> {new.server.control}): the "
            "control socket moves only with a restart"
        )
    if new.server.io != old.server.io:
        raise ReloadError(
            f"server.io changed ({old.server.io.value} -> {new.server.io.value}): connections "
            "change how they run only with a restart"
        )
    result = ReloadPlan()
    for name, cfg in new.devices.items():
        before = old.devices.get(name)
        if before is None:
            result.added.append(name)
        elif isinstance(cfg, TableDeviceConfig) and isinstance(before, TableDeviceConfig):
            if cfg.lines != before.lines:
                result.retabled.append(name)
        else:
            _check_unchanged(name, before, cfg)
    result.removed = [name for name in old.devices if name not in new.devices]
    if not socket_activated:
        result.listen_added = [a for a in new.server.listen if a not in old.server.listen]
        result.listen_removed = [a for a in old.server.listen if a not in new.server.listen]
    return result


def _check_unchanged(name: str, old: DeviceConfig, new: DeviceConfig) -> None:
    """A device that is not a table must stay exactly as it is while clients use it."""
    if type(old) is not type(new):
        raise ReloadError(
            f"device {name}: its kind changed ({_kind(old)} -> {_kind(new)}); a device changes "
            "kind only with a restart (or give the new one another name)"
        )
    differs = _differences(old, new)
    if differs:
        raise ReloadError(
            f"device {name}: {', '.join(differs)} changed; a {_kind(new)} device changes only "
            "with a restart (or give the new one another name)"
        )


def _differences(old: DeviceConfig, new: DeviceConfig) -> list[str]:
    if isinstance(old, LuksDeviceConfig) and isinstance(new, LuksDeviceConfig):
        pairs = {
            "file": (old.path, new.path),
            "passphrase_file": (old.passphrase_file, new.passphrase_file),
            "keyslot": (old.keyslot, new.keyslot),
            "size": (old.size, new.size),
        }
        return [key for key, (a, b) in pairs.items() if a != b]
    if isinstance(old, FileDeviceConfig) and isinstance(new, FileDeviceConfig):
        new = dataclasses.replace(new, create=old.create)  # the file exists by now
    assert isinstance(old, FileDeviceConfig | MemoryDeviceConfig)
    assert isinstance(new, FileDeviceConfig | MemoryDeviceConfig)
    return [
        f.name
        for f in dataclasses.fields(old)
        if f.name != "name" and getattr(old, f.name) != getattr(new, f.name)
    ]


def _kind(cfg: DeviceConfig) -> str:
    if isinstance(cfg, FileDeviceConfig):
        return "file"
    if isinstance(cfg, MemoryDeviceConfig):
        return "memory"
    if isinstance(cfg, LuksDeviceConfig):
        return "luks"
    return "table"
