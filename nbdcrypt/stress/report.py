"""The summary of a stress run, as text for people and as JSON for programs.

Both say the same: the run's parameters (seed first, so it can be repeated), each export as the
server described it, operations, bytes and latency percentiles by kind, errors by kind,
mismatches (the first MAX_REPORTED in full: client, operation, first differing byte, a few
bytes expected and found, whose data was found), clients done and failed, the hostile
connections, the server's memory, and the verdict.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nbdcrypt.nbd.constants import TransmissionFlag
from nbdcrypt.stress.runner import ExportPlan, RunResult
from nbdcrypt.stress.stats import KindStats

_KIND_ORDER = ("read", "write", "flush", "trim", "zero", "shared-read", "shared-write")
_FLAG_NAMES = {
    TransmissionFlag.READ_ONLY: "read-only",
    TransmissionFlag.SEND_FLUSH: "flush",
    TransmissionFlag.SEND_FUA: "fua",
    TransmissionFlag.ROTATIONAL: "rotational",
    TransmissionFlag.SEND_TRIM: "trim",
    TransmissionFlag.SEND_WRITE_ZEROES: "zero",
    TransmissionFlag.SEND_DF: "df",
    TransmissionFlag.CAN_MULTI_CONN: "multi-conn",
    TransmissionFlag.SEND_CACHE: "cache",
    TransmissionFlag.SEND_FAST_ZERO: "fast-zero",
}


def exit_status(result: RunResult) -> int:
    return 0 if result.ok else 1


def _latency_ms(k: KindStats) -> dict[str, float]:
    if not k.latencies:
        return {"p50": 0.0, "p99": 0.0, "max": 0.0}
    values = np.frombuffer(k.latencies, dtype=np.float64) * 1000.0
    p50, p99 = np.percentile(values, [50, 99])
    return {
        "p50": round(float(p50), 3),
        "p99": round(float(p99), 3),
        "max": round(float(values.max()), 3),
    }


def _flags(flags: int) -> list[str]:
    return [name for flag, name in _FLAG_NAMES.items() if flags & flag]


def _export_json(plan: ExportPlan) -> dict[str, Any]:
    info = plan.info
    first = plan.layouts[0]
    shared = plan.shared
    return {
        "uri": str(plan.uri),
        "size": info.size,
        "block_sizes": list(info.block_sizes),
        "block_sizes_advertised": info.block_sizes_advertised,
        "flags": _flags(info.flags),
        "structured_replies": info.structured_replies,
        "clients": len(plan.layouts),
        "region_size": first.region_length,
        "align": first.align,
        "max_size": first.max_size,
        "mix": {k.value: w for k, w in plan.mix.items() if w},
        "fua_percent": plan.fua_percent,
        "shared": {"start": shared.start, "cell": shared.cell, "cells": shared.cells}
        if shared
        else None,
    }


def summary_json(result: RunResult) -> dict[str, Any]:
    opts = result.options
    s = result.stats
    kinds = {name: s.kinds[name] for name in _KIND_ORDER if name in s.kinds}
    total = KindStats()
    for k in kinds.values():
        total.ops += k.ops
        total.bytes += k.bytes
        total.errors += k.errors
        total.latencies.extend(k.latencies)
    ops = {
        name: {"ops": k.ops, "bytes": k.bytes, "errors": k.errors, "latency_ms": _latency_ms(k)}
        for name, k in [*kinds.items(), ("total", total)]
    }
    abuse = result.abuse
    return {
        "ok": result.ok,
        "exit_status": exit_status(result),
        "fatal": result.fatal,
        "seed": opts.seed,
        "uris": [str(u) for u in opts.uris],
        "clients": opts.clients,
        "queue_depth": opts.queue_depth,
        "duration_limit_s": opts.duration,
        "ops_limit": opts.ops,
        "elapsed_s": round(result.elapsed, 3),
        "trimmed": opts.trimmed,
        "exports": [_export_json(p) for p in result.plans],
        "ops": ops,
        "ops_per_s": round(total.ops / result.elapsed, 1) if result.elapsed else 0.0,
        "bytes_per_s": round(s.total_bytes / result.elapsed, 1) if result.elapsed else 0.0,
        "errors": dict(sorted(s.errors.items())),
        "mismatches": {
            "count": s.mismatch_count,
            "first": [
                {
                    "client": r.client,
                    "op": r.op,
                    "offset": r.mismatch.offset,
                    "length": r.mismatch.length,
                    "at": r.mismatch.at,
                    "differing": r.mismatch.differing,
                    "expected": r.mismatch.expected.hex(),
                    "found": r.mismatch.found.hex(),
                    "rule": r.mismatch.rule,
                    "found_origin": r.found_origin,
                }
                for r in s.mismatches
            ],
        },
        "clients_done": s.clients_done,
        "clients_failed": s.clients_failed,
        "failures": s.failures,
        "unchecked_shared_reads": s.unchecked_reads,
        "abuse": (
            {
                "connections": dict(abuse.connections),
                "connect_failures": dict(abuse.connect_failures),
                "requested_bytes": dict(abuse.requested),
                "half_sent_bytes": dict(abuse.half_sent),
                "last_error": abuse.last_error,
            }
            if abuse
            else None
        ),
        "server_rss": result.rss.as_json() if result.rss else None,
        "warnings": result.warnings,
    }


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def summary_text(result: RunResult) -> str:
    data = summary_json(result)
    opts = result.options
    lines = []
    if result.fatal:
        return f"nbdcrypt stress: FAIL: {result.fatal}"
    limits = []
    if opts.duration:
        limits.append(f"{opts.duration:g} s")
    if opts.ops:
        limits.append(f"{opts.ops} ops per client")
    lines.append(
        f"nbdcrypt stress: {opts.clients} clients, queue depth {opts.queue_depth}, "
        f"seed {opts.seed}, {' or '.join(limits)}; ran {result.elapsed:.1f} s"
    )
    for e in data["exports"]:
        shared = (
            f", shared {e['shared']['cells']} cells of {e['shared']['cell']}" if e["shared"] else ""
        )
        sizes = "/".join(str(b) for b in e["block_sizes"])
        if not e["block_sizes_advertised"]:
            sizes += " (defaults)"
        lines.append(
            f"  {e['uri']}: {_size(e['size'])}, blocks {sizes}, "
            f"{' '.join(e['flags']) or 'no flags'}"
            f"{', structured' if e['structured_replies'] else ', simple replies'}; "
            f"{e['clients']} clients, regions {_size(e['region_size'])}, align {e['align']}, "
            f"up to {_size(e['max_size'])}{shared}"
        )
    head = ("ops", 10), ("bytes", 13), ("errors", 8), ("p50 ms", 10), ("p99 ms", 10), ("max ms", 10)
    lines.append("  " + "kind".ljust(13) + "".join(t.rjust(w) for t, w in head))
    for name, k in data["ops"].items():
        lat = k["latency_ms"]
        lines.append(
            f"  {name:<13}{k['ops']:>10}{_size(k['bytes']):>13}{k['errors']:>8}"
            f"{lat['p50']:>10.2f}{lat['p99']:>10.2f}{lat['max']:>10.2f}"
        )
    lines.append(
        f"  throughput: {data['ops_per_s']:.0f} ops/s, "
        f"{data['bytes_per_s'] / 1e6:.1f} MB/s read+written"
    )
    errors = ", ".join(f"{k} {v}" for k, v in data["errors"].items()) or "none"
    lines.append(f"  errors: {errors}")
    s = result.stats
    if s.mismatch_count:
        lines.append(f"  mismatches: {s.mismatch_count} (the first {len(s.mismatches)}):")
        lines += [f"    {r.describe()}" for r in s.mismatches]
    if s.unchecked_reads:
        lines.append(
            f"  shared cells not checked (a failed write in the window): {s.unchecked_reads}"
        )
    lines.append(f"  clients: {s.clients_done} done, {s.clients_failed} failed")
    lines += [f"    {f}" for f in s.failures]
    if result.abuse:
        a = data["abuse"]
        parts = [
            f"{kind} {n} connections"
            + (
                f" ({_size(a['requested_bytes'].get(kind, 0))} of replies unread)"
                if a["requested_bytes"].get(kind)
                else ""
            )
            for kind, n in a["connections"].items()
        ]
        fails = sum(a["connect_failures"].values())
        lines.append(
            f"  abuse: {', '.join(parts) or 'none connected'}"
            + (f"; {fails} could not connect ({a['last_error']})" if fails else "")
        )
    if result.rss:
        r = result.rss
        if r.start_kib is None:
            lines.append(f"  server pid {r.pid}: gone before the first sample")
        else:
            hwm = f", VmHWM {_size(r.hwm_kib * 1024)}" if r.hwm_kib else ""
            gone = " (the process went away)" if r.gone else ""
            lines.append(
                f"  server pid {r.pid} RSS: start {_size(r.start_kib * 1024)}, "
                f"peak {_size(r.peak_kib * 1024)}, "
                f"end {_size((r.last_kib or 0) * 1024)}{hwm}{gone}"
            )
    for w in result.warnings:
        lines.append(f"  warning: {w}")
    lines.append(f"result: {'PASS' if result.ok else 'FAIL'}" + _why(result))
    return "\n".join(lines)


def _why(result: RunResult) -> str:
    s = result.stats
    reasons = []
    if s.mismatch_count:
        reasons.append(f"{s.mismatch_count} mismatches")
    if s.clients_failed:
        reasons.append(f"{s.clients_failed} clients failed")
    if s.reply_errors() and not result.options.allow_errors:
        reasons.append(f"{s.reply_errors()} error replies")
    return f" ({', '.join(reasons)})" if reasons else ""
