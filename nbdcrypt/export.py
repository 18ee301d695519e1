"""An export: a name clients ask for, the top device of a stack, and how it is offered."""

from __future__ import annotations

from dataclasses import dataclass, field

from nbdcrypt.blkcrypto.key import CryptoKey
from nbdcrypt.blkcrypto.submit import CryptSubmitter
from nbdcrypt.device import Device
from nbdcrypt.nbd.constants import MAX_PAYLOAD, TransmissionFlag

PREFERRED_BLOCK = 4096


@dataclass(frozen=True, slots=True)
class Export:
    """`device` is the device exported; `io` is what requests are submitted to: the device
    itself, or the device seen through the export's key (a CryptSubmitter)."""

    name: str
    device: Device
    readonly: bool = False
    description: str = ""
    multi_conn: bool = True
    key: CryptoKey | None = None
    io: Device = field(init=False)

    def __post_init__(self) -> None:
        io = self.device if self.key is None else CryptSubmitter(self.device, self.key)
        object.__setattr__(self, "io", io)

    @property
    def size(self) -> int:
        return self.device.size

    @property
    def block_sizes(self) -> tuple[int, int, int]:
        """NBD_INFO_BLOCK_SIZE: minimum (the data unit size with a key), preferred, maximum."""
        minimum = self.io.caps.block_size
        return minimum, max(minimum, PREFERRED_BLOCK), MAX_PAYLOAD

    def transmission_flags(self, *, structured: bool) -> int:
        """Exactly what this export can do, as NBD transmission flags."""
        caps = self.io.caps
        tf = TransmissionFlag
        flags = tf.HAS_FLAGS | tf.SEND_FLUSH | tf.SEND_FUA
        if self.readonly:  # no point offering what would only fail with EPERM
            flags |= tf.READ_ONLY
        else:
            flags |= tf.SEND_WRITE_ZEROES
            if caps.can_trim:
                flags |= tf.SEND_TRIM
            if caps.can_fast_zero:
                flags |= tf.SEND_FAST_ZERO
        if caps.can_cache:
            flags |= tf.SEND_CACHE
        if caps.rotational:
            flags |= tf.ROTATIONAL
        if structured:
            flags |= tf.SEND_DF
        if self.multi_conn and caps.can_multi_conn:
            flags |= tf.CAN_MULTI_CONN
        return int(flags)
