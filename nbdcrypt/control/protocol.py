"""The control protocol: one JSON object per line, a request in, a reply out, in order.

    -> {"command": "load", "device": "pool", "table": ["0 2048 linear a 0"]}
    <- {"ok": true, "output": ""}
    -> {"command": "suspend", "device": "nosuch"}
    <- {"ok": false, "error": "unknown device 'nosuch' (known: a, b, pool)"}

Every request is checked here against COMMANDS before anything acts on it: which keys a command
requires and allows, and the type of each value. A bad request gets an error reply; the
connection goes on. Lines are UTF-8 and at most MAX_LINE bytes; blank lines are ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MAX_LINE = 1024 * 1024  # bytes of one request line, newline included
IDLE_TIMEOUT = 60.0  # seconds a control client may wait between requests


class ProtocolError(ValueError):
    """A request that cannot be carried out as written; the message is the reply's error."""


@dataclass(frozen=True, slots=True)
class CommandSpec:
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()


COMMANDS: dict[str, CommandSpec] = {
    "ls": CommandSpec(),
    "status": CommandSpec(optional=("device",)),
    "table": CommandSpec(optional=("device", "inactive")),
    "info": CommandSpec(optional=("device",)),
    "load": CommandSpec(required=("device", "table")),
    "suspend": CommandSpec(required=("device",)),
    "resume": CommandSpec(required=("device",)),
    "clear": CommandSpec(required=("device",)),
    "evict-key": CommandSpec(required=("key",)),
    "reload": CommandSpec(),
}


@dataclass(frozen=True, slots=True)
class ControlRequest:
    command: str
    device: str | None = None
    table: tuple[str, ...] | None = None  # load: the table lines as written (blank, # comments)
    inactive: bool = False  # table: show the inactive table instead of the live one
    key: str | None = None  # evict-key: the key ID (the keyring's name, never key bytes)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"command": self.command}
        if self.device is not None:
            out["device"] = self.device
        if self.table is not None:
            out["table"] = list(self.table)
        if self.inactive:
            out["inactive"] = True
        if self.key is not None:
            out["key"] = self.key
        return out


def parse_request(line: bytes) -> ControlRequest:
    """One request line -> a checked request; ProtocolError says what is wrong."""
    try:
        obj = json.loads(line)
    except UnicodeDecodeError:
        raise ProtocolError("malformed request: not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"malformed request: not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"malformed request: expected a JSON object, got {_json_type(obj)}")
    command = obj.get("command")
    if command is None:
        raise ProtocolError("malformed request: missing 'command'")
    if not isinstance(command, str):
        raise ProtocolError(
            f"malformed request: 'command' must be a string, not {_json_type(command)}"
        )
    spec = COMMANDS.get(command)
    if spec is None:
        known = ", ".join(sorted(COMMANDS))
        raise ProtocolError(f"unknown command {command[:100]!r} (known: {known})")
    for key in obj:
        if key != "command" and key not in spec.required + spec.optional:
            raise ProtocolError(f"{command}: unexpected argument {key[:100]!r}")
    for key in spec.required:
        if key not in obj:
            raise ProtocolError(f"{command}: missing argument {key!r}")
    device = obj.get("device")
    if device is not None and not isinstance(device, str):
        raise ProtocolError(f"{command}: 'device' must be a string, not {_json_type(device)}")
    table = obj.get("table")
    if table is not None and not (
        isinstance(table, list) and all(isinstance(line, str) for line in table)
    ):
        raise ProtocolError(f"{command}: 'table' must be a list of strings (the table's lines)")
    inactive = obj.get("inactive", False)
    if not isinstance(inactive, bool):
        raise ProtocolError(f"{command}: 'inactive' must be true or false")
    key = obj.get("key")
    if key is not None and not isinstance(key, str):
        raise ProtocolError(f"{command}: 'key' must be a string (a key ID), not {_json_type(key)}")
    lines = tuple(table) if table is not None else None
    return ControlRequest(command, device, lines, inactive, key)


def _json_type(value: object) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number"


def ok_reply(output: str) -> bytes:
    return _encode({"ok": True, "output": output})


def error_reply(error: str) -> bytes:
    return _encode({"ok": False, "error": error})


def _encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\n"
