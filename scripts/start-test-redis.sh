#!/usr/bin/env bash
# Starts a local Redis server for the tests of rate limits shared by web replicas and prints its URL
# on stdout (everything else goes to stderr). Installs Debian's redis-server package first if it is
# missing (needs root). Safe to run again: a server already answering on the port is left as it is.
#
#   export MEMCHAT_TEST_REDIS_URL="$(scripts/start-test-redis.sh)"
#   .venv/bin/python -m pytest tests/app/test_limits.py
set -euo pipefail

PORT="${MEMCHAT_TEST_REDIS_PORT:-6390}"
log() { echo "start-test-redis: $*" >&2; }

if ! command -v redis-server >/dev/null; then
    if [[ "$(id -u)" != 0 ]]; then
        log "Redis is not installed; run as root, or: apt-get install redis-server"
        exit 1
    fi
    log "installing Debian's redis-server package"
    apt-get update >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server >&2
fi

if ! redis-cli -p "$PORT" ping >/dev/null 2>&1; then
    # loopback only, nothing written to disk: the counts are the tests' own
    redis-server --bind 127.0.0.1 --port "$PORT" --save '' --appendonly no --daemonize yes \
        --dir /tmp --logfile "/tmp/memchat-test-redis-$PORT.log" >&2
    for _ in $(seq 50); do
        redis-cli -p "$PORT" ping >/dev/null 2>&1 && break
        sleep 0.1
    done
fi
redis-cli -p "$PORT" ping >&2
echo "redis://127.0.0.1:$PORT/0"
