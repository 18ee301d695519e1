"""One data unit per OpenSSL call, through ctypes into the system's libcrypto.

`cryptography` needs ~4-6 us of object setup per data unit because an XTS tweak or a CBC IV
can only be given to a new context. libcrypto itself can keep a keyed context and change only
the IV (EVP_CipherInit_ex with NULL cipher and key), so a unit costs two foreign calls, ~1-2 us
in all. ctypes releases the GIL around each call.

Used when the system has libcrypto (Debian: libssl3, which Python's own ssl module needs); when
it is missing or refuses a key (OpenSSL rejects XTS keys whose halves are equal), the ciphers
fall back to `cryptography` or to their batched paths. A context belongs to one thread.

With the optional C module `_units` (built at install when a compiler is there) the whole
request is one call with the GIL released for all of it: UnitEngine's per-unit loop in C, and
XtsEngine, AES-XTS from two ECB contexts with no OpenSSL call per unit.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from nbdcrypt.crypto.batch import BLOCK, U64, Buffer
from nbdcrypt.threadrole import unlocked

try:
    from nbdcrypt.crypto._units import land as _c_land
    from nbdcrypt.crypto._units import run as _c_loop
    from nbdcrypt.crypto._units import xts as _c_xts
except ImportError:  # installed without a compiler: UnitEngine's Python loop
    _c_land = None  # type: ignore[assignment]
    _c_loop = None  # type: ignore[assignment]
    _c_xts = None  # type: ignore[assignment]

_VP = ctypes.c_void_p
_INT = ctypes.c_int


def _load() -> Any:
    name = ctypes.util.find_library("crypto")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
        lib.EVP_CIPHER_CTX_new.restype = _VP
        lib.EVP_CIPHER_CTX_new.argtypes = []
        lib.EVP_CIPHER_CTX_free.restype = None
        lib.EVP_CIPHER_CTX_free.argtypes = [_VP]
        lib.EVP_CIPHER_CTX_set_padding.argtypes = [_VP, _INT]
        lib.EVP_CIPHER_CTX_set_padding.restype = _INT
        lib.EVP_CipherInit_ex.argtypes = [_VP, _VP, _VP, _VP, _VP, _INT]
        lib.EVP_CipherInit_ex.restype = _INT
        lib.EVP_CipherUpdate.argtypes = [_VP, _VP, _VP, _VP, _INT]
        lib.EVP_CipherUpdate.restype = _INT
        lib.ERR_clear_error.argtypes = []
        lib.ERR_clear_error.restype = None
        for function in _CIPHERS.values():
            getattr(lib, function).restype = _VP
            getattr(lib, function).argtypes = []
    except (OSError, AttributeError):
        return None
    return lib


_CIPHERS = {
    ("xts", 32): "EVP_aes_128_xts",
    ("xts", 64): "EVP_aes_256_xts",
    ("cbc", 16): "EVP_aes_128_cbc",
    ("cbc", 24): "EVP_aes_192_cbc",
    ("cbc", 32): "EVP_aes_256_cbc",
    ("ecb", 16): "EVP_aes_128_ecb",
    ("ecb", 32): "EVP_aes_256_ecb",
}
_lib = _load()


def available() -> bool:
    return _lib is not None


def native() -> bool:
    """Whether whole requests run in the C loop (libcrypto and the built `_units` module)."""
    return _lib is not None and _c_loop is not None


def _function_address(function: Any) -> int:
    return ctypes.cast(function, _VP).value or 0


def _c_call(function: Callable[..., None], *args: object) -> None:
    """Call into _units.c, letting go of the server lock (threadrole.py): the call touches
    only the request's buffers and this thread's contexts, so connection threads encrypt at
    once, one per core."""
    with unlocked():
        _c_direct(function, *args)


def _c_direct(function: Callable[..., None], *args: object) -> None:
    """Call into _units.c; on failure (OSError EIO) clear this thread's OpenSSL error queue,
    which Python's ssl module shares, before the error goes up."""
    try:
        function(*args)
    except OSError:
        _lib.ERR_clear_error()
        raise


class InPlace:
    """One request prepared whole (its IV blocks given now) to run later in place over its
    buffer, holding no server lock: `xts` says which C call (_units.c xts() or run()), `args`
    its libcrypto addresses, `undo` those of the other direction. It keeps the contexts it
    uses: were the engine dropped meanwhile (a key evicted from a keyslot-less engine), they
    must outlive the C call."""

    __slots__ = ("_args", "_ivs", "_keep", "_undo", "_unit_size", "_xts")

    def __init__(
        self,
        xts: bool,
        args: tuple[int, int, int],
        undo: tuple[int, int, int],
        *,
        keep: object,
        ivs: bytes,
        unit_size: int,
    ) -> None:
        self._xts, self._args, self._undo, self._keep = xts, args, undo, keep
        self._ivs, self._unit_size = ivs, unit_size

    def __call__(self, buffer: bytearray | memoryview) -> None:
        """Run the request over `buffer` in place."""
        function = _c_xts if self._xts else _c_loop
        _c_direct(function, *self._args, buffer, buffer, self._ivs, self._unit_size)

    def undo(self, buffer: bytearray | memoryview) -> None:
        """Take back what the request did to `buffer`, a whole number of its first units."""
        function = _c_xts if self._xts else _c_loop
        _c_direct(function, *self._undo, buffer, buffer, self._ivs, self._unit_size)

    def land(
        self,
        buffer: bytearray | memoryview,
        got: int,
        sock: int,
        *,
        stall_ms: int,
        within_ms: int,
        fd: int,
        offset: int,
        reply: bytes,
        header: memoryview,
    ) -> tuple[int, int, int, int, int]:
        """A sealed write in one C call (_units.c land()): `buffer` holds `got` bytes of the
        payload; the rest is received from `sock`, all of it run through the request as it
        arrives, written to `fd` at `offset`, `reply` sent and the next header read into
        `header` as far as each goes without waiting. (Bytes received; code: 0 all in, 1 the
        sender was silent for stall_ms or not done within within_ms, and what was done to the
        bytes received is taken back, they are as sent; 2 it closed; 3 the cipher failed;
        -errno the socket's. The write's errno or 0; the reply's bytes sent, or -errno; the
        header's bytes received.)"""
        a, b, c = self._args
        landed = _c_land(
            self._xts, a, b, c, buffer, self._ivs, self._unit_size, got, sock,
            stall_ms, within_ms, fd, offset, reply, header,
        )  # fmt: skip
        got, code = landed[0], landed[1]
        if code == 1:
            try:
                self.undo(memoryview(buffer)[: got - got % self._unit_size])
            except OSError:
                return got, 3, 0, 0, 0
        if code == 3:
            _lib.ERR_clear_error()
        return landed


def address(buffer: Buffer | U64) -> tuple[int, object]:
    """The address of a contiguous buffer, and the object that keeps it exported."""
    if isinstance(buffer, bytes):
        return ctypes.cast(ctypes.c_char_p(buffer), _VP).value or 0, buffer
    if isinstance(buffer, np.ndarray):
        return int(buffer.ctypes.data), buffer
    try:
        char = ctypes.c_char.from_buffer(buffer)  # writable buffers
        return ctypes.addressof(char), char
    except TypeError:
        array = np.frombuffer(buffer, np.uint8)  # read-only memoryviews
        return int(array.ctypes.data), array


class _Context:
    """One EVP_CIPHER_CTX with its key set; freed with the object."""

    __slots__ = ("ptr",)

    def __init__(self, mode: str, key: bytes, encrypt: bool) -> None:
        self.ptr: int | None = None
        ptr = _lib.EVP_CIPHER_CTX_new()
        if not ptr:
            raise MemoryError("EVP_CIPHER_CTX_new failed")
        self.ptr = ptr
        cipher = getattr(_lib, _CIPHERS[(mode, len(key))])()
        key_buffer = ctypes.create_string_buffer(key, len(key))
        if _lib.EVP_CipherInit_ex(ptr, cipher, None, key_buffer, None, int(encrypt)) != 1:
            _lib.ERR_clear_error()
            raise ValueError("libcrypto refused the key")
        _lib.EVP_CIPHER_CTX_set_padding(ptr, 0)

    def __del__(self) -> None:
        if self.ptr is not None and _lib is not None:
            _lib.EVP_CIPHER_CTX_free(self.ptr)
            self.ptr = None


class UnitEngine:
    """AES-XTS or AES-CBC, one unit per call pair, with a context per thread and direction."""

    __slots__ = ("_key", "_local", "_mode", "_native")

    def __init__(self, mode: str, key: bytes, *, use_native: bool = True) -> None:
        if _lib is None:
            raise ValueError("no libcrypto")
        if (mode, len(key)) not in _CIPHERS:
            raise ValueError(f"no libcrypto cipher for {mode} with a {len(key)}-byte key")
        self._mode = mode
        self._key = key
        self._local = threading.local()
        self._native: tuple[int, int] | None = None
        if use_native and _c_loop is not None:
            init, update = _lib.EVP_CipherInit_ex, _lib.EVP_CipherUpdate
            self._native = (_function_address(init), _function_address(update))
        self._context(True)  # refuses bad keys now, not at the first request
        self._context(False)

    def __repr__(self) -> str:
        return f"UnitEngine({self._mode}, <{len(self._key)}-byte key>)"

    @property
    def native(self) -> bool:
        """Whether a request is one C call (the loop in _units.c) rather than a Python loop."""
        return self._native is not None

    def _context(self, encrypt: bool) -> _Context:
        name = "enc" if encrypt else "dec"
        ctx: _Context | None = getattr(self._local, name, None)
        if ctx is None:
            ctx = _Context(self._mode, self._key, encrypt)
            setattr(self._local, name, ctx)
        return ctx

    def run(
        self,
        data: Buffer,
        ivs: bytes | U64,
        unit_size: int,
        target: memoryview,
        *,
        encrypt: bool,
    ) -> None:
        """Unit i of `data` with the 16-byte IV block i of `ivs` into `target` (same length)."""
        ctx = self._context(encrypt).ptr
        if self._native is not None and _c_loop is not None:
            _c_call(_c_loop, *self._native, ctx or 0, data, target, ivs, unit_size)
            return
        length = len(target)
        src, keep_src = address(data)
        dst, keep_dst = address(target)
        iv, keep_ivs = address(ivs)
        written = _INT()
        written_ptr = ctypes.addressof(written)
        init, update = _lib.EVP_CipherInit_ex, _lib.EVP_CipherUpdate
        for at in range(0, length, unit_size):
            if init(ctx, None, None, None, iv, -1) != 1:
                _lib.ERR_clear_error()
                raise OSError(errno.EIO, "libcrypto: EVP_CipherInit_ex failed")
            if update(ctx, dst + at, written_ptr, src + at, unit_size) != 1:
                _lib.ERR_clear_error()
                raise OSError(errno.EIO, "libcrypto: EVP_CipherUpdate failed")
            iv += BLOCK
        del keep_src, keep_dst, keep_ivs

    def in_place(self, ivs: bytes, unit_size: int, *, encrypt: bool) -> InPlace | None:
        """One request prepared whole (its IV blocks given now) for a caller that runs it
        later holding no server lock, over a buffer in place; None without the C loop."""
        if self._native is None or _c_loop is None:
            return None
        init, update = self._native
        context, other = self._context(encrypt), self._context(not encrypt)
        args, undo = (init, update, context.ptr or 0), (init, update, other.ptr or 0)
        return InPlace(False, args, undo, keep=(context, other), ivs=ivs, unit_size=unit_size)


class XtsEngine:
    """AES-XTS of whole requests in the C module from two ECB contexts (K1 and K2), no
    per-unit call at all: the fastest path for units under 2 KiB (see _units.c). Contexts
    are per thread, like UnitEngine's; keys with equal halves are fine here."""

    __slots__ = ("_k1", "_k2", "_local", "_update")

    def __init__(self, key: bytes) -> None:
        if _lib is None or _c_xts is None:
            raise ValueError("the C module or libcrypto is missing")
        half = len(key) // 2
        if len(key) not in (32, 64):
            raise ValueError(f"an AES-XTS key is 32 or 64 bytes, not {len(key)}")
        self._k1, self._k2 = key[:half], key[half:]
        self._local = threading.local()
        self._update = _function_address(_lib.EVP_CipherUpdate)
        self._contexts()  # refuses bad keys now, not at the first request

    def __repr__(self) -> str:
        return f"XtsEngine(<{len(self._k1) * 2}-byte key>)"

    def _contexts(self) -> tuple[_Context, _Context, _Context]:
        """(tweak: K2 encrypt, K1 encrypt, K1 decrypt) of this thread."""
        found: tuple[_Context, _Context, _Context] | None = getattr(self._local, "ctx", None)
        if found is None:
            found = (
                _Context("ecb", self._k2, True),
                _Context("ecb", self._k1, True),
                _Context("ecb", self._k1, False),
            )
            self._local.ctx = found
        return found

    def run(
        self,
        data: Buffer,
        ivs: bytes | U64,
        unit_size: int,
        target: memoryview,
        *,
        encrypt: bool,
    ) -> None:
        """Unit i of `data` with the 16-byte IV block i of `ivs` into `target` (same length)."""
        tweak, enc, dec = self._contexts()
        data_ctx = enc.ptr if encrypt else dec.ptr
        _c_call(_c_xts, self._update, tweak.ptr or 0, data_ctx or 0, data, target, ivs, unit_size)

    def in_place(self, ivs: bytes, unit_size: int, *, encrypt: bool) -> InPlace:
        """One request prepared whole, as UnitEngine.in_place (its contexts held by the call)."""
        tweak, enc, dec = self._contexts()
        data, other = (enc, dec) if encrypt else (dec, enc)
        args = (self._update, tweak.ptr or 0, data.ptr or 0)
        undo = (self._update, tweak.ptr or 0, other.ptr or 0)
        return InPlace(True, args, undo, keep=(tweak, enc, dec), ivs=ivs, unit_size=unit_size)
