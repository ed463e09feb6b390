"""``meshctl config``: which MDM and token ``meshctl`` would use, and from where."""

from __future__ import annotations

from argparse import Namespace

from meshblock.cli.context import Context
from meshblock.cli.output import render_fields
from meshblock.cli.parser import Subparsers, add_command, add_noun


def register(root: Subparsers) -> None:
    sub = add_noun(root, "config", "show meshctl's connection settings")
    add_command(
        sub,
        "show",
        show,
        help="show the MDM address and where it and the token come from",
        description="The token itself is never printed, only whether one is set.",
        examples=["meshctl config show", "MESHCTL_MDM=http://10.0.0.5:6611 meshctl config show"],
    )


def show(ctx: Context, args: Namespace) -> None:
    s = ctx.settings
    doc = {
        "mdm": list(s.mdm_urls),
        "mdm_source": s.mdm_source,
        "token_set": s.token is not None,
        "token_source": s.token_source,
        "config_file": str(s.config_path) if s.config_path else None,
        "default_config_file": str(s.default_config_path),
        "tls_ca": str(s.tls_ca) if s.tls_ca else None,
        "tls_cert": str(s.tls_cert) if s.tls_cert else None,
    }
    ctx.emit(
        doc,
        lambda: render_fields(
            [
                ("mdm", ", ".join(s.mdm_urls)),
                ("mdm from", s.mdm_source),
                ("token", "set" if s.token else "not set"),
                ("token from", s.token_source),
                ("config file", doc["config_file"] or f"none ({doc['default_config_file']})"),
                ("tls ca", doc["tls_ca"] or "system"),
                ("tls cert", doc["tls_cert"]),
            ]
        ),
    )
