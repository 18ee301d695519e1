#!/usr/bin/env python3
"""Measure nbdcrypt against nbdkit and qemu-nbd on the same machine, in one run.

One backing file of non-zero data is created in a private temporary directory. For each
repeat round, each server in turn is started on a unix socket (or 127.0.0.1 TCP with --tcp),
the same clients (nbdcopy, fio's nbd engine) run every workload against it once, and the server
is stopped (SIGTERM, then SIGKILL). Medians over the rounds are written as Markdown to
docs/BENCHMARKS.md (or --output PATH, `-` for stdout).

Servers and workloads are data (SERVERS, WORKLOADS, TARGETS below): a new server definition or
workload is one more entry, not more code paths.

Quick development run (small, short, does not touch docs/):
    python benchmarks/run.py --size 64M --runtime 3 --repeats 1 --output -
Full run (quiet machine):
    python benchmarks/run.py
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import quote

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO / "docs" / "BENCHMARKS.md"
EXPORT = "bench"
MIB = 1 << 20
GB = 1e9  # throughput is reported in decimal GB/s
READY_TIMEOUT = 30.0  # seconds for a server to answer a handshake
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL
UNIX_PATH_MAX = 107

# --------------------------------------------------------------------------------------------
# Where a server listens


@dataclass(frozen=True)
class Endpoint:
    """A unix socket path, or a TCP host and port."""

    socket: Path | None = None
    host: str = "127.0.0.1"
    port: int = 0

    def uri(self, export: str) -> str:
        if self.socket is not None:
            return f"nbd+unix:///{quote(export)}?socket={quote(str(self.socket))}"
        return f"nbd://{self.host}:{self.port}/{quote(export)}"


def free_tcp_port(host: str) -> int:
    """A port that was free a moment ago (the server binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


# --------------------------------------------------------------------------------------------
# Server definitions


@dataclass(frozen=True)
class ServerContext:
    """What a server definition needs to build its command line."""

    workdir: Path  # private to this server: socket, config, log
    backing: Path  # the shared plain backing file
    endpoint: Endpoint
    export: str
    python: str  # the interpreter that runs nbdcrypt


def _no_prepare(ctx: ServerContext) -> None:
    del ctx


@dataclass(frozen=True)
class ServerDef:
    """How to start one NBD server serving ctx.backing (or an image prepared from it)."""

    name: str
    description: str
    tools: tuple[str, ...]  # executables that must be on PATH
    command: Callable[[ServerContext], list[str]]
    version: Callable[[ServerContext], str]
    prepare: Callable[[ServerContext], None] = _no_prepare  # once, before the first round
    env: Mapping[str, str] = field(default_factory=dict)
    # False for exports smaller than their image (e.g. LUKS: the header is not exported)
    same_size_as_backing: bool = True


def nbdkit_command(ctx: ServerContext) -> list[str]:
    ep = ctx.endpoint
    listen = ["-U", str(ep.socket)] if ep.socket else ["-i", ep.host, "-p", str(ep.port)]
    # nbdkit serves every export name; -e only affects --run, so it is not passed.
    return ["nbdkit", "-f", *listen, "file", str(ctx.backing)]


def qemu_nbd_command(ctx: ServerContext) -> list[str]:
    ep = ctx.endpoint
    listen = ["-k", str(ep.socket)] if ep.socket else ["-b", ep.host, "-p", str(ep.port)]
    return [
        "qemu-nbd",
        "-f",
        "raw",
        "-x",
        ctx.export,
        "--shared=8",  # more than one client, and advertise multi-conn
        "--persistent",
        "--cache=writeback",
        *listen,
        str(ctx.backing),
    ]


def nbdcrypt_config_path(ctx: ServerContext) -> Path:
    return ctx.workdir / "nbdcrypt.yaml"


def nbdcrypt_prepare(ctx: ServerContext) -> None:
    # JSON strings are valid YAML scalars: safe quoting for any path.
    path = json.dumps(str(ctx.backing.resolve()))
    name = json.dumps(ctx.export)
    text = f"devices:\n  {name}:\n    file: {path}\nexports:\n  {name}:\n    device: {name}\n"
    nbdcrypt_config_path(ctx).write_text(text)


def nbdcrypt_command(ctx: ServerContext) -> list[str]:
    ep = ctx.endpoint
    listen = f"unix://{ep.socket}" if ep.socket else f"tcp://{ep.host}:{ep.port}"
    cfg = str(nbdcrypt_config_path(ctx))
    serve = ["serve", "-c", cfg, "--listen", listen, "--log-level", "warning"]
    return [ctx.python, "-m", "nbdcrypt", *serve]


def first_line(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def nbdcrypt_version(ctx: ServerContext) -> str:
    code = "import importlib.metadata as m, sys\nfor p in ('uvloop', 'cryptography'):\n"
    code += "    try: v = m.version(p)\n    except Exception: v = 'missing'\n"
    code += "    print(p, v, end='; ')\nprint('Python', sys.version.split()[0])"
    deps = first_line([ctx.python, "-c", code])
    return f"nbdcrypt {git_revision()} ({deps})"


SERVERS: dict[str, ServerDef] = {
    s.name: s
    for s in (
        ServerDef(
            name="nbdkit",
            description="file plugin with its defaults: page cache, 16 worker threads",
            tools=("nbdkit",),
            command=nbdkit_command,
            version=lambda ctx: first_line(["nbdkit", "--version"]),
        ),
        ServerDef(
            name="qemu-nbd",
            description="raw, writeback (page) cache, up to 8 clients, so multi-conn",
            tools=("qemu-nbd",),
            command=qemu_nbd_command,
            version=lambda ctx: first_line(["qemu-nbd", "--version"]),
        ),
        ServerDef(
            name="nbdcrypt",
            description="one file device exported as-is, no encryption",
            tools=(),
            command=nbdcrypt_command,
            version=nbdcrypt_version,
            prepare=nbdcrypt_prepare,
            env={"PYTHONPATH": str(REPO)},
        ),
    )
}

# --------------------------------------------------------------------------------------------
# Workloads


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    higher_is_better: bool
    fmt: Callable[[float], str]


def fmt_gbps(v: float) -> str:
    return f"{v:.2f}"


def fmt_iops(v: float) -> str:
    return f"{v:,.0f}"


def fmt_us(v: float) -> str:
    return f"{v:,.1f}"


GBPS = Metric("gbps", "GB/s", True, fmt_gbps)
IOPS = Metric("iops", "IOPS", True, fmt_iops)
LAT_MEAN = Metric("lat_mean_us", "mean latency (us)", False, fmt_us)
LAT_P99 = Metric("lat_p99_us", "p99 latency (us)", False, fmt_us)


@dataclass(frozen=True)
class RunContext:
    """One workload run against one running server."""

    uri: str
    size: int  # export size in bytes
    runtime: int  # seconds, for time-based workloads
    write_source: Path  # a file of `size` bytes for sequential writes
    out: Path  # where the client writes machine-readable output


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    metrics: tuple[Metric, ...]
    command: Callable[[RunContext], list[str]]
    # (context, wall-clock seconds) -> metric values
    parse: Callable[[RunContext, float], dict[str, float]]
    timeout: Callable[[RunContext], float]
    estimate: Callable[[int, int], float]  # (size, runtime) -> rough seconds, for the ETA


def nbdcopy_timeout(ctx: RunContext) -> float:
    return 120.0 + ctx.size / 20e6  # far beyond any plausible run; only to avoid hanging


def nbdcopy_estimate(size: int, runtime: int) -> float:
    del runtime
    return 2.0 + size / 0.3e9  # startup and sync, and a slow server


def throughput(ctx: RunContext, seconds: float) -> dict[str, float]:
    return {"gbps": ctx.size / seconds / GB}


def nbdcopy_read(key: str) -> Workload:
    return Workload(
        key=key,
        title="Sequential read, whole export (nbdcopy to null:)",
        metrics=(GBPS,),
        command=lambda ctx: ["nbdcopy", ctx.uri, "null:"],
        parse=throughput,
        timeout=nbdcopy_timeout,
        estimate=nbdcopy_estimate,
    )


def nbdcopy_write(key: str) -> Workload:
    return Workload(
        key=key,
        title="Sequential write, whole export (nbdcopy from a local file)",
        metrics=(GBPS,),
        command=lambda ctx: ["nbdcopy", str(ctx.write_source), ctx.uri],
        parse=throughput,
        timeout=nbdcopy_timeout,
        estimate=nbdcopy_estimate,
    )


def fio_command(rw: str, bs: str, depth: int) -> Callable[[RunContext], list[str]]:
    def command(ctx: RunContext) -> list[str]:
        return [
            "fio",
            f"--name={rw}-{bs}-qd{depth}",
            "--ioengine=nbd",
            f"--uri={ctx.uri}",
            f"--rw={rw}",
            f"--bs={bs}",
            f"--iodepth={depth}",
            "--time_based",
            f"--runtime={ctx.runtime}",
            "--lat_percentiles=1",
            "--output-format=json",
            f"--output={ctx.out}",  # fio prints a banner on stdout before the JSON
        ]

    return command


def fio_parse(direction: str) -> Callable[[RunContext, float], dict[str, float]]:
    def parse(ctx: RunContext, seconds: float) -> dict[str, float]:
        del seconds
        job = json.loads(ctx.out.read_text())["jobs"][0]
        if job.get("error"):
            raise RuntimeError(f"fio job error {job['error']}")
        stats = job[direction]
        if not stats.get("total_ios"):
            raise RuntimeError("fio completed no I/O")
        lat = stats["lat_ns"]
        return {
            "iops": float(stats["iops"]),
            "lat_mean_us": float(lat["mean"]) / 1000,
            "lat_p99_us": float(lat["percentile"]["99.000000"]) / 1000,
        }

    return parse


def fio_workload(key: str, rw: str, depth: int, latency: bool) -> Workload:
    kind = "read" if "read" in rw else "write"
    order = "Random" if rw.startswith("rand") else "Sequential"
    return Workload(
        key=key,
        title=f"{order} 4 KiB {kind}s, queue depth {depth} (fio nbd engine, 1 connection)",
        metrics=(IOPS, LAT_MEAN, LAT_P99) if latency else (IOPS,),
        command=fio_command(rw, "4k", depth),
        parse=fio_parse(kind),
        timeout=lambda ctx: ctx.runtime + 60.0,
        estimate=lambda size, runtime: runtime + 1.0,
    )


WORKLOADS: dict[str, Workload] = {
    w.key: w
    for w in (
        nbdcopy_read("seq-read"),
        nbdcopy_write("seq-write"),
        fio_workload("randread-qd32", "randread", 32, latency=False),
        fio_workload("randwrite-qd32", "randwrite", 32, latency=False),
        fio_workload("randread-qd1", "randread", 1, latency=True),
        fio_workload("randwrite-qd1", "randwrite", 1, latency=True),
    )
}


@dataclass(frozen=True)
class Target:
    """subject's median / baseline's median must satisfy `op bound`."""

    workload: str
    metric: str
    op: str  # ">=" or "<="
    bound: float
    subject: str = "nbdcrypt"
    baseline: str = "nbdkit"

    def holds(self, ratio: float) -> bool:
        return ratio >= self.bound if self.op == ">=" else ratio <= self.bound


TARGETS: tuple[Target, ...] = (
    Target("randread-qd32", "iops", ">=", 1.0),
    Target("randwrite-qd32", "iops", ">=", 1.0),
    Target("seq-read", "gbps", ">=", 0.9),
    Target("seq-write", "gbps", ">=", 0.9),
    Target("randread-qd1", "lat_mean_us", "<=", 1.5),
)

# --------------------------------------------------------------------------------------------
# Process handling


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP: unwind like Ctrl-C so every finally block runs."""


def raise_interrupted(signum: int, frame: FrameType | None) -> None:
    del frame
    raise Interrupted(signal.Signals(signum).name)


_LIBC = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In the child before exec: get SIGKILL if this script dies, even by SIGKILL."""
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


@dataclass
class RunningServer:
    proc: subprocess.Popen[bytes]
    logfile: Path
    endpoint: Endpoint
    export_size: int = 0  # as the server reports it, once ready


def start_server(sdef: ServerDef, ctx: ServerContext, logfile: Path) -> RunningServer:
    if ctx.endpoint.socket is not None:
        ctx.endpoint.socket.unlink(missing_ok=True)
    env = {**os.environ, **sdef.env}
    with logfile.open("ab") as logf:
        proc = subprocess.Popen(
            sdef.command(ctx),
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
            start_new_session=True,  # Ctrl-C reaches only us; we stop servers in order
            preexec_fn=die_with_parent,  # noqa: PLW1509 (single-threaded parent)
        )
    return RunningServer(proc, logfile, ctx.endpoint)


def export_size(uri: str) -> int | None:
    try:
        out = subprocess.run(
            ["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=10, check=False
        )
    except subprocess.TimeoutExpired:
        return None
    return int(out.stdout) if out.returncode == 0 and out.stdout.strip().isdigit() else None


def wait_ready(server: RunningServer, uri: str, name: str) -> int:
    """Until a full handshake succeeds; the export's size."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(
                f"{name} exited with {server.proc.returncode} while starting:\n"
                + tail(server.logfile)
            )
        size = export_size(uri)
        if size is not None:
            return size
        time.sleep(0.1)
    raise RuntimeError(f"{name} not ready after {READY_TIMEOUT:.0f} s:\n" + tail(server.logfile))


def stop_server(server: RunningServer, name: str) -> None:
    """SIGTERM, then SIGKILL; an exit before this point is reported by the caller."""
    proc = server.proc
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        log(f"  {name} (pid {proc.pid}) ignored SIGTERM for {STOP_TIMEOUT:.0f} s: SIGKILL")
        proc.kill()
        proc.wait()
    if proc.returncode not in (0, -signal.SIGTERM):
        log(f"  {name} exited with {proc.returncode} on SIGTERM:\n{tail(server.logfile)}")


@contextlib.contextmanager
def serving(sdef: ServerDef, ctx: ServerContext) -> Iterator[RunningServer]:
    server = start_server(sdef, ctx, ctx.workdir / "server.log")
    try:
        server.export_size = wait_ready(server, ctx.endpoint.uri(ctx.export), sdef.name)
        backing = ctx.backing.stat().st_size
        if sdef.same_size_as_backing and server.export_size != backing:
            raise RuntimeError(f"{sdef.name} serves {server.export_size} bytes, not {backing}")
        yield server
    finally:
        stop_server(server, sdef.name)


# --------------------------------------------------------------------------------------------
# Data files


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)\s*([KMGT]?)(i?B)?", text.strip(), re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 64M, 1G)")
    shift = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2).upper()]
    size = int(m.group(1)) << shift
    if size <= 0 or size % MIB:
        raise argparse.ArgumentTypeError("size must be a positive multiple of 1 MiB")
    return size


def write_data_file(path: Path, size: int, seed: int) -> None:
    """Non-zero, incompressible-looking data, fully allocated, flushed to disk."""
    chunk = 4 * MIB
    block = bytearray(random.Random(seed).randbytes(chunk))
    with path.open("wb") as f:
        for i, offset in enumerate(range(0, size, chunk)):
            block[:8] = (i + 1).to_bytes(8, "little")  # every chunk differs
            f.write(block[: min(chunk, size - offset)])
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------
# Running the workloads

Samples = dict[str, dict[str, dict[str, list[float]]]]  # server -> workload -> metric -> values


@dataclass(frozen=True)
class Options:
    """The command line, typed."""

    size: int
    runtime: int
    repeats: int
    servers: tuple[str, ...]
    workloads: tuple[str, ...]
    baseline: str
    tcp: bool
    workdir: Path
    keep_workdir: bool
    python: str
    output: str
    json: Path | None


@dataclass
class Bench:
    args: Options
    workdir: Path
    backing: Path
    servers: list[ServerDef]
    workloads: list[Workload]
    samples: Samples = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    server_commands: dict[str, list[str]] = field(default_factory=dict)
    client_commands: dict[str, list[str]] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)


def server_context(bench: Bench, sdef: ServerDef) -> ServerContext:
    wd = bench.workdir / sdef.name
    if bench.args.tcp:
        endpoint = Endpoint(host="127.0.0.1", port=free_tcp_port("127.0.0.1"))
    else:
        endpoint = Endpoint(socket=wd / "nbd.sock")
    return ServerContext(wd, bench.backing, endpoint, EXPORT, bench.args.python)


def write_source(bench: Bench, size: int) -> Path:
    """A data file of exactly `size` bytes to copy onto an export; made once per size."""
    path = bench.workdir / f"write-source-{size}.img"
    if not path.exists():
        write_data_file(path, size, seed=size)
    return path


def run_client(argv: list[str], out: Path, timeout: float) -> float:
    """Run one client to completion; wall-clock seconds. Raises on failure."""
    logfile = out.with_suffix(".log")
    out.unlink(missing_ok=True)
    with logfile.open("wb") as logf:
        start = time.perf_counter()
        rc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
            preexec_fn=die_with_parent,  # a client never outlives this script either
        ).returncode
        seconds = time.perf_counter() - start
    if rc != 0:
        raise RuntimeError(f"{argv[0]} exited with {rc}:\n{tail(logfile)}")
    return seconds


def run_workload(bench: Bench, sdef: ServerDef, wl: Workload, server: RunningServer) -> None:
    ctx = RunContext(
        uri=server.endpoint.uri(EXPORT),
        size=server.export_size,
        runtime=bench.args.runtime,
        write_source=write_source(bench, server.export_size),
        out=bench.workdir / sdef.name / f"{wl.key}.out",
    )
    argv = wl.command(ctx)
    shown_argv = [
        a.replace(ctx.uri, "$URI").replace(str(ctx.out.parent), "$WORK/SERVER") for a in argv
    ]
    bench.client_commands.setdefault(wl.key, shown_argv)
    values = wl.parse(ctx, run_client(argv, ctx.out, wl.timeout(ctx)))
    per_metric = bench.samples.setdefault(sdef.name, {}).setdefault(wl.key, {})
    for key, value in values.items():
        per_metric.setdefault(key, []).append(value)
    shown = ", ".join(f"{m.label} {m.fmt(values[m.key])}" for m in wl.metrics)
    log(f"  {sdef.name:10} {wl.key:15} {shown}")
    if server.proc.poll() is not None:
        raise RuntimeError("the server is gone")
    os.sync()  # settle dirty pages outside the timed region, so writeback does not spill over


def brief(msg: str) -> str:
    """First line and last line of a multi-line error, for the report."""
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    if len(lines) <= 1:
        return "".join(lines)
    return f"{lines[0]} ... {lines[-1]}".replace("|", "/")


def run_round(bench: Bench, sdef: ServerDef, ctx: ServerContext) -> None:
    with serving(sdef, ctx) as server:
        for wl in bench.workloads:
            try:
                run_workload(bench, sdef, wl, server)
            except (RuntimeError, subprocess.TimeoutExpired, ValueError, KeyError) as exc:
                msg = f"{sdef.name} {wl.key}: {exc}"
                log(f"  ERROR {msg}\n{tail(ctx.workdir / 'server.log')}")
                bench.errors.append(brief(msg))
                if server.proc.poll() is not None:  # it crashed: the next round starts it afresh
                    crash = f"{sdef.name} exited with {server.proc.returncode} during {wl.key}"
                    bench.errors.append(brief(f"{crash}\n{tail(ctx.workdir / 'server.log')}"))
                    return


def run_all(bench: Bench) -> None:
    contexts: dict[str, ServerContext] = {}
    for sdef in bench.servers:
        ctx = server_context(bench, sdef)
        ctx.workdir.mkdir()
        if ctx.endpoint.socket and len(str(ctx.endpoint.socket)) > UNIX_PATH_MAX:
            raise SystemExit(f"socket path too long: {ctx.endpoint.socket} (use --workdir)")
        sdef.prepare(ctx)
        contexts[sdef.name] = ctx
        bench.server_commands[sdef.name] = sdef.command(ctx)
        bench.versions[sdef.name] = sdef.version(ctx)
    for r in range(bench.args.repeats):
        for sdef in bench.servers:
            log(f"[round {r + 1}/{bench.args.repeats}] {sdef.name}")
            ctx = contexts[sdef.name]
            if bench.args.tcp:  # a fresh port each time; the old one may linger in TIME_WAIT
                ctx = server_context(bench, sdef)
            try:
                run_round(bench, sdef, ctx)
            except RuntimeError as exc:
                log(f"  ERROR {exc}")
                bench.errors.append(brief(f"{sdef.name}: {exc}"))


# --------------------------------------------------------------------------------------------
# The report


def git_revision() -> str:
    rev = first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    status = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return f"{rev}{' + uncommitted changes' if status.strip() else ''}"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_lines(bench: Bench, load_before: str) -> list[str]:
    client_versions = {
        "nbdcopy": first_line(["nbdcopy", "--version"]),
        "fio": first_line(["fio", "--version"]),
    }
    rows = [
        ("CPUs (nproc)", str(len(os.sched_getaffinity(0)))),
        ("CPU model", cpu_model()),
        ("Kernel", f"{platform.system()} {platform.release()}"),
        ("Load average before / after", f"{load_before} / {loadavg()}"),
        *((f"Server {k}", v) for k, v in bench.versions.items()),
        *((f"Client {k}", v) for k, v in client_versions.items()),
        ("Benchmark script Python", platform.python_version()),
    ]
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def display(argv: Sequence[str], workdir: Path) -> str:
    return shlex.join(argv).replace(str(workdir), "$WORK")


def summary(values: list[float], fmt: Callable[[float], str], rounds: int) -> tuple[str, str]:
    """(median, "min - max"); the median says so when some rounds failed."""
    if not values:
        return "error", ""
    median = fmt(statistics.median(values))
    if len(values) < rounds:
        median += f" ({len(values)} of {rounds} runs)"
    lo, hi = min(values), max(values)
    return median, f"{fmt(lo)} - {fmt(hi)}" if len(values) > 1 else ""


def median_of(bench: Bench, server: str, workload: str, metric: str) -> float | None:
    values = bench.samples.get(server, {}).get(workload, {}).get(metric, [])
    return statistics.median(values) if values else None


def workload_table(bench: Bench, wl: Workload) -> list[str]:
    base = bench.args.baseline
    has_base = any(s.name == base for s in bench.servers)
    head = ["Server"]
    for m in wl.metrics:
        head += [f"{m.label} median", "min - max", *([f"/ {base}"] if has_base else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for sdef in bench.servers:
        cells = [sdef.name]
        for m in wl.metrics:
            values = bench.samples.get(sdef.name, {}).get(wl.key, {}).get(m.key, [])
            cells += list(summary(values, m.fmt, bench.args.repeats))
            if has_base:
                cells.append(ratio_text(bench, sdef.name, base, wl.key, m.key))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def ratio(bench: Bench, subject: str, baseline: str, workload: str, metric: str) -> float | None:
    num = median_of(bench, subject, workload, metric)
    den = median_of(bench, baseline, workload, metric)
    return num / den if num is not None and den else None


def ratio_text(bench: Bench, subject: str, baseline: str, workload: str, metric: str) -> str:
    r = ratio(bench, subject, baseline, workload, metric)
    return "n/a" if r is None else f"{r:.2f}x"


def target_lines(bench: Bench) -> tuple[list[str], list[str]]:
    lines = [
        "| Target | subject | baseline | ratio | verdict |",
        "|---|---|---|---|---|",
    ]
    verdicts = []
    for t in TARGETS:
        wl = WORKLOADS[t.workload]
        metric = next(m for m in wl.metrics if m.key == t.metric)
        r = ratio(bench, t.subject, t.baseline, t.workload, t.metric)
        verdict = "not measured" if r is None else ("PASS" if t.holds(r) else "FAIL")
        verdicts.append(verdict)
        subj = median_of(bench, t.subject, t.workload, t.metric)
        base = median_of(bench, t.baseline, t.workload, t.metric)
        lines.append(
            f"| {t.workload} {metric.label}: {t.subject} {t.op} {t.bound:g}x {t.baseline} "
            f"| {metric.fmt(subj) if subj is not None else 'n/a'} "
            f"| {metric.fmt(base) if base is not None else 'n/a'} "
            f"| {'n/a' if r is None else f'{r:.2f}x'} | **{verdict}** |"
        )
    return lines, verdicts


def how_to_run(bench: Bench) -> list[str]:
    this_run = shlex.join(["python", "benchmarks/run.py", *sys.argv[1:]])
    return [
        "## How to run",
        "",
        "On a quiet machine (nothing else running; the run takes about 15 minutes with the",
        "defaults: 3 rounds x 3 servers x (4 x 20 s of fio + two 1 GiB copies)):",
        "",
        "```sh",
        "cd /path/to/nbdcrypt && . .venv/bin/activate",
        "python benchmarks/run.py                  # writes docs/BENCHMARKS.md",
        "python benchmarks/run.py --size 64M --runtime 3 --repeats 1 --output -   # smoke test",
        "```",
        "",
        "Needs nbdkit, qemu-nbd (qemu-utils), nbdcopy and nbdinfo (libnbd-bin), and fio with its",
        "nbd engine. For `--servers`, `--workloads`, `--tcp`, `--json` and more see `--help`.",
        "",
        f"This document was produced by: `{this_run}`",
    ]


def method_lines(bench: Bench) -> list[str]:
    a = bench.args
    size = bench.backing.stat().st_size
    transport = "127.0.0.1 (TCP)" if a.tcp else "a unix socket"
    return [
        "## Method",
        "",
        f"- One backing file of {size // MIB} MiB of non-zero, fully allocated data in a temporary",
        "  directory (`$WORK` below), written once and fsynced; it stays in the page cache, so",
        "  this measures the servers' request paths, not the disk.",
        f"- {a.repeats} round(s); in each round every server in turn is started, listening on",
        f"  {transport}, runs every workload once, and is stopped (SIGTERM). Rounds",
        "  interleave the servers so drifting background load hits them alike. Tables give the",
        "  median over the rounds and the min - max. `sync` runs between workloads, outside the",
        "  timed part.",
        f"- fio runs are time-based, {a.runtime} s each, one NBD connection; latency is fio's",
        "  total latency (submission + completion) per request.",
        "- nbdcopy throughput is the export size divided by the wall-clock time of the whole",
        "  nbdcopy process, in 10^9 bytes/s. nbdcopy's defaults are used: with multi-conn",
        "  (all three servers advertise it) up to 4 connections but no more than --threads,",
        f"  which defaults to the number of CPUs (so {nbdcopy_connections()} connections here);",
        "  64 requests in flight per connection, 256 KiB requests; zero-block detection is on,",
        "  but the data has no zero blocks, so every byte is read or written.",
        "- Clients and servers share the machine's CPUs: on a small machine the clients' CPU",
        "  time counts against every server alike.",
        "- Sequential writes copy a second prepared file of the export's size (other data).",
    ]


def nbdcopy_connections() -> int:
    return min(4, len(os.sched_getaffinity(0)))


def busy_warning(load_before: str) -> list[str]:
    load1 = float(load_before.split(maxsplit=1)[0])
    if load1 <= 0.5:
        return []
    return [
        "",
        f"**Warning: the 1-minute load average was {load1:.2f} when the run started; other",
        "work on the machine makes these figures noisy. Rerun on a quiet machine.**",
    ]


def commands_lines(bench: Bench) -> list[str]:
    lines = ["## Command lines", "", "Servers:", ""]
    for sdef in bench.servers:
        cmd = bench.server_commands.get(sdef.name, [])
        lines += [f"- {sdef.name}: {sdef.description}.", f"  `{display(cmd, bench.workdir)}`"]
    if any(s.name == "nbdcrypt" for s in bench.servers):
        cfg = bench.workdir / "nbdcrypt" / "nbdcrypt.yaml"
        body = cfg.read_text() if cfg.exists() else ""
        lines += ["", "nbdcrypt's config:", "", "```yaml", *display_text(body, bench), "```"]
    ep = "nbd://127.0.0.1:PORT/" if bench.args.tcp else "nbd+unix:///"
    example = f"{ep}{EXPORT}" + ("" if bench.args.tcp else "?socket=$WORK/SERVER/nbd.sock")
    lines += ["", f"Clients, the same for every server (`$URI` is `{example}`):", ""]
    for key, argv in bench.client_commands.items():
        lines.append(f"- {key}: `{display(argv, bench.workdir)}`")
    return lines


def display_text(text: str, bench: Bench) -> list[str]:
    return text.replace(str(bench.workdir), "$WORK").splitlines()


def render(bench: Bench, started: datetime.datetime, load_before: str) -> str:
    out = [
        "# Benchmarks: nbdcrypt vs nbdkit vs qemu-nbd",
        "",
        "Generated by `benchmarks/run.py`; do not edit by hand, rerun it.",
        "",
        f"Run started {started:%Y-%m-%d %H:%M} UTC.",
        "",
        "## Machine",
        "",
        *machine_lines(bench, load_before),
        *busy_warning(load_before),
        "",
        *method_lines(bench),
        "",
        "## Results",
        "",
    ]
    for wl in bench.workloads:
        out += [f"### {wl.key}: {wl.title}", "", *workload_table(bench, wl), ""]
    tlines, verdicts = target_lines(bench)
    overall = "PASS" if all(v == "PASS" for v in verdicts) else "FAIL"
    if "not measured" in verdicts and "FAIL" not in verdicts:
        overall = "INCOMPLETE (not every target was measured)"
    out += ["## Targets", ""]
    out += ["nbdcrypt (plain file export) against nbdkit's file plugin, same run:", ""]
    out += [*tlines, "", f"Overall: **{overall}**", ""]
    if bench.errors:
        out += ["## Errors", "", *(f"- {e}" for e in bench.errors), ""]
    out += [*commands_lines(bench), "", *how_to_run(bench), ""]
    return "\n".join(out)


def write_output(text: str, dest: str) -> None:
    if dest == "-":
        sys.stdout.write(text)
        return
    path = Path(dest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    log(f"wrote {path}")


def write_json(bench: Bench, dest: Path) -> None:
    data: dict[str, Any] = {
        "samples": bench.samples,
        "errors": bench.errors,
        "servers": {k: display(v, bench.workdir) for k, v in bench.server_commands.items()},
        "clients": {k: display(v, bench.workdir) for k, v in bench.client_commands.items()},
        "versions": bench.versions,
    }
    dest.write_text(json.dumps(data, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# Command line


def choose(kind: str, text: str, known: Mapping[str, object]) -> tuple[str, ...]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise SystemExit(f"unknown {kind} {unknown}; choose from {', '.join(known)}")
    return tuple(names)


def parse_args(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Quick check: --size 64M --runtime 3 --repeats 1 --output -",
    )
    p.add_argument(
        "--size", type=parse_size, default=parse_size("1G"), help="backing file size (default 1G)"
    )
    p.add_argument("--runtime", type=int, default=20, help="seconds per fio run (default 20)")
    p.add_argument("--repeats", type=int, default=3, help="rounds; medians reported (default 3)")
    p.add_argument(
        "--servers",
        default=",".join(SERVERS),
        help=f"comma-separated, in order (default {','.join(SERVERS)})",
    )
    p.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help=f"comma-separated (default {','.join(WORKLOADS)})",
    )
    p.add_argument("--baseline", default="nbdkit", help="server the ratios compare to")
    p.add_argument("--tcp", action="store_true", help="listen on 127.0.0.1 TCP, not unix sockets")
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path("/var/tmp"),
        help="parent of the temporary directory (default /var/tmp)",
    )
    p.add_argument("--keep-workdir", action="store_true", help="keep data files and logs")
    p.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter that runs nbdcrypt (default: this one)",
    )
    p.add_argument(
        "--output",
        default=str(DEFAULT_OUTPUT),
        help="Markdown report path, '-' for stdout (default docs/BENCHMARKS.md)",
    )
    p.add_argument("--json", type=Path, help="also write every sample as JSON here")
    ns = p.parse_args(argv)
    if ns.repeats < 1 or ns.runtime < 1:
        p.error("--repeats and --runtime must be at least 1")
    fields = {**vars(ns)}
    fields["servers"] = choose("servers", ns.servers, SERVERS)
    fields["workloads"] = choose("workloads", ns.workloads, WORKLOADS)
    return Options(**fields)


def check_tools(servers: list[ServerDef]) -> None:
    needed = {"nbdcopy", "nbdinfo", "fio", *(t for s in servers for t in s.tools)}
    missing = sorted(t for t in needed if shutil.which(t) is None)
    if missing:
        raise SystemExit(f"missing tools: {', '.join(missing)}")


def make_bench(args: Options, workdir: Path) -> Bench:
    servers = [SERVERS[n] for n in args.servers]
    workloads = [WORKLOADS[n] for n in args.workloads]
    return Bench(
        args=args,
        workdir=workdir,
        backing=workdir / "backing.img",
        servers=servers,
        workloads=workloads,
    )


def estimate_minutes(bench: Bench) -> float:
    """Rough wall-clock time: fio runtimes plus startup, copies and syncs."""
    a = bench.args
    per_round = 2 + sum(w.estimate(a.size, a.runtime) for w in bench.workloads)
    return a.repeats * len(bench.servers) * per_round / 60


def benchmark(args: Options, workdir: Path) -> int:
    bench = make_bench(args, workdir)
    check_tools(bench.servers)
    started = datetime.datetime.now(datetime.UTC)
    load_before = loadavg()
    log(f"workdir {workdir}; writing 2 x {args.size // MIB} MiB of data")
    log(f"expect about {estimate_minutes(bench):.0f} min")
    write_data_file(bench.backing, args.size, seed=1)
    write_source(bench, args.size)  # the usual size, made before anything is timed
    run_all(bench)
    if args.json:
        write_json(bench, args.json)
    write_output(render(bench, started, load_before), args.output)
    return 1 if bench.errors else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, raise_interrupted)
    args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="nbdbench-", dir=args.workdir))
    try:
        return benchmark(args, workdir)
    except KeyboardInterrupt as exc:
        log(f"interrupted ({str(exc) or 'SIGINT'}); servers stopped")
        return 130
    finally:
        if args.keep_workdir:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
