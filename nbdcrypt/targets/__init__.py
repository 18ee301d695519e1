"""The target types a table line may name, by name (like the kernel's target registry)."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from nbdcrypt.dm.target import TargetSpec
from nbdcrypt.targets.crypt import CryptSpec
from nbdcrypt.targets.default_key import DefaultKeySpec
from nbdcrypt.targets.delay import DelaySpec
from nbdcrypt.targets.flakey import FlakeySpec
from nbdcrypt.targets.linear import LinearSpec
from nbdcrypt.targets.striped import StripedSpec
from nbdcrypt.targets.zero import ErrorSpec, ZeroSpec

TARGETS: Mapping[str, type[TargetSpec]] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            LinearSpec,
            StripedSpec,
            ZeroSpec,
            ErrorSpec,
            FlakeySpec,
            DelaySpec,
            CryptSpec,
            DefaultKeySpec,
        )
    }
)
