#!/usr/bin/env bash
# Router memory with many concurrent slow streams: a slow simulated engine, the router in front,
# N streams held open through it; prints the router's RSS before, during and after.
# usage: scripts/bench-rss.sh [N=1000] [SECONDS=20]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000}; SECS=${2:-20}
cargo build --release --bin qoe-router --example hold_streams >/dev/null
T=${CARGO_TARGET_DIR:-target}
BIN=$T/release/qoe-router
ENGINE_PORT=18501; ROUTER_PORT=18500
# A slow engine (tokens every ~100 ms per stream) that can hold all the streams at once.
$BIN engine --port $ENGINE_PORT --profile tiny --speed 0.05 --max-num-seqs $((N + 16)) \
  --kv-capacity-tokens 100000000 --max-model-len 1000000 >/dev/null 2>&1 &
ENGINE=$!
$BIN serve --port $ROUTER_PORT --static-backends http://127.0.0.1:$ENGINE_PORT --log-level warn >/dev/null 2>&1 &
ROUTER=$!
trap 'kill $ENGINE $ROUTER 2>/dev/null || true' EXIT
sleep 1
rss() { awk '/VmRSS/ {print $2/1024 " MiB"}' /proc/$ROUTER/status; }
echo "router RSS idle: $(rss)"
$T/release/examples/hold_streams http://127.0.0.1:$ROUTER_PORT "$N" "$SECS" | while read -r line; do
  echo "$line router_rss=$(rss)"
done
echo "router RSS after the streams closed: $(rss)"
