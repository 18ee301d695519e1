"""The prometheus-client collector: reads the server's plain counters when Prometheus scrapes.

Nothing here runs per request. At a scrape it adds up each export's counters and those of the
connections still feeding them (metrics/counters.py), reads the devices' keyslot and fallback
counters and the open connections, and yields metric families. Every label value comes from a
bounded set: export and device names from the configuration, NBD command and errno names,
identity classes, transports, handshake failure reasons. Never a key, a certificate subject, a
peer address or a name a client sent.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from nbdcrypt import __version__
from nbdcrypt.blkcrypto.engine import InlineCryptoDevice
from nbdcrypt.device import Device
from nbdcrypt.metrics.counters import (
    BUCKET_BOUNDS,
    COMMAND_LABELS,
    ERRNO_LABELS,
    HANDSHAKE_FAILURES,
    IDENTITY_CLASSES,
    TRANSPORTS,
    Counters,
    ExportTotals,
    identity_class,
    unpack_row,
)
from nbdcrypt.server.identity import PeerIdentity

_LE = [repr(b) for b in BUCKET_BOUNDS] + ["+Inf"]  # 8.192e-06, ..., 17.179869184


class Peer(Protocol):
    """An open connection, as the collector sees it: how it came and who it showed."""

    @property
    def identity(self) -> PeerIdentity: ...


@dataclass(eq=False)  # registered in a registry, which hashes it
class ServerCollector:
    """Collects one server's metrics: `counters` it owns, its current `devices` and open
    `connections` (callables, read at each scrape: a reload replaces what they return)."""

    counters: Counters
    devices: Callable[[], Iterable[Device]]
    connections: Callable[[], Iterable[Peer]]

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("nbdcrypt_info", "The nbdcrypt version.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        totals = {name: c.totals() for name, c in sorted(self.counters.exports.items())}
        yield from _export_metrics(totals)
        yield from _device_metrics(sorted(self.devices(), key=lambda d: d.name))
        yield from self._connection_metrics()

    def _connection_metrics(self) -> Iterator[Metric]:
        labels = ["transport", "identity"]
        opened = GaugeMetricFamily(
            "nbdcrypt_connections_open",
            "Client connections open now, by transport and TLS identity class.",
            labels=labels,
        )
        total = CounterMetricFamily(
            "nbdcrypt_connections",
            "Client connections accepted, counted once their identity is settled (at the start "
            "of transmission, or when they close before it).",
            labels=labels,
        )
        now = Counter(
            (p.identity.transport, identity_class(p.identity)) for p in self.connections()
        )
        counted = self.counters.connections.total
        for transport in TRANSPORTS:
            for cls in IDENTITY_CLASSES:
                opened.add_metric([transport, cls], now[(transport, cls)])
                total.add_metric([transport, cls], counted[(transport, cls)])
        failures = CounterMetricFamily(
            "nbdcrypt_handshake_failures",
            "Connections that closed before transmission, by why (NBD_OPT_ABORT is no failure).",
            labels=["reason"],
        )
        for reason in HANDSHAKE_FAILURES:
            failures.add_metric([reason], self.counters.connections.handshake_failures[reason])
        yield from (opened, total, failures)


def _export_metrics(totals: dict[str, ExportTotals]) -> Iterator[Metric]:
    requests = CounterMetricFamily(
        "nbdcrypt_export_requests",
        "NBD requests answered (or handed on to finish later), by command.",
        labels=["export", "command"],
    )
    duration = HistogramMetricFamily(
        "nbdcrypt_export_request_duration_seconds",
        "Time from a request's turn in its connection's batch to its reply, by command.",
        labels=["export", "command"],
    )
    read = CounterMetricFamily(
        "nbdcrypt_export_read_bytes", "Bytes read by clients.", labels=["export"]
    )
    written = CounterMetricFamily(
        "nbdcrypt_export_written_bytes", "Bytes written by clients.", labels=["export"]
    )
    errors = CounterMetricFamily(
        "nbdcrypt_export_errors",
        "Requests answered with an error, by the NBD errno sent.",
        labels=["export", "errno"],
    )
    inflight = GaugeMetricFamily(
        "nbdcrypt_export_requests_in_flight",
        "Requests started and not yet answered.",
        labels=["export"],
    )
    conns = GaugeMetricFamily(
        "nbdcrypt_export_connections",
        "Connections in transmission on the export (closing ones until their last request).",
        labels=["export"],
    )
    for name, t in totals.items():
        for slot, command in COMMAND_LABELS.items():
            row = unpack_row(t.latency, slot)
            requests.add_metric([name, command], row.requests)
            duration.add_metric([name, command], _cumulative(row.counts), row.seconds)
        read.add_metric([name], t.bytes_read)
        written.add_metric([name], t.bytes_written)
        for number, errno_name in ERRNO_LABELS.items():
            errors.add_metric([name, errno_name], t.errors.get(number, 0))
        inflight.add_metric([name], t.inflight)
        conns.add_metric([name], t.connections)
    yield from (requests, duration, read, written, errors, inflight, conns)


def _cumulative(counts: Sequence[int]) -> list[tuple[str, float]]:
    buckets, running = [], 0
    for le, count in zip(_LE, counts, strict=True):
        running += count
        buckets.append((le, float(running)))
    return buckets


_KEYSLOT_COUNTERS = (
    ("hits", "Requests that found their key already in a keyslot."),
    ("programs", "Keys programmed into a keyslot."),
    ("evictions", "Keys evicted from a keyslot (to make room, or by ctl evict-key / on-idle)."),
    ("waits", "Requests that waited for a keyslot to become free."),
)


def _device_metrics(devices: Sequence[Device]) -> Iterator[Metric]:
    labels = ["device"]
    openers = GaugeMetricFamily(
        "nbdcrypt_device_open_count",
        "Connections in transmission on an export of the device itself.",
        labels=labels,
    )
    fallback = CounterMetricFamily(
        "nbdcrypt_device_fallback_bytes",
        "Bytes the blk-crypto fallback en/decrypted in software for requests sent to the device.",
        labels=labels,
    )
    slots = GaugeMetricFamily(
        "nbdcrypt_device_keyslots",
        "Keyslots of the device's inline-encryption engine (0: it takes raw keys).",
        labels=labels,
    )
    inline = CounterMetricFamily(
        "nbdcrypt_device_inline_requests",
        "Requests the device's inline-encryption engine en/decrypted.",
        labels=labels,
    )
    keyslot = {
        what: CounterMetricFamily(f"nbdcrypt_device_keyslot_{what}", text, labels=labels)
        for what, text in _KEYSLOT_COUNTERS
    }
    waited = CounterMetricFamily(
        "nbdcrypt_device_keyslot_wait_seconds",
        "Time requests spent waiting for a keyslot.",
        labels=labels,
    )
    for dev in devices:
        openers.add_metric([dev.name], dev.openers)
        fallback.add_metric([dev.name], dev.fallback_bytes)
        if not isinstance(dev, InlineCryptoDevice):
            continue
        inline.add_metric([dev.name], dev.requests)
        manager = dev.keyslots
        slots.add_metric([dev.name], manager.num_slots if manager is not None else 0)
        if manager is None:
            continue
        stats = manager.stats
        for what, family in keyslot.items():
            family.add_metric([dev.name], getattr(stats, what))
        waited.add_metric([dev.name], stats.wait_seconds)
    yield from (openers, fallback, slots, inline, *keyslot.values(), waited)
