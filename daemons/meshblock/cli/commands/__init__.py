"""The ``meshctl`` command tree: one module per noun, each with ``register(subparsers)``.

The building blocks are in :mod:`meshblock.cli.parser`, which imports nothing from
here: the tree is assembled in this package, so the import graph has no circle.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from meshblock.cli.commands import (
    ca,
    cluster,
    completion,
    config,
    fault_sets,
    lab,
    mappings,
    pools,
    protection_domains,
    rebuild,
    scrub,
    sdc,
    sds,
    snapshot_gc,
    volumes,
)
from meshblock.cli.parser import Subparsers, root_parser

NOUNS: list[Callable[[Subparsers], None]] = [
    protection_domains.register,
    fault_sets.register,
    pools.register,
    sds.register,
    sdc.register,
    rebuild.register,
    scrub.register,
    snapshot_gc.register,
    volumes.register,
    mappings.register,
    cluster.register,
    config.register,
    lab.register,
    ca.register,
    completion.register,
]


def build_parser() -> argparse.ArgumentParser:
    """The whole ``meshctl`` command line."""
    parser = root_parser()
    sub = parser.add_subparsers(dest="noun", metavar="COMMAND", required=True)
    for register in NOUNS:
        register(sub)
    return parser
