#!/usr/bin/env python3
"""Measure nbdcrypt against nbdkit and qemu-nbd on the same machine, in one run.

One backing file of non-zero data is created in a private temporary directory. For each
repeat round, each server in turn is started on a unix socket (or 127.0.0.1 TCP with --tcp),
the same clients (nbdcopy, fio's nbd engine) run its suite's workloads against it once, and the
server is stopped (SIGTERM, then SIGKILL). Medians over the rounds are written as Markdown to
docs/BENCHMARKS.md (or --output PATH, `-` for stdout), with a PASS/FAIL verdict per target.

Two suites (--suite plain|encrypted|all, default all), each with its servers, workloads and
targets: `plain` serves the backing file as-is (nbdcrypt, nbdkit's file plugin, qemu-nbd);
`encrypted` serves it through AES-256-XTS: nbdcrypt's dm-crypt style and blk-crypto (inline)
style exports with 512- and 4096-byte data units, against qemu-nbd and nbdkit's luks filter
serving a LUKS1 image of the same data (qemu-img; LUKS1 has 512-byte sectors only).

Servers, workloads, targets and suites are data (SERVERS, WORKLOADS, SUITES below): a new
server definition, workload or target is one more entry, not more code paths.

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
FULL_SIZE, FULL_RUNTIME, FULL_REPEATS = 1 << 30, 20, 3  # the defaults, the targets' setting
DATA_UNITS = (512, 4096)  # nbdcrypt's encrypted exports are measured with each

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

    workdir: Path  # private to this server: socket, config, key, log
    backing: Path  # the shared plain backing file
    endpoint: Endpoint
    export: str
    python: str  # the interpreter that runs nbdcrypt

    @property
    def shared(self) -> Path:
        """The run's directory: data files several servers use (the LUKS image, its secret)."""
        return self.backing.parent


def _no_prepare(ctx: ServerContext) -> None:
    del ctx


@dataclass(frozen=True)
class ServerDef:
    """How to start one NBD server serving ctx.backing (or an image prepared from it)."""

    name: str
    suite: str  # a key of SUITES: the report section and targets it belongs to
    description: str
    tools: tuple[str, ...]  # executables that must be on PATH
    command: Callable[[ServerContext], list[str]]
    version: Callable[[ServerContext], str]
    prepare: Callable[[ServerContext], None] = _no_prepare  # once, before the first round
    env: Mapping[str, str] = field(default_factory=dict)
    # False for an export whose size may differ from the backing file's (checked otherwise)
    same_size_as_backing: bool = True
    est_gbps: float = 0.3  # a slow sequential speed, only for the time estimate


def nbdkit_command(ctx: ServerContext) -> list[str]:
    # nbdkit serves every export name; -e only affects --run, so it is not passed.
    return ["nbdkit", "-f", *nbdkit_listen(ctx.endpoint), "file", str(ctx.backing)]


def nbdkit_listen(ep: Endpoint) -> list[str]:
    return ["-U", str(ep.socket)] if ep.socket else ["-i", ep.host, "-p", str(ep.port)]


def qemu_nbd_common(ctx: ServerContext) -> list[str]:
    ep = ctx.endpoint
    listen = ["-k", str(ep.socket)] if ep.socket else ["-b", ep.host, "-p", str(ep.port)]
    return [
        "-x",
        ctx.export,
        "--shared=8",  # more than one client, and advertise multi-conn
        "--persistent",
        "--cache=writeback",
        *listen,
    ]


def qemu_nbd_command(ctx: ServerContext) -> list[str]:
    return ["qemu-nbd", "-f", "raw", *qemu_nbd_common(ctx), str(ctx.backing)]


# LUKS1 peers: qemu-img's `luks` format (aes-xts-plain64, sha256, 512-byte sectors; LUKS1 has
# no other sector size, and qemu 7.2 and nbdkit 1.32 read only LUKS1). One image, made from
# the backing file so its payload is the same data, fully allocated, serves both peers.


def luks_paths(shared: Path) -> tuple[Path, Path]:
    """(image, passphrase file) in the run's directory, shared by the LUKS peers."""
    return shared / "luks1.img", shared / "luks1.passphrase"


def qemu_opt(value: str) -> str:
    """A value inside a qemu -object / --image-opts list: commas are doubled."""
    return value.replace(",", ",,")


def write_private(path: Path, data: bytes) -> None:
    """A new file only its owner can read (keys, passphrases)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def luks_convert_argv(backing: Path) -> list[str]:
    """qemu-img: the LUKS1 image of the backing file's data, every byte allocated."""
    image, passphrase = luks_paths(backing.parent)
    return [
        "qemu-img",
        "convert",
        "-f",
        "raw",
        "-O",
        "luks",
        "-S",
        "0",  # allocate everything: no holes for nbdcopy to skip
        "--object",
        f"secret,id=sec0,file={qemu_opt(str(passphrase))}",
        "-o",
        "key-secret=sec0,iter-time=10",  # a fast PBKDF: startup is not what is measured
        str(backing),
        str(image),
    ]


def luks_prepare(ctx: ServerContext) -> None:
    image, passphrase = luks_paths(ctx.shared)
    if image.exists():
        return  # the other LUKS peer made it
    write_private(passphrase, os.urandom(16).hex().encode())  # no newline: both peers agree
    log(f"  making the LUKS1 image ({ctx.backing.stat().st_size // MIB} MiB payload)")
    argv = luks_convert_argv(ctx.backing)
    for _ in range(5):  # qemu's PBKDF2 calibration can read 0 ms of CPU time: try again
        out = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
        if out.returncode == 0 or "Unable to get accurate CPU usage" not in out.stderr:
            break
    if out.returncode != 0:
        image.unlink(missing_ok=True)
        raise SystemExit(f"qemu-img convert failed ({out.returncode}): {out.stderr.strip()}")
    with image.open("rb+") as f:
        os.fsync(f.fileno())


def qemu_nbd_luks_command(ctx: ServerContext) -> list[str]:
    image, passphrase = luks_paths(ctx.shared)
    return [
        "qemu-nbd",
        "--object",
        f"secret,id=sec0,file={qemu_opt(str(passphrase))}",
        "--image-opts",
        f"driver=luks,key-secret=sec0,file.filename={qemu_opt(str(image))}",
        *qemu_nbd_common(ctx),
    ]


def nbdkit_luks_command(ctx: ServerContext) -> list[str]:
    image, passphrase = luks_paths(ctx.shared)
    listen = nbdkit_listen(ctx.endpoint)
    return [
        "nbdkit",
        "-f",
        *listen,
        "--filter=luks",
        "file",
        str(image),
        f"passphrase=+{passphrase}",
    ]


# nbdcrypt: each definition writes its own config (device `f` is the shared backing file).


def nbdcrypt_config_path(ctx: ServerContext) -> Path:
    return ctx.workdir / "nbdcrypt.yaml"


def yaml_str(text: str) -> str:
    # JSON strings are valid YAML scalars: safe quoting for any path.
    return json.dumps(text)


def plain_config(ctx: ServerContext) -> str:
    path, name = yaml_str(str(ctx.backing.resolve())), yaml_str(ctx.export)
    return f"devices:\n  {name}:\n    file: {path}\nexports:\n  {name}:\n    device: {name}\n"


def loop_config(ctx: ServerContext) -> str:
    """The plain export with every connection on the one uvloop loop (`server.io: loop`)."""
    return "server: {io: loop}\n" + plain_config(ctx)


def crypt_config(unit: int) -> Callable[[ServerContext], str]:
    """dm-crypt style: a crypt table line over the file, AES-256-XTS, `unit`-byte sectors."""

    def config(ctx: ServerContext) -> str:
        sectors = ctx.backing.stat().st_size // 512
        key = os.urandom(64).hex()  # AES-256-XTS: two 256-bit keys, new each run
        opts = "" if unit == 512 else f" 1 sector_size:{unit}"
        line = f"0 {sectors} crypt aes-xts-plain64 {key} 0 f 0{opts}"
        return (
            "devices:\n"
            f"  f: {{file: {yaml_str(str(ctx.backing.resolve()))}}}\n"
            f"  c: {{table: [{yaml_str(line)}]}}\n"
            "exports:\n"
            f"  {yaml_str(ctx.export)}: {{device: c}}\n"
        )

    return config


def inline_config(unit: int) -> Callable[[ServerContext], str]:
    """blk-crypto style: an export key, the file device's inline engine does the crypto."""

    def config(ctx: ServerContext) -> str:
        keyfile = ctx.workdir / "export.key"
        if not keyfile.exists():
            write_private(keyfile, os.urandom(64))  # AES-256-XTS, raw bytes
        engine = "{keyslots: 4, modes: {aes-256-xts: [512, 4096]}, max_dun_bytes: 8}"
        return (
            "keys:\n"
            f"  k: {{mode: aes-256-xts, data_unit_size: {unit}, "
            f"source: {{file: {yaml_str(str(keyfile.resolve()))}}}}}\n"
            "devices:\n"
            f"  f: {{file: {yaml_str(str(ctx.backing.resolve()))}, inline_crypto: {engine}}}\n"
            "exports:\n"
            f"  {yaml_str(ctx.export)}: {{device: f, key: k}}\n"
        )

    return config


def nbdcrypt_prepare(config: Callable[[ServerContext], str]) -> Callable[[ServerContext], None]:
    def prepare(ctx: ServerContext) -> None:
        write_private(nbdcrypt_config_path(ctx), config(ctx).encode())  # it may hold a key

    return prepare


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


def nbdcrypt_server(
    name: str, suite: str, description: str, config: Callable[[ServerContext], str]
) -> ServerDef:
    return ServerDef(
        name=name,
        suite=suite,
        description=description,
        tools=(),
        command=nbdcrypt_command,
        version=nbdcrypt_version,
        prepare=nbdcrypt_prepare(config),
        env={"PYTHONPATH": str(REPO)},
        est_gbps=0.3 if suite == "plain" else 0.1,
    )


def nbdcrypt_encrypted(unit: int) -> tuple[ServerDef, ServerDef]:
    """The dm-crypt style and the blk-crypto style export, with `unit`-byte data units."""
    crypt = nbdcrypt_server(
        f"nbdcrypt-crypt-{unit}",
        "encrypted",
        f"dm-crypt style: a crypt table line (aes-xts-plain64, {unit}-byte sectors) over the"
        " file device",
        crypt_config(unit),
    )
    inline = nbdcrypt_server(
        f"nbdcrypt-inline-{unit}",
        "encrypted",
        f"blk-crypto style: export key aes-256-xts with {unit}-byte data units, encrypted by"
        " the file device's inline engine",
        inline_config(unit),
    )
    return crypt, inline


def qemu_nbd_version(ctx: ServerContext) -> str:
    del ctx
    return first_line(["qemu-nbd", "--version"])


def nbdkit_version(ctx: ServerContext) -> str:
    del ctx
    return first_line(["nbdkit", "--version"])


SERVERS: dict[str, ServerDef] = {
    s.name: s
    for s in (
        ServerDef(
            name="nbdkit",
            suite="plain",
            description="file plugin with its defaults: page cache, 16 worker threads",
            tools=("nbdkit",),
            command=nbdkit_command,
            version=nbdkit_version,
        ),
        ServerDef(
            name="qemu-nbd",
            suite="plain",
            description="raw, writeback (page) cache, up to 8 clients, so multi-conn",
            tools=("qemu-nbd",),
            command=qemu_nbd_command,
            version=qemu_nbd_version,
        ),
        nbdcrypt_server(
            "nbdcrypt",
            "plain",
            "one file device exported as-is, no encryption; each connection on its own thread"
            " (server.io: threads, the default)",
            plain_config,
        ),
        nbdcrypt_server(
            "nbdcrypt-loop",
            "plain",
            "the same export with every connection on one uvloop event loop (server.io: loop)",
            loop_config,
        ),
        ServerDef(
            name="qemu-nbd-luks",
            suite="encrypted",
            description="LUKS1 image (qemu-img, aes-xts-plain64, 512-byte sectors), luks driver"
            " over the file, writeback cache, up to 8 clients, so multi-conn",
            tools=("qemu-nbd", "qemu-img"),
            command=qemu_nbd_luks_command,
            version=qemu_nbd_version,
            prepare=luks_prepare,
            est_gbps=0.1,
        ),
        ServerDef(
            name="nbdkit-luks",
            suite="encrypted",
            description="the same LUKS1 image: file plugin under the luks filter",
            tools=("nbdkit", "qemu-img"),
            command=nbdkit_luks_command,
            version=nbdkit_version,
            prepare=luks_prepare,
            est_gbps=0.1,
        ),
        *(server for unit in DATA_UNITS for server in nbdcrypt_encrypted(unit)),
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
OPS = Metric("ops", "verified ops/s", True, fmt_iops)
P99_MS = Metric("p99_ms", "p99 latency (ms)", False, lambda v: f"{v:.1f}")


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
    # (size, runtime, a slow GB/s for the server) -> rough seconds, for the time estimate
    estimate: Callable[[int, int, float], float]


def nbdcopy_timeout(ctx: RunContext) -> float:
    return 120.0 + ctx.size / 20e6  # far beyond any plausible run; only to avoid hanging


def nbdcopy_estimate(size: int, runtime: int, gbps: float) -> float:
    del runtime
    return 2.0 + size / (gbps * GB)  # startup and sync, and a slow server


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
        estimate=lambda size, runtime, gbps: runtime + 1.0,
    )


STRESS_CLIENTS = 6  # qemu-nbd is started with --shared=8


def stress_command(ctx: RunContext) -> list[str]:
    """`nbdcrypt stress` with its JSON summary redirected to ctx.out (it prints it on stdout)."""
    argv = [
        sys.executable, "-m", "nbdcrypt", "stress", ctx.uri,
        "--clients", str(STRESS_CLIENTS), "--duration", str(ctx.runtime), "--seed", "1",
        "--trimmed", "any",  # a trimmed block of a LUKS or keyed export reads as noise
        "--json", "--no-progress",
    ]  # fmt: skip
    return ["sh", "-c", f'exec "$@" > {shlex.quote(str(ctx.out))}', "stress", *argv]


def stress_parse(ctx: RunContext, seconds: float) -> dict[str, float]:
    del seconds
    summary = json.loads(ctx.out.read_text())
    if not summary["ok"]:
        raise RuntimeError(f"stress found problems: {summary.get('fatal') or summary['failures']}")
    return {
        "ops": float(summary["ops_per_s"]),
        "p99_ms": float(summary["ops"]["total"]["latency_ms"]["p99"]),
    }


def stress_workload(key: str) -> Workload:
    return Workload(
        key=key,
        title=f"nbdcrypt stress: {STRESS_CLIENTS} verifying clients, mixed I/O (client-bound)",
        metrics=(OPS, P99_MS),
        command=stress_command,
        parse=stress_parse,
        timeout=lambda ctx: ctx.runtime + 120.0,
        estimate=lambda size, runtime, gbps: runtime + 3.0,
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
        stress_workload("stress"),
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
    note: str = ""  # shown after the target, e.g. when the peer runs another sector size

    def holds(self, ratio: float) -> bool:
        return ratio >= self.bound if self.op == ">=" else ratio <= self.bound


PEER_512 = "peer at 512-byte sectors"  # LUKS1 (qemu 7.2, nbdkit 1.32) has no others


ENCRYPTED_BARS = (  # (workload, metric, nbdcrypt / peer >= bound, peer)
    ("seq-read", "gbps", 2.0, "qemu-nbd-luks"),
    ("seq-write", "gbps", 2.0, "qemu-nbd-luks"),
    ("seq-read", "gbps", 1.0, "nbdkit-luks"),
    ("seq-write", "gbps", 3.0, "nbdkit-luks"),
    ("randread-qd32", "iops", 1.0, "qemu-nbd-luks"),
)


def encrypted_targets(unit: int) -> tuple[Target, ...]:
    """The bars for nbdcrypt's encrypted exports with `unit`-byte data units."""
    note = "" if unit == 512 else PEER_512
    return tuple(
        Target(workload, metric, ">=", bound, f"nbdcrypt-{style}-{unit}", peer, note)
        for style in ("crypt", "inline")
        for workload, metric, bound, peer in ENCRYPTED_BARS
    )


@dataclass(frozen=True)
class Suite:
    """A group of servers measured alike, with its own section and targets in the report."""

    key: str
    title: str
    about: tuple[str, ...]  # paragraph lines before the results
    workloads: tuple[str, ...]  # the default workloads of its servers
    baselines: tuple[str, ...]  # the ratio columns of its tables
    targets: tuple[Target, ...]

    @property
    def servers(self) -> tuple[str, ...]:
        return tuple(name for name, s in SERVERS.items() if s.suite == self.key)


SUITES: dict[str, Suite] = {
    s.key: s
    for s in (
        Suite(
            key="plain",
            title="Plain exports",
            about=(
                "The same plain file served as-is by each server: nbdcrypt against nbdkit's",
                "file plugin and qemu-nbd.",
            ),
            workloads=tuple(WORKLOADS),
            baselines=("nbdkit",),
            targets=(
                Target("randread-qd32", "iops", ">=", 1.0),
                Target("randwrite-qd32", "iops", ">=", 1.0),
                Target("seq-read", "gbps", ">=", 0.9),
                Target("seq-write", "gbps", ">=", 0.9),
                Target("randread-qd1", "lat_mean_us", "<=", 1.5),
            ),
        ),
        Suite(
            key="encrypted",
            title="Encrypted exports",
            about=(
                "AES-256-XTS everywhere, the same export size. The peers serve one LUKS1 image",
                "made by `qemu-img convert -O luks` from the backing file (aes-xts-plain64,",
                "sha256, PBKDF iter-time 10 ms, payload = the backing file's size). LUKS1 has",
                "only 512-byte sectors and qemu 7.2 and nbdkit 1.32 read no LUKS2, so the",
                "peers run at 512-byte sectors only: **nbdcrypt's 4096-byte exports are compared",
                "with the peers' 512-byte figures** (marked in the targets). nbdcrypt serves the",
                "backing file itself as ciphertext, two ways per data unit size: `crypt`, a",
                "dm-crypt table line (`aes-xts-plain64`, `sector_size:4096` for 4096), and",
                "`inline`, an export key (`aes-256-xts`, `data_unit_size`) encrypted by the file",
                "device's inline-crypto engine (blk-crypto style). Its configs are below.",
            ),
            workloads=("seq-read", "seq-write", "randread-qd32", "stress"),
            baselines=("qemu-nbd-luks", "nbdkit-luks"),
            targets=tuple(t for unit in DATA_UNITS for t in encrypted_targets(unit)),
        ),
    )
}

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
    suite: tuple[str, ...]  # keys of SUITES
    servers: tuple[str, ...]
    workloads: tuple[str, ...] | None  # None: each suite's own
    baseline: str | None  # None: each suite's own
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
    suites: list[Suite]
    servers: list[ServerDef]
    workloads: dict[str, list[Workload]]  # server -> what it runs, in order
    samples: Samples = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    server_commands: dict[str, list[str]] = field(default_factory=dict)
    client_commands: dict[str, list[str]] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    export_info: dict[str, str] = field(default_factory=dict)  # server -> what nbdinfo saw

    def suite_servers(self, suite: Suite) -> list[ServerDef]:
        return [s for s in self.servers if s.suite == suite.key]

    def suite_workloads(self, suite: Suite) -> list[Workload]:
        keys = {w.key for s in self.suite_servers(suite) for w in self.workloads[s.name]}
        return [w for k, w in WORKLOADS.items() if k in keys]

    def baselines(self, suite: Suite) -> list[str]:
        names = (self.args.baseline,) if self.args.baseline else suite.baselines
        return [n for n in names if any(s.name == n for s in self.servers)]


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


def describe_export(uri: str) -> str:
    """What the clients are offered: multi-conn decides how many connections nbdcopy opens."""
    try:
        out = subprocess.run(
            ["nbdinfo", "--json", uri], capture_output=True, text=True, timeout=10, check=False
        )
        info = json.loads(out.stdout)["exports"][0]
    except (subprocess.TimeoutExpired, ValueError, KeyError, IndexError) as exc:
        return f"nbdinfo failed: {exc}"
    multi = "multi-conn" if info.get("can_multi_conn") else "**no multi-conn** (1 connection)"
    sizes = [info.get(f"block_size_{k}") for k in ("minimum", "preferred")]
    return f"{multi}, block size min / preferred {sizes[0]} / {sizes[1]}"


def run_round(bench: Bench, sdef: ServerDef, ctx: ServerContext) -> None:
    with serving(sdef, ctx) as server:
        if sdef.name not in bench.export_info:
            bench.export_info[sdef.name] = describe_export(ctx.endpoint.uri(ctx.export))
        for wl in bench.workloads[sdef.name]:
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
    by_version: dict[str, list[str]] = {}  # one row per program, not per server definition
    for name, version in bench.versions.items():
        by_version.setdefault(version, []).append(name)
    rows = [
        ("CPUs (nproc)", str(len(os.sched_getaffinity(0)))),
        ("CPU model", cpu_model()),
        ("Kernel", f"{platform.system()} {platform.release()}"),
        ("Load average before / after", f"{load_before} / {loadavg()}"),
        *((f"Server {', '.join(names)}", v) for v, names in by_version.items()),
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


def workload_table(bench: Bench, suite: Suite, wl: Workload) -> list[str]:
    bases = bench.baselines(suite)
    head = ["Server"]
    for m in wl.metrics:
        head += [f"{m.label} median", "min - max", *(f"/ {b}" for b in bases)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for sdef in bench.suite_servers(suite):
        if wl not in bench.workloads[sdef.name]:
            continue
        cells = [sdef.name]
        for m in wl.metrics:
            values = bench.samples.get(sdef.name, {}).get(wl.key, {}).get(m.key, [])
            cells += list(summary(values, m.fmt, bench.args.repeats))
            cells += [ratio_text(bench, sdef.name, b, wl.key, m.key) for b in bases]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def ratio(bench: Bench, subject: str, baseline: str, workload: str, metric: str) -> float | None:
    num = median_of(bench, subject, workload, metric)
    den = median_of(bench, baseline, workload, metric)
    return num / den if num is not None and den else None


def ratio_text(bench: Bench, subject: str, baseline: str, workload: str, metric: str) -> str:
    r = ratio(bench, subject, baseline, workload, metric)
    return "n/a" if r is None else f"{r:.2f}x"


@dataclass(frozen=True)
class Verdict:
    suite: str
    target: Target
    text: str  # the target as the report words it
    subject: float | None
    baseline: float | None
    ratio: float | None
    verdict: str  # PASS, FAIL or "not measured"


def verdicts(bench: Bench, suite: Suite) -> list[Verdict]:
    out = []
    for t in suite.targets:
        metric = next(m for m in WORKLOADS[t.workload].metrics if m.key == t.metric)
        r = ratio(bench, t.subject, t.baseline, t.workload, t.metric)
        note = f" ({t.note})" if t.note else ""
        out.append(
            Verdict(
                suite=suite.key,
                target=t,
                text=f"{t.workload} {metric.label}: {t.subject} {t.op} {t.bound:g}x "
                f"{t.baseline}{note}",
                subject=median_of(bench, t.subject, t.workload, t.metric),
                baseline=median_of(bench, t.baseline, t.workload, t.metric),
                ratio=r,
                verdict="not measured" if r is None else ("PASS" if t.holds(r) else "FAIL"),
            )
        )
    return out


def overall(results: Sequence[Verdict]) -> str:
    seen = {v.verdict for v in results}
    if "FAIL" in seen:
        return "FAIL"
    if "not measured" in seen or not results:
        return "INCOMPLETE (not every target was measured)"
    return "PASS"


def tally(results: Sequence[Verdict]) -> str:
    counts = {k: sum(v.verdict == k for v in results) for k in ("PASS", "FAIL", "not measured")}
    shown = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
    return f"**{overall(results)}** ({shown or 'no targets'})"


def target_lines(suite: Suite, results: list[Verdict]) -> list[str]:
    lines = [
        "| Target | subject | baseline | ratio | verdict |",
        "|---|---|---|---|---|",
    ]
    for v in results:
        wl = WORKLOADS[v.target.workload]
        metric = next(m for m in wl.metrics if m.key == v.target.metric)
        lines.append(
            f"| {v.text} "
            f"| {metric.fmt(v.subject) if v.subject is not None else 'n/a'} "
            f"| {metric.fmt(v.baseline) if v.baseline is not None else 'n/a'} "
            f"| {'n/a' if v.ratio is None else f'{v.ratio:.2f}x'} | **{v.verdict}** |"
        )
    return [*lines, "", f"{suite.title}: {tally(results)}"]


def default_run_minutes() -> float:
    args = parse_args([])
    return estimate_minutes(make_bench(args, args.workdir))


def how_to_run(bench: Bench) -> list[str]:
    this_run = shlex.join(["python", "benchmarks/run.py", *sys.argv[1:]])
    return [
        "## How to run",
        "",
        f"On a quiet machine (nothing else running; the run takes about "
        f"{default_run_minutes():.0f} minutes with",
        f"the defaults: {FULL_REPEATS} rounds x {len(SERVERS)} servers, {FULL_RUNTIME} s per fio"
        f" run, {FULL_SIZE >> 30} GiB copies):",
        "",
        "```sh",
        "cd /path/to/nbdcrypt && . .venv/bin/activate",
        "python benchmarks/run.py                  # both suites; writes docs/BENCHMARKS.md",
        "python benchmarks/run.py --suite plain    # or encrypted: one suite only",
        "python benchmarks/run.py --size 64M --runtime 3 --repeats 1 --output -   # smoke test",
        "```",
        "",
        "Needs nbdkit (with its luks filter), qemu-nbd and qemu-img (qemu-utils), nbdcopy and",
        "nbdinfo (libnbd-bin), and fio with its nbd engine. For `--servers`, `--workloads`,",
        "`--tcp`, `--json` and more see `--help`.",
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
        "  this measures the servers' request paths, not the disk. The LUKS peers serve an image",
        "  made from it (same payload size, fully allocated).",
        f"- {a.repeats} round(s); in each round every server in turn is started, listening on",
        f"  {transport}, runs its suite's workloads once, and is stopped (SIGTERM). Rounds",
        "  interleave the servers so drifting background load hits them alike. Tables give the",
        "  median over the rounds and the min - max. `sync` runs between workloads, outside the",
        "  timed part.",
        f"- fio runs are time-based, {a.runtime} s each, one NBD connection; latency is fio's",
        "  total latency (submission + completion) per request.",
        "- nbdcopy throughput is the export size divided by the wall-clock time of the whole",
        "  nbdcopy process, in 10^9 bytes/s. nbdcopy's defaults are used: with multi-conn",
        "  (what each server advertised is listed under Command lines) up to 4 connections but",
        "  no more than --threads, which defaults to the number of CPUs (so",
        f"  {nbdcopy_connections()} connections here); 64 requests in flight per connection,",
        "  256 KiB requests; zero-block detection is on, but the data has no zero blocks, so",
        "  every byte is read or written.",
        "- Clients and servers share the machine's CPUs: on a small machine the clients' CPU",
        "  time counts against every server alike.",
        "- Sequential writes copy a second prepared file of the export's size (other data).",
    ]


def nbdcopy_connections() -> int:
    return min(4, len(os.sched_getaffinity(0)))


def short_run_warning(bench: Bench) -> list[str]:
    a = bench.args
    if a.size >= FULL_SIZE and a.repeats >= FULL_REPEATS and a.runtime >= FULL_RUNTIME:
        return []
    return [
        "",
        f"**Warning: a short run ({a.size // MIB} MiB, {a.repeats} round(s), {a.runtime} s per",
        f"fio run). The targets are set for {FULL_SIZE >> 30} GiB exports, {FULL_REPEATS} rounds "
        f"and {FULL_RUNTIME} s: with small",
        "exports nbdcopy's startup dominates and throughput ratios shrink towards 1.**",
    ]


def busy_warning(load_before: str) -> list[str]:
    load1 = float(load_before.split(maxsplit=1)[0])
    if load1 <= 0.5:
        return []
    return [
        "",
        f"**Warning: the 1-minute load average was {load1:.2f} when the run started; other",
        "work on the machine makes these figures noisy. Rerun on a quiet machine.**",
    ]


HEX_KEY = re.compile(r"\b[0-9a-fA-F]{32,}\b")


def mask_keys(text: str) -> str:
    return HEX_KEY.sub(lambda m: f"<key: {len(m.group())} hex digits, random per run>", text)


def commands_lines(bench: Bench) -> list[str]:
    lines = ["## Command lines", "", "Servers:", ""]
    for sdef in bench.servers:
        cmd = bench.server_commands.get(sdef.name, [])
        info = bench.export_info.get(sdef.name, "not reached")
        lines += [
            f"- {sdef.name}: {sdef.description}. Export: {info}.",
            f"  `{display(cmd, bench.workdir)}`",
        ]
    if any(s.prepare is luks_prepare for s in bench.servers):
        lines += [
            "",
            "The LUKS1 image (`$WORK/luks1.passphrase` holds a random passphrase, mode 0600):",
            "",
            f"  `{display(luks_convert_argv(bench.backing), bench.workdir)}`",
        ]
    for sdef in bench.servers:
        cfg = bench.workdir / sdef.name / "nbdcrypt.yaml"
        if cfg.exists():
            body = mask_keys(cfg.read_text())
            lines += ["", f"{sdef.name}'s config:", "", "```yaml", *display_text(body, bench)]
            lines.append("```")
    ep = "nbd://127.0.0.1:PORT/" if bench.args.tcp else "nbd+unix:///"
    example = f"{ep}{EXPORT}" + ("" if bench.args.tcp else "?socket=$WORK/SERVER/nbd.sock")
    lines += ["", f"Clients, the same for every server (`$URI` is `{example}`):", ""]
    for key, argv in bench.client_commands.items():
        lines.append(f"- {key}: `{display(argv, bench.workdir)}`")
    return lines


def display_text(text: str, bench: Bench) -> list[str]:
    return text.replace(str(bench.workdir), "$WORK").splitlines()


def suite_lines(bench: Bench, suite: Suite, results: list[Verdict]) -> list[str]:
    out = [f"## {suite.title}", "", *suite.about, ""]
    for wl in bench.suite_workloads(suite):
        out += [f"### {wl.key}: {wl.title}", "", *workload_table(bench, suite, wl), ""]
    out += [f"### Targets: {suite.title.lower()}", "", *target_lines(suite, results), ""]
    return out


def render(bench: Bench, started: datetime.datetime, load_before: str) -> str:
    results = {s.key: verdicts(bench, s) for s in bench.suites}
    out = [
        "# Benchmarks: nbdcrypt vs nbdkit vs qemu-nbd",
        "",
        "Generated by `benchmarks/run.py`; do not edit by hand, rerun it.",
        "",
        f"Run started {started:%Y-%m-%d %H:%M} UTC.",
        "",
        "## Summary",
        "",
        *(f"- {s.title}: {tally(results[s.key])}" for s in bench.suites),
        f"- Overall: {tally([v for r in results.values() for v in r])}",
        *short_run_warning(bench),
        "",
        "## Machine",
        "",
        *machine_lines(bench, load_before),
        *busy_warning(load_before),
        "",
        *method_lines(bench),
        "",
    ]
    for suite in bench.suites:
        out += suite_lines(bench, suite, results[suite.key])
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
        "targets": [
            {
                "suite": v.suite,
                "target": v.text,
                "subject": v.subject,
                "baseline": v.baseline,
                "ratio": v.ratio,
                "verdict": v.verdict,
            }
            for s in bench.suites
            for v in verdicts(bench, s)
        ],
        "errors": bench.errors,
        "servers": {k: display(v, bench.workdir) for k, v in bench.server_commands.items()},
        "clients": {k: display(v, bench.workdir) for k, v in bench.client_commands.items()},
        "versions": bench.versions,
        "exports": bench.export_info,
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
        "--size", type=parse_size, default=FULL_SIZE, help="backing file size (default 1G)"
    )
    p.add_argument(
        "--runtime", type=int, default=FULL_RUNTIME, help="seconds per fio run (default 20)"
    )
    p.add_argument(
        "--repeats", type=int, default=FULL_REPEATS, help="rounds; medians reported (default 3)"
    )
    p.add_argument(
        "--suite",
        choices=[*SUITES, "all"],
        default="all",
        help="plain: nbdcrypt, nbdkit and qemu-nbd serving a plain file; encrypted: nbdcrypt's"
        " encrypted exports against qemu-nbd and nbdkit serving LUKS1 (default all)",
    )
    p.add_argument(
        "--servers",
        help="comma-separated, in order, from the chosen suites (default: all of them: "
        f"{','.join(SERVERS)})",
    )
    p.add_argument(
        "--workloads",
        help=f"comma-separated, run on every server (default: each suite's own; known: "
        f"{','.join(WORKLOADS)})",
    )
    p.add_argument(
        "--baseline",
        help="server (of this run, any suite) the ratio columns compare to (default: nbdkit for"
        " plain, qemu-nbd-luks and nbdkit-luks for encrypted); targets keep their own",
    )
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
    fields["suite"] = tuple(SUITES) if ns.suite == "all" else (ns.suite,)
    in_suites = {n: SERVERS[n] for k in fields["suite"] for n in SUITES[k].servers}
    fields["servers"] = choose("servers", ns.servers, in_suites) if ns.servers else (*in_suites,)
    if ns.workloads:
        fields["workloads"] = choose("workloads", ns.workloads, WORKLOADS)
    if ns.baseline:
        choose("baseline", ns.baseline, SERVERS)
    return Options(**fields)


def check_tools(servers: list[ServerDef]) -> None:
    needed = {"nbdcopy", "nbdinfo", "fio", *(t for s in servers for t in s.tools)}
    missing = sorted(t for t in needed if shutil.which(t) is None)
    if missing:
        raise SystemExit(f"missing tools: {', '.join(missing)}")


def make_bench(args: Options, workdir: Path) -> Bench:
    servers = [SERVERS[n] for n in args.servers]
    workloads = {
        s.name: [WORKLOADS[k] for k in (args.workloads or SUITES[s.suite].workloads)]
        for s in servers
    }
    return Bench(
        args=args,
        workdir=workdir,
        backing=workdir / "backing.img",
        suites=[SUITES[k] for k in args.suite if any(s.suite == k for s in servers)],
        servers=servers,
        workloads=workloads,
    )


def estimate_minutes(bench: Bench) -> float:
    """Rough wall-clock time: fio runtimes plus startup, copies and syncs."""
    a = bench.args
    per_round = sum(
        2 + sum(w.estimate(a.size, a.runtime, s.est_gbps) for w in bench.workloads[s.name])
        for s in bench.servers
    )
    return a.repeats * per_round / 60


def benchmark(args: Options, workdir: Path) -> int:
    bench = make_bench(args, workdir)
    check_tools(bench.servers)
    started = datetime.datetime.now(datetime.UTC)
    load_before = loadavg()
    log(f"workdir {workdir}; writing 2 x {args.size // MIB} MiB of data")
    log(f"servers: {', '.join(s.name for s in bench.servers)}")
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
