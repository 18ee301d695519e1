"""Logs: one line per connection open and close (who, which export, which key ID, how much, how
long; never key bytes), as text or, with `--log-format json`, one JSON object per line."""

from __future__ import annotations

import io
import json
import logging
import sys
from pathlib import Path
from typing import Any

from conftest import ROOT, StartServer, require_tool, run

from nbdcrypt.logformat import JsonFormatter, configure

CONFIG = """\
keys:
  k: {mode: aes-256-xts, data_unit_size: 512, source: {file: k.key, create: true}}
devices:
  a: {file: a.img, size: 16M}
exports:
  vault: {device: a, key: k}
  plain: {device: a, readonly: true}
"""
FIELDS = {"time", "level", "logger", "message"}


def qemu_io(uri: str, *commands: str, readonly: bool = False) -> None:
    args = [require_tool("qemu-io"), "-f", "raw", *(["-r"] if readonly else []), uri]
    for command in commands:
        args += ["-c", command]
    out = run(args).stdout
    assert "fail" not in out.lower(), out


def key_forms(path: Path) -> list[str]:
    raw = path.read_bytes()
    text = raw.decode("latin-1").strip()
    return [raw.hex(), raw.hex().upper(), text, text.lower(), text.upper()]


def test_json_lines_carry_the_connection_fields(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(CONFIG, "--log-format", "json")
    qemu_io(server.uri("vault"), "write -P 0x11 0 128k", "read -P 0x11 0 64k")
    qemu_io(server.uri("plain", tcp=True), "read 0 4k", readonly=True)
    assert server.stop() == 0
    records = [json.loads(line) for line in server.log.splitlines()]  # each line is one object
    assert records and all(r.keys() >= FIELDS for r in records)
    assert all(r["time"].endswith("Z") and "T" in r["time"] for r in records)
    assert {r["level"] for r in records} <= {"DEBUG", "INFO", "WARNING", "ERROR"}
    opened = [r for r in records if r.get("event") == "open"]
    closed = [r for r in records if r.get("event") == "close"]
    assert [r["export"] for r in opened] == [r["export"] for r in closed] == ["vault", "plain"]
    vault, plain = closed
    assert vault["key_id"] == "k" and plain["key_id"] is None
    assert vault["bytes_written"] == 128 * 1024 and vault["bytes_read"] == 64 * 1024
    assert plain["bytes_read"] == 4096 and plain["bytes_written"] == 0
    assert vault["requests"] >= 2 and plain["requests"] >= 1
    assert vault["transport"] == "unix" and plain["transport"] == "tcp"
    assert vault["identity"].startswith("unix uid=") and plain["identity"].startswith("127.0.0.1:")
    assert isinstance(vault["seconds"], float) and vault["seconds"] >= 0
    assert vault["peer"] == opened[0]["peer"] and vault["logger"] == "nbdcrypt.connection"
    assert "closed export 'vault' (key k)" in vault["message"]
    assert opened[0]["readonly"] is False and opened[1]["readonly"] is True
    assert opened[0]["size"] == 16 * 1024 * 1024
    for form in key_forms(tmp_path / "k.key"):
        assert form not in server.log


def test_text_lines_by_default(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(CONFIG)
    qemu_io(server.uri("vault"), "write -P 0x22 4k 8k")
    assert server.stop() == 0
    log = server.log
    assert "opened export 'vault' with key k (read-write, 16777216 bytes" in log
    closed = [line for line in log.splitlines() if "closed export 'vault' (key k)" in line]
    assert len(closed) == 1
    assert " INFO nbdcrypt.connection: unix:" in closed[0]
    assert "requests, 0 bytes read, 8192 written" in closed[0]
    assert not any(line.startswith("{") for line in log.splitlines())
    for form in key_forms(tmp_path / "k.key"):
        assert form not in log


def record(**extra: Any) -> logging.LogRecord:
    rec = logging.LogRecord("nbdcrypt.test", logging.ERROR, __file__, 1, "boom %s", ("x",), None)
    for name, value in extra.items():
        setattr(rec, name, value)
    return rec


def test_a_traceback_stays_on_its_line() -> None:
    try:
        raise ValueError("line one\nline two")
    except ValueError:
        exc_info = sys.exc_info()
    rec = record(peer="p\nq", export="e\u2028x")
    rec.exc_info = exc_info
    out = JsonFormatter().format(rec)
    assert "\n" not in out and "\r" not in out and "\u2028" not in out
    assert len(out.splitlines()) == 1 and out.isascii()
    parsed = json.loads(out)
    assert parsed["message"] == "boom x" and parsed["level"] == "ERROR"
    assert parsed["peer"] == "p\nq" and parsed["export"] == "e\u2028x"
    assert parsed["traceback"].startswith("Traceback (most recent call last):\n")
    assert parsed["traceback"].endswith("ValueError: line one\nline two")


def test_configure_json_and_text() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        for fmt in ("json", "text"):
            root.handlers.clear()
            stream = io.StringIO()
            configure("info", fmt, stream)
            logging.getLogger("t").warning("hello %d", 7)
            logging.getLogger("t").debug("hidden")
            out = stream.getvalue()
            assert len(out.splitlines()) == 1, out
            if fmt == "json":
                assert json.loads(out)["message"] == "hello 7"
            else:
                assert out.rstrip().endswith(" WARNING t: hello 7")
    finally:
        root.handlers[:], root.level = saved[0], saved[1]


def test_bad_log_format_is_a_usage_error(tmp_path: Path) -> None:
    proc = run(
        [sys.executable, "-m", "nbdcrypt", "serve", "-c", "x.yaml", "--log-format", "xml"],
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "invalid choice: 'xml' (choose from 'text', 'json')" in proc.stderr
