#!/usr/bin/env bash
# Measures Sluice against the load generator's do-nothing RLS server in one run, alternately,
# on this machine: Sluice on the memory store, Sluice on a Redis it starts on a unix socket,
# and the do-nothing server, each driven by the same load generator for the same time.
#
#   loadtest/compare.sh [ROUNDS] [-- LOADGEN RUN FLAGS...]
#   loadtest/compare.sh 3 -- --concurrency 256 --connections 8
#   SLUICE_FLAGS="--worker-threads 1" NULL_FLAGS="--worker-threads 1" loadtest/compare.sh
#
# Needs a release build (`cargo build --release --examples --bins`) and redis-server.
# Everything listens on loopback or in a temporary folder, and every run stops by itself.
set -euo pipefail
cd "$(dirname "$0")/.."

rounds="${1:-3}"
shift || true
if [ "${1:-}" = "--" ]; then shift; fi
seconds="${SECONDS_PER_RUN:-6}"

sluice=target/release/sluice
loadgen=target/release/examples/loadgen
for binary in "$sluice" "$loadgen"; do
    [ -x "$binary" ] || { echo "missing $binary: cargo build --release --examples --bins" >&2; exit 1; }
done
command -v redis-server >/dev/null || { echo "redis-server is missing: scripts/install-test-deps" >&2; exit 1; }

work="$(mktemp -d)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

redis-server --port 0 --unixsocket "$work/redis.sock" --save '' --appendonly no \
    --daemonize no >"$work/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do [ -S "$work/redis.sock" ] && break; sleep 0.1; done

# Ports above the ephemeral range's usual start are unlikely to be taken on a test machine.
"$loadgen" null-server --listen 127.0.0.1:19081 ${NULL_FLAGS:-} >/dev/null &
pids+=($!)
"$sluice" serve --rules config/rules.yaml --grpc-addr 127.0.0.1:19082 \
    --http-addr 127.0.0.1:19083 ${SLUICE_FLAGS:-} >"$work/memory.log" 2>&1 &
pids+=($!)
"$sluice" serve --rules config/rules.yaml --grpc-addr 127.0.0.1:19084 \
    --http-addr 127.0.0.1:19085 --redis-url "redis+unix://$work/redis.sock" ${SLUICE_FLAGS:-} \
    >"$work/redis-store.log" 2>&1 &
pids+=($!)
sleep 1

throughput() {
    local target="$1"
    shift
    "$loadgen" run --target "$target" --seconds "$seconds" "$@" |
        sed -n 's/.*throughput \([0-9]*\).*/\1/p'
}

# Each round runs the three one after another, so that all three meet the same machine; the
# ratios of a round are what to read, and the medians over the rounds sum them up.
printf '%-6s %12s %12s %12s %8s %8s\n' round do-nothing memory redis mem/0 redis/0
for round in $(seq "$rounds"); do
    null=$(throughput 127.0.0.1:19081 "$@")
    memory=$(throughput 127.0.0.1:19082 "$@")
    redis=$(throughput 127.0.0.1:19084 "$@")
    awk -v r="$round" -v n="$null" -v m="$memory" -v d="$redis" \
        'BEGIN { printf "%-6s %12d %12d %12d %8.2f %8.2f\n", r, n, m, d, m / n, d / n }'
done
