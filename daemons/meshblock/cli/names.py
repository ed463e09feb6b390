"""Turning the names an operator types into the ids the API wants.

Names come first: ``vol1`` is the volume named ``vol1``. An id is accepted where no
object has that string as its name (``meshctl volume show 12``), and an SDC may also
be named by its GUID. Lists are fetched once per invocation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from meshblock.cli.client import JsonObject, MdmClient
from meshblock.cli.errors import CliError, NotFound, UsageError


class Ambiguous(UsageError):
    """A name matches several objects; the command line must say which one."""


class Names:
    def __init__(self, client: MdmClient) -> None:
        self._client = client
        self._lists: dict[str, list[JsonObject]] = {}

    def _list(self, path: str, key: str) -> list[JsonObject]:
        if path not in self._lists:
            doc = self._client.get(path)
            items = doc.get(key) if isinstance(doc, dict) else None
            if not isinstance(items, list):
                raise CliError(f"unexpected answer from GET {path}: no {key!r} list")
            self._lists[path] = items
        return self._lists[path]

    def forget(self) -> None:
        """Drop cached lists (after a change that the next lookup must see)."""
        self._lists.clear()

    # -- lists -------------------------------------------------------------------

    def protection_domains(self) -> list[JsonObject]:
        return self._list("/api/v1/protection-domains", "protection_domains")

    def fault_sets(self) -> list[JsonObject]:
        return self._list("/api/v1/fault-sets", "fault_sets")

    def pools(self) -> list[JsonObject]:
        return self._list("/api/v1/pools", "pools")

    def sds_list(self) -> list[JsonObject]:
        return self._list("/api/v1/sds", "sds")

    def sdc_list(self) -> list[JsonObject]:
        return self._list("/api/v1/sdc", "sdc")

    def volumes(self) -> list[JsonObject]:
        return self._list("/api/v1/volumes", "volumes")

    # -- lookups by name (or id) -------------------------------------------------

    def protection_domain(self, ref: str) -> JsonObject:
        return find(self.protection_domains(), ref, "protection domain")

    def pool(self, ref: str) -> JsonObject:
        return find(self.pools(), ref, "pool")

    def sds(self, ref: str) -> JsonObject:
        return find(self.sds_list(), ref, "SDS")

    def sdc(self, ref: str) -> JsonObject:
        return find(self.sdc_list(), ref, "SDC", also=lambda s: s.get("guid") == ref)

    def volume(self, ref: str) -> JsonObject:
        """An active volume by name (a deleting one gave its name up), any by id."""
        vols = self.volumes()
        active = [v for v in vols if v.get("state", "active") == "active"]
        for v in vols:
            if (
                ref.isdigit()
                and v.get("id") == int(ref)
                and not any(a.get("name") == ref for a in active)
            ):
                return v
        return find(active, ref, "volume")

    def fault_set(self, ref: str, pd_ref: str | None = None) -> JsonObject:
        """Fault set names are unique within a protection domain only."""
        candidates = self.fault_sets()
        where = ""
        if pd_ref is not None:
            pd = self.protection_domain(pd_ref)
            candidates = [f for f in candidates if f.get("protection_domain_id") == pd["id"]]
            where = f" in protection domain {pd['name']!r}"
        matches = [f for f in candidates if f.get("name") == ref]
        if len(matches) > 1:
            pds = {p["id"]: p["name"] for p in self.protection_domains()}
            owners = ", ".join(sorted(str(pds.get(f["protection_domain_id"])) for f in matches))
            raise Ambiguous(
                f"fault set {ref!r} exists in several protection domains ({owners}); "
                "say which with --pd"
            )
        if matches:
            return matches[0]
        return find(candidates, ref, "fault set", where=where)

    def name_of(self, kind: str, ident: object) -> str:
        """The name of the object with id ``ident``, or ``#<id>`` if unknown."""
        lists: dict[str, Callable[[], list[JsonObject]]] = {
            "protection_domain": self.protection_domains,
            "fault_set": self.fault_sets,
            "pool": self.pools,
            "sds": self.sds_list,
            "sdc": self.sdc_list,
            "volume": self.volumes,
        }
        if ident is None:
            return "-"
        for item in lists[kind]():
            if item.get("id") == ident:
                return str(item.get("name"))
        return f"#{ident}"


def find(
    items: list[JsonObject],
    ref: str,
    kind: str,
    *,
    where: str = "",
    also: Callable[[JsonObject], Any] | None = None,
) -> JsonObject:
    """The item named ``ref``; else the one whose id is ``ref``; else :class:`NotFound`."""
    for item in items:
        if item.get("name") == ref:
            return item
    if also is not None:
        for item in items:
            if also(item):
                return item
    if ref.isdigit():
        for item in items:
            if item.get("id") == int(ref):
                return item
    raise NotFound(f"no {kind} named {ref!r}{where}")
