"""The MDM leader terms an SDS or an SDC has seen (docs/mdm.md, "High availability").

Every PG map, mappings document and heartbeat answer of an MDM carries the term of its
leader lease (``"term"``). A component keeps the highest term it has seen and refuses
a map or an order of an older one: a deposed leader's answers, even those that left it
before the fence stopped its writes. An answer without a term (an MDM of an older
release) is taken as before.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)


def term_of(doc: Any) -> int | None:
    """The term an MDM's answer carries; None when it carries none."""
    term = doc.get("term") if isinstance(doc, Mapping) else None
    if isinstance(term, int) and not isinstance(term, bool) and term > 0:
        return term
    return None


class Terms:
    """The highest leader term seen, and how many answers of an older one were
    refused (the ``*_mdm_term_refused_total`` metrics)."""

    def __init__(self) -> None:
        self.highest = 0
        self.refused = 0

    def saw(self, doc: Any) -> None:
        """Raise the highest term to ``doc``'s (a map kept from before a restart)."""
        term = term_of(doc)
        if term is not None and term > self.highest:
            self.highest = term

    def admit(self, doc: Any, what: str) -> bool:
        """Whether ``doc`` (``what``: for the log) may be taken: it carries no term or
        one at least the highest seen, which it then becomes; refused (logged, counted)
        when it carries an older one."""
        term = term_of(doc)
        if term is None:
            return True
        if term < self.highest:
            self.refused += 1
            log.warning(
                "%s of MDM leader term %d refused: term %d has been seen (a deposed MDM's)",
                what,
                term,
                self.highest,
            )
            return False
        self.highest = term
        return True
