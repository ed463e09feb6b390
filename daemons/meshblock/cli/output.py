"""What ``meshctl`` prints: aligned tables, ``key: value`` blocks, trees, or JSON.

Human output formats sizes with :func:`meshblock.sizes.format_size` and shows a
missing value as ``-``; ``--json`` prints the API's documents unchanged so that
scripts can rely on the shapes of ``docs/api.md``.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from meshblock.sizes import format_size

NONE = "-"


def to_json(doc: Any) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False)


def render_table(
    headers: Sequence[str],
    rows: Iterable[Sequence[object]],
    *,
    right: Collection[str] = (),
    empty: str | None = None,
) -> str:
    """Columns padded to their widest cell; columns named in ``right`` align right.

    >>> print(render_table(["NAME", "SIZE"], [["vol1", "16 GiB"], ["v2", "1 TiB"]],
    ...                    right={"SIZE"}))
    NAME    SIZE
    vol1  16 GiB
    v2     1 TiB
    """
    cells = [[cell_text(c) for c in row] for row in rows]
    if not cells and empty is not None:
        return empty
    widths = [len(h) for h in headers]
    for row in cells:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, table has {len(headers)} columns")
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = []
    for row in [list(headers), *cells]:
        parts = [
            c.rjust(w) if h in right else c.ljust(w)
            for h, c, w in zip(headers, row, widths, strict=True)
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def render_fields(pairs: Iterable[tuple[str, object]]) -> str:
    """``key: value`` lines with the values aligned, for ``show`` commands."""
    items = [(k, cell_text(v)) for k, v in pairs]
    width = max((len(k) for k, _ in items), default=0) + 1
    return "\n".join(f"{(k + ':').ljust(width)} {v}".rstrip() for k, v in items)


@dataclass
class TreeNode:
    label: str
    children: list[TreeNode] = field(default_factory=list)

    def add(self, label: str) -> TreeNode:
        child = TreeNode(label)
        self.children.append(child)
        return child


def render_tree(root: TreeNode) -> str:
    """Draw ``root`` and its descendants with box-drawing branches.

    >>> root = TreeNode("pd1")
    >>> fs = root.add("fs1"); _ = fs.add("sds1"); _ = root.add("sp1")
    >>> print(render_tree(root))
    pd1
    ├── fs1
    │   └── sds1
    └── sp1
    """
    lines = [root.label]

    def walk(node: TreeNode, prefix: str) -> None:
        for i, child in enumerate(node.children):
            last = i == len(node.children) - 1
            lines.append(f"{prefix}{'└── ' if last else '├── '}{child.label}")
            walk(child, prefix + ("    " if last else "│   "))

    walk(root, "")
    return "\n".join(lines)


def cell_text(value: object) -> str:
    if value is None or value == "":
        return NONE
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def size(value: object) -> str:
    """Bytes as ``16 GiB``; anything that is not a byte count as ``-``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return format_size(value)
    return NONE


def rate(value: object) -> str:
    """Bytes per second as ``100 MiB/s``; ``None`` (no limit) as ``-``."""
    return f"{size(value)}/s" if isinstance(value, int | float) else NONE


def percent(value: object) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:.1f}%"
    return NONE


def timestamp(value: object) -> str:
    """An ISO 8601 timestamp to the second, without the ``T``: ``2024-05-01 10:22:03``."""
    if not isinstance(value, str) or not value:
        return NONE
    text = value.replace("T", " ")
    return text.split(".")[0].removesuffix("+00:00").removesuffix("Z")
