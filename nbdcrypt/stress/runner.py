"""A whole stress run: probe the exports, lay the clients out, connect, run, collect.

1. One probe connection per URI learns the export (size, flags, block sizes); a URI that cannot
   be reached ends the run at once, with its error.
2. Clients are dealt round-robin over the URIs. On each export, every client gets its own
   region (regions are spread evenly over the export, each at most --region-size), and the
   shared region, if any, takes the end of the export. Alignment is the export's minimum block
   size unless --align asks for more. What the export cannot do leaves the mix (trim without
   NBD_FLAG_SEND_TRIM, ...), with a warning; what cannot work at all is a UsageError.
3. All clients connect at once (each failure is reported, the others go on), owners write their
   shared cells, then every client runs its workload until the duration is over, its --ops are
   done, or SIGINT; beside them run the hostile connections, the progress line and the RSS
   sampler, which stop when the last client is done.
"""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass, field
from typing import TextIO

from nbdcrypt.nbd.client_handshake import ExportInfo
from nbdcrypt.nbd.constants import TransmissionFlag
from nbdcrypt.stress.abuse import AbuseStats, AbuseTarget, run_abuser
from nbdcrypt.stress.client import ClientConfig, StressClient
from nbdcrypt.stress.options import StressOptions, UsageError
from nbdcrypt.stress.pattern import run_tag
from nbdcrypt.stress.progress import show_progress
from nbdcrypt.stress.rss import RssWatch
from nbdcrypt.stress.session import SessionError, open_session
from nbdcrypt.stress.shared import SharedModel
from nbdcrypt.stress.stats import Stats
from nbdcrypt.stress.uri import NbdUri
from nbdcrypt.stress.workload import ClientLayout, Kind, SharedLayout, Workload

_NEEDS = {
    Kind.FLUSH: TransmissionFlag.SEND_FLUSH,
    Kind.TRIM: TransmissionFlag.SEND_TRIM,
    Kind.ZERO: TransmissionFlag.SEND_WRITE_ZEROES,
}


@dataclass(frozen=True, slots=True)
class ExportPlan:
    """How one export is used: its clients' layouts, its mix, its shared region."""

    uri: NbdUri
    info: ExportInfo
    layouts: tuple[ClientLayout, ...]
    mix: dict[Kind, int]
    fua_percent: float
    shared: SharedLayout | None


@dataclass(slots=True)
class RunResult:
    options: StressOptions
    run: int = 0
    plans: list[ExportPlan] = field(default_factory=list)
    stats: Stats = field(default_factory=Stats)
    abuse: AbuseStats | None = None
    rss: RssWatch | None = None
    elapsed: float = 0.0
    warnings: list[str] = field(default_factory=list)
    fatal: str | None = None  # the run could not start

    @property
    def ok(self) -> bool:
        s = self.stats
        if self.fatal or s.mismatch_count or s.clients_failed:
            return False
        return self.options.allow_errors or not s.reply_errors()


def plan_export(
    index: int,
    *,
    uri: NbdUri,
    info: ExportInfo,
    members: list[int],
    opts: StressOptions,
    warnings: list[str],
) -> ExportPlan:
    """Lay out the clients `members` (their run numbers) on one export; UsageError if the
    options cannot work with it."""
    mix, fua = _export_mix(uri, info, opts, warnings)
    align = opts.align or info.min_block
    if align % info.min_block:
        raise UsageError(
            f"--align {align}: not a multiple of {uri}'s minimum block size {info.min_block}"
        )
    size = info.size - info.size % align
    n = len(members)
    shared = _shared_layout(uri, info, opts, align=align, size=size, members=n)
    private = size - (shared.cells * shared.cell if shared else 0)
    stride = private // n // align * align
    region = min(stride, opts.region_size // align * align)
    if region < align:
        raise UsageError(
            f"{uri}: {info.size} bytes is too small for {n} clients of {align}-byte blocks"
        )
    max_size = min(opts.max_size, info.max_payload, region) // align * align
    if max_size < align:
        raise UsageError(f"--max-size {opts.max_size}: smaller than the alignment {align}")
    layouts = tuple(
        ClientLayout(
            client=client,
            export=index,
            member=m,
            region_start=m * stride,
            region_length=region,
            align=align,
            max_size=max_size,
            shared=shared,
        )
        for m, client in enumerate(members)
    )
    return ExportPlan(uri, info, layouts, mix, fua, shared)


def _export_mix(
    uri: NbdUri, info: ExportInfo, opts: StressOptions, warnings: list[str]
) -> tuple[dict[Kind, int], float]:
    mix = dict(opts.mix)
    if info.can(TransmissionFlag.READ_ONLY) and any(w for k, w in mix.items() if k.modifies):
        raise UsageError(
            f"{uri}: the export is read-only: use a mix without writes (--mix read=100)"
        )
    for kind, flag in _NEEDS.items():
        if mix.get(kind) and not info.can(flag):
            warnings.append(f"{uri}: the export does not support {kind.value}: left out of the mix")
            mix[kind] = 0
    if mix.get(Kind.SHARED_WRITE) and not info.can(TransmissionFlag.SEND_FLUSH):
        raise UsageError(f"{uri}: the shared region needs FLUSH, which the export does not support")
    if not any(mix.values()):
        raise UsageError(f"{uri}: nothing of the mix is supported by the export")
    fua = opts.fua_percent
    if fua and not info.can(TransmissionFlag.SEND_FUA):
        warnings.append(f"{uri}: the export does not support FUA: no request carries it")
        fua = 0.0
    return mix, fua


def _shared_layout(
    uri: NbdUri, info: ExportInfo, opts: StressOptions, *, align: int, size: int, members: int
) -> SharedLayout | None:
    if not opts.shared:
        return None
    if not info.can(TransmissionFlag.CAN_MULTI_CONN):
        raise UsageError(
            f"{uri}: --shared needs NBD_FLAG_CAN_MULTI_CONN (flushes seen by every connection), "
            "which the export does not advertise"
        )
    cell = opts.cell_size or max(4096, align)
    if cell % align or cell > info.max_payload:
        raise UsageError(
            f"--cell-size {cell}: must be a multiple of {align} up to {info.max_payload}"
        )
    cells = opts.shared // cell
    if cells < members:
        raise UsageError(
            f"--shared {opts.shared}: {cells} cells of {cell} bytes for {members} clients "
            f"of {uri}; each client needs a cell of its own"
        )
    if cells * cell >= size:
        raise UsageError(
            f"--shared {opts.shared}: leaves nothing of {uri} for the clients' own regions"
        )
    return SharedLayout(size - cells * cell, cell, cells, members)


async def _probe(uri: NbdUri, opts: StressOptions) -> ExportInfo:
    session = await open_session(uri, structured=opts.structured, timeout=opts.timeout)
    assert session.info is not None
    await session.disconnect()
    return session.info


async def run_stress(opts: StressOptions, err: TextIO) -> RunResult:
    """Run the whole stress test; raises UsageError when the options do not fit an export."""
    result = RunResult(opts, run=run_tag(opts.seed))
    infos = []
    for uri in opts.uris:
        try:
            infos.append(await _probe(uri, opts))
        except SessionError as exc:
            result.fatal = str(exc)
            return result
    members: list[list[int]] = [[] for _ in opts.uris]
    for client in range(opts.clients):
        members[client % len(opts.uris)].append(client)
    for i, uri in enumerate(opts.uris):
        plan = plan_export(
            i, uri=uri, info=infos[i], members=members[i], opts=opts, warnings=result.warnings
        )
        result.plans.append(plan)
    for warning in result.warnings:
        print(f"nbdcrypt stress: warning: {warning}", file=err)
    await _run_clients(result, err)
    return result


def _make_clients(result: RunResult) -> list[tuple[StressClient, ExportPlan]]:
    opts = result.options
    config = ClientConfig(
        run=result.run,
        clients=opts.clients,
        queue_depth=opts.queue_depth,
        ops=opts.ops,
        timeout=opts.timeout,
        trim_any=opts.trimmed == "any",
    )
    clients = []
    for plan in result.plans:
        shared = SharedModel(plan.shared, result.run) if plan.shared else None
        for layout in plan.layouts:
            ops = iter(Workload(opts.seed, layout, plan.mix, plan.fua_percent))
            clients.append((StressClient(layout, ops, config, result.stats, shared), plan))
    clients.sort(key=lambda cp: cp[0].number)
    return clients


async def _connect(
    client: StressClient, plan: ExportPlan, opts: StressOptions, stats: Stats
) -> bool:
    try:
        session = await open_session(plan.uri, structured=opts.structured, timeout=opts.timeout)
    except SessionError as exc:
        stats.client_failed(client.number, "connect", str(exc))
        return False
    info = session.info
    assert info is not None
    if (info.size, info.min_block, info.flags) != (
        plan.info.size,
        plan.info.min_block,
        plan.info.flags,
    ):
        session.abort()
        stats.client_failed(
            client.number, "connect", f"{plan.uri}: the export changed during the run"
        )
        return False
    client.attach(session)
    return True


async def _run_clients(result: RunResult, err: TextIO) -> None:
    opts = result.options
    stats = result.stats
    pairs = _make_clients(result)
    connected = await asyncio.gather(*(_connect(c, p, opts, stats) for c, p in pairs))
    clients = [c for (c, _), ok in zip(pairs, connected, strict=True) if ok]
    await asyncio.gather(*(c.setup() for c in clients))
    stop, side_stop = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def interrupted() -> None:  # the first SIGINT ends the run with a summary; a second, at once
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)

    loop.add_signal_handler(signal.SIGINT, interrupted)
    side = _side_tasks(result, err, side_stop)
    start = time.monotonic()
    timer = loop.call_later(opts.duration, stop.set) if opts.duration else None
    try:
        await asyncio.gather(*(c.run(stop) for c in clients))
    finally:
        result.elapsed = time.monotonic() - start
        if timer is not None:
            timer.cancel()
        loop.remove_signal_handler(signal.SIGINT)
        side_stop.set()
        for c in clients:
            c.abort()
        await asyncio.gather(*side)


def _side_tasks(result: RunResult, err: TextIO, stop: asyncio.Event) -> list[asyncio.Task[None]]:
    opts = result.options
    tasks = []
    show = opts.progress if opts.progress is not None else err.isatty()
    if show:
        tasks.append(asyncio.create_task(show_progress(result.stats, err, stop)))
    if opts.watch_pid is not None:
        result.rss = RssWatch(opts.watch_pid)
        tasks.append(asyncio.create_task(result.rss.run(stop)))
    if opts.abuse:
        result.abuse = AbuseStats()
        plan = result.plans[0]
        target = AbuseTarget(plan.uri, plan.info, opts.structured, opts.timeout)
        for kind in opts.abuse:
            for i in range(opts.abusers):
                tasks.append(asyncio.create_task(run_abuser(kind, i, target, result.abuse, stop)))
    return tasks
