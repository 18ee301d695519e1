"""The `nbdcrypt` command line: serve, check, ctl, luks, stress."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import uvloop

from nbdcrypt import __version__, logformat
from nbdcrypt.backends.file import BackingFileError
from nbdcrypt.blkcrypto.profile import CryptoCaps
from nbdcrypt.clients import describe_rule
from nbdcrypt.config.loader import ConfigError, load_config
from nbdcrypt.config.model import (
    ClientCertificate,
    Config,
    FileDeviceConfig,
    IoMode,
    KeyFile,
    ListenAddress,
    LuksDeviceConfig,
    MemoryDeviceConfig,
    TableDeviceConfig,
    TlsConfig,
    TlsMode,
)
from nbdcrypt.control.client import add_parser as add_ctl_parser
from nbdcrypt.control.client import socket_path
from nbdcrypt.keyring import KeyFileError
from nbdcrypt.luks import LuksError
from nbdcrypt.luks.cli import add_parser as add_luks_parser
from nbdcrypt.luks.cli import check_lines as luks_check_lines
from nbdcrypt.server import heap, systemd
from nbdcrypt.server.app import Server
from nbdcrypt.server.lockedloop import LockedLoop
from nbdcrypt.stress.cli import add_parser as add_stress_parser
from nbdcrypt.tls import TlsFileError, check_credentials

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
        "--control",
        type=socket_path,
        metavar="PATH",
        help="the control socket for `nbdcrypt ctl` (mode 0600); replaces server.control",
    )
    serve.add_argument(
        "--log-level", choices=LOG_LEVELS, default="info", help="default: %(default)s"
    )
    serve.add_argument(
        "--log-format",
        choices=logformat.FORMATS,
        default="text",
        help="text, or json: one JSON object per line (default: %(default)s)",
    )
    serve.set_defaults(func=_serve)

    check = sub.add_parser(
        "check",
        help="validate a config file and print what would be served",
        description="Validate a config file and print its devices and exports. Writes nothing.",
    )
    _add_config(check)
    check.set_defaults(func=_check)
    add_ctl_parser(sub)
    add_luks_parser(sub)
    add_stress_parser(sub)
    return parser


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c", "--config", required=True, type=Path, metavar="FILE", help="the YAML config file"
    )
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
    except KeyFileError as exc:
        print(f"nbdcrypt: {exc}", file=sys.stderr)
        return 1
    except LuksError as exc:  # a passphrase that opens no keyslot, an image that changed
        print(f"nbdcrypt: {exc}", file=sys.stderr)
        return 1
    except TlsFileError as exc:  # a TLS file changed between loading the config and serving
        print(f"nbdcrypt: {exc}", file=sys.stderr)
        return 1
    except systemd.SystemdError as exc:  # socket activation handed over an unusable socket
        print(f"nbdcrypt: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


def _serve(args: argparse.Namespace) -> int:
    logformat.configure(args.log_level, args.log_format, sys.stderr)
    activated = systemd.activated_sockets()  # read first: they are ours only until a fork
    notifier = systemd.Notifier()

    def read_config() -> Config:
        """The config file with the command line's overrides: at startup and at each reload."""
        config = load_config(
            args.config, listen_override=args.listen, listen_required=not activated
        )
        if args.control is None:
            return config
        server = dataclasses.replace(config.server, control=args.control)
        return dataclasses.replace(config, server=server)

    config = read_config()
    heap.keep_freed_memory()

    async def run() -> int:
        server = Server(config, activated=activated, notifier=notifier, reread=read_config)
        try:
            await server.serve_until_stopped()
        except OSError as exc:
            log.error("cannot listen: %s", exc)
            server.close_devices()
            return 1
        return 1 if server.flush_failed else 0  # exit 0 only when everything reached disk

    # With io: threads, connections run on threads sharing the loop's lock (server/lockedloop.py).
    factory = LockedLoop if config.server.io is IoMode.THREADS else uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        result: int = runner.run(run())
    return result


def _human(size: int) -> str:
    value = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{size} bytes" if unit == "bytes" else f"{value:.1f} {unit} ({size} bytes)"
        value /= 1024
    raise AssertionError


def _below(config: Config, name: str) -> list[str]:
    """The devices a table names, once each, in the order of its lines."""
    device = config.devices[name]
    if not isinstance(device, TableDeviceConfig):
        return []
    rank = {name: i for i, name in enumerate(config.devices)}  # a line's refs: a stable order
    names = (sorted({r.device for r in line.refs()}, key=rank.__getitem__) for line in device.lines)
    return list(dict.fromkeys(name for line_names in names for name in line_names))


def stack(config: Config, name: str) -> str:
    """The devices below `name`, as a tree: `top -> pool -> a, b`, `top -> (pool -> a), c`.

    A device's lower devices follow its arrow, separated by commas; one that has devices of its
    own is put in parentheses when it has siblings.
    """
    below = [stack(config, lower) for lower in _below(config, name)]
    if not below:
        return name
    if len(below) > 1:
        below = [f"({part})" if " -> " in part else part for part in below]
    return f"{name} -> {', '.join(below)}"


def _crypto_stops(config: Config, name: str) -> list[str]:
    """The targets in and below a table that do not pass inline crypto: `zero in pool`."""
    device = config.devices[name]
    if not isinstance(device, TableDeviceConfig):
        return []
    stops = [f"{line.target} in {name}" for line in device.lines if not line.spec.passes_crypto]
    for lower in _below(config, name):
        stops += _crypto_stops(config, lower)
    return list(dict.fromkeys(stops))


def _describe_table(name: str, dev: TableDeviceConfig, config: Config) -> list[str]:
    count = f"{len(dev.lines)} line" + ("s" if len(dev.lines) != 1 else "")
    stops = _crypto_stops(config, name)
    crypto = f"does not pass inline crypto ({', '.join(stops)})" if stops else ""
    header = ", ".join(part for part in (f"{name}: table", _human(dev.size), count, crypto) if part)
    if dev.allow_overlap:
        header += ", allow_overlap"
    lines = [f"  {header}"]
    lines += [f"    {line.text()}" for line in dev.lines]
    lines.append(f"    stack: {stack(config, name)}")
    return lines


def crypto_profile(config: Config, name: str) -> CryptoCaps:
    """A device's inline-crypto profile as the server will build it: its engine's, or for a
    table the intersection below when every target passes crypto (dm passthrough)."""
    device = config.devices[name]
    if isinstance(device, LuksDeviceConfig):  # a crypt table: does its own encryption
        return CryptoCaps.none()
    if not isinstance(device, TableDeviceConfig):
        return device.inline_crypto.caps if device.inline_crypto else CryptoCaps.none()
    caps = CryptoCaps.everything()
    for line in device.lines:
        if not line.spec.passes_crypto:
            return CryptoCaps.none()
        for ref in line.refs():
            caps &= crypto_profile(config, ref.device)
    return caps if caps else CryptoCaps.none()


def _profile_line(config: Config, name: str) -> str:
    device = config.devices[name]
    caps = crypto_profile(config, name)
    engine = getattr(device, "inline_crypto", None)
    if engine is not None:
        slots = f"{engine.keyslots} keyslots" if engine.keyslots else "no keyslots (raw keys)"
        return f"    inline crypto: {caps.describe()}; {slots}"
    if isinstance(device, TableDeviceConfig) and caps:
        return f"    inline crypto (passthrough): {caps.describe()}"
    return ""


def _key_line(config: Config, device: str, key_name: str) -> str:
    key = config.keys[key_name]
    caps = crypto_profile(config, device)
    supported = (key.mode, key.data_unit_size) in caps.modes and key.dun_bytes <= caps.max_dun_bytes
    path = "inline" if supported else "blk-crypto fallback (software, at the export)"
    return f"    key: {key_name} ({key.mode.value}, {key.data_unit_size}-byte data units): {path}"


_TLS_MODES = {
    TlsMode.OFF: "off (STARTTLS is refused)",
    TlsMode.ALLOW: "allow (clients may STARTTLS)",
    TlsMode.REQUIRE: "require (STARTTLS before any other option)",
}
_CLIENT_CERTIFICATES = {
    ClientCertificate.REQUIRED: "required",
    ClientCertificate.OPTIONAL: "optional (without one, a client is anonymous)",
    ClientCertificate.NONE: "not asked for (every TLS client is anonymous)",
}


def _tls_lines(tls: TlsConfig) -> list[str]:
    """`server.tls` as check prints it: the mode, and with TLS on what the files hold."""
    lines = [f"tls: {_TLS_MODES[tls.mode]}"]
    if tls.mode is TlsMode.OFF:
        return lines
    found = check_credentials(tls)
    names = f" ({', '.join(found.sans)})" if found.sans else ""
    lines.append(
        f"  certificate: {tls.certificate}: {found.subject}{names}, "
        f"expires {found.not_after:%Y-%m-%d}"
    )
    lines.append(f"  private key: {tls.private_key}")
    lines.append(f"  client certificates: {_CLIENT_CERTIFICATES[tls.client_certificate]}")
    if tls.ca is not None and tls.client_certificate is not ClientCertificate.NONE:
        lines.append(f"  ca: {tls.ca}: {'; '.join(found.ca_subjects)}")
    return lines


def _metrics_url(address: ListenAddress) -> str:
    """Where `server.metrics` is scraped: http://HOST:PORT/metrics, or the unix socket."""
    if address.path is not None:
        return f"GET /metrics on unix socket {address.path}"
    return f"http://{str(address).removeprefix('tcp://')}/metrics"


def describe(config: Config) -> str:
    """What `check` prints: listeners, devices (tables with their lines) and exports, resolved."""
    lines = [f"config: {config.source}", "listen:"]
    lines += [f"  {address}" for address in config.server.listen]
    lines += _tls_lines(config.server.tls)
    if config.server.metrics is not None:
        lines.append(f"metrics: {_metrics_url(config.server.metrics)}")
    lines.append("devices:")
    for name, dev in config.devices.items():
        if isinstance(dev, FileDeviceConfig):
            note = "  (created sparse on first start)" if dev.create else ""
            lines.append(f"  {name}: file {dev.path}, {_human(dev.size)}{note}")
        elif isinstance(dev, MemoryDeviceConfig):
            lines.append(f"  {name}: memory, {_human(dev.size)}")
        elif isinstance(dev, LuksDeviceConfig):
            lines += luks_check_lines(name, dev.header, dev.passphrase_file, dev.keyslot)
        else:
            lines += _describe_table(name, dev, config)
        if profile := _profile_line(config, name):
            lines.append(profile)
    if config.keys:
        lines.append("keys:")
        for name, key in config.keys.items():
            src = key.source
            new = isinstance(src, KeyFile) and src.create and not src.path.exists()
            note = "  (created on first start)" if new else ""
            lines.append(
                f"  {name}: {key.mode.value}, {key.data_unit_size}-byte data units, "
                f"{key.dun_bytes}-byte DUNs, {src.describe()}{note}"
            )
    lines.append("exports:")
    for name, exp in config.exports.items():
        size = config.devices[exp.device].size
        traits = ["read-only" if exp.readonly else "read-write"]
        if exp.multi_conn:
            traits.append("multi-conn")
        if exp.default:
            traits.append("default export")
        lines.append(f"  {name!r}: device {exp.device}, {_human(size)}, {', '.join(traits)}")
        if isinstance(config.devices[exp.device], TableDeviceConfig):
            lines.append(f"    stack: {stack(config, exp.device)}")
        if exp.key is not None:
            lines.append(_key_line(config, exp.device, exp.key))
        if exp.per_client_key:
            lines.append("    key: per client (the key of the client's rule):")
            granted = (r.key for r in config.clients or () if name in r.exports and r.key)
            for key_id in dict.fromkeys(granted):
                line = _key_line(config, exp.device, key_id).removeprefix("    key: ")
                lines.append(f"      {line}")
        if exp.key is not None or exp.per_client_key:
            lines.append(f"    evict: {exp.evict.value}")
        if exp.description:
            lines.append(f"    description: {exp.description}")
    if config.clients is not None:
        lines.append("clients (first match wins):")
        lines += [f"  {describe_rule(rule)}" for rule in config.clients]
    return "\n".join(lines)


def _check(args: argparse.Namespace) -> int:
    print(describe(load_config(args.config)))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
