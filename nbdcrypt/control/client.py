"""`nbdcrypt ctl`: one command line -> one request on the control socket -> its output.

Exit status: 0 on success (the output on stdout), 1 when the command failed or the server could
not be reached (the error on stderr), 2 for usage errors (argparse's convention).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path
from typing import Any

from nbdcrypt import __version__
from nbdcrypt.config.loader import load_config
from nbdcrypt.control.protocol import ControlRequest

MAX_REPLY = 256 * 1024 * 1024  # a reply this long is not from an nbdcrypt server


class ControlClientError(Exception):
    """The server could not be asked, or answered with something that is not a reply."""


def socket_path(text: str) -> Path:
    """A control socket as a path or as unix:///PATH."""
    return Path(text.removeprefix("unix://"))


def call(path: Path, request: ControlRequest, timeout: float | None = None) -> dict[str, Any]:
    """Send one request and return the reply object ({"ok": ..., "output"/"error": ...})."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise ControlClientError(
                f"no control socket at {path} (is the server running, with server.control or "
                f"--control?)"
            ) from None
        except ConnectionRefusedError:
            raise ControlClientError(
                f"nothing listens on {path} (a server that is gone left it behind)"
            ) from None
        except PermissionError:
            raise ControlClientError(
                f"permission denied on {path} (the control socket is mode 0600: run as the "
                f"server's user)"
            ) from None
        except OSError as exc:
            raise ControlClientError(f"cannot connect to {path}: {exc.strerror or exc}") from None
        try:
            sock.sendall(json.dumps(request.to_json()).encode() + b"\n")
            with sock.makefile("rb") as f:
                line = f.readline(MAX_REPLY)
        except OSError as exc:
            raise ControlClientError(f"control socket {path}: {exc.strerror or exc}") from None
    if not line.endswith(b"\n"):
        raise ControlClientError(f"control socket {path}: the server closed without a reply")
    try:
        reply = json.loads(line)
    except ValueError:
        raise ControlClientError(f"control socket {path}: the reply is not JSON") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise ControlClientError(f"control socket {path}: the reply is not a control reply")
    return reply


# The command line -------------------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `ctl` and its commands to the `nbdcrypt` command line."""
    ctl = sub.add_parser(
        "ctl",
        help="control a running server: ls, status, table, info, load, suspend, resume, clear, "
        "evict-key",
        description="Control a running server over its control socket, as dmsetup controls "
        "device-mapper: look at devices and tables, load a new table, suspend, resume.",
    )
    ctl.add_argument("--version", action="version", version=f"nbdcrypt {__version__}")
    where = ctl.add_mutually_exclusive_group(required=True)
    where.add_argument("-s", "--socket", type=socket_path, metavar="SOCKET", help="control socket")
    where.add_argument(
        "-c", "--config", type=Path, metavar="FILE", help="take the socket from server.control"
    )
    cmds = ctl.add_subparsers(dest="ctl_command", required=True, metavar="COMMAND")
    cmds.add_parser("ls", help="every device and its kind (file, memory, table)")
    for name, what in (
        ("status", "the status lines of the live table; of every table device without DEV"),
        ("table", "the live table (key material masked); of every table device without DEV"),
        ("info", "state, tables, open count, size, devices below and above; every device"),
    ):
        cmd = cmds.add_parser(name, help=what)
        cmd.add_argument("device", nargs="?", metavar="DEV")
        if name == "table":
            cmd.add_argument(
                "--inactive", action="store_true", help="the inactive (loaded) table instead"
            )
    load = cmds.add_parser(
        "load",
        help="load an inactive table into DEV (resume swaps it in)",
        description="Load a table into DEV as its inactive table. The table comes from FILE, "
        "from standard input (-), or from --table options, one line each.",
    )
    load.add_argument("device", metavar="DEV")
    load.add_argument("file", nargs="?", metavar="FILE", help="a file of table lines, or -")
    load.add_argument(
        "--table", action="append", default=[], metavar="LINE", help="a table line (repeatable)"
    )
    for name, what in (
        ("suspend", "hold new I/O on DEV and wait until the I/O in flight has finished"),
        ("resume", "swap in the inactive table, if one was loaded, and let I/O flow"),
        ("clear", "drop the inactive table of DEV"),
    ):
        cmds.add_parser(name, help=what).add_argument("device", metavar="DEV")
    evict = cmds.add_parser(
        "evict-key",
        help="evict key ID from every inline engine (fails with EBUSY while it is in use)",
    )
    evict.add_argument("key", metavar="ID", help="the key's name in the config's keys:")
    cmds.add_parser(
        "reload",
        help="re-read the server's config file and apply it (as SIGHUP does); an error "
        "leaves the running config untouched",
    )
    ctl.set_defaults(func=run, ctl_parser=ctl, load_parser=load)


def run(args: argparse.Namespace) -> int:
    """`nbdcrypt ctl` (ConfigError from -c propagates to the caller: exit status 2)."""
    if args.socket is not None:
        path: Path = args.socket
    else:
        config = load_config(args.config)
        if config.server.control is None:
            parser: argparse.ArgumentParser = args.ctl_parser
            parser.error(f"{args.config} has no server.control; give the socket with -s")
        path = config.server.control
    request = _request(args)
    try:
        reply = call(path, request)
    except ControlClientError as exc:
        print(f"nbdcrypt ctl: {exc}", file=sys.stderr)
        return 1
    if not reply["ok"]:
        print(f"nbdcrypt ctl: {reply.get('error', 'failed')}", file=sys.stderr)
        return 1
    output = reply.get("output", "")
    if output:
        print(output)
    return 0


def _request(args: argparse.Namespace) -> ControlRequest:
    command: str = args.ctl_command
    device: str | None = getattr(args, "device", None)
    if command == "table":
        return ControlRequest(command, device, inactive=args.inactive)
    if command == "evict-key":
        return ControlRequest(command, key=args.key)
    if command != "load":
        return ControlRequest(command, device)
    parser: argparse.ArgumentParser = args.load_parser
    if (args.file is None) == (not args.table):
        parser.error("give the table as FILE, as - (standard input), or as --table LINE...")
    if args.table:
        lines = [line for text in args.table for line in text.splitlines()]
    elif args.file == "-":
        lines = sys.stdin.read().splitlines()
    else:
        try:
            lines = Path(args.file).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            print(f"nbdcrypt ctl: cannot read {args.file}: {reason}", file=sys.stderr)
            raise SystemExit(1) from None
    return ControlRequest(command, device, table=tuple(lines))
