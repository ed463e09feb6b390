"""The controller's side of the roles' TLS (roles/common/tasks/tls.yml).

Run by Ansible on the controller with the Python that runs Ansible (which must have
meshblock installed: it uses meshblock.pki, the code behind `meshctl ca`). Two
commands, each idempotent: it changes something only when needed, and says so on its
first output line (``changed ...`` or ``unchanged ...``), which the task reads.

  meshblock_pki.py cert --ca DIR --out DIR --identity KIND:NAME [--san NAME]...
                        [--days N] [--renew-days N] [--force]
      (Re-)issue the identity's certificate into OUT (KIND-NAME.crt, .key 0600, ca.crt)
      unless OUT holds one of this CA that names exactly this identity and these SANs,
      is not revoked, and is valid for more than --renew-days days.
  meshblock_pki.py crl --ca DIR [--days N] [--renew-days N]
      Re-sign the CA's CRL when it expires within --renew-days days.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import sys
from pathlib import Path

from cryptography import x509

from meshblock import pki


def _sans_of(cert: x509.Certificate) -> set[str]:
    """The DNS names and IP addresses a certificate names, as text."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return ips | {name.lower() for name in san.get_values_for_type(x509.DNSName)}


def _normal(san: str) -> str:
    try:
        return str(ipaddress.ip_address(san))
    except ValueError:
        return san.lower()


def _why_reissue(
    ca: pki.Ca, out: Path, identity: pki.Identity, sans: set[str], renew: dt.timedelta
) -> str | None:
    """Why the certificate in ``out`` must be issued again; None if it is fine."""
    paths = pki.identity_paths(out, identity)
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        return f"missing {', '.join(missing)}"
    ca_cert = ca.load()[0]
    cert = pki.load_cert(paths["cert"])
    key = pki.load_key(paths["key"])
    if paths["ca"].read_bytes() != pki.cert_pem(ca_cert):
        return "ca.crt is not this CA's"
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, x509.InvalidSignature):
        return "signed by another CA"
    if cert.public_key() != key.public_key():
        return "the key is not the certificate's"
    try:
        named = pki.identity_of(cert)
    except pki.PkiError as exc:
        return str(exc)
    if named != identity:
        return f"it names {named}"
    if _sans_of(cert) != sans:
        return f"its names {sorted(_sans_of(cert))} are not {sorted(sans)}"
    if ca.crl().get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
        return "revoked"
    left = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    if left <= renew:
        return f"expires in {left.days} days"
    return None


def cert(args: argparse.Namespace) -> str:
    ca = pki.Ca(Path(args.ca))
    identity = pki.Identity.parse(args.identity)
    out = Path(args.out)
    sans = {_normal(s) for s in args.san}
    why = "forced" if args.force else _why_reissue(ca, out, identity, sans, args.renew)
    if why is None:
        return f"unchanged {identity}"
    new, key = ca.issue(identity, sans=sorted(sans), days=args.days)
    pki.write_identity(out, identity, new, key, ca.load()[0], force=True)
    return f"changed {identity}: issued serial {new.serial_number:x} ({why})"


def crl(args: argparse.Namespace) -> str:
    ca = pki.Ca(Path(args.ca))
    left = ca.crl().next_update_utc
    if left is not None and left - dt.datetime.now(dt.UTC) > args.renew:
        return f"unchanged CRL, valid until {left.isoformat()}"
    new = ca.resign_crl(days=args.days)
    return f"changed CRL: re-signed, valid until {new.next_update_utc}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("cert")
    p.add_argument("--ca", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--identity", required=True)
    p.add_argument("--san", action="append", default=[])
    p.add_argument("--days", type=int, default=pki.LEAF_DAYS)
    p.add_argument("--renew-days", dest="renew_days", type=int, default=30)
    p.add_argument("--force", action="store_true")
    p.set_defaults(run=cert)
    p = sub.add_parser("crl")
    p.add_argument("--ca", required=True)
    p.add_argument("--days", type=int, default=pki.CRL_DAYS)
    p.add_argument("--renew-days", dest="renew_days", type=int, default=7)
    p.set_defaults(run=crl)
    args = parser.parse_args(argv)
    args.renew = dt.timedelta(days=args.renew_days)
    try:
        print(args.run(args))
    except pki.PkiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
