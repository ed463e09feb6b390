#!/usr/bin/env bash
# Quick start: a whole meshblock cluster on this machine (`meshctl lab up`), then a real
# NBD client (qemu-io, nbdinfo) writing and reading its volume.
#
#   scripts/quickstart.sh        (make run)   start the lab in ./run/lab (or show the
#                                             running one), write a pattern through NBD,
#                                             read it back verified, show nbdinfo
#   scripts/quickstart.sh stop   (make stop)  meshctl lab down (the data stays)
#
# Environment: MESHBLOCK_LAB_DIR (default ./run/lab), MESHBLOCK_BASE_PORT (default: the
# daemons' standard ports, NBD on 10809; N uses ports N..N+8).
set -Eeuo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
MESHCTL="$VENV/bin/meshctl"
export MESHBLOCK_LAB_DIR="${MESHBLOCK_LAB_DIR:-$ROOT/run/lab}"

say() { printf '\n==> %s\n' "$*"; }
die() { printf 'quickstart: %s\n' "$*" >&2; exit 1; }
# Show a command (arguments with spaces in single quotes), then run it.
show() {
    local arg line="    \$"
    for arg in "$@"; do
        if [[ "$arg" == *[[:space:]]* ]]; then line+=" '$arg'"; else line+=" $arg"; fi
    done
    printf '%s\n' "$line"
    "$@"
}

[[ -x "$MESHCTL" ]] || die "no virtualenv with meshblock in $VENV: run 'make venv' first"

case "${1:-start}" in
    stop)
        exec "$MESHCTL" lab down
        ;;
    start) ;;
    *) die "usage: $0 [start|stop]" ;;
esac

for tool in qemu-io nbdinfo; do
    command -v "$tool" >/dev/null || die "$tool is not installed: run 'make deps' (Debian: qemu-utils libnbd-bin)"
done

if "$MESHCTL" lab status >/dev/null 2>&1; then
    say "a lab is already running in $MESHBLOCK_LAB_DIR ('make stop' stops it); using it"
    "$MESHCTL" lab status
else
    say "starting a lab in $MESHBLOCK_LAB_DIR: meshctl lab up"
    "$MESHCTL" lab up ${MESHBLOCK_BASE_PORT:+--base-port "$MESHBLOCK_BASE_PORT"}
fi

NBD="$("$MESHCTL" lab status --json | "$VENV/bin/python" -c 'import json, sys; d = json.load(sys.stdin)["nbd"]; print(d["unix"]); print(d["tcp"])')"
URI="$(sed -n 1p <<<"$NBD")"      # the unix socket (qemu-io 7.2 has no nbds:// URI)
TLS_URI="$(sed -n 2p <<<"$NBD")"  # TCP on loopback, TLS with the lab's client certificate

say "qemu-io writes two patterns into the volume over NBD ($URI), one at unaligned offsets across a chunk boundary"
show qemu-io -f raw -c 'write -P 0x5a 0 4M' -c 'write -P 0xc3 1048000 5000' -c 'flush' "$URI"

say "qemu-io reads them back and verifies every byte (it fails on any mismatch)"
show qemu-io -f raw -r -c 'read -P 0x5a 0 1048000' -c 'read -P 0xc3 1048000 5000' \
    -c 'read -P 0x5a 1053000 3141304' "$URI"

say "nbdinfo describes the export, over TCP with TLS"
show nbdinfo "$TLS_URI"

cat <<EOF

==> done: both copies of every chunk are on two SDSs in different fault sets.
    verify them:     . $MESHBLOCK_LAB_DIR/env && meshctl volume verify vol1
    the cluster:     . $MESHBLOCK_LAB_DIR/env && meshctl topology
    status / stop:   meshctl lab status / make stop   (docs/lab.md)
EOF
