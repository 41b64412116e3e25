#!/usr/bin/env bash
# Start an MLflow tracking server on 127.0.0.1: its backend store on SQLite (default) or on a PostgreSQL
# server of its own, artifacts on disk served by the server itself (--serve-artifacts), so clients on any
# node need only the HTTP URI.
#
# Usage: cluster/local/mlflow_server.sh [--state DIR] [--port N] [--workers N] [--backend sqlite|postgresql]
#                                       [--pg-port N]
#   --state DIR   state folder shared with start.sh/stop.sh (default $STKD_CLUSTER_STATE or
#                 ${TMPDIR:-/tmp}/stkd-cluster-$(id -un)); the artifacts go to DIR/mlflow/artifacts, the
#                 logs to DIR/logs/mlflow.log (and postgres.log)
#   --port N      default 5000
#   --backend     sqlite: one file, DIR/mlflow/mlflow.db, one writer at a time (a laptop, a few trials);
#                 postgresql: a PostgreSQL server started here for this folder (data DIR/postgres/data,
#                 loopback only, user stkd with a generated password in DIR/postgres/pgpass, mode 600),
#                 for sweeps with many trials at once (BENCHMARKS.md, the tracking load test)
#   --pg-port N   PostgreSQL's port, default 5433
#
# Tracking URI for clients and jobs: http://127.0.0.1:PORT (written to DIR/mlflow_uri).
# The UI is the same address in a browser. It listens on loopback only and has no authentication:
# on a shared machine or a real cluster put it behind an authenticating proxy (see README).
# cluster/local/stop.sh stops the server and its PostgreSQL by the PIDs recorded here.
set -euo pipefail
source "$(dirname "$0")/common.sh"

port=5000
workers=2
backend=sqlite
pg_port=5433
while [ $# -gt 0 ]; do
    case "$1" in
        --state) state="$2"; shift 2 ;;
        --port) port="$2"; shift 2 ;;
        --workers) workers="$2"; shift 2 ;;
        --backend) backend="$2"; shift 2 ;;
        --pg-port) pg_port="$2"; shift 2 ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
case "$backend" in sqlite|postgresql) ;; *) die "--backend: sqlite or postgresql, got $backend" ;; esac
need_venv
[ -x "$venv_bin/mlflow" ] || die "no mlflow in $venv_bin: run scripts/env first"
if alive "$state/mlflow.pid"; then
    die "an MLflow server from $state is already running: cluster/local/stop.sh --mlflow-only --state $state"
fi
if [ "$backend" = postgresql ]; then
    "$venv_bin/python" -c "import psycopg2" 2>/dev/null \
        || die "MLflow needs psycopg2 for PostgreSQL: $venv_bin/pip install psycopg2-binary (or scripts/env postgres)"
    check_ports "$port" "$pg_port"
else
    check_ports "$port"
fi
mkdir -p "$state/logs" "$state/mlflow/artifacts"
chmod 700 "$state"
state="$(cd "$state" && pwd)"

export STKD_LOCAL_MLFLOW="$state"
unset MLFLOW_TRACKING_URI
if [ "$backend" = postgresql ]; then
    source "$(dirname "$0")/postgres.sh"
    start_postgres "$pg_port"
    # No password on a command line or in the URI: libpq reads it from the pgpass file.
    export PGPASSFILE="$state/postgres/pgpass"
    export MLFLOW_BACKEND_STORE_URI="postgresql+psycopg2://stkd@127.0.0.1:$pg_port/mlflow"
else
    export MLFLOW_BACKEND_STORE_URI="sqlite:///$state/mlflow/mlflow.db"
fi
# The server's background job runner (a pool of worker processes for GenAI evaluation jobs) is not used
# by this project: off, unless asked for.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
# uvicorn kills a worker that takes more than 5 s (its default) to answer its supervisor's health check: on
# a busy machine, under a sweep's load, that dropped the requests the worker was serving.
setsid "$venv_bin/mlflow" server --host 127.0.0.1 --port "$port" --workers "$workers" \
    --uvicorn-opts "--timeout-worker-healthcheck 60" \
    --artifacts-destination "$state/mlflow/artifacts" --serve-artifacts \
    </dev/null >"$state/logs/mlflow.log" 2>&1 &
echo $! >"$state/mlflow.pid"
uri="http://127.0.0.1:$port"
if ! wait_http "$uri/health" 300 "" "$state/mlflow.pid"; then
    tail -n 30 "$state/logs/mlflow.log" >&2
    "$(dirname "$0")/stop.sh" --mlflow-only --state "$state" >&2 || true
    die "the MLflow server did not answer at $uri"
fi
echo "$uri" >"$state/mlflow_uri"
echo "mlflow server: pid $(cat "$state/mlflow.pid"), $uri (UI and tracking URI), backend $backend, log $state/logs/mlflow.log"
