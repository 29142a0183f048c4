#!/usr/bin/env bash
# HTTP load benchmark of the API: authenticated GET /v1/me (access token and API key) and a
# paginated list, with /healthz (no auth, no database) as the comparison measured in the same run.
#
#   bench/http-load.sh [duration-seconds] [connections]
#   (env: WRK_THREADS, default 1; BENCH_API_FLAGS, extra nimbus-api flags; BENCH_DATABASE_URL)
#
# Builds nimbus-api in release mode, serves it against a scratch database on the machine's
# PostgreSQL, and drives it with wrk (installed from Debian if missing) on the same machine.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-20}"
CONNS="${2:-64}"
THREADS="${WRK_THREADS:-1}"
PORT="${BENCH_PORT:-18181}"
ADMIN_URL="${NIMBUS_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
DB=nimbus_bench
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/nimbus-target}"

command -v wrk >/dev/null || apt-get install -y wrk >/dev/null
cargo build --release -p nimbus-api >/dev/null
psql "$ADMIN_URL" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
# The API reaches a PostgreSQL on the same machine over its Unix socket when there is one (as the
# local runner does); BENCH_DATABASE_URL overrides, e.g. to compare with TCP loopback.
if [ -S /var/run/postgresql/.s.PGSQL.5432 ]; then
  DEFAULT_DB_URL="postgres://postgres@localhost/$DB?host=/var/run/postgresql"
else
  DEFAULT_DB_URL="${ADMIN_URL%/*}/$DB"
fi
DB_URL="${BENCH_DATABASE_URL:-$DEFAULT_DB_URL}"

"$CARGO_TARGET_DIR/release/nimbus-api" serve --database-url "$DB_URL" --listen "127.0.0.1:$PORT" --log warn ${BENCH_API_FLAGS:-} \
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

# Each case runs REPEAT times; the row shows the median run (by req/s) and the range of req/s.
REPEAT="${REPEAT:-3}"
run() { # name path auth
  local results=() out rps p50 p99 errors
  for _ in $(seq 1 "$REPEAT"); do
    out=$(wrk -t"$THREADS" -c"$CONNS" -d"${DURATION}s" --latency -H "authorization: Bearer $3" "$BASE$2")
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    p50=$(echo "$out" | awk '$1=="50%" {print $2}')
    p99=$(echo "$out" | awk '$1=="99%" {print $2}')
    errors=$(echo "$out" | awk '/Non-2xx/ {print $5}')
    results+=("$rps $p50 $p99 ${errors:-0}")
  done
  local sorted median low high
  sorted=$(printf '%s\n' "${results[@]}" | sort -n)
  median=$(echo "$sorted" | sed -n "$(( (REPEAT + 1) / 2 ))p")
  low=$(echo "$sorted" | head -n1 | cut -d' ' -f1)
  high=$(echo "$sorted" | tail -n1 | cut -d' ' -f1)
  read -r rps p50 p99 errors <<<"$median"
  printf '| %s | `%s` | %s | %s–%s | %s | %s | %s |\n' "$1" "$2" "$rps" "$low" "$high" "$p50" "$p99" "$errors"
}

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -sr); $(date -u +%F)"
echo "nimbus-api serve with default settings ${BENCH_API_FLAGS:-}; wrk -t$THREADS -c$CONNS -d${DURATION}s, API and load generator on the same machine; database: ${DB_URL%%\?*} ${DB_URL#*\?}"
echo
echo "$REPEAT runs per case, median shown"
echo
echo "| case | path | req/s (median) | req/s (range) | p50 | p99 | non-2xx |"
echo "|---|---|---|---|---|---|---|"
run "baseline: no auth, no database" /healthz none
run "GET /v1/me, access token" /v1/me "$TOKEN"
run "GET /v1/me, API key" /v1/me "$KEY"
run "paginated list, 20 of 40" "/v1/tenants?limit=20" "$TOKEN"
