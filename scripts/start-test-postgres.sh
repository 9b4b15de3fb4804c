#!/usr/bin/env bash
# Starts a local PostgreSQL server for the storage tests and prints its SQLAlchemy URL on stdout
# (everything else goes to stderr). Installs Debian's postgresql package first if it is missing
# (needs root). Safe to run again: a running server, role or database is left as it is.
#
#   export MEMCHAT_TEST_POSTGRES_URL="$(scripts/start-test-postgres.sh)"
#   .venv/bin/python -m pytest tests/storage
set -euo pipefail

ROLE=memchat_test
PASSWORD=memchat_test
DATABASE=memchat_test

log() { echo "start-test-postgres: $*" >&2; }

newest_version() { ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -n 1; }

if [[ -z "$(newest_version)" || ! -x "/usr/lib/postgresql/$(newest_version)/bin/postgres" ]]; then
    if [[ "$(id -u)" != 0 ]]; then
        log "PostgreSQL is not installed; run as root, or: apt-get install postgresql"
        exit 1
    fi
    log "installing Debian's postgresql package"
    apt-get update >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql >&2
fi
VERSION="$(newest_version)"

# pg_lsclusters -h prints: version cluster port status owner data-dir log-file
cluster() { pg_lsclusters -h | awk -v v="$VERSION" '$1 == v && $2 == "main"'; }
if [[ -z "$(cluster)" ]]; then
    log "creating cluster $VERSION/main"
    pg_createcluster "$VERSION" main >&2
fi
if [[ "$(cluster | awk '{print $4}')" != online* ]]; then
    log "starting cluster $VERSION/main"
    pg_ctlcluster "$VERSION" main start >&2
fi
PORT="$(cluster | awk '{print $3}')"

for _ in $(seq 1 30); do
    pg_isready -q -h 127.0.0.1 -p "$PORT" && break
    sleep 1
done
pg_isready -h 127.0.0.1 -p "$PORT" >&2

as_postgres() { runuser -u postgres -- psql -X -q -p "$PORT" -v ON_ERROR_STOP=1 -tA "$@"; }
if [[ "$(as_postgres -c "SELECT 1 FROM pg_roles WHERE rolname = '$ROLE'")" != 1 ]]; then
    log "creating role $ROLE"
    as_postgres -c "CREATE ROLE $ROLE LOGIN PASSWORD '$PASSWORD'"
fi
if [[ "$(as_postgres -c "SELECT 1 FROM pg_database WHERE datname = '$DATABASE'")" != 1 ]]; then
    log "creating database $DATABASE"
    as_postgres -c "CREATE DATABASE $DATABASE OWNER $ROLE ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
fi

echo "postgresql+psycopg://$ROLE:$PASSWORD@127.0.0.1:$PORT/$DATABASE"
