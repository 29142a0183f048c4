#!/usr/bin/env bash
# Upload throughput of code packages: a 20 MB WebAssembly package PUT through the API into the
# local store and into S3, compared with a direct S3 PUT of the same bytes to the same server in
# the same run.
#
#   bench/upload.sh [size-mb] [repeat]
#   (env: NIMBUS_TEST_DATABASE_URL, the machine's PostgreSQL)
#
# Builds nimbus-api in release mode and starts two instances against scratch databases (one with
# the local store, one with S3), and moto_server (the S3-protocol server the tests use). Every
# upload sends different bytes, so no upload is deduplicated. curl does the uploads; MB/s is
# size / curl's total time. API, S3 server and client share the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MB="${1:-20}"
REPEAT="${2:-5}"
ADMIN_URL="${NIMBUS_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/nimbus-target}"
WORK=$(mktemp -d /tmp/nimbus-upload-bench.XXXXXX)
S3_PORT=18290
LOCAL_PORT=18291
S3API_PORT=18292
BUCKET=bench

command -v moto_server >/dev/null || python3 -m pip install --quiet 'moto[server]==5.2.1'
cargo build --release -p nimbus-api >/dev/null

PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  for db in nimbus_bench_up_local nimbus_bench_up_s3; do psql "$ADMIN_URL" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

moto_server -H 127.0.0.1 -p "$S3_PORT" >"$WORK/moto.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$S3_PORT/moto-api/" >/dev/null && break; sleep 0.2; done

start_api() { # db port extra-flags...
  local db=$1 port=$2; shift 2
  psql "$ADMIN_URL" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db"
  "$CARGO_TARGET_DIR/release/nimbus-api" serve --database-url "${ADMIN_URL%/*}/$db" --listen "127.0.0.1:$port" \
    --log warn --max-package-bytes $((64 * 1024 * 1024)) --spool-dir "$WORK/spool-$port" "$@" >"$WORK/api-$port.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.2; done
}
start_api nimbus_bench_up_local "$LOCAL_PORT" --package-dir "$WORK/packages"
start_api nimbus_bench_up_s3 "$S3API_PORT" --s3-bucket "$BUCKET" --s3-endpoint "http://127.0.0.1:$S3_PORT" \
  --s3-path-style --s3-access-key-id bench --s3-secret-access-key bench --s3-create-bucket

json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
setup() { # port -> "token tenant"
  local base="http://127.0.0.1:$1" out token tenant
  out=$(curl -sf "$base/v1/auth/signup" -H 'content-type: application/json' \
    -d '{"email":"bench@example.com","password":"correct horse battery","display_name":"Bench","tenant_name":"bench"}')
  token=$(echo "$out" | json "d['tokens']['access_token']")
  tenant=$(echo "$out" | json "d['tenant']['id']")
  curl -sf "$base/v1/tenants/$tenant/functions" -H "authorization: Bearer $token" -H 'content-type: application/json' \
    -d '{"name":"big","runtime":"wasm"}' >/dev/null
  echo "$token $tenant"
}
read -r LOCAL_TOKEN LOCAL_TENANT <<<"$(setup "$LOCAL_PORT")"
read -r S3_TOKEN S3_TENANT <<<"$(setup "$S3API_PORT")"

# A valid WASI module (exports _start) carrying SIZE_MB of data; `variant` changes one byte.
make_wasm() { # variant out
  python3 - "$SIZE_MB" "$1" "$2" <<'EOF'
import sys
size, variant, out = int(sys.argv[1]) * 1024 * 1024, int(sys.argv[2]), sys.argv[3]
def leb(n):
    b = bytearray()
    while True:
        x = n & 0x7f; n >>= 7
        b.append(x | (0x80 if n else 0))
        if not n: return bytes(b)
def section(id, body): return bytes([id]) + leb(len(body)) + body
data = bytearray((i * 7 + variant) & 0xff for i in range(256)) * (size // 256)
data[0] = variant & 0xff
pages = len(data) // 65536 + 1
m = b"\0asm\x01\0\0\0"
m += section(1, leb(1) + b"\x60\x00\x00")
m += section(3, leb(1) + leb(0))
m += section(5, leb(1) + b"\x00" + leb(pages))
m += section(7, leb(1) + leb(6) + b"_start" + b"\x00" + leb(0))
m += section(10, leb(1) + leb(2) + b"\x00\x0b")
m += section(11, leb(1) + b"\x00\x41\x00\x0b" + leb(len(data)) + bytes(data))
open(out, "wb").write(m)
EOF
}

time_put() { # url file [curl args...] -> seconds
  local url=$1 file=$2; shift 2
  curl -sS -o "$WORK/out" -w '%{http_code} %{time_total}\n' -X PUT --data-binary "@$file" "$@" "$url"
}

mbps() { python3 -c "print(f'{$1 / $2:.0f}')"; }
declare -A RESULTS
variant=0
for run in $(seq 1 "$REPEAT"); do
  for case in direct-s3 api-s3 api-local; do
    variant=$((variant + 1))
    f="$WORK/pkg-$variant.wasm"
    make_wasm "$variant" "$f"
    bytes=$(stat -c %s "$f")
    case $case in
      direct-s3) read -r code secs <<<"$(time_put "http://127.0.0.1:$S3_PORT/$BUCKET/direct/$variant" "$f" \
                   --aws-sigv4 "aws:amz:us-east-1:s3" --user bench:bench -H 'content-type: application/wasm')" ;;
      api-s3) read -r code secs <<<"$(time_put "http://127.0.0.1:$S3API_PORT/v1/tenants/$S3_TENANT/functions/big/code" "$f" \
                   -H "authorization: Bearer $S3_TOKEN" -H 'content-type: application/wasm')" ;;
      api-local) read -r code secs <<<"$(time_put "http://127.0.0.1:$LOCAL_PORT/v1/tenants/$LOCAL_TENANT/functions/big/code" "$f" \
                   -H "authorization: Bearer $LOCAL_TOKEN" -H 'content-type: application/wasm')" ;;
    esac
    case $code in 200|201) ;; *) echo "$case upload failed: HTTP $code $(cat "$WORK/out")" >&2; exit 1 ;; esac
    RESULTS[$case]+="$(mbps "$bytes / 1048576" "$secs") "
    rm -f "$f"
  done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
range() { tr ' ' '\n' | grep -v '^$' | sort -n | awk 'NR==1 {lo=$1} {hi=$1} END {print lo "–" hi}'; }
DIRECT=$(echo "${RESULTS[direct-s3]}" | median)
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -sr); $(date -u +%F)"
echo "package: ${SIZE_MB} MiB WebAssembly module, different bytes every upload; $REPEAT uploads per case, interleaved; S3 server: moto_server $(python3 -c 'import moto; print(moto.__version__)')"
echo
echo "| case | MB/s (median) | MB/s (range) | vs direct S3 PUT |"
echo "|---|---|---|---|"
for case in direct-s3 api-s3 api-local; do
  m=$(echo "${RESULTS[$case]}" | median)
  printf '| %s | %s | %s | %s%% |\n' "$case" "$m" "$(echo "${RESULTS[$case]}" | range)" "$(python3 -c "print(round(100 * $m / $DIRECT))")"
done
