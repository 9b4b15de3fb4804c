#!/usr/bin/env bash
# memchat as several processes on one machine, the way it runs on several (docs/deploy.md):
#
#   scripts/cluster.sh up       PostgreSQL, Redis, 2 web replicas, 2 compression workers and HAProxy
#                               in front, each on a loopback port; prints the address to open
#   scripts/cluster.sh status   which of them run
#   scripts/cluster.sh down     stops them all (the data stays in cluster/ for the next `up`)
#   scripts/cluster.sh stop web2 [...]   stops those memchat processes or HAProxy or Redis
#                               (web1|web2|worker1|worker2|haproxy|redis); `up` starts them again
#
# Everything lives in one folder (MEMCHAT_CLUSTER_DIR, default ./cluster): logs/ (one log per
# process, 0700), run/ (pid files), secrets (0600: the database's and Redis's passwords), postgres/
# and postgres.log (its own user's),
# and each process's data folder. Ports: the load balancer on MEMCHAT_CLUSTER_PORT (default 8000),
# the replicas on the next two, Redis on +10, PostgreSQL on +20. Debian's postgresql, redis-server
# and haproxy are installed first when missing (as root). Extra flags for every memchat process:
# MEMCHAT_CLUSTER_ARGS; the command that starts one: MEMCHAT_CLUSTER_APP (tests start tiny models).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

DIR="$(mkdir -p "${MEMCHAT_CLUSTER_DIR:-$ROOT/cluster}" && cd "${MEMCHAT_CLUSTER_DIR:-$ROOT/cluster}" && pwd)"
PORT="${MEMCHAT_CLUSTER_PORT:-8000}"
APP="${MEMCHAT_CLUSTER_APP:-$ROOT/.venv/bin/python $ROOT/app.py}"
ARGS="${MEMCHAT_CLUSTER_ARGS:-}"
REDIS_PORT=$((PORT + 10))
PG_PORT=$((PORT + 20))
LOGS="$DIR/logs"
RUN="$DIR/run"
WAIT_S="${MEMCHAT_CLUSTER_WAIT_S:-600}"

log() { echo "cluster: $*" >&2; }

apt_install() {  # apt_install <what is missing> <Debian package>: as root, else say how and stop
    [[ "$(id -u)" == 0 ]] || { log "$1 is missing: apt-get install $2 (as root)"; exit 1; }
    log "installing Debian's $2"
    apt-get update >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y "$2" >&2
}

need() {  # need <command> <Debian package>
    command -v "$1" >/dev/null || apt_install "$1" "$2"
}

pg_bin() { echo "/usr/lib/postgresql/$(ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -n 1)/bin"; }

as_postgres() {  # PostgreSQL refuses to run as root
    if [[ "$(id -u)" == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

running() {  # running <pid>: a live process, not a zombie. A process killed a moment ago stays a
    # zombie until init reaps it (about a second here), and kill -0 takes a zombie for a live one:
    # `up` right after a kill -9 would then not start the node again
    local state
    state="$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)" || return 1
    [[ -n "$state" && "$state" != Z ]]
}

alive() { [[ -f "$RUN/$1.pid" ]] && running "$(cat "$RUN/$1.pid")"; }

secret() {  # secret <name>: a random password kept in $DIR/secrets (0600), made once
    touch "$DIR/secrets" && chmod 600 "$DIR/secrets"
    grep -q "^$1=" "$DIR/secrets" || echo "$1=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')" >> "$DIR/secrets"
    grep "^$1=" "$DIR/secrets" | cut -d= -f2
}

wait_ready() {  # wait_ready <name> <url>: until its /healthz says ready (the loading page does not)
    local deadline=$((SECONDS + WAIT_S))
    until curl -fs "$2/healthz" 2>/dev/null | grep -q '"ready": *true'; do
        alive "$1" || { log "$1 stopped while starting; its log:"; tail -n 20 "$LOGS/$1.log" >&2; exit 1; }
        (( SECONDS < deadline )) || { log "$1 not ready after ${WAIT_S} s (see $LOGS/$1.log)"; exit 1; }
        sleep 1
    done
}

start_postgres() {
    # Debian keeps it off PATH, in /usr/lib/postgresql/<version>/bin
    [[ -x "$(pg_bin)/postgres" ]] || apt_install PostgreSQL postgresql
    local data="$DIR/postgres"
    if [[ ! -f "$data/PG_VERSION" ]]; then
        mkdir -p "$data" && chmod 700 "$data"
        local pwfile="$data.pw"
        (umask 077 && secret postgres > "$pwfile")
        [[ "$(id -u)" == 0 ]] && chown postgres "$data" "$pwfile"
        as_postgres "$(pg_bin)/initdb" -D "$data" -U memchat --pwfile="$pwfile" --auth=scram-sha-256 >"$LOGS/initdb.log"
        rm -f "$pwfile"
    fi
    if ! as_postgres "$(pg_bin)/pg_ctl" -D "$data" status >/dev/null 2>&1; then
        # beside its data folder, not in logs/ (0700, not PostgreSQL's user's to enter)
        touch "$DIR/postgres.log" && chmod 600 "$DIR/postgres.log"
        [[ "$(id -u)" != 0 ]] || chown postgres "$DIR/postgres.log"
        as_postgres "$(pg_bin)/pg_ctl" -D "$data" -l "$DIR/postgres.log" -w -o \
            "-p $PG_PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories=''" start >&2
    fi
    PGPASSWORD="$(secret postgres)" "$(pg_bin)/psql" -h 127.0.0.1 -p "$PG_PORT" -U memchat -d postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname = 'memchat'" | grep -q 1 ||
        PGPASSWORD="$(secret postgres)" "$(pg_bin)/createdb" -h 127.0.0.1 -p "$PG_PORT" -U memchat memchat
}

start_redis() {
    need redis-server redis-server
    alive redis && return
    # loopback only, a password (read from stdin: never on a command line), nothing written to
    # disk: rate limits are counts of the last hour
    printf 'requirepass %s\n' "$(secret redis)" | redis-server - --bind 127.0.0.1 --port "$REDIS_PORT" --save '' \
        --appendonly no --daemonize yes --pidfile "$RUN/redis.pid" --logfile "$LOGS/redis.log" --dir "$DIR"
    for _ in $(seq 50); do alive redis && return; sleep 0.1; done
    log "Redis did not start (see $LOGS/redis.log)"; exit 1
}

start_node() {  # start_node <name> <role> [port]
    local name="$1" role="$2" port="${3:-0}"
    alive "$name" && return
    mkdir -p "$DIR/$name" "$DIR/model-cache"
    ln -sfn "$DIR/model-cache" "$DIR/$name/model-cache"  # the converted model, made once for all
    # the passwords go in the environment, never on a command line (ps shows those to everyone)
    MEMCHAT_DATABASE_URL="postgresql+psycopg://memchat:$(secret postgres)@127.0.0.1:$PG_PORT/memchat" \
    MEMCHAT_RATE_LIMIT_STORAGE="redis://:$(secret redis)@127.0.0.1:$REDIS_PORT/0" \
        setsid $APP --role "$role" --data-dir "$DIR/$name" --snapshot-store database --port "$port" \
        --forwarded-allow-ips 127.0.0.1 $ARGS >>"$LOGS/$name.log" 2>&1 < /dev/null &
    echo $! > "$RUN/$name.pid"
}

up() {
    mkdir -p "$LOGS" "$RUN"
    chmod 700 "$LOGS" "$RUN"  # the logs name users and paths; the load balancer's names download links
    need curl curl
    need haproxy haproxy
    start_postgres
    start_redis
    # the first replica alone: a first start converts the model into the shared cache
    start_node web1 web $((PORT + 1))
    wait_ready web1 "http://127.0.0.1:$((PORT + 1))"
    start_node web2 web $((PORT + 2))
    start_node worker1 worker
    start_node worker2 worker
    wait_ready web2 "http://127.0.0.1:$((PORT + 2))"
    if ! alive haproxy; then
        MEMCHAT_DEPLOY_DIR="$ROOT/deploy" MEMCHAT_LB_ADDRESS="127.0.0.1:$PORT" MEMCHAT_WEB1_ADDRESS="127.0.0.1:$((PORT + 1))" \
        MEMCHAT_WEB2_ADDRESS="127.0.0.1:$((PORT + 2))" \
            setsid haproxy -W -f "$ROOT/deploy/haproxy.cfg" -p "$RUN/haproxy.pid" >"$LOGS/haproxy.log" 2>&1 < /dev/null &
        echo $! > "$RUN/haproxy.pid"
    fi
    wait_ready haproxy "http://127.0.0.1:$PORT"
    log "up: open http://127.0.0.1:$PORT/ (logs in $LOGS)"
    echo "http://127.0.0.1:$PORT/"
}

stop_pid() {  # stop_pid <name>: SIGTERM (memchat ends replies and stores what it can), SIGKILL after 30 s
    alive "$1" || { rm -f "$RUN/$1.pid"; return; }
    local pid; pid="$(cat "$RUN/$1.pid")"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 300); do running "$pid" || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$RUN/$1.pid"
}

down() {
    for name in haproxy web1 web2 worker1 worker2 redis; do stop_pid "$name"; done
    if [[ -f "$DIR/postgres/PG_VERSION" ]]; then
        as_postgres "$(pg_bin)/pg_ctl" -D "$DIR/postgres" -m fast stop >&2 2>/dev/null || true
    fi
    log "down"
}

status() {
    for name in haproxy web1 web2 worker1 worker2 redis; do
        if alive "$name"; then echo "$name: running (pid $(cat "$RUN/$name.pid"))"; else echo "$name: stopped"; fi
    done
    if as_postgres "$(pg_bin)/pg_ctl" -D "$DIR/postgres" status >/dev/null 2>&1; then
        echo "postgres: running"; else echo "postgres: stopped"; fi
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    stop)
        shift
        (( $# )) || { echo "usage: $0 stop web1|web2|worker1|worker2|haproxy|redis ..." >&2; exit 2; }
        for name in "$@"; do  # all checked before any is stopped
            [[ " haproxy web1 web2 worker1 worker2 redis " == *" $name "* ]] || { log "no process named $name"; exit 2; }
        done
        for name in "$@"; do stop_pid "$name"; done ;;
    *) echo "usage: $0 up|down|status|stop NAME..." >&2; exit 2 ;;
esac
