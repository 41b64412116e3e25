# PostgreSQL for `mlflow_server.sh --backend postgresql` and stop.sh (sourced after common.sh, not run).
#
# One server per state folder: data in $state/postgres/data, its log in $state/postgres/log, listening on
# 127.0.0.1 only (no Unix socket), one superuser `stkd` whose generated password is in
# $state/postgres/pgpass (mode 600, libpq's password file format). Its processes carry
# STKD_LOCAL_POSTGRES=<state> in their environment and the postmaster's PID is in $state/postgres.pid,
# which is how stop.sh finds them. PostgreSQL refuses to run as root: for root it runs as the `postgres`
# user of Debian's package, and the state folder is made traversable (mode 711) for it.

# pg_bin: the folder of PostgreSQL's programs (initdb, pg_ctl), on PATH or where Debian puts them.
pg_bin() {
    local found
    found="$(command -v initdb 2>/dev/null || true)"
    if [ -n "$found" ]; then
        dirname "$(readlink -f "$found")"
        return 0
    fi
    found="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
    [ -n "$found" ] && [ -x "$found/initdb" ] && echo "$found"
}

ensure_postgres() {
    [ -n "$(pg_bin)" ] && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "PostgreSQL is not installed: installing Debian's postgresql package" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2 || die "apt-get install postgresql failed"
        [ -n "$(pg_bin)" ] || die "no initdb after installing postgresql"
    else
        die "PostgreSQL is not installed: sudo apt-get install postgresql (Debian, Ubuntu), then run this again"
    fi
}

# as_server_user CMD...: CMD as the user the server runs as, with the marker stop.sh looks for, and
# without the MLflow server's and the Ray cluster's markers (stop.sh would SIGTERM it with them).
as_server_user() {
    local marked=(env -u STKD_LOCAL_MLFLOW -u STKD_LOCAL_CLUSTER "STKD_LOCAL_POSTGRES=$state")
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "${marked[@]}" "$@"
    else
        "${marked[@]}" "$@"
    fi
}

# owned_by_server_user PATH...: for root, hand PATHs to `postgres`.
owned_by_server_user() {
    if [ "$(id -u)" = 0 ]; then chown postgres: "$@"; fi
}

# start_postgres PORT: initialise (first time), start, wait until it answers, create database `mlflow`.
start_postgres() {
    local port="$1" dir="$state/postgres" bin password
    ensure_postgres
    bin="$(pg_bin)"
    if alive "$state/postgres.pid"; then
        die "a PostgreSQL server of $state is already running: cluster/local/stop.sh --mlflow-only --state $state"
    fi
    mkdir -p "$dir/log"
    if [ "$(id -u)" = 0 ]; then chmod 711 "$state" "$dir"; else chmod 700 "$dir"; fi
    if [ "$(id -u)" = 0 ] && ! runuser -u postgres -- test -x "$dir"; then
        die "PostgreSQL runs as user postgres here (it refuses root), which cannot reach $dir: a folder above" \
            "the state folder is closed to other users; use a --state under a folder it can pass (e.g. /tmp)"
    fi
    owned_by_server_user "$dir/log"
    if [ ! -s "$dir/data/PG_VERSION" ]; then
        rm -rf "$dir/data"
        password="$("$venv_bin/python" -c 'import secrets; print(secrets.token_urlsafe(24), end="")')"
        (umask 077; printf '%s' "$password" >"$dir/initdb-password"; mkdir "$dir/data")
        owned_by_server_user "$dir/initdb-password" "$dir/data"
        if ! as_server_user "$bin/initdb" -D "$dir/data" -U stkd --auth=scram-sha-256 \
                --pwfile="$dir/initdb-password" --encoding=UTF8 >"$dir/log/initdb.log" 2>&1; then
            rm -f "$dir/initdb-password"
            die "initdb failed: see $dir/log/initdb.log"
        fi
        rm -f "$dir/initdb-password"
        (umask 077; printf '127.0.0.1:*:*:stkd:%s\n' "$password" >"$dir/pgpass")
    fi
    if ! as_server_user "$bin/pg_ctl" -D "$dir/data" -l "$dir/log/postgres.log" -w -t 120 \
            -o "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories=''" start >/dev/null; then
        tail -n 20 "$dir/log/postgres.log" >&2
        die "PostgreSQL did not start on 127.0.0.1:$port (log $dir/log/postgres.log)"
    fi
    head -n 1 "$dir/data/postmaster.pid" >"$state/postgres.pid"
    PGPASSFILE="$dir/pgpass" "$venv_bin/python" - "$port" <<'PY' || die "could not create database mlflow"
import sys

import psycopg2

connection = psycopg2.connect(host="127.0.0.1", port=int(sys.argv[1]), user="stkd", dbname="postgres")
connection.autocommit = True  # CREATE DATABASE runs outside a transaction
with connection.cursor() as cursor:
    cursor.execute("SELECT 1 FROM pg_database WHERE datname = 'mlflow'")
    if cursor.fetchone() is None:
        cursor.execute("CREATE DATABASE mlflow")
connection.close()
PY
    echo "postgresql: pid $(cat "$state/postgres.pid"), 127.0.0.1:$port, database mlflow, log $dir/log/postgres.log"
}

# stop_postgres: a fast shutdown (SIGINT to the postmaster: sessions end, a checkpoint, exit), then
# whatever is left of it by the marker, as stop.sh stops everything else.
stop_postgres() {
    local pidfile="$state/postgres.pid" pid deadline
    [ -f "$pidfile" ] || return 0
    pid="$(cat "$pidfile")"
    if kill -0 "$pid" 2>/dev/null && tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qx "STKD_LOCAL_POSTGRES=$state"; then
        kill -INT "$pid" 2>/dev/null || true
        deadline=$((SECONDS + grace))
        while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.5; done
    fi
    stop_all "postgresql ($state)" STKD_LOCAL_POSTGRES "$pidfile"
}
