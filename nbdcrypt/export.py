"""An export: a name clients ask for, the top device of a stack, and how it is offered;
and one connection's view of it (its key context and access)."""

from __future__ import annotations

from dataclasses import dataclass

from nbdcrypt.blkcrypto.key import CryptoKey
from nbdcrypt.blkcrypto.submit import CryptSubmitter
from nbdcrypt.device import Device
from nbdcrypt.nbd.constants import MAX_PAYLOAD, TransmissionFlag

PREFERRED_BLOCK = 4096


@dataclass(frozen=True, slots=True)
class Export:
    """`device` is the device exported. Its key is fixed (`key`), none, or the key of the
    client's rule (`per_client_key`); each connection gets its own view (`open`)."""

    name: str
    device: Device
    readonly: bool = False
    description: str = ""
    multi_conn: bool = True
    key: CryptoKey | None = None
    per_client_key: bool = False  # `encryption: per-client`
    evict_on_idle: bool = False  # `evict: on-idle`: a key leaves the engines with its last user

    @property
    def size(self) -> int:
        return self.device.size

    def open(self, key: CryptoKey | None, *, readonly: bool, rule: int | None = None) -> OpenExport:
        """The view of this export a connection gets: requests through `key`, if any (a
        CryptSubmitter made here, one per connection: cheap, and only at NBD_OPT_INFO/GO)."""
        io = self.device if key is None else CryptSubmitter(self.device, key)
        return OpenExport(self, key, readonly or self.readonly, io, rule)


@dataclass(frozen=True, slots=True)
class OpenExport:
    """One connection's export: the key its requests carry (its key context: the DUN is the
    export offset / the key's data unit size), whether it may write, and `io`, the device its
    requests are submitted to (the export's device, or that device seen through the key)."""

    export: Export
    key: CryptoKey | None
    readonly: bool
    io: Device
    rule: int | None = None  # the index of the client rule that granted it, if any

    @property
    def name(self) -> str:
        return self.export.name

    @property
    def size(self) -> int:
        return self.export.device.size

    @property
    def key_id(self) -> str | None:
        return self.key.key_id if self.key is not None else None

    @property
    def sparse_reads(self) -> bool:
        """Whether holes below read as zeroes here, so reads may report them: not through a key."""
        return self.key is None and self.export.device.caps.can_extents

    @property
    def block_sizes(self) -> tuple[int, int, int]:
        """NBD_INFO_BLOCK_SIZE: minimum (the data unit size with a key), preferred, maximum."""
        minimum = self.io.caps.block_size
        return minimum, max(minimum, PREFERRED_BLOCK), MAX_PAYLOAD

    def transmission_flags(self, *, structured: bool) -> int:
        """Exactly what this connection can do with the export, as NBD transmission flags."""
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
        if self.export.multi_conn and caps.can_multi_conn:
            flags |= tf.CAN_MULTI_CONN
        return int(flags)
