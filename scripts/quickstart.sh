#!/usr/bin/env bash
# Quick start: an MDM on SQLite in ./run/ and a small topology built with meshctl.
#
#   scripts/quickstart.sh        (make run)   start afresh: stop an earlier MDM, wipe ./run/,
#                                             start the MDM, build the topology, print it
#   scripts/quickstart.sh stop   (make stop)  stop the MDM that this script started
#
# Environment: MESHBLOCK_PORT (default 6611) for the MDM's API port.
set -Eeuo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN="$ROOT/run"
VENV="$ROOT/.venv"
PORT="${MESHBLOCK_PORT:-6611}"
PIDFILE="$RUN/mdm.pid"
LOG="$RUN/mdm.log"

say() { printf '==> %s\n' "$*"; }
die() { printf 'quickstart: %s\n' "$*" >&2; exit 1; }

# The pid of the MDM this script started, if it is still running.
running_pid() {
    [[ -f "$PIDFILE" ]] || return 1
    local pid
    pid="$(cat "$PIDFILE")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    # Only a live process that is our MDM (the pid may have been reused).
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "meshblock-mdm --config $RUN/mdm.toml" \
        || return 1
    echo "$pid"
}

stop_mdm() {
    local pid
    if ! pid="$(running_pid)"; then
        rm -f "$PIDFILE"
        [[ "${1:-}" == quiet ]] || say "no quick-start MDM is running"
        return 0
    fi
    say "stopping the MDM (pid $pid)"
    kill -TERM "$pid"
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$PIDFILE"; say "stopped"; return 0; }
        sleep 0.1
    done
    die "the MDM (pid $pid) did not stop within 10 s; see $LOG"
}

if [[ "${1:-start}" == "stop" ]]; then
    stop_mdm
    exit 0
elif [[ "${1:-start}" != "start" ]]; then
    die "usage: $0 [start|stop]"
fi

[[ -x "$VENV/bin/meshblock-mdm" && -x "$VENV/bin/meshctl" ]] \
    || die "no virtualenv with meshblock in $VENV: run 'make venv' first"

stop_mdm quiet
rm -rf "$RUN"
mkdir -p "$RUN/devices"
chmod 700 "$RUN"

token() { "$VENV/bin/python" -c 'import secrets; print(secrets.token_urlsafe(24))'; }
ADMIN_TOKEN="$(token)"
READONLY_TOKEN="$(token)"
CLUSTER_SECRET="$(token)"
URL="http://127.0.0.1:$PORT"

umask 077
cat >"$RUN/mdm.toml" <<EOF
# Written by scripts/quickstart.sh for a local try-out; see docs/ for every setting.
[api]
host = "127.0.0.1"
port = $PORT

[auth]
admin_token = "$ADMIN_TOKEN"
readonly_token = "$READONLY_TOKEN"
cluster_secret = "$CLUSTER_SECRET"

[database]
url = "sqlite+aiosqlite:///$RUN/mdm.db"

[cluster]
name = "quickstart"
EOF

cat >"$RUN/env" <<EOF
# Source this file to use meshctl against the quick-start MDM: . run/env
export MESHCTL_MDM="$URL"
export MESHCTL_TOKEN="$ADMIN_TOKEN"
export PATH="$VENV/bin:\$PATH"
EOF
umask 022

if "$VENV/bin/python" - "$PORT" <<'EOF'
import socket, sys
with socket.socket() as s:
    sys.exit(0 if s.connect_ex(("127.0.0.1", int(sys.argv[1]))) == 0 else 1)
EOF
then
    die "port $PORT is already in use; pick another with MESHBLOCK_PORT=NNNN make run"
fi

say "starting the MDM on $URL (log: run/mdm.log)"
nohup "$VENV/bin/meshblock-mdm" --config "$RUN/mdm.toml" >"$LOG" 2>&1 </dev/null &
echo $! >"$PIDFILE"

on_error() {
    echo "quickstart: failed; the MDM log ends with:" >&2
    tail -n 30 "$LOG" >&2 || true
    stop_mdm >&2 || true
}
trap on_error ERR

say "waiting for $URL/health"
"$VENV/bin/python" - "$URL/health" "$(cat "$PIDFILE")" <<'EOF'
import os, sys, time, urllib.request
url, pid = sys.argv[1], int(sys.argv[2])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("the MDM exited while starting")
    try:
        with opener.open(url, timeout=2) as resp:
            if resp.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.2)
sys.exit("the MDM was not healthy within 30 s")
EOF

export MESHCTL_MDM="$URL" MESHCTL_TOKEN="$ADMIN_TOKEN"
meshctl() {
    printf '    $ meshctl %s\n' "$*"
    "$VENV/bin/meshctl" "$@" >/dev/null
}

say "building a topology: pd1, fault sets fs1..fs3, pool sp1, sds1..sds3, host1, two volumes"
meshctl pd create pd1
for i in 1 2 3; do
    meshctl faultset create "fs$i" --pd pd1
done
meshctl pool create sp1 --pd pd1
for i in 1 2 3; do
    # File devices, sparse: they take no disk space until an SDS writes to them.
    dev="$RUN/devices/sds$i-disk1.img"
    truncate -s 64G "$dev"
    # All on this host, so each SDS gets its own ports (7072/7073, 7082/7083, ...).
    meshctl sds add "sds$i" --pd pd1 --fault-set "fs$i" --address 127.0.0.1 \
        --data-port "$((7062 + 10 * i))" --control-port "$((7063 + 10 * i))" \
        --device "$dev:64GiB:sp1"
done
meshctl sdc add host1 --guid "$("$VENV/bin/python" -c 'import uuid; print(uuid.uuid4())')"
meshctl volume create vol-thin --pool sp1 --size 16GiB --thin
meshctl volume create vol-thick --pool sp1 --size 8GiB --thick
meshctl volume map vol-thin --sdc host1
meshctl volume map vol-thick --sdc host1
trap - ERR

echo
"$VENV/bin/meshctl" topology
echo
cat <<EOF
The MDM keeps running (pid $(cat "$PIDFILE")) at $URL; its state is in run/.
  use meshctl:   . run/env && meshctl topology
  its log:       run/mdm.log
  stop it:       make stop
EOF
