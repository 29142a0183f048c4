#!/usr/bin/env bash
# Gateway overhead benchmark: the same trivial wasm function invoked through the gateway
# (`POST /fn/bench/hello`, API key) and directly at the agent's listener (`POST /invoke/<version>`,
# invoke secret), in the same run, at concurrency 1 and 64; and, for the cost of authorization,
# through the gateway without credentials (the function's resource policy lets anyone invoke
# it: no authentication, one statement evaluated, against the API key's authentication and its
# identity policies).
#
#   bench/gateway.sh [duration-seconds]      (env: REPEAT, default 3; BENCH_NO_BUILD=1 uses the
#   release binaries as they are; API_BIN and AGENT_BIN run other binaries, e.g. an older
#   commit's build for an A/B comparison, without building; API_BIN_B starts a second API
#   replica from that binary on the same database, whose gateway routes to the same agent, and
#   then measures only the two gateways, run by run in turn with the agent called directly:
#   an A/B of two API builds in one run, on one agent and one database, which the machine's
#   drift cannot tell apart. Swap API_BIN and API_BIN_B for a second run: only replica A gets
#   the agent's reports and usage). The two gateway paths run
#   interleaved (key, anonymous, key, ...), and the last line gives the difference of their medians, in throughput and in the API
#   process's CPU time per invocation (user + system from /proc, which drift of the shared
#   machine moves far less than throughput).
#
# Builds nimbus-api and nimbus-worker-agent in release mode, serves the API against a scratch
# database on the machine's PostgreSQL, starts one agent, deploys the function, assigns it to the
# agent and drives both paths with wrk (installed from Debian if missing), all on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-10}"
PORT="${BENCH_PORT:-18182}"
ADMIN_URL="${NIMBUS_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
DB=nimbus_bench_gateway
WORK=$(mktemp -d /tmp/nimbus-bench-gateway.XXXXXX)
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/nimbus-target}"

command -v wrk >/dev/null || apt-get install -y wrk >/dev/null
command -v wat2wasm >/dev/null || apt-get install -y wabt >/dev/null
[ -n "${BENCH_NO_BUILD:-}${API_BIN:-}${AGENT_BIN:-}" ] || cargo build --release -p nimbus-api -p nimbus-worker-agent >/dev/null
API_BIN="${API_BIN:-$CARGO_TARGET_DIR/release/nimbus-api}"
AGENT_BIN="${AGENT_BIN:-$CARGO_TARGET_DIR/release/nimbus-worker-agent}"
psql "$ADMIN_URL" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
if [ -S /var/run/postgresql/.s.PGSQL.5432 ]; then
  DB_URL="postgres://postgres@localhost/$DB?host=/var/run/postgresql"
else
  DB_URL="${ADMIN_URL%/*}/$DB"
fi
"$API_BIN" serve --database-url "$DB_URL" --listen "127.0.0.1:$PORT" --log warn \
  --package-dir "$WORK/packages" --tenant-rate-limit 0 --tenant-max-concurrency 100000 > "$WORK/api.log" 2>&1 &
API_PID=$!
AGENT_PID=
API_B_PID=
cleanup() {
  [ -n "$AGENT_PID" ] && kill "$AGENT_PID" 2>/dev/null && wait "$AGENT_PID" 2>/dev/null
  [ -n "$API_B_PID" ] && kill "$API_B_PID" 2>/dev/null && wait "$API_B_PID" 2>/dev/null
  kill $API_PID 2>/dev/null; wait $API_PID 2>/dev/null
  psql "$ADMIN_URL" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)"
  rm -rf "$WORK"
}
trap cleanup EXIT
BASE="http://127.0.0.1:$PORT"
for _ in $(seq 1 100); do curl -sf "$BASE/readyz" >/dev/null && break; sleep 0.2; done

json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
SIGNUP=$(curl -sf "$BASE/v1/auth/signup" -H 'content-type: application/json' \
  -d '{"email":"bench@example.com","password":"correct horse battery","display_name":"Bench","tenant_name":"bench"}')
TOKEN=$(echo "$SIGNUP" | json "d['tokens']['access_token']")
TENANT=$(echo "$SIGNUP" | json "d['tenant']['id']")
psql "$DB_URL" -qc "UPDATE users SET is_platform_admin = true"
AUTH="authorization: Bearer $TOKEN"
KEY=$(curl -sf "$BASE/v1/tenants/$TENANT/api-keys" -H "$AUTH" -H 'content-type: application/json' \
  -d '{"name":"bench","role":"developer"}' | json "d['secret']")
FN="$BASE/v1/tenants/$TENANT/functions"
# The trivial function: one fd_write of "hello\n" to stdout (WebAssembly text, wabt's wat2wasm).
cat > "$WORK/hello.wat" <<'WAT'
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "hello\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 6))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
WAT
wat2wasm "$WORK/hello.wat" -o "$WORK/hello.wasm"
curl -sf "$FN" -H "$AUTH" -H 'content-type: application/json' -d '{"name":"hello","runtime":"wasm","concurrency":1000}' >/dev/null
curl -sf -X PUT "$FN/hello/code" -H "$AUTH" -H 'content-type: application/wasm' --data-binary @"$WORK/hello.wasm" >/dev/null
VERSION=$(curl -sf "$FN/hello/versions" -H "$AUTH" -H 'content-type: application/json' -d '{}' | json "d['id']")
curl -sf "$FN/hello/aliases" -H "$AUTH" -H 'content-type: application/json' \
  -d '{"name":"live","routing":{"weights":[{"version":1,"weight":100}]}}' >/dev/null
JOIN=$(curl -sf "$BASE/v1/join-tokens" -H "$AUTH" -H 'content-type: application/json' -d '{"name":"bench"}' | json "d['secret']")
NIMBUS_AGENT_CONTROL_PLANE_URL="$BASE" NIMBUS_AGENT_JOIN_TOKEN="$JOIN" NIMBUS_AGENT_NAME=bench NIMBUS_AGENT_ZONE=local \
  NIMBUS_AGENT_DATA_DIR="$WORK/agent" NIMBUS_AGENT_LISTEN=127.0.0.1:0 NIMBUS_AGENT_LOG=warn \
  NIMBUS_AGENT_MAX_QUEUED=1000 "$AGENT_BIN" > "$WORK/agent.out" 2> "$WORK/agent.log" &
AGENT_PID=$!
for _ in $(seq 1 100); do grep -q "joined as node" "$WORK/agent.out" 2>/dev/null && break; sleep 0.1; done
AGENT_URL=$(awk '/listening on/ {print $3}' "$WORK/agent.out")
NODE=$(awk '/joined as node/ {print $4}' "$WORK/agent.out")
curl -sf -X PUT "$BASE/v1/nodes/$NODE/assignments" -H "$AUTH" -H 'content-type: application/json' \
  -d "{\"assignments\":[{\"tenant_id\":\"$TENANT\",\"function\":\"hello\",\"version\":1,\"instances\":1}]}" >/dev/null
for _ in $(seq 1 200); do
  curl -sf "$BASE/fn/bench/hello" -H "authorization: Bearer $KEY" -d x 2>/dev/null | grep -q hello && break
  sleep 0.1
done
SECRET=$(psql "$DB_URL" -Atc "SELECT invoke_secret FROM nodes WHERE id = '$NODE'")
[ "$(curl -sf "$AGENT_URL/invoke/$VERSION" -H "authorization: Bearer $SECRET" -d x)" = "hello" ] || { echo "the agent does not answer" >&2; exit 1; }
[ "$(curl -sf "$BASE/fn/bench/hello" -H "authorization: Bearer $KEY" -d x)" = "hello" ] || { echo "the gateway does not answer" >&2; exit 1; }
curl -sf -X PUT "$FN/hello/policy" -H "$AUTH" -H 'content-type: application/json' -d "{\"document\":{\"Version\":\"2012-10-17\",
  \"Statement\":[{\"Effect\":\"Allow\",\"Principal\":\"*\",\"Action\":\"functions:InvokeFunction\",
  \"Resource\":\"nrn:nimbus:functions:$TENANT:function/hello\"}]}}" >/dev/null
for _ in $(seq 1 100); do curl -sf "$BASE/fn/bench/hello" -d x 2>/dev/null | grep -q hello && break; sleep 0.1; done
[ "$(curl -sf "$BASE/fn/bench/hello" -d x)" = "hello" ] || { echo "the public function does not answer" >&2; exit 1; }

REPEAT="${REPEAT:-3}"
printf 'wrk.method = "POST"\nwrk.body = "ping"\n' > "$WORK/post.lua"
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; } # user + system clock ticks of a process
TICK_US=$((1000000 / $(getconf CLK_TCK)))
# Context switches of all threads of a process: each one a thread parked (waiting for work) or
# preempted, the cost of the wake-ups between tasks and processes that CPU time alone hides.
switches() { cat /proc/"$1"/task/*/status 2>/dev/null | awk '/ctxt_switches/ {n += $2} END {print n + 0}'; }
# url secret (- for none) connections
#   -> "rps p50 p99 non2xx api-cpu-us/req agent-cpu-us/req api-switches-per-100-req"
sample() {
  local out threads=1 header=() rps p50 p99 errors n a0 a1 g0 g1 w0 w1
  [ "$3" -gt 1 ] && threads=2
  [ "$2" = "-" ] || header=(-H "authorization: Bearer $2")
  a0=$(cpu "${MEASURED_API:-$API_PID}"); g0=$(cpu $AGENT_PID); w0=$(switches "${MEASURED_API:-$API_PID}")
  out=$(wrk -t$threads -c"$3" -d"${DURATION}s" --latency -s "$WORK/post.lua" "${header[@]}" "$1")
  a1=$(cpu "${MEASURED_API:-$API_PID}"); g1=$(cpu $AGENT_PID); w1=$(switches "${MEASURED_API:-$API_PID}")
  n=$(echo "$out" | awk '/requests in/ {print $1}')
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p50=$(echo "$out" | awk '$1=="50%" {print $2}')
  p99=$(echo "$out" | awk '$1=="99%" {print $2}')
  errors=$(echo "$out" | awk '/Non-2xx/ {print $5}')
  echo "$rps $p50 $p99 ${errors:-0} $(( (a1 - a0) * TICK_US / n )) $(( (g1 - g0) * TICK_US / n )) $(( (w1 - w0) * 100 / n ))"
}
warm() { # url secret connections
  local header=()
  [ "$2" = "-" ] || header=(-H "authorization: Bearer $2")
  wrk -t1 -c"$3" -d2s -s "$WORK/post.lua" "${header[@]}" "$1" >/dev/null
}
row() { # name connections samples... -> the median's row; sets MEDIAN and API_CPU (its median)
  local name=$1 c=$2 sorted median low high rps p50 p99 errors api agent
  shift 2
  sorted=$(printf '%s\n' "$@" | sort -n)
  median=$(echo "$sorted" | sed -n "$(( ($# + 1) / 2 ))p")
  low=$(echo "$sorted" | head -n1 | cut -d' ' -f1)
  high=$(echo "$sorted" | tail -n1 | cut -d' ' -f1)
  read -r rps p50 p99 errors api agent <<<"$median"
  MEDIAN=$rps
  API_CPU=$(printf '%s\n' "$@" | awk '{print $5}' | sort -n | sed -n "$(( ($# + 1) / 2 ))p")
  printf '| %s | %s | %s | %s–%s | %s | %s | %s | %s | %s |\n' "$name" "$c" "$rps" "$low" "$high" "$p50" "$p99" "$errors" \
    "$API_CPU" "$(printf '%s\n' "$@" | awk '{print $6}' | sort -n | sed -n "$(( ($# + 1) / 2 ))p")"
}
run() { # name url secret connections
  local samples=()
  warm "$2" "$3" "$4"
  for _ in $(seq 1 "$REPEAT"); do samples+=("$(sample "$2" "$3" "$4")"); done
  row "$1" "$4" "${samples[@]}"
}
# Authorization on vs off: the two gateway paths alternate run by run (key, anonymous, key, ...)
# so that drift of the machine falls on both alike.
compare() { # connections
  local on=() off=() on_median on_cpu
  warm "$BASE/fn/bench/hello" "$KEY" "$1"
  warm "$BASE/fn/bench/hello" - "$1"
  for _ in $(seq 1 "$REPEAT"); do
    on+=("$(sample "$BASE/fn/bench/hello" "$KEY" "$1")")
    off+=("$(sample "$BASE/fn/bench/hello" - "$1")")
  done
  row "gateway + agent (\`/fn/bench/hello\`, API key: authentication + identity policies)" "$1" "${on[@]}"
  on_median=$MEDIAN
  on_cpu=$API_CPU
  row "gateway + agent, no credentials (public by resource policy)" "$1" "${off[@]}"
  DIFFS+=("c$1: throughput $(awk -v a="$on_median" -v b="$MEDIAN" 'BEGIN {printf "%+.1f %%", (a - b) / b * 100}'), API CPU per invocation $(awk -v a="$on_cpu" -v b="$API_CPU" 'BEGIN {printf "%+.1f %%", (a - b) / b * 100}')")
}

if [ -n "${API_BIN_B:-}" ]; then
  "$API_BIN_B" serve --database-url "$DB_URL" --listen "127.0.0.1:$((PORT + 1))" --log warn \
    --package-dir "$WORK/packages-b" --tenant-rate-limit 0 --tenant-max-concurrency 100000 > "$WORK/api-b.log" 2>&1 &
  API_B_PID=$!
  BASE_B="http://127.0.0.1:$((PORT + 1))"
  for _ in $(seq 1 200); do
    [ "$(curl -sf "$BASE_B/fn/bench/hello" -H "authorization: Bearer $KEY" -d x 2>/dev/null)" = "hello" ] && break
    sleep 0.1
  done
  [ "$(curl -sf "$BASE_B/fn/bench/hello" -H "authorization: Bearer $KEY" -d x)" = "hello" ] || { echo "replica B does not answer" >&2; exit 1; }
  us() { awk '{v = $1 + 0; if ($1 ~ /ms$/) v *= 1000; else if ($1 ~ /[0-9]s$/) v *= 1000000; print v}'; }
  median() { sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }
  steal() { awk '/^cpu / {print $9}' /proc/stat; }
  echo "machine: $(nproc) cores, $(uname -sr); $(date -u +%F); ${DURATION}s per run, $REPEAT rounds (agent directly, A, B in turn), medians"
  echo "A: $API_BIN"
  echo "B: $API_BIN_B"
  echo
  echo "| connections | agent directly: p50 | A: p50 | B: p50 | A adds at p50 | B adds at p50 | A inv/s | B inv/s | A API CPU µs/inv | B API CPU µs/inv | A / B API context switches per 100 inv | steal % |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
  RAW=()
  for c in 1 64; do
    warm "$AGENT_URL/invoke/$VERSION" "$SECRET" $c
    warm "$BASE/fn/bench/hello" "$KEY" $c
    warm "$BASE_B/fn/bench/hello" "$KEY" $c
    d=(); a=(); b=()
    s0=$(steal); t0=$(date +%s%N)
    for _ in $(seq 1 "$REPEAT"); do
      d+=("$(sample "$AGENT_URL/invoke/$VERSION" "$SECRET" $c)")
      a+=("$(MEASURED_API=$API_PID sample "$BASE/fn/bench/hello" "$KEY" $c)")
      b+=("$(MEASURED_API=$API_B_PID sample "$BASE_B/fn/bench/hello" "$KEY" $c)")
    done
    s1=$(steal); t1=$(date +%s%N)
    col() { printf '%s\n' "${@:2}" | awk -v f="$1" '{print $f}'; }
    dp=$(col 2 "${d[@]}" | us | median); ap=$(col 2 "${a[@]}" | us | median); bp=$(col 2 "${b[@]}" | us | median)
    printf '| %s | %s µs | %s µs | %s µs | **%s µs** | **%s µs** | %s | %s | %s | %s | %s / %s | %s |\n' "$c" "$dp" "$ap" "$bp" \
      "$(awk -v x="$ap" -v y="$dp" 'BEGIN {print x - y}')" "$(awk -v x="$bp" -v y="$dp" 'BEGIN {print x - y}')" \
      "$(col 1 "${a[@]}" | median)" "$(col 1 "${b[@]}" | median)" "$(col 5 "${a[@]}" | median)" "$(col 5 "${b[@]}" | median)" \
      "$(col 7 "${a[@]}" | median)" "$(col 7 "${b[@]}" | median)" \
      "$(awk -v s="$((s1 - s0))" -v t="$((t1 - t0))" -v n="$(nproc)" -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.1f", s / hz / (t / 1e9 * n) * 100}')"
    RAW+=("c$c: direct ${d[*]} | A ${a[*]} | B ${b[*]}")
  done
  echo
  echo "runs (inv/s p50 p99 non-2xx API-CPU-µs agent-CPU-µs API-switches-per-100):"
  printf '%s\n' "${RAW[@]}"
  exit 0
fi

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -sr); $(date -u +%F)"
echo "release builds; API, agent, PostgreSQL and wrk on the same machine; ${DURATION}s per run, $REPEAT runs per case, median shown"
echo
echo "| path | connections | inv/s (median) | inv/s (range) | p50 | p99 | non-2xx | API CPU µs/inv | agent CPU µs/inv |"
echo "|---|---|---|---|---|---|---|---|---|"
DIFFS=()
for c in 1 64; do
  run "agent directly (\`/invoke/<version>\`)" "$AGENT_URL/invoke/$VERSION" "$SECRET" $c
  compare $c
done
echo
echo "authorized vs anonymous gateway (medians of interleaved runs): ${DIFFS[*]}"
