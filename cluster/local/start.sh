#!/usr/bin/env bash
# Start a real two-node Ray cluster on this machine: a head node and one worker node, two `ray start`
# processes joined over 127.0.0.1, token authentication on, the dashboard and job API on loopback only.
#
# Usage: cluster/local/start.sh [--state DIR] [--port N] [--dashboard-port N] [--port-base N]
#                               [--head-cpus N] [--worker-cpus N] [--worker-gpus N] [--object-store-mb N]
#   --state DIR         state folder (default $STKD_CLUSTER_STATE or ${TMPDIR:-/tmp}/stkd-cluster-$(id -un)):
#                       PIDs, logs, the auth token, Ray's temp dir, env.sh
#   --port N            GCS port of the head (default 6379)
#   --dashboard-port N  dashboard and job submission API (default 8265)
#   --port-base N       first of the 300 ports the nodes use internally (default 23000)
#   --head-cpus/--worker-cpus N   logical CPUs each node advertises (default 4 each; see below)
#   --worker-gpus N     GPUs of the worker node (default: detected); the head never has any, as on a
#                       real cluster with a CPU head
#
# Then:   source "$STATE/env.sh"     # RAY_ADDRESS, RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH
#         ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- stkd distill ...
# Stop:   cluster/local/stop.sh [--state DIR]
#
# Logical CPUs: a Tune trial's driver, its Train workers and Ray Data tasks each hold CPU resources; with
# only the physical cores of a small machine advertised they wait on each other forever, so the nodes
# advertise more logical CPUs than the machine has.
#
# Network: Ray 2.60 rewrites --node-ip-address 127.0.0.1 to the machine's address for what it advertises,
# and its GCS, raylets, object managers and agents listen on that address or on all interfaces whatever
# the flags. Token auth guards their RPCs and the runtime-env agent; each node's metrics endpoint
# (--metrics-export-port) serves read-only Prometheus metrics to anyone who can reach it. The dashboard
# and job API (--dashboard-host) are bound to loopback. On a shared machine, firewall the ports.
#
# The processes run from the project's virtual environment (.venv/bin first on their PATH), so a job's
# entrypoint can call `stkd` directly. Their environment carries STKD_LOCAL_CLUSTER=<state>, which
# stop.sh uses to find, by PID, any process they left behind; nothing else on the machine is touched.
set -euo pipefail
source "$(dirname "$0")/common.sh"

port=6379
dashboard_port=8265
port_base=23000
head_cpus=4
worker_cpus=4
worker_gpus=
object_store_mb=512
while [ $# -gt 0 ]; do
    case "$1" in
        --state) state="$2"; shift 2 ;;
        --port) port="$2"; shift 2 ;;
        --dashboard-port) dashboard_port="$2"; shift 2 ;;
        --port-base) port_base="$2"; shift 2 ;;
        --head-cpus) head_cpus="$2"; shift 2 ;;
        --worker-cpus) worker_cpus="$2"; shift 2 ;;
        --worker-gpus) worker_gpus="$2"; shift 2 ;;
        --object-store-mb) object_store_mb="$2"; shift 2 ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
need_venv
if alive "$state/ray-head.pid" || alive "$state/ray-worker.pid"; then
    die "a cluster from $state is already running: cluster/local/stop.sh --state $state"
fi

# Ports each node binds: node manager, object manager, dashboard agent (http, grpc), runtime env agent,
# metrics, and a range for worker processes. Ray's defaults would collide between two nodes on one machine.
head_ports=(--node-manager-port $((port_base)) --object-manager-port $((port_base + 1))
            --dashboard-agent-listen-port $((port_base + 2)) --dashboard-agent-grpc-port $((port_base + 3))
            --runtime-env-agent-port $((port_base + 4)) --metrics-export-port $((port_base + 5))
            --ray-client-server-port $((port_base + 6))
            --min-worker-port $((port_base + 100)) --max-worker-port $((port_base + 199)))
worker_ports=(--node-manager-port $((port_base + 10)) --object-manager-port $((port_base + 11))
              --dashboard-agent-listen-port $((port_base + 12)) --dashboard-agent-grpc-port $((port_base + 13))
              --runtime-env-agent-port $((port_base + 14)) --metrics-export-port $((port_base + 15))
              --min-worker-port $((port_base + 200)) --max-worker-port $((port_base + 299)))
check_ports "$port" "$dashboard_port" $(seq "$port_base" $((port_base + 15))) \
    $(seq $((port_base + 100)) $((port_base + 299)))

mkdir -p "$state/logs"
chmod 700 "$state"
state="$(cd "$state" && pwd)"
rm -f "$state/ray-head.pid" "$state/ray-worker.pid" "$state/env.sh"

# Token authentication: a fresh random token for this cluster, readable by this user only. Every node
# and every client (ray job submit, the dashboard) must present it.
if [ ! -s "$state/auth_token" ]; then
    (umask 077; "$venv_bin/python" -c 'import secrets; print(secrets.token_hex(32), end="")' >"$state/auth_token")
fi
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH="$state/auth_token"
unset RAY_AUTH_TOKEN RAY_ADDRESS
export RAY_USAGE_STATS_ENABLED=0
# On SIGTERM (stop.sh) a node drains before it shuts down: bound the wait for a local cluster.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-5}"
export PATH="$venv_bin:$PATH"
export STKD_LOCAL_CLUSTER="$state"
# Ray's state API, used inside the cluster (Ray Train's placement group cleaner, say), finds "the" local
# cluster by scanning for GCS processes and gives up when it sees several on one machine: name ours.
export RAY_API_SERVER_ADDRESS="http://127.0.0.1:$dashboard_port"
auth_header="Authorization: Bearer $(cat "$state/auth_token")"

common=(--block --node-ip-address 127.0.0.1 --disable-usage-stats
        --object-store-memory $((object_store_mb * 1024 * 1024)))
# Each `ray start --block` leads its own session (setsid): its PID is the process group of the node's
# processes, recorded for stop.sh.
setsid "$venv_bin/ray" start --head --port "$port" --dashboard-host 127.0.0.1 --dashboard-port "$dashboard_port" \
    --include-dashboard true --num-cpus "$head_cpus" --num-gpus 0 --temp-dir "$state/ray/head" "${head_ports[@]}" "${common[@]}" \
    </dev/null >"$state/logs/ray-head.log" 2>&1 &
echo $! >"$state/ray-head.pid"
echo "ray head: pid $(cat "$state/ray-head.pid"), log $state/logs/ray-head.log"

dashboard="http://127.0.0.1:$dashboard_port"
if ! wait_http "$dashboard/api/version" 120 "$auth_header"; then
    tail -n 30 "$state/logs/ray-head.log" >&2
    "$(dirname "$0")/stop.sh" --ray-only --state "$state" >&2 || true
    die "the head's dashboard did not answer at $dashboard"
fi

# Its own temp dir: two nodes on one machine sharing a session folder would share runtime_resources/,
# and one node's runtime env agent would delete a job's working_dir while the other node still runs in it.
setsid "$venv_bin/ray" start --address "127.0.0.1:$port" --num-cpus "$worker_cpus" ${worker_gpus:+--num-gpus "$worker_gpus"} \
    --temp-dir "$state/ray/worker" \
    "${worker_ports[@]}" \
    "${common[@]}" </dev/null >"$state/logs/ray-worker.log" 2>&1 &
echo $! >"$state/ray-worker.pid"
echo "ray worker node: pid $(cat "$state/ray-worker.pid"), log $state/logs/ray-worker.log"

# Ready when the head sees two alive nodes.
alive_nodes() {
    curl -sf -H "$auth_header" "$dashboard/api/v0/nodes?limit=100" | "$venv_bin/python" -c '
import json, sys
rows = json.load(sys.stdin)["data"]["result"]["result"]
print(sum(r["state"] == "ALIVE" for r in rows))' 2>/dev/null || echo 0
}
deadline=$((SECONDS + 120))
until [ "$(alive_nodes)" -ge 2 ]; do
    if [ $SECONDS -ge $deadline ] || ! alive "$state/ray-worker.pid"; then
        tail -n 30 "$state/logs/ray-worker.log" >&2
        "$(dirname "$0")/stop.sh" --ray-only --state "$state" >&2 || true
        die "the worker node did not join the head at 127.0.0.1:$port"
    fi
    sleep 1
done

cat >"$state/env.sh" <<ENV
# Source this to talk to the local cluster in $state (ray job submit / logs / status / stop).
export RAY_ADDRESS=$dashboard
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$state/auth_token
ENV
echo "cluster up: 2 nodes, $head_cpus + $worker_cpus logical CPUs, GCS 127.0.0.1:$port, dashboard $dashboard"
echo "next: source $state/env.sh && ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- stkd ..."
echo "dashboard login token: cat $state/auth_token"
