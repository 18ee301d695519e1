from nbdcrypt.crypto.batch import U64, Buffer

def run(
    init: int,
    update: int,
    ctx: int,
    src: Buffer,
    dst: memoryview,
    ivs: bytes | U64,
    unit_size: int,
    /,
) -> None: ...
def xts(
    update: int,
    tweak_ctx: int,
    data_ctx: int,
    src: Buffer,
    dst: memoryview,
    ivs: bytes | U64,
    unit_size: int,
    /,
) -> None: ...
def land(
    xts: bool,
    a: int,
    b: int,
    c: int,
    buf: bytearray | memoryview,
    ivs: bytes,
    unit_size: int,
    got: int,
    sock: int,
    stall_ms: int,
    within_ms: int,
    fd: int,
    offset: int,
    reply: bytes,
    header: memoryview,
    /,
) -> tuple[int, int, int, int, int]: ...
def ivs(first_lo: int, first_hi: int, step: int, bits: int, count: int, /) -> bytes: ...
