"""The `nbdcrypt stress` command line: its argparse definitions and the validated options.

`add_parser` adds the subcommand to the `nbdcrypt` parser; `options_from_args` turns the parsed
namespace into StressOptions or raises UsageError (exit status 2) with one clear line. What
depends on the export (its size, block sizes, flags) is checked later, by the runner.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from nbdcrypt import __version__
from nbdcrypt.config.units import parse_bytes, parse_duration
from nbdcrypt.stress.uri import NbdUri, UriError, parse_uri
from nbdcrypt.stress.workload import Kind

DEFAULT_DURATION = 10.0  # seconds, when neither --duration nor --ops is given
DEFAULT_MIX = "read=40,write=30,flush=5,trim=10,zero=15"
DEFAULT_SHARED_MIX = "shared-read=10,shared-write=5"  # added when --shared is given
MIX_NAMES = {k.value: k for k in Kind} | {"write-zeroes": Kind.ZERO}
ABUSE_KINDS = ("vanish", "half-request", "slow-reader")
MAX_CLIENTS = 4096  # client numbers are 12 bits in the data pattern


class UsageError(ValueError):
    """Options that cannot work; exit status 2."""


@dataclass(frozen=True, slots=True)
class StressOptions:
    uris: tuple[NbdUri, ...]
    clients: int = 4
    duration: float | None = DEFAULT_DURATION
    ops: int | None = None  # per client
    seed: int = 0
    mix: dict[Kind, int] = field(default_factory=dict)
    fua_percent: float = 10.0
    queue_depth: int = 8
    max_size: int = 256 * 1024
    region_size: int = 16 * 1024 * 1024
    align: int | None = None  # None: the export's minimum block size
    shared: int = 0  # bytes of shared region per export
    cell_size: int | None = None  # None: max(4096, alignment)
    trimmed: str = "old-or-zero"  # or "any"
    allow_errors: bool = False
    structured: bool = True
    timeout: float = 60.0
    abuse: tuple[str, ...] = ()
    abusers: int = 1
    watch_pid: int | None = None
    json: bool = False
    progress: bool | None = None  # None: when stderr is a terminal


class _DefaultsFormatter(argparse.HelpFormatter):
    """Appends `(default: X)` to an option's help unless X is unset or the help says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{text} (default: %(default)s)"
        return text


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add `stress` to the `nbdcrypt` command line."""
    p = sub.add_parser(
        "stress",
        help="drive many verifying NBD clients against a server",
        description="Drive N NBD clients at once against one or more exports (any NBD server) "
        "with a seeded mix of reads, writes (some FUA), flushes, trims and write-zeroes, and "
        "verify every read against what the server acknowledged. Exit status: 0 when every "
        "read verified and nothing failed, 1 on a mismatch, a protocol error, a client that "
        "could not connect or lost its connection, or an error reply (see --allow-errors), "
        "2 on usage errors. See docs/STRESS.md.",
        formatter_class=_DefaultsFormatter,
    )
    p.add_argument("--version", action="version", version=f"nbdcrypt {__version__}")
    p.add_argument(
        "uris",
        nargs="+",
        metavar="URI",
        help="nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH; with several, "
        "clients are dealt round-robin (the URIs must name different storage)",
    )
    p.add_argument(
        "-n",
        "--clients",
        type=_positive(int),
        default=4,
        metavar="N",
        help="client connections in all",
    )
    p.add_argument(
        "-d",
        "--duration",
        metavar="S",
        default=None,
        help=f"stop after S seconds (10s, 2m; default {DEFAULT_DURATION:g} s "
        "unless --ops is given)",
    )
    p.add_argument(
        "--ops",
        type=_positive(int),
        metavar="N",
        default=None,
        help="stop each client after N operations",
    )
    p.add_argument(
        "--seed",
        type=int,
        metavar="N",
        default=None,
        help="the seed of the operation sequences (default: random; printed)",
    )
    p.add_argument(
        "--mix",
        metavar="KIND=W,...",
        default=None,
        help=f"weights of read, write, flush, trim, zero, shared-read, shared-write "
        f"(default {DEFAULT_MIX}; with --shared also {DEFAULT_SHARED_MIX})",
    )
    p.add_argument(
        "--fua",
        type=_percent,
        metavar="PCT",
        default=10.0,
        help="percentage of writes, trims and zeroes sent with FUA",
    )
    p.add_argument(
        "-q",
        "--queue-depth",
        type=_positive(int),
        metavar="N",
        default=8,
        help="requests in flight per client",
    )
    p.add_argument(
        "--max-size",
        type=_size,
        metavar="SIZE",
        default="256K",
        help="the largest request (the export's maximum and region cap it)",
    )
    p.add_argument(
        "--region-size",
        type=_size,
        metavar="SIZE",
        default="16M",
        help="each client's own region, at most (spread over the export)",
    )
    p.add_argument(
        "--align",
        type=_size,
        metavar="N",
        default=None,
        help="alignment of offsets and lengths (a multiple of the export's minimum "
        "block size, which is the default)",
    )
    p.add_argument(
        "--shared",
        type=_size,
        metavar="SIZE",
        default=None,
        help="a shared region at the end of each export, written by all and checked "
        "by flush order (needs multi-conn)",
    )
    p.add_argument(
        "--cell-size",
        type=_size,
        metavar="SIZE",
        default=None,
        help="the size of a shared cell (default max(4096, alignment))",
    )
    p.add_argument(
        "--trimmed",
        choices=("old-or-zero", "any"),
        default="old-or-zero",
        help="what a trimmed range may read as until rewritten: old data or zeroes, "
        "or anything (encrypted exports)",
    )
    p.add_argument(
        "--allow-errors",
        action="store_true",
        help="error replies do not fail the run (mismatches still do)",
    )
    p.add_argument(
        "--simple-replies", action="store_true", help="do not negotiate structured replies"
    )
    p.add_argument(
        "--timeout",
        metavar="S",
        default="60s",
        help="a request or connection unanswered this long fails its client",
    )
    p.add_argument(
        "--abuse",
        metavar="KIND,...",
        default=None,
        help=f"hostile connections beside the clients: {', '.join(ABUSE_KINDS)}",
    )
    p.add_argument(
        "--abusers",
        type=_positive(int),
        metavar="N",
        default=1,
        help="hostile connections of each --abuse kind",
    )
    p.add_argument(
        "--watch-pid",
        type=_positive(int),
        metavar="PID",
        default=None,
        help="sample a local process's VmRSS (the server's) and report its peak",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a progress line on stderr (default: if stderr is a terminal)",
    )
    return p


def _positive(kind: Callable[[str], int]) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
        return value

    return parse


def _percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid percentage {text!r}") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be 0 to 100, got {text}")
    return value


def _size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_mix(text: str) -> dict[Kind, int]:
    """'read=40,write=30' -> {Kind.READ: 40, Kind.WRITE: 30}; UsageError on anything else."""
    mix: dict[Kind, int] = {}
    for item in text.split(","):
        name, eq, weight = item.strip().partition("=")
        kind = MIX_NAMES.get(name.strip().lower())
        if kind is None:
            known = ", ".join(MIX_NAMES)
            raise UsageError(f"--mix: unknown operation {name.strip()!r} (known: {known})")
        if not eq or not weight.strip().isdigit():
            raise UsageError(f"--mix: {item.strip()!r}: expected {name.strip()}=WEIGHT (0 or more)")
        if kind in mix:
            raise UsageError(f"--mix: {name.strip()} is given twice")
        mix[kind] = int(weight)
    if not any(mix.values()):
        raise UsageError("--mix: every weight is 0")
    return mix


def options_from_args(args: argparse.Namespace) -> StressOptions:
    """Validate what argparse could not; UsageError names the option."""
    uris = []
    for text in args.uris:
        try:
            uris.append(parse_uri(text))
        except UriError as exc:
            raise UsageError(str(exc)) from None
    if args.clients < len(uris):
        raise UsageError(f"--clients {args.clients}: fewer clients than URIs ({len(uris)})")
    if args.clients > MAX_CLIENTS:
        raise UsageError(f"--clients {args.clients}: at most {MAX_CLIENTS}")
    duration = _duration("--duration", args.duration) if args.duration is not None else None
    if duration is not None and duration <= 0:
        raise UsageError("--duration must be more than 0")
    if duration is None and args.ops is None:
        duration = DEFAULT_DURATION
    shared = args.shared or 0
    mix = _mix(args.mix, shared)
    abuse = _abuse(args.abuse)
    if args.watch_pid is not None and not os.path.exists(f"/proc/{args.watch_pid}/status"):
        raise UsageError(f"--watch-pid {args.watch_pid}: no such process on this machine")
    timeout = _duration("--timeout", args.timeout)
    if timeout <= 0:
        raise UsageError("--timeout must be more than 0")
    return StressOptions(
        uris=tuple(uris),
        clients=args.clients,
        duration=duration,
        ops=args.ops,
        seed=args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big"),
        mix=mix,
        fua_percent=args.fua,
        queue_depth=args.queue_depth,
        max_size=args.max_size,
        region_size=args.region_size,
        align=args.align,
        shared=shared,
        cell_size=args.cell_size,
        trimmed=args.trimmed,
        allow_errors=args.allow_errors,
        structured=not args.simple_replies,
        timeout=timeout,
        abuse=abuse,
        abusers=args.abusers,
        watch_pid=args.watch_pid,
        json=args.json,
        progress=args.progress,
    )


def _duration(option: str, text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from None


def _mix(text: str | None, shared: int) -> dict[Kind, int]:
    if text is None:
        return parse_mix(DEFAULT_MIX + ("," + DEFAULT_SHARED_MIX if shared else ""))
    mix = parse_mix(text)
    uses_shared = [k.value for k, w in mix.items() if k.shared and w]
    if uses_shared and not shared:
        raise UsageError(f"--mix: {uses_shared[0]} needs a shared region (--shared SIZE)")
    return mix


def _abuse(text: str | None) -> tuple[str, ...]:
    if text is None:
        return ()
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    for kind in kinds:
        if kind not in ABUSE_KINDS:
            raise UsageError(f"--abuse: unknown kind {kind!r} (known: {', '.join(ABUSE_KINDS)})")
    if len(set(kinds)) != len(kinds) or not kinds:
        raise UsageError(f"--abuse {text!r}: list each kind once")
    return kinds
