"""A backing file: pread/pwrite, fdatasync for FLUSH and FUA, holes for TRIM and zeroes.

Reads and plain writes run where the request runs: on the page cache they take a few
microseconds, less than handing them to a thread would. With `io: threads` that is the client's
connection thread, which lets go of the server lock for each system call
(server/lockedloop.py), so connections read and write at once. Everything that waits for the
disk (fdatasync, FUA writes) or may take long (writing zeroes over a wide range) runs inline on
a connection thread and in the loop's default executor on the loop thread, so one client's
flush never stalls another client's reads. A connection thread splices large plain writes
from its socket straight to the file (`splice_target`, server/splice.py), and writes a sealed
write's ciphertext itself (`file_target`, `pwrite_all`): neither goes through write() here.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

from nbdcrypt.backends.fallocate import punch_hole, zero_range
from nbdcrypt.device import Device, DeviceCaps
from nbdcrypt.request import EXTENT_DATA, EXTENT_HOLE, EXTENT_ZERO, Extent, ReqFlag, Request
from nbdcrypt.threadrole import on_connection_thread, unlocked

_ZERO_CHUNK = 1024 * 1024
_MAX_EXTENTS = 1024  # per block_status answer; the client asks again for the rest
_HOLE_ZERO = EXTENT_HOLE | EXTENT_ZERO
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS)


class BackingFileError(Exception):
    """The backing file can't be opened or created as configured (a one-line reason)."""


class FileDevice(Device):
    """A regular file (or block device) of a fixed size."""

    caps = DeviceCaps(
        can_trim=True,
        can_zero=True,
        can_fast_zero=True,
        can_cache=True,
        can_multi_conn=True,
        can_extents=True,
    )

    def __init__(self, name: str, path: Path, size: int, *, create: bool = False) -> None:
        self.name = name
        self.path = path
        self.size = size
        self.fd = self._open(path, size, create)
        self._unsupported: set[Callable[[int, int, int], None]] = set()  # fallocate modes
        self.splices = takes_splice(self.fd)

    @staticmethod
    def _open(path: Path, size: int, create: bool) -> int:
        try:
            if create and not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                os.ftruncate(fd, size)
                return fd
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise BackingFileError(f"{path}: {exc.strerror}") from None
        st = os.fstat(fd)
        actual = os.lseek(fd, 0, os.SEEK_END) if stat.S_ISBLK(st.st_mode) else st.st_size
        if actual != size:
            os.close(fd)
            raise BackingFileError(f"{path}: is {actual} bytes, the config says {size}")
        return fd

    async def read(self, req: Request) -> bytes | bytearray | memoryview:
        with unlocked(req.length):
            data = os.pread(self.fd, req.length, req.offset)
        if len(data) == req.length:
            return data
        return self._read_rest(data, req)

    def _read_rest(self, first: bytes, req: Request) -> bytearray:
        buf = bytearray(req.length)
        buf[: len(first)] = first
        got = len(first)
        while got < req.length:
            with unlocked():
                chunk = os.pread(self.fd, req.length - got, req.offset + got)
            if not chunk:
                break  # past the end of a file that shrank under us: reads as zeroes
            buf[got : got + len(chunk)] = chunk
            got += len(chunk)
        return buf

    async def write(self, req: Request) -> None:
        data, flags = req.data, req.flags
        assert data is not None
        if flags and flags & ReqFlag.FUA:  # IntFlag's & is Python code: most writes skip it
            await self._run(self._write_all, data, req.offset, True)
        else:
            self._write_all(data, req.offset, False)

    def _write_all(self, data: bytes | bytearray | memoryview, offset: int, sync: bool) -> None:
        with unlocked(None if sync else len(data)):  # a synchronous write waits for the disk
            pwrite_all(self.fd, data, offset, os.RWF_DSYNC if sync else 0)

    def file_target(self, offset: int, length: int) -> tuple[int, int] | None:
        return self.fd, offset

    async def flush(self) -> None:
        await self._run(self._fdatasync)

    def _fdatasync(self) -> None:
        with unlocked():
            os.fdatasync(self.fd)

    async def trim(self, req: Request) -> None:
        self._fallocate(punch_hole, req)  # TRIM is advisory: where holes are unsupported, no-op
        if req.flags & ReqFlag.FUA:
            await self.flush()

    async def write_zeroes(self, req: Request) -> None:
        done = not req.flags & ReqFlag.NO_HOLE and self._fallocate(punch_hole, req)
        if not done and not self._fallocate(zero_range, req):
            if req.flags & ReqFlag.FAST_ZERO:
                raise OSError(errno.ENOTSUP, "zeroing this range would mean writing zeroes")
            await self._run(self._write_zeroes, req.offset, req.length)
        if req.flags & ReqFlag.FUA:
            await self.flush()

    def _fallocate(self, mode: Callable[[int, int, int], None], req: Request) -> bool:
        """Apply a fallocate mode; False (remembered) where the filesystem lacks it."""
        if mode in self._unsupported:
            return False
        try:
            mode(self.fd, req.offset, req.length)
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
            self._unsupported.add(mode)
            return False
        return True

    def _write_zeroes(self, offset: int, length: int) -> None:
        zeroes = bytes(min(length, _ZERO_CHUNK))
        end = offset + length
        while offset < end:
            n = min(len(zeroes), end - offset)
            self._write_all(memoryview(zeroes)[:n], offset, False)
            offset += n

    async def block_status(self, req: Request) -> list[Extent]:
        return file_extents(self.fd, req.offset, req.offset + req.length, self.size)

    async def cache(self, req: Request) -> None:
        os.posix_fadvise(self.fd, req.offset, req.length, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @staticmethod
    async def _run(func: Callable[..., object], *args: object) -> None:
        """A call that may block long: inline on a connection thread, else in the executor."""
        if on_connection_thread():
            func(*args)  # its system calls let go of the lock themselves
            return
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, func, *args)


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int, flags: int = 0) -> None:
    """Write all of `data` to `fd` at `offset`; a short write goes on where it stopped (as
    _units.c land() does for a sealed write's ciphertext)."""
    size, view, done = len(data), data, 0
    while True:
        n = os.pwritev(fd, (view,), offset + done, flags)
        done += n
        if done >= size:
            return
        if not n:
            raise OSError(errno.EIO, "pwrite wrote nothing")
        view = memoryview(data)[done:]


def takes_splice(fd: int) -> bool:
    """Whether `fd` takes writes by splice(2) from a pipe (regular files on the usual
    filesystems and block devices do): an empty pipe spliced to it without blocking is EAGAIN
    where it does, EINVAL where the filesystem lacks it. (No pipe to probe with, at the
    descriptor limit: no, and writes take the ordinary path.)"""
    try:
        pipe = os.pipe2(os.O_CLOEXEC)
    except OSError:
        return False
    try:
        os.splice(pipe[0], fd, 1, offset_dst=0, flags=os.SPLICE_F_NONBLOCK)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(pipe[0])
        os.close(pipe[1])
    return True


def file_extents(fd: int, offset: int, end: int, size: int) -> list[Extent]:
    """Data and hole extents of [offset, end) from SEEK_DATA/SEEK_HOLE."""
    extents: list[Extent] = []
    pos = offset
    while pos < end and len(extents) < _MAX_EXTENTS:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            data = size  # nothing but hole up to the end of the file
        if data > pos:
            stop = min(data, end)
            extents.append(Extent(stop - pos, _HOLE_ZERO))
            pos = stop
            continue
        hole = os.lseek(fd, pos, os.SEEK_HOLE)
        stop = min(hole, end)
        extents.append(Extent(stop - pos, EXTENT_DATA))
        pos = stop
    return extents
