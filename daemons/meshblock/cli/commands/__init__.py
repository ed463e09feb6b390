"""One module per noun of the command line; each has ``register(subparsers)``."""

from __future__ import annotations

from collections.abc import Callable

from meshblock.cli.commands import (
    ca,
    cluster,
    config,
    fault_sets,
    lab,
    mappings,
    pools,
    protection_domains,
    rebuild,
    sdc,
    sds,
    volumes,
)
from meshblock.cli.parser import Subparsers

NOUNS: list[Callable[[Subparsers], None]] = [
    protection_domains.register,
    fault_sets.register,
    pools.register,
    sds.register,
    sdc.register,
    rebuild.register,
    volumes.register,
    mappings.register,
    cluster.register,
    config.register,
    lab.register,
    ca.register,
]
