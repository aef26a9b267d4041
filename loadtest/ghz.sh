#!/usr/bin/env bash
# Load a running Sluice with ghz (https://ghz.sh), using the protos in proto/.
#   loadtest/ghz.sh [host:port] [total requests]
set -euo pipefail
cd "$(dirname "$0")/.."
target="${1:-127.0.0.1:8081}"
total="${2:-200000}"
exec ghz --insecure \
    --proto proto/envoy/service/ratelimit/v3/rls.proto --import-paths proto \
    --call envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit \
    --concurrency 64 --connections 4 --total "$total" \
    --data '{"domain":"envoy","descriptors":[{"entries":[{"key":"remote_address","value":"10.0.{{.RequestNumber}}.1"}]}]}' \
    "$target"
