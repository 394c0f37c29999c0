#!/usr/bin/env bash
# Issue #8's measurements on PostgreSQL, in one run on this machine:
#
#   1. encrypt throughput of a PostgreSQL-backed cipherd next to an SQLite one
#      (same build, same flags, alternating, two rounds each);
#   2. rotation propagation: a rotation through replica A until replica B
#      encrypts under the new version (cipherd-propagation, ROTATIONS times);
#   3. cold start: with KEYS keys in the database, a replica restarted until it
#      is ready and until its key cache holds every key (its own log line
#      "key cache warm", with elapsed_ms from unseal).
#
# Needs PostgreSQL (scripts/ensure-postgres.sh starts the local one); uses a fresh
# database that it drops at the end, and ports 8311-8313. Release builds.
#   scripts/bench-replicas.sh            # KEYS=100000 ROTATIONS=100 DURATION=8
set -euo pipefail
cd "$(dirname "$0")/.."
KEYS=${KEYS:-100000}
ROTATIONS=${ROTATIONS:-100}
DURATION=${DURATION:-8}
BASE_URL=${CIPHERD_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}

scripts/ensure-postgres.sh
cargo build --locked --release -q --bin cipherd --bin cipherd-bench --bin cipherd-propagation
bin=target/release
work=$(mktemp -d)
db="cipherd_bench_$$"
url="${BASE_URL%/*}/$db"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  psql -q "$BASE_URL" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
psql -q "$BASE_URL" -c "CREATE DATABASE $db" >/dev/null

# start NAME PORT BACKEND: a dev-mode cipherd with its data dir in $work/NAME.
start() {
  local name=$1 port=$2 backend=$3
  mkdir -p "$work/$name"
  if [ "$backend" = postgres ]; then
    CIPHERD_SERVER_STORAGE__BACKEND=postgres CIPHERD_SERVER_STORAGE__URL="$url" \
      "$bin/cipherd" --dev --listen "127.0.0.1:$port" --data-dir "$work/$name" \
      --log-level info >"$work/$name.log" 2>&1 &
  else
    "$bin/cipherd" --dev --listen "127.0.0.1:$port" --data-dir "$work/$name" \
      --log-level info >"$work/$name.log" 2>&1 &
  fi
  pids+=($!)
  eval "pid_$name=$!"
  # Polls health (cipherd-bench --wait), never sleeps.
  "$bin/cipherd-bench" --addr "127.0.0.1:$port" --setup-only --wait 60 >/dev/null
}

start a 8311 postgres
mkdir -p "$work/b" && cp "$work/a/dev-unseal-share.INSECURE" "$work/b/"
start b 8312 postgres
start s 8313 sqlite
token_pg="$work/a/root-token.INSECURE"
token_sq="$work/s/root-token.INSECURE"

echo "== 1. encrypt throughput, PostgreSQL (A) vs SQLite (S), ${DURATION}s each, 2 rounds"
bench() { # PORT TOKEN ARGS...
  local port=$1 token=$2; shift 2
  "$bin/cipherd-bench" --addr "127.0.0.1:$port" --token-file "$token" --create-keys \
    --duration "$DURATION" --warmup 2 --json "$@" \
    | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["items_per_sec"]))'
}
for workload in "--mode unary --size 64 -c 32" "--mode batch --size 1024 --batch 400 -c 4" \
                "--mode unary --size 64 -c 32 --key gcm --key-type aes256-gcm96"; do
  pg=() sq=()
  for round in 1 2; do
    # shellcheck disable=SC2086
    pg+=("$(bench 8311 "$token_pg" $workload)")
    # shellcheck disable=SC2086
    sq+=("$(bench 8313 "$token_sq" $workload)")
  done
  python3 - "$workload" "${pg[@]}" "${sq[@]}" <<'PY'
import sys
w, a1, a2, b1, b2 = sys.argv[1], *map(float, sys.argv[2:])
pg, sq = (a1 + a2) / 2, (b1 + b2) / 2
print(f"{w:55s} items/s  postgres {a1:.0f} / {a2:.0f}  sqlite {b1:.0f} / {b2:.0f}  ratio {pg / sq:.2f}")
PY
done

echo "== 2. rotation propagation A -> B, $ROTATIONS rotations"
"$bin/cipherd-propagation" --rotate 127.0.0.1:8311 --observe 127.0.0.1:8312 \
  --token-file "$token_pg" --rotations "$ROTATIONS"

echo "== 3. cold start with $KEYS keys"
started=$(date +%s.%N)
"$bin/cipherd-bench" --addr 127.0.0.1:8311 --token-file "$token_pg" --create-keys \
  --keys "$KEYS" --key cold --setup-only >/dev/null
echo "created $KEYS keys in $(python3 -c "import time; print(f'{time.time() - $started:.1f}')") s"
kill "$pid_b"; wait "$pid_b" 2>/dev/null || true
: >"$work/b.log"
t0=$(date +%s.%N)
start b 8312 postgres
t1=$(date +%s.%N)
# The warm-up runs in the background after unseal; its log line says when it ended.
for _ in $(seq 1 600); do
  grep -q "key cache warm" "$work/b.log" && break
  # Polling the log: a short pause between reads, not a readiness sleep.
  sleep 0.1
done
line=$(grep "key cache warm" "$work/b.log" | tail -1)
echo "restarted replica ready (health SERVING, unsealed) after $(python3 -c "print(f'{$t1 - $t0:.2f}')") s"
echo "key cache warm: $(echo "$line" | grep -o 'keys=[0-9]*') $(echo "$line" | grep -o 'elapsed_ms=[0-9]*') (from unseal)"
