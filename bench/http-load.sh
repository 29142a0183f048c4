#!/usr/bin/env bash
# HTTP load benchmark of the API: authenticated GET /v1/me (access token and API key) and a
# paginated list, with /healthz (no auth, no database) as the comparison measured in the same run.
#
#   bench/http-load.sh [duration-seconds] [connections]
#
# Builds nimbus-api in release mode, serves it against a scratch database on the machine's
# PostgreSQL, and drives it with wrk (installed from Debian if missing) on the same machine.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-20}"
CONNS="${2:-64}"
PORT="${BENCH_PORT:-18181}"
ADMIN_URL="${NIMBUS_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
DB=nimbus_bench
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/nimbus-target}"

command -v wrk >/dev/null || apt-get install -y wrk >/dev/null
cargo build --release -p nimbus-api >/dev/null
psql "$ADMIN_URL" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
DB_URL="${ADMIN_URL%/*}/$DB"

"$CARGO_TARGET_DIR/release/nimbus-api" serve --database-url "$DB_URL" --listen "127.0.0.1:$PORT" --log warn \
  > /tmp/nimbus-bench-api.log 2>&1 &
API_PID=$!
trap 'kill $API_PID 2>/dev/null; wait $API_PID 2>/dev/null; psql "$ADMIN_URL" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)"' EXIT
BASE="http://127.0.0.1:$PORT"
for _ in $(seq 1 100); do curl -sf "$BASE/readyz" >/dev/null && break; sleep 0.2; done

json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
SIGNUP=$(curl -sf "$BASE/v1/auth/signup" -H 'content-type: application/json' \
  -d '{"email":"bench@example.com","password":"correct horse battery","display_name":"Bench","tenant_name":"bench"}')
TOKEN=$(echo "$SIGNUP" | json "d['tokens']['access_token']")
TENANT=$(echo "$SIGNUP" | json "d['tenant']['id']")
# 40 tenants so that the list is a real page of 20 with a next cursor.
for i in $(seq 1 39); do
  curl -sf "$BASE/v1/tenants" -H "authorization: Bearer $TOKEN" -H 'content-type: application/json' \
    -d "{\"name\":\"bench-$i\"}" >/dev/null
done
KEY=$(curl -sf "$BASE/v1/tenants/$TENANT/api-keys" -H "authorization: Bearer $TOKEN" \
  -H 'content-type: application/json' -d '{"name":"bench","role":"viewer"}' | json "d['secret']")

run() { # name path auth
  local out
  out=$(wrk -t2 -c"$CONNS" -d"${DURATION}s" --latency -H "authorization: Bearer $3" "$BASE$2")
  local rps p50 p99 errors
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p50=$(echo "$out" | awk '$1=="50%" {print $2}')
  p99=$(echo "$out" | awk '$1=="99%" {print $2}')
  errors=$(echo "$out" | awk '/Non-2xx/ {print $5}')
  printf '| %s | `%s` | %s | %s | %s | %s |\n' "$1" "$2" "$rps" "$p50" "$p99" "${errors:-0}"
}

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -sr); $(date -u +%F)"
echo "wrk -t2 -c$CONNS -d${DURATION}s, API and load generator on the same machine"
echo
echo "| case | path | req/s | p50 | p99 | non-2xx |"
echo "|---|---|---|---|---|---|"
run "baseline: no auth, no database" /healthz none
run "GET /v1/me, access token" /v1/me "$TOKEN"
run "GET /v1/me, API key" /v1/me "$KEY"
run "paginated list, 20 of 40" "/v1/tenants?limit=20" "$TOKEN"
