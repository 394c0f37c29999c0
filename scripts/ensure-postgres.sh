#!/usr/bin/env bash
# Makes sure the PostgreSQL server the tests use is up (the PostgreSQL store's
# conformance tests and the e2e tests on PostgreSQL need it; they fail, never
# skip, without it). Idempotent and quick when it is already up; `make test`
# runs it first.
#
# The server is the one at CIPHERD_TEST_POSTGRES_URL (default
# postgres://postgres@127.0.0.1:5432/postgres, the tests' default too). If it does
# not answer and this machine has a Debian-style cluster (/etc/postgresql), the
# cluster is started with pg_ctlcluster; otherwise this says what to do.
set -euo pipefail

url="${CIPHERD_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
# For messages: the URL without a password.
shown="$(printf '%s' "$url" | sed -E 's#(://[^:/@]*):[^@/]*@#\1@#')"

if ! command -v pg_isready >/dev/null 2>&1; then
  echo "ensure-postgres: pg_isready not found; install PostgreSQL (apt-get install postgresql)" >&2
  echo "  or point CIPHERD_TEST_POSTGRES_URL at a server whose user may CREATE DATABASE" >&2
  exit 1
fi

if pg_isready -q -d "$url"; then
  exit 0
fi

# Only a server on this machine is ours to start.
case "$url" in
  *@127.0.0.1[:/]* | *@localhost[:/]* | *://127.0.0.1[:/]* | *://localhost[:/]*) local=yes ;;
  *) local=no ;;
esac

if [ "$local" = yes ] && command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
  for version in $(ls /etc/postgresql); do
    echo "ensure-postgres: starting PostgreSQL $version/main"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  done
  for _ in $(seq 1 60); do
    if pg_isready -q -d "$url"; then
      echo "ensure-postgres: $shown is up"
      exit 0
    fi
    sleep 0.5
  done
fi

echo "ensure-postgres: PostgreSQL does not answer at $shown" >&2
echo "  start it (pg_ctlcluster --skip-systemctl-redirect \$(ls /etc/postgresql) main start)" >&2
echo "  or point CIPHERD_TEST_POSTGRES_URL at a server whose user may CREATE DATABASE" >&2
exit 1
