"""What every meshblock daemon does the same way at start."""

from __future__ import annotations

import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str) -> None:
    """Log to stderr (journald keeps it) at ``level``.

    DEBUG applies to meshblock's own loggers only: the libraries' debug output (a line
    per SQL call, per HTTP request) would drown it. aiohttp's access log stays quiet.
    """
    level = level.upper()
    logging.basicConfig(level="INFO" if level == "DEBUG" else level, format=LOG_FORMAT)
    logging.getLogger("meshblock").setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
