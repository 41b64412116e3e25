#!/usr/bin/env bash
# Start an MLflow tracking server on 127.0.0.1: SQLite backend store, artifacts on disk served by the
# server itself (--serve-artifacts), so clients on any node need only the HTTP URI.
#
# Usage: cluster/local/mlflow_server.sh [--state DIR] [--port N] [--workers N]
#   --state DIR   state folder shared with start.sh/stop.sh (default $STKD_CLUSTER_STATE or
#                 ${TMPDIR:-/tmp}/stkd-cluster-$(id -un)); the database is DIR/mlflow/mlflow.db, the
#                 artifacts DIR/mlflow/artifacts, the log DIR/logs/mlflow.log
#   --port N      default 5000
#
# Tracking URI for clients and jobs: http://127.0.0.1:PORT (written to DIR/mlflow_uri).
# The UI is the same address in a browser. It listens on loopback only and has no authentication:
# on a shared machine or a real cluster put it behind an authenticating proxy (see README).
set -euo pipefail
source "$(dirname "$0")/common.sh"

port=5000
workers=2
while [ $# -gt 0 ]; do
    case "$1" in
        --state) state="$2"; shift 2 ;;
        --port) port="$2"; shift 2 ;;
        --workers) workers="$2"; shift 2 ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
need_venv
[ -x "$venv_bin/mlflow" ] || die "no mlflow in $venv_bin: run scripts/env first"
if alive "$state/mlflow.pid"; then
    die "an MLflow server from $state is already running: cluster/local/stop.sh --mlflow-only --state $state"
fi
check_ports "$port"
mkdir -p "$state/logs" "$state/mlflow/artifacts"
chmod 700 "$state"
state="$(cd "$state" && pwd)"

export STKD_LOCAL_MLFLOW="$state"
unset MLFLOW_TRACKING_URI
# The server's background job runner (a pool of worker processes for GenAI evaluation jobs) is not used
# by this project: off, unless asked for.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
setsid "$venv_bin/mlflow" server --host 127.0.0.1 --port "$port" --workers "$workers" \
    --backend-store-uri "sqlite:///$state/mlflow/mlflow.db" \
    --artifacts-destination "$state/mlflow/artifacts" --serve-artifacts \
    </dev/null >"$state/logs/mlflow.log" 2>&1 &
echo $! >"$state/mlflow.pid"
uri="http://127.0.0.1:$port"
if ! wait_http "$uri/health" 120; then
    tail -n 30 "$state/logs/mlflow.log" >&2
    "$(dirname "$0")/stop.sh" --mlflow-only --state "$state" >&2 || true
    die "the MLflow server did not answer at $uri"
fi
echo "$uri" >"$state/mlflow_uri"
echo "mlflow server: pid $(cat "$state/mlflow.pid"), $uri (UI and tracking URI), log $state/logs/mlflow.log"
