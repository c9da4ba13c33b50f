#!/usr/bin/env bash
# The standard simulated scenarios of docs/EVALUATION.md: every policy, a goodput sweep each, the
# reports and plots under OUT (default target/evaluation/). Deterministic: the same binary gives
# the same files. About ten minutes on two cores; SCENARIOS="hetero rag-large" runs a subset,
# RECORDS=1 also writes each run's requests (requests-<policy>.jsonl, see simulate --records),
# CONFIG=FILE runs the simulated router with a router config file (simulate --config).
#
#   cargo build --release --bin qoe-router
#   scripts/simulate-scenarios.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${QOE_ROUTER_BIN:-target/release/qoe-router}
OUT=${1:-target/evaluation}
JOBS=${JOBS:-2}
POLICIES=${POLICIES:-qoe,roundrobin,random,least-loaded,power-of-two,session,prefix-aware}
SCENARIOS=${SCENARIOS:-hetero mixed-priority rag-prefix rag-large hot-prefix decode-heavy bursty bursty-uniform degrading}
EXTRA=()
if [ -n "${RECORDS:-}" ]; then EXTRA+=(--records); fi
if [ -n "${CONFIG:-}" ]; then EXTRA+=(--config "$CONFIG"); fi
mkdir -p "$OUT"

sim() {
  local name=$1
  shift
  echo "== $name: simulate $*" >&2
  "$BIN" simulate "$@" --policies "$POLICIES" --jobs "$JOBS" --quiet "${EXTRA[@]}" --out "$OUT/$name" >/dev/null
}

for s in $SCENARIOS; do
  case $s in
  hetero) sim hetero --fleet bench/fleets/hetero-4.toml --workload bench/workloads/conversation.toml --sweep-rate 2:60 ;;
  mixed-priority) sim mixed-priority --fleet bench/fleets/hetero-4.toml --workload bench/workloads/mixed-priority.toml --sweep-rate 20:250 ;;
  rag-prefix) sim rag-prefix --fleet bench/fleets/uniform-4.toml --workload bench/workloads/rag-prefix.toml --sweep-rate 20:600 ;;
  rag-large) sim rag-large --fleet bench/fleets/uniform-4.toml --workload bench/workloads/rag-large.toml --sweep-rate 2:200 ;;
  hot-prefix) sim hot-prefix --fleet bench/fleets/uniform-4.toml --workload bench/workloads/hot-prefix.toml --sweep-rate 10:400 ;;
  decode-heavy) sim decode-heavy --fleet bench/fleets/hetero-4.toml --workload bench/workloads/decode-heavy.toml --sweep-rate 1:60 ;;
  bursty) sim bursty --fleet bench/fleets/hetero-4.toml --workload bench/workloads/bursty.toml --sweep-rate 0.25:60 ;;
  bursty-uniform) sim bursty-uniform --fleet bench/fleets/uniform-4.toml --workload bench/workloads/bursty.toml --sweep-rate 0.25:60 ;;
  degrading) sim degrading --fleet bench/fleets/degrading-4.toml --workload bench/workloads/conversation.toml --sweep-rate 2:80 ;;
  *) echo "unknown scenario $s" >&2; exit 2 ;;
  esac
done
echo "wrote $OUT/" >&2
