"""``meshctl``'s entry point: parse the command line, run the command, map errors.

Errors are printed as ``meshctl: error: <message>`` on stderr and turned into the
exit codes listed in :mod:`meshblock.cli.errors`.
"""

from __future__ import annotations

import os
import ssl
import sys
from collections.abc import Mapping, Sequence

from meshblock import pki
from meshblock.cli.client import MdmClient
from meshblock.cli.commands import build_parser
from meshblock.cli.context import Context
from meshblock.cli.errors import CliError, ExitCode
from meshblock.cli.parser import PROG
from meshblock.cli.settings import Settings, resolve


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    try:
        return _run(argv, os.environ if env is None else env)
    except CliError as exc:
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


def _run(argv: Sequence[str] | None, env: Mapping[str, str]) -> int:
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):
        # Bare `meshctl`: the whole help rather than argparse's one-line complaint, on
        # stderr and with exit 2 as for any command line that does not say what to do.
        parser.print_help(sys.stderr)
        return int(ExitCode.USAGE)
    args = parser.parse_args(argv)
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
    ctx = Context(client=client, settings=settings, json=args.json)
    result = args.handler(ctx, args)
    return int(result or ExitCode.OK)


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
