"""``meshctl``'s entry point: parse the command line, run the command, map errors.

Errors are printed as ``meshctl: error: <message>`` on stderr and turned into the
exit codes listed in :mod:`meshblock.cli.errors`. With ``--json`` anywhere on the
command line an error is one JSON object on stderr instead (:func:`error_doc`), with
the same exit code; argparse's own usage errors included.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import ssl
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from meshblock import pki
from meshblock.cli.client import MdmClient
from meshblock.cli.commands import build_parser
from meshblock.cli.context import Context
from meshblock.cli.errors import ApiError, CliError, ExitCode, UsageError
from meshblock.cli.parser import PROG
from meshblock.cli.settings import ENV_TOKEN, Settings, resolve


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in words[: words.index("--")] if "--" in words else "--json" in words
    try:
        return _run(words, os.environ if env is None else env, as_json)
    except CliError as exc:
        if as_json:
            print(json.dumps(error_doc(exc), ensure_ascii=False), file=sys.stderr)
        else:
            print(f"{PROG}: error: {exc.message}", file=sys.stderr)
        return int(exc.exit_code)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else int(ExitCode.USAGE)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`meshctl volume list | head -1`): not an error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return int(ExitCode.OK)


def error_doc(exc: CliError) -> dict[str, Any]:
    """An error as ``--json`` prints it: ``error`` (the message), ``exit_code``,
    ``kind`` (the exit code's name: ``not_found``, ``auth``, ...) and, when the MDM
    refused the request, its HTTP ``status``, error ``code`` and ``details``."""
    doc: dict[str, Any] = {
        "error": exc.message,
        "exit_code": int(exc.exit_code),
        "kind": ExitCode(exc.exit_code).name.lower(),
    }
    if isinstance(exc, ApiError):
        doc.update(status=exc.status, code=exc.code, details=exc.details)
    return doc


def _run(argv: list[str], env: Mapping[str, str], as_json: bool = False) -> int:
    parser = build_parser()
    if not argv:
        # Bare `meshctl`: the whole help rather than argparse's one-line complaint, on
        # stderr and with exit 2 as for any command line that does not say what to do.
        parser.print_help(sys.stderr)
        return int(ExitCode.USAGE)
    args = _parse(parser, argv) if as_json else parser.parse_args(argv)
    settings = resolve(
        mdm_flag=args.mdm,
        token_flag=args.token,
        config_flag=args.config,
        env=env,
        token_file_flag=args.token_file,
    )
    if args.timeout <= 0:
        raise CliError("--timeout must be positive")
    client = MdmClient(
        settings.mdm_urls, settings.token, timeout=args.timeout, tls=_tls_context(settings)
    )
    ctx = Context(client=client, settings=settings, json=args.json, env=env)
    try:
        result = args.handler(ctx, args)
    except ApiError as exc:
        if exc.status in (401, 403):
            exc.message = f"{exc.message}; {credential_hint(settings, exc.status)}"
        raise
    return int(result or ExitCode.OK)


def _parse(parser: Any, argv: list[str]) -> Any:
    """``parser.parse_args`` with argparse's usage error raised as :class:`UsageError`
    (for ``--json``) instead of printed; ``--help`` and ``--version`` print as usual."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return parser.parse_args(argv)
    except SystemExit as exc:
        if not exc.code:
            sys.stderr.write(captured.getvalue())
            raise
        lines = captured.getvalue().strip().splitlines() or ["bad command line"]
        # argparse's last line: "meshctl volume create: error: the following ..."
        raise UsageError(lines[-1].partition(": error: ")[2] or lines[-1]) from None


def credential_hint(settings: Settings, status: int) -> str:
    """What to set when the MDM refused meshctl's credential (401) or its right (403)."""
    source = _token_source(settings)
    if status == 403:
        if settings.token is None:
            return "the admin certificate (MESHCTL_TLS_CERT) may not do this"
        return (
            f"the token from {source} may not do this (a read-only token only reads): "
            "use an admin token"
        )
    if settings.token is None:
        return (
            f"no API token was given: set {ENV_TOKEN}, or pass --token-file PATH, or put "
            f'token = "..." in {settings.default_config_path} (meshctl config show)'
        )
    return (
        f"the MDM does not know the token from {source}: check it (meshctl config show "
        f"tells where the token comes from; {ENV_TOKEN}, --token-file PATH, the config file)"
    )


def _token_source(settings: Settings) -> str:
    source = settings.token_source
    if source in ("--token", ENV_TOKEN):
        return source
    if settings.config_path is not None and source == str(settings.config_path):
        return f"the config file {source}"
    return f"--token-file {source}"


def _tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The cluster CA to trust for https, and the admin certificate to present."""
    if settings.tls_ca is None:
        if settings.tls_cert is not None:
            raise CliError("a client certificate (MESHCTL_TLS_CERT) needs MESHCTL_TLS_CA")
        return None
    try:
        return pki.client_context(settings.tls_ca, cert=settings.tls_cert, key=settings.tls_key)
    except pki.PkiError as exc:
        raise CliError(str(exc)) from None


if __name__ == "__main__":
    sys.exit(main())
