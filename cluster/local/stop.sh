#!/usr/bin/env bash
# Stop what start.sh and mlflow_server.sh started (its PostgreSQL too), by the PIDs they recorded, and
# nothing else.
#
# Usage: cluster/local/stop.sh [--state DIR] [--ray-only | --mlflow-only] [--purge]
#   --purge   also delete the state folder (logs, token, MLflow database and artifacts)
#
# First each recorded `ray start --block` process (the worker node's, then the head's) gets SIGTERM and
# shuts its node down in order (draining first). Then whatever is left, and the MLflow server: each
# recorded PID leads its own process group (the scripts start it with setsid), and Ray starts some
# worker processes in process groups of their own, so the processes to end are those groups plus any
# process whose environment carries the scripts' marker for this state folder, STKD_LOCAL_CLUSTER=<state>
# (Ray) or STKD_LOCAL_MLFLOW=<state> (MLflow): SIGTERM, then SIGKILL after a grace period
# (STKD_STOP_GRACE_S, default 15 s). The MLflow server's PostgreSQL, if it has one, gets a fast shutdown
# (SIGINT to its postmaster) before the same sweep by its marker, STKD_LOCAL_POSTGRES=<state>. No `ray stop`:
# it would stop every Ray cluster of this user on the machine, other people's test clusters included.
set -euo pipefail
source "$(dirname "$0")/common.sh"

ray=1
mlflow=1
purge=0
while [ $# -gt 0 ]; do
    case "$1" in
        --state) state="$2"; shift 2 ;;
        --ray-only) mlflow=0; shift ;;
        --mlflow-only) ray=0; shift ;;
        --purge) purge=1; shift ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
[ -d "$state" ] || { echo "nothing to stop: no state folder $state"; exit 0; }
state="$(cd "$state" && pwd)"
grace="${STKD_STOP_GRACE_S:-15}"

# members MARKER PIDFILE...: the PIDs marked MARKER=<state>, and the members of the recorded process
# groups whose leader is still alive and marked (so a recycled PID never names someone else's group).
members() {
    "$venv_bin/python" - "$$" "$state" "$@" <<'PY'
import os, sys
me, state, marker, pidfiles = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
tag = f"{marker}={state}".encode()

def marked(pid):
    try:
        return tag in open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    except OSError:
        return False

groups = {int(open(f).read().split()[0]) for f in pidfiles if os.path.exists(f)}
groups = {g for g in groups if marked(g)}
for name in os.listdir("/proc"):
    if not name.isdigit() or int(name) in (me, os.getpid(), os.getppid()):
        continue
    pid = int(name)
    try:
        if marked(pid) or os.getpgid(pid) in groups:
            print(pid)
    except OSError:
        pass
PY
}

stop_all() {  # stop_all NAME MARKER PIDFILE...
    local name="$1" marker="$2" pids deadline
    shift 2
    pids="$(members "$marker" "$@")"
    if [ -z "$pids" ]; then
        echo "$name: not running"
    else
        kill -TERM $pids 2>/dev/null || true
        deadline=$((SECONDS + grace))
        while [ -n "$(members "$marker" "$@")" ] && [ $SECONDS -lt $deadline ]; do sleep 0.5; done
        pids="$(members "$marker" "$@")"
        if [ -n "$pids" ]; then
            kill -KILL $pids 2>/dev/null || true
            echo "$name: stopped (SIGKILL after ${grace}s for $(echo $pids | wc -w) process(es))"
        else
            echo "$name: stopped"
        fi
    fi
    rm -f "$@"
}

# stop_leader NAME PIDFILE: SIGTERM to a recorded `ray start --block` process only, which then shuts its
# node's processes down in order (the node drains first); wait for it to exit.
stop_leader() {
    local name="$1" pid deadline
    [ -f "$2" ] || return 0
    pid="$(cat "$2")"
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + grace))
    while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.5; done
    echo "$name (pid $pid): $(kill -0 "$pid" 2>/dev/null && echo "still running after ${grace}s" || echo exited)"
}

if [ "$ray" = 1 ]; then
    stop_leader "ray worker node" "$state/ray-worker.pid"
    stop_leader "ray head node" "$state/ray-head.pid"
    stop_all "ray cluster ($state)" STKD_LOCAL_CLUSTER "$state/ray-head.pid" "$state/ray-worker.pid"
    rm -f "$state/env.sh"
fi
if [ "$mlflow" = 1 ]; then
    stop_all "mlflow server ($state)" STKD_LOCAL_MLFLOW "$state/mlflow.pid"
    rm -f "$state/mlflow_uri"
    source "$(dirname "$0")/postgres.sh"
    stop_postgres  # the server's database, when it had one (mlflow_server.sh --backend postgresql)
fi
if [ "$purge" = 1 ]; then
    rm -rf "$state"
    echo "removed $state"
fi
