"""``meshctl ca``: the cluster's certificate authority (``meshblock.pki``, docs/security.md).

Like ``meshctl lab`` it talks to no MDM: it works on a CA directory on this machine,
which should be the controller's, readable by its owner only.
"""

from __future__ import annotations

from argparse import Namespace
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature

from meshblock import pki
from meshblock.cli.context import Context
from meshblock.cli.errors import CliError, Conflict, InvalidInput, NotFound
from meshblock.cli.output import render_fields, render_table
from meshblock.cli.parser import Subparsers, add_command, add_noun

_KINDS = ", ".join(k.value for k in pki.Kind)
_USAGES = {
    "server": pki.Usage.SERVER,
    "client": pki.Usage.CLIENT,
    "both": pki.Usage.SERVER | pki.Usage.CLIENT,
}


def register(root: Subparsers) -> None:
    sub = add_noun(root, "ca", "make the cluster's CA, issue and revoke component certificates")

    p = add_command(
        sub,
        "init",
        init,
        help="make a new cluster CA in DIR",
        description=f"""
            Writes DIR/{pki.CA_CERT} (give it to every component), DIR/{pki.CA_KEY}
            (mode 0600: it signs every identity of the cluster; keep it on the
            controller only), DIR/{pki.CRL} (the revocation list, empty) and
            DIR/{pki.ISSUED}/. The key is ECDSA P-256. Refused (exit 5) if DIR
            already holds a CA: replacing it invalidates every certificate it signed,
            so that needs --force.""",
        examples=["meshctl ca init /etc/meshblock/ca", "meshctl ca init ./ca --days 1825"],
    )
    p.add_argument("dir", type=Path, metavar="DIR", help="the CA directory (made 0700)")
    p.add_argument(
        "--days",
        type=int,
        default=pki.CA_DAYS,
        metavar="N",
        help=f"how long the CA is valid (default {pki.CA_DAYS} days)",
    )
    p.add_argument(
        "--name",
        default="meshblock cluster CA",
        metavar="CN",
        help="the CA's common name (default 'meshblock cluster CA')",
    )
    p.add_argument("--force", action="store_true", help="replace the CA that DIR holds")

    p = add_command(
        sub,
        "issue",
        issue,
        help="issue a key and certificate for one component's identity",
        description=f"""
            IDENTITY is KIND:NAME with KIND one of {_KINDS}: sds:sds1, sdc:GUID,
            mdm:mdm1, mgmt:mgmt1, admin:alice. Writes KIND-NAME.crt, KIND-NAME.key
            (mode 0600) and ca.crt to --out DIR; refuses to replace them without
            --force. Give each --san (a DNS name or IP address) that clients dial a
            server at. The usage defaults to client for admin, both for the others.""",
        examples=[
            "meshctl ca issue sds:sds1 --ca ./ca --out /etc/meshblock/tls "
            "--san sds1.example.net --san 10.0.0.11",
            "meshctl ca issue admin:alice --ca ./ca --out ~/.config/meshblock --days 30",
        ],
    )
    p.add_argument("identity", metavar="IDENTITY", help="KIND:NAME, e.g. sds:sds1")
    _ca_option(p)
    p.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="where to write the files"
    )
    p.add_argument(
        "--days",
        type=int,
        default=pki.LEAF_DAYS,
        metavar="N",
        help=f"how long it is valid (default {pki.LEAF_DAYS} days; never past the CA)",
    )
    p.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="NAME",
        help="a DNS name or IP address of the component (repeat for more)",
    )
    p.add_argument(
        "--usage", choices=sorted(_USAGES), help="TLS server, client or both (default by kind)"
    )
    p.add_argument("--force", action="store_true", help="replace files that exist in --out")

    p = add_command(
        sub,
        "revoke",
        revoke,
        help="revoke a certificate the CA issued, by serial or certificate file",
        description=f"""
            Adds it to DIR/{pki.CRL} and re-signs the list. Components refuse a
            revoked certificate once they load the new CRL: copy it to them (today
            by hand or with Ansible; later the MDM publishes it). SERIAL is the hex
            serial that 'meshctl ca list' shows.""",
        examples=[
            "meshctl ca revoke 3f2a...c1 --ca ./ca",
            "meshctl ca revoke /etc/meshblock/tls/sds-sds1.crt --ca ./ca",
        ],
    )
    p.add_argument("target", metavar="SERIAL|CERT", help="hex serial or a certificate file")
    _ca_option(p)

    p = add_command(
        sub,
        "crl",
        crl,
        help="re-sign the revocation list with a new expiry",
        description=f"""
            A CRL is valid for --days (default {pki.CRL_DAYS}); past that, every
            component that loads it refuses every peer (fail closed). Re-sign it
            before then and copy it out again.""",
        examples=["meshctl ca crl --ca ./ca"],
    )
    _ca_option(p)
    p.add_argument(
        "--days",
        type=int,
        default=pki.CRL_DAYS,
        metavar="N",
        help=f"how long the list is valid (default {pki.CRL_DAYS} days)",
    )

    p = add_command(
        sub,
        "list",
        list_,
        help="list the certificates the CA issued: identity, validity, status",
        description="Status is valid, expired or revoked.",
        examples=["meshctl ca list --ca ./ca", "meshctl ca list --ca ./ca --json"],
    )
    _ca_option(p)


def _ca_option(p: Any) -> None:
    p.add_argument(
        "--ca", type=Path, required=True, metavar="DIR", help="the CA directory ('ca init')"
    )


def _cli_error(exc: pki.PkiError) -> CliError:
    if isinstance(exc, pki.InvalidInput):
        return InvalidInput(str(exc))
    if isinstance(exc, pki.AlreadyExists):
        return Conflict(str(exc))
    if isinstance(exc, pki.NotFound):
        return NotFound(str(exc))
    return CliError(str(exc))


def init(ctx: Context, args: Namespace) -> None:
    try:
        ca = pki.Ca.init(args.dir, common_name=args.name, days=args.days, force=args.force)
        cert, _ = ca.load()
    except pki.PkiError as exc:
        raise _cli_error(exc) from None
    doc = {
        "dir": str(args.dir),
        "ca_cert": str(ca.cert_path),
        "ca_key": str(ca.key_path),
        "crl": str(ca.crl_path),
        "not_after": cert.not_valid_after_utc.isoformat(),
    }
    ctx.done(
        f"made CA '{args.name}' in {args.dir} (valid until {doc['not_after']}); "
        f"keep {ca.key_path} secret",
        doc,
    )


def issue(ctx: Context, args: Namespace) -> None:
    try:
        identity = pki.Identity.parse(args.identity)
        ca = pki.Ca(args.ca)
        ca_cert, _ = ca.load()
        usage = _USAGES[args.usage] if args.usage else None
        # Check the output before signing: a refused --out leaves no record in issued/.
        pki.check_identity_out(args.out, identity, ca_cert, force=args.force)
        cert, key = ca.issue(identity, sans=args.san, days=args.days, usage=usage)
        paths = pki.write_identity(args.out, identity, cert, key, ca_cert, force=args.force)
    except pki.PkiError as exc:
        raise _cli_error(exc) from None
    doc = {
        "identity": str(identity),
        "serial": f"{cert.serial_number:x}",
        "not_after": cert.not_valid_after_utc.isoformat(),
        **{k: str(v) for k, v in paths.items()},
    }
    ctx.done(
        f"issued {identity} (serial {doc['serial']}, valid until {doc['not_after']}): "
        f"{paths['cert']}, {paths['key']}",
        doc,
    )


def _serial(ca: pki.Ca, target: str) -> int:
    path = Path(target)
    if path.is_file():
        cert = pki.load_cert(path)
        ca_cert, _ = ca.load()
        try:
            cert.verify_directly_issued_by(ca_cert)
        except (ValueError, TypeError, InvalidSignature):
            raise InvalidInput(f"{path} was not issued by the CA in {ca.root}") from None
        return cert.serial_number
    try:
        return int(target.removeprefix("0x").replace(":", ""), 16)
    except ValueError:
        raise InvalidInput(f"{target!r} is neither a certificate file nor a hex serial") from None


def revoke(ctx: Context, args: Namespace) -> None:
    ca = pki.Ca(args.ca)
    try:
        cert = ca.revoke(_serial(ca, args.target))
    except pki.PkiError as exc:
        raise _cli_error(exc) from None
    ident = pki.identity_or_subject(cert)
    doc = {"serial": f"{cert.serial_number:x}", "identity": ident, "crl": str(ca.crl_path)}
    ctx.done(
        f"revoked {ident} (serial {doc['serial']}); copy {ca.crl_path} to the components",
        doc,
    )


def crl(ctx: Context, args: Namespace) -> None:
    ca = pki.Ca(args.ca)
    try:
        new = ca.resign_crl(days=args.days)
    except pki.PkiError as exc:
        raise _cli_error(exc) from None
    next_update = new.next_update_utc.isoformat() if new.next_update_utc else None
    doc = {"crl": str(ca.crl_path), "number": pki.crl_number(new), "next_update": next_update}
    ctx.done(f"re-signed {ca.crl_path} (number {doc['number']}), valid until {next_update}", doc)


def list_(ctx: Context, args: Namespace) -> None:
    ca = pki.Ca(args.ca)
    try:
        rows = ca.listing()
        ca_cert, _ = ca.load()
        current = ca.crl()
    except pki.PkiError as exc:
        raise _cli_error(exc) from None
    next_update = current.next_update_utc.isoformat() if current.next_update_utc else None
    doc: dict[str, Any] = {
        "ca": {
            "subject": ca_cert.subject.rfc4514_string(),
            "not_after": ca_cert.not_valid_after_utc.isoformat(),
            "crl_next_update": next_update,
        },
        "certificates": [r.to_json() for r in rows],
    }

    def human() -> str:
        head = render_fields(
            [
                ("CA", doc["ca"]["subject"]),
                ("valid until", doc["ca"]["not_after"]),
                ("CRL valid until", next_update),
            ]
        )
        table = render_table(
            ["SERIAL", "IDENTITY", "USAGE", "NOT AFTER", "STATUS"],
            [
                [c["serial"], c["identity"], ",".join(c["usage"]), c["not_after"], c["status"]]
                for c in doc["certificates"]
            ],
            empty="no certificates issued",
        )
        return f"{head}\n\n{table}"

    ctx.emit(doc, human)
