"""What can go wrong in ``meshctl``, each kind with its own exit code.

The exit codes are part of the CLI's contract (scripts test them), so they live in
one enum that the ``--help`` epilog and ``docs/meshctl.md`` both describe.
"""

from __future__ import annotations

import enum
from typing import Any


class ExitCode(enum.IntEnum):
    OK = 0
    ERROR = 1  # a generic error, or `meshctl health` found the cluster unhealthy
    USAGE = 2  # argparse's own code for a bad command line
    UNREACHABLE = 3
    NOT_FOUND = 4
    CONFLICT = 5
    AUTH = 6
    INVALID = 7
    NOT_SAFE = 8  # `meshctl sds ok-to-stop`: stopping them would leave a PG without a copy
    # `meshctl volume unmap` / `set-access --read-only`: done, but an SDS has not
    # confirmed it (it may still serve the SDC as before)
    UNCONFIRMED = 9


EXIT_CODES_HELP = """\
exit codes:
  0  success
  1  generic error; for `meshctl health`: a component is disconnected or degraded
  2  usage error (bad command line)
  3  cannot reach the MDM
  4  not found (no object with that name or id)
  5  conflict (duplicate name, object in use, shrinking, insufficient capacity)
  6  authentication or authorisation refused (401/403): check the token
  7  invalid input (bad size, value out of range; HTTP 400/422)
  8  not safe: `meshctl sds ok-to-stop` found a PG that would have no copy left
  9  unconfirmed: `meshctl volume unmap` (or `set-access --read-only`) changed the
     mapping, but an SDS has not taken it yet and may still serve the SDC as before
     (it is named)"""


class CliError(Exception):
    """An error to report as ``meshctl: error: <message>`` with ``exit_code``."""

    exit_code: ExitCode = ExitCode.ERROR

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(CliError):
    """The command line is well-formed for argparse but does not say enough."""

    exit_code = ExitCode.USAGE


class Unreachable(CliError):
    """No MDM answered at any of the configured addresses."""

    exit_code = ExitCode.UNREACHABLE


class NotFound(CliError):
    exit_code = ExitCode.NOT_FOUND


class Conflict(CliError):
    exit_code = ExitCode.CONFLICT


class AuthRefused(CliError):
    exit_code = ExitCode.AUTH


class InvalidInput(CliError):
    exit_code = ExitCode.INVALID


class ApiError(CliError):
    """The MDM answered with an error document ``{"error": {...}}``.

    ``status`` is the HTTP status, ``code`` and ``details`` come from the body; the
    exit code follows from the status (see :data:`_EXIT_BY_STATUS`).
    """

    def __init__(
        self, status: int, code: str, message: str, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.details = details or {}
        self.exit_code = _EXIT_BY_STATUS.get(status, ExitCode.ERROR)


_EXIT_BY_STATUS = {
    400: ExitCode.INVALID,
    401: ExitCode.AUTH,
    403: ExitCode.AUTH,
    404: ExitCode.NOT_FOUND,
    409: ExitCode.CONFLICT,
    422: ExitCode.INVALID,
}
