"""The memory of a local process (the server under test), sampled from /proc/PID/status.

`--watch-pid PID` runs a RssWatch beside the clients: it reads VmRSS every SAMPLE seconds and
keeps the first, the largest and the last value, and at the end the kernel's own peak (VmHWM,
which also covers the time before the run). A process that went away just stops the sampling.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

SAMPLE = 0.25  # seconds between samples


def read_status_kib(pid: int, field_name: str) -> int | None:
    """A `kB` field of /proc/PID/status (VmRSS, VmHWM), or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass(slots=True)
class RssWatch:
    pid: int
    start_kib: int | None = None
    peak_kib: int = 0
    last_kib: int | None = None
    hwm_kib: int | None = None
    samples: int = 0
    gone: bool = field(default=False)

    def sample(self) -> None:
        rss = read_status_kib(self.pid, "VmRSS")
        if rss is None:
            self.gone = True
            return
        if self.start_kib is None:
            self.start_kib = rss
        self.peak_kib = max(self.peak_kib, rss)
        self.last_kib = rss
        self.samples += 1

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set() and not self.gone:
            self.sample()
            try:
                async with asyncio.timeout(SAMPLE):
                    await stop.wait()
            except TimeoutError:
                pass
        self.finish()

    def finish(self) -> None:
        if not self.gone:
            self.sample()
            self.hwm_kib = read_status_kib(self.pid, "VmHWM")

    def as_json(self) -> dict[str, int | bool | None]:
        return {
            "pid": self.pid,
            "start_kib": self.start_kib,
            "peak_kib": self.peak_kib,
            "end_kib": self.last_kib,
            "hwm_kib": self.hwm_kib,
            "samples": self.samples,
            "gone": self.gone,
        }
