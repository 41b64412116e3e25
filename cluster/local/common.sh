# Shared by start.sh, mlflow_server.sh and stop.sh (sourced, not run).
# The state folder holds everything these scripts start or write: PIDs, logs, the Ray auth token,
# the Ray temp dir, the MLflow database and artifacts, and env.sh for `ray job submit`.

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# Ray's unix sockets live under the state folder: keep its path short (sockets are limited to 107 bytes).
state="${STKD_CLUSTER_STATE:-${TMPDIR:-/tmp}/stkd-cluster-$(id -un)}"
venv_bin="${STKD_VENV_BIN:-$root/.venv/bin}"

die() { echo "$(basename "$0"): $*" >&2; exit 1; }

need_venv() {
    [ -x "$venv_bin/ray" ] || die "no ray in $venv_bin: run scripts/env first (or set STKD_VENV_BIN)"
}

# check_ports PORT...: fail, naming them, if any of the ports is taken on this machine.
check_ports() {
    local busy
    busy="$("$venv_bin/python" - "$@" <<'PY'
import socket, sys
busy = []
for port in map(int, sys.argv[1:]):
    for host in ("127.0.0.1", "0.0.0.0"):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are not listeners
        try:
            s.bind((host, port))
        except OSError:
            busy.append(str(port))
            break
        finally:
            s.close()
print(" ".join(busy))
PY
)"
    [ -z "$busy" ] || die "port(s) already in use on this machine: $busy (pick others with the port options)"
}

# alive PIDFILE: the process recorded in PIDFILE is running.
alive() {
    [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

# wait_http URL SECONDS [HEADER] [PIDFILE]: poll until URL answers 2xx; give up early when the process
# recorded in PIDFILE (the server that should answer) has exited.
wait_http() {
    local url="$1" deadline=$((SECONDS + $2)) header="${3:-}" pidfile="${4:-}"
    until curl -sf -o /dev/null ${header:+-H "$header"} "$url"; do
        [ $SECONDS -lt $deadline ] || return 1
        if [ -n "$pidfile" ] && ! alive "$pidfile"; then return 1; fi
        sleep 1
    done
}
