#!/usr/bin/env bash
# Installs Debian's PostgreSQL server, starts it, and prints the URL of a database for sweep
# studies (rex sweep SPEC --storage URL). Safe to run again: an installed server is not
# reinstalled, a running one is left running, and the same URL is printed.
# Runs as root, also in a container without systemd: the cluster is started with
# pg_ctlcluster, which runs pg_ctl as the postgres user.
# Only the URL goes to stdout, so `URL=$(bash scripts/postgres.sh)` works; progress goes to stderr.
set -euo pipefail
# Every command's output goes to stderr (pg_ctlcluster prints "Removed stale pid file." to stdout
# after an unclean stop); fd 3 keeps the real stdout for the URL alone.
exec 3>&1 1>&2
ROLE=${REX_PG_USER:-rex}
PASSWORD=${REX_PG_PASSWORD:-rex}
DATABASE=${REX_PG_DATABASE:-rex}

say() { echo "postgres.sh: $*"; }
as_postgres() {
    # from /, which the postgres user can read whatever the caller's folder
    if [ "$(id -u)" -eq 0 ]; then (cd / && runuser -u postgres -- "$@"); else (cd / && sudo -u postgres -- "$@"); fi
}
as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

if ! dpkg-query -W -f='${Status}' postgresql 2>/dev/null | grep -q "ok installed"; then
    say "installing Debian's postgresql package"
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get update -qq
    as_root apt-get install -y -qq --no-install-recommends postgresql >/dev/null
fi

# The newest installed server version; Debian 12 ships 15, Debian 13 ships 17.
VERSION=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -n | tail -n 1)
# The package creates the main cluster, unless createcluster.conf says otherwise.
if ! pg_lsclusters -h | awk -v v="$VERSION" '$1 == v && $2 == "main" { found = 1 } END { exit !found }'; then
    say "creating cluster $VERSION/main"
    as_root pg_createcluster "$VERSION" main >/dev/null
fi
# /run is empty after a container restart, and without systemd nothing recreates the socket folder.
as_root install -d -o postgres -g postgres -m 2775 /var/run/postgresql
if as_root pg_ctlcluster "$VERSION" main status >/dev/null 2>&1; then
    say "cluster $VERSION/main is already running"
else
    say "starting cluster $VERSION/main"
    # 3>&-: the server must not hold the URL pipe open, or `$(bash scripts/postgres.sh)` never returns
    as_root pg_ctlcluster "$VERSION" main start 3>&-
fi
PORT=$(pg_lsclusters -h | awk -v v="$VERSION" '$1 == v && $2 == "main" { print $3 }')
for _ in $(seq 1 30); do
    pg_isready -q -h 127.0.0.1 -p "$PORT" && break
    sleep 1
done
pg_isready -q -h 127.0.0.1 -p "$PORT" || { say "the server on port $PORT does not accept connections"; exit 1; }

# CREATEDB: tests make a throw-away database per run (tests/test_sweep_postgres.py).
if [ "$(as_postgres psql -p "$PORT" -tAc "SELECT 1 FROM pg_roles WHERE rolname = '$ROLE'")" != 1 ]; then
    say "creating role $ROLE"
    as_postgres psql -q -p "$PORT" -c "CREATE ROLE \"$ROLE\" LOGIN CREATEDB PASSWORD '$PASSWORD'"
fi
if [ "$(as_postgres psql -p "$PORT" -tAc "SELECT 1 FROM pg_database WHERE datname = '$DATABASE'")" != 1 ]; then
    say "creating database $DATABASE"
    as_postgres createdb -p "$PORT" -O "$ROLE" "$DATABASE"
fi
echo "postgresql://$ROLE:$PASSWORD@127.0.0.1:$PORT/$DATABASE" >&3
