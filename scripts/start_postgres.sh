#!/usr/bin/env bash
# For CI: make sure a local PostgreSQL (Debian's package) runs, with a throw-away role and database for the
# history-store tests; prints the SQLAlchemy URL on success, nothing (and exit 1) where it cannot start.
set -uo pipefail
if ! command -v pg_lsclusters >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get install -y postgresql >/dev/null 2>&1 || (apt-get update >/dev/null && apt-get install -y postgresql >/dev/null)) || exit 1
  else
    exit 1
  fi
fi
read -r ver name port _ < <(pg_lsclusters -h | head -1) || exit 1
[ -n "${ver:-}" ] || exit 1
pg_ctlcluster "$ver" "$name" start >/dev/null 2>&1 || true
for _ in $(seq 20); do pg_isready -q && break; sleep 1; done
pg_isready -q || exit 1
psql_as_postgres() { if [ "$(id -u)" = 0 ]; then su postgres -c "psql -qtAc \"$1\""; else sudo -u postgres psql -qtAc "$1"; fi; }
psql_as_postgres "SELECT 1 FROM pg_roles WHERE rolname='breakhis_ci'" | grep -q 1 \
  || psql_as_postgres "CREATE ROLE breakhis_ci LOGIN PASSWORD 'breakhis_ci'" >/dev/null || exit 1
psql_as_postgres "SELECT 1 FROM pg_database WHERE datname='breakhis_ci'" | grep -q 1 \
  || psql_as_postgres "CREATE DATABASE breakhis_ci OWNER breakhis_ci" >/dev/null || exit 1
echo "postgresql+psycopg://breakhis_ci:breakhis_ci@127.0.0.1:${port:-5432}/breakhis_ci"
