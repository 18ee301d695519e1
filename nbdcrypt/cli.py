"""The `nbdcrypt` command line: serve, check."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import uvloop

from nbdcrypt import __version__
from nbdcrypt.backends.file import BackingFileError
from nbdcrypt.config.loader import ConfigError, load_config
from nbdcrypt.config.model import Config, FileDeviceConfig, MemoryDeviceConfig
from nbdcrypt.server.app import Server

log = logging.getLogger("nbdcrypt")

LOG_LEVELS = ("debug", "info", "warning", "error")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nbdcrypt",
        description="An NBD server whose exports are device-mapper-style stacks over backing "
        "files, with blk-crypto-style inline encryption.",
    )
    parser.add_argument("--version", action="version", version=f"nbdcrypt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="serve the exports of a config file until SIGTERM/SIGINT",
        description="Serve the exports of a config file until SIGTERM or SIGINT, then finish "
        "in-flight requests, flush, and exit 0.",
    )
    _add_config(serve)
    serve.add_argument(
        "--listen",
        action="append",
        default=[],
        metavar="URL",
        help="tcp://HOST:PORT or unix:///PATH; repeatable; replaces server.listen",
    )
    serve.add_argument(
        "--log-level", choices=LOG_LEVELS, default="info", help="default: %(default)s"
    )
    serve.set_defaults(func=_serve)

    check = sub.add_parser(
        "check",
        help="validate a config file and print what would be served",
        description="Validate a config file and print its devices and exports. Writes nothing.",
    )
    _add_config(check)
    check.set_defaults(func=_check)
    return parser


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", required=True, type=Path, metavar="FILE")
    parser.add_argument("--version", action="version", version=f"nbdcrypt {__version__}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"nbdcrypt: config error: {exc}", file=sys.stderr)
        return 2
    except BackingFileError as exc:
        print(f"nbdcrypt: backing file: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    config = load_config(args.config, listen_override=args.listen)

    async def run() -> int:
        server = Server(config)
        try:
            await server.serve_until_stopped()
        except OSError as exc:
            log.error("cannot listen: %s", exc)
            server.close_devices()
            return 1
        return 0

    result: int = uvloop.run(run())
    return result


def _human(size: int) -> str:
    value = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{size} bytes" if unit == "bytes" else f"{value:.1f} {unit} ({size} bytes)"
        value /= 1024
    raise AssertionError


def describe(config: Config) -> str:
    """What `check` prints: listeners, devices and exports, resolved."""
    lines = [f"config: {config.source}", "listen:"]
    lines += [f"  {address}" for address in config.server.listen]
    lines.append("devices:")
    for name, dev in config.devices.items():
        if isinstance(dev, FileDeviceConfig):
            note = "  (created sparse on first start)" if dev.create else ""
            lines.append(f"  {name}: file {dev.path}, {_human(dev.size)}{note}")
        elif isinstance(dev, MemoryDeviceConfig):
            lines.append(f"  {name}: memory, {_human(dev.size)}")
    lines.append("exports:")
    for name, exp in config.exports.items():
        size = config.devices[exp.device].size
        traits = ["read-only" if exp.readonly else "read-write"]
        if exp.multi_conn:
            traits.append("multi-conn")
        if exp.default:
            traits.append("default export")
        lines.append(f"  {name!r}: device {exp.device}, {_human(size)}, {', '.join(traits)}")
        if exp.description:
            lines.append(f"    description: {exp.description}")
    return "\n".join(lines)


def _check(args: argparse.Namespace) -> int:
    print(describe(load_config(args.config)))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
