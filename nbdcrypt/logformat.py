"""How `nbdcrypt serve` writes its log: `text` for people, `json` for machines.

json: one JSON object per line with `time` (UTC, RFC 3339, milliseconds), `level`, `logger` and
`message`, then the structured fields a log call passed in `extra` (the connection open and
close lines carry peer, identity, export, key_id, requests, bytes_read, bytes_written,
seconds), and `traceback` when there is one. Everything is escaped into that one line: newlines
of a traceback, control characters and non-ASCII text alike (`ensure_ascii`), so a line
splitter, whatever it takes for a line break, cannot split a record.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import IO

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# What every LogRecord has; anything else on a record came from `extra` and is a field.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, UTC)
        out: dict[str, object] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in _STANDARD and not name.startswith("_") and name not in out:
                out[name] = value
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["traceback"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=True, default=str)


def configure(level: str, fmt: str, stream: IO[str]) -> None:
    """Send the root logger's records to `stream` in format `fmt` (one of FORMATS)."""
    handler = logging.StreamHandler(stream)
    formatter = JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    logging.basicConfig(level=level.upper(), handlers=[handler])
