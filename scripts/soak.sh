#!/usr/bin/env bash
# Soak and chaos run of qoe-router over loopback: simulated engines (`qoe-router engine`, tiny
# profile), the release router, load from `qoe-router bench`, faults injected through the engines'
# POST /admin/config and by killing an engine process. Prints the figures of docs/RELIABILITY.md.
#
# Bounded: every phase runs a fixed time, every wait has a limit, only 127.0.0.1 is used, and every
# process started here is stopped on exit (by its PID). About 9 minutes with the defaults on 2 cores.
#
# usage: scripts/soak.sh
#   SOAK_PHASES="overload chaos disconnect rss"   phases to run (default: all, in that order)
#   SOAK_RSS_SECS=360      length of the memory run     SOAK_RSS_RATE=2800   its request rate
#                          (the defaults plan 1,008,000 requests)
#   SOAK_RSS_POLICY=qoe    routing policy of the memory run; SOAK_RSS_FLAGS: more router flags
#   SOAK_CHAOS_POLICY=roundrobin   routing policy of the chaos phase
#   SOAK_PORT_BASE=18600   first of the ports used (18600-18629)
#   SOAK_OUT=target/soak   where reports and logs go
set -euo pipefail
cd "$(dirname "$0")/.."
T=${CARGO_TARGET_DIR:-target}
BIN=$T/release/qoe-router
OUT=${SOAK_OUT:-$T/soak}
BASE=${SOAK_PORT_BASE:-18600}
PHASES=${SOAK_PHASES:-overload chaos disconnect rss}
RSS_SECS=${SOAK_RSS_SECS:-360}
RSS_RATE=${SOAK_RSS_RATE:-2800}
HOST=127.0.0.1
MODEL=sim-llama

cargo build -q --release --bin qoe-router
rm -rf "$OUT" && mkdir -p "$OUT/logs"

PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

now() { date +%s.%N; }

# wait_up URL: until it answers (at most 10 s).
wait_up() {
  for _ in $(seq 200); do curl -sf -o /dev/null "$1" && return 0; sleep 0.05; done
  echo "error: $1 did not come up" >&2; exit 1
}

# engine NAME PORT FLAGS...: starts a simulated engine; its PID lands in ENGINE_PID_<NAME>.
engine() {
  local name=$1 port=$2; shift 2
  "$BIN" engine --host $HOST --port "$port" --profile tiny --model $MODEL "$@" \
    >>"$OUT/logs/engine-$name.log" 2>&1 &
  PIDS+=($!); printf -v "ENGINE_PID_$name" '%s' $!
  wait_up "http://$HOST:$port/health"
}

# router PORT FLAGS...: starts the router in front of the engines given in FLAGS; PID in ROUTER_PID.
router() {
  local port=$1; shift
  "$BIN" serve --host $HOST --port "$port" --static-models $MODEL "$@" \
    >>"$OUT/logs/router-$port.log" 2>&1 &
  ROUTER_PID=$!; PIDS+=($!)
  wait_up "http://$HOST:$port/health"
}

# forget PID: drops a process that has ended from the cleanup list (its PID may be reused).
forget() {
  local keep=() p
  for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}

# stop PID...: stops processes started here.
stop() {
  for pid in "$@"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; forget "$pid"; done
}

# workload FILE RATE DURATION OUTPUT_TOKENS PRIORITIES(yes|no): writes a bench workload.
workload() {
  cat >"$1" <<EOF
name = "soak"
seed = 42
duration_s = $3
api = "completions"
send_expected_output_header = true
max_context_tokens = 2048
[arrivals]
kind = "poisson"
rate = $2
[prompt]
kind = "uniform"
min = ${PROMPT_MIN:-32}
max = ${PROMPT_MAX:-256}
[output]
kind = "fixed"
tokens = $4
EOF
  if [ "$5" = yes ]; then
    cat >>"$1" <<EOF
[[priorities]]
level = 1
share = 0.2
ttft_ms = $P1_TTFT_MS
tpot_ms = 200
[[priorities]]
level = 2
share = 0.5
ttft_ms = 3000
tpot_ms = 300
[[priorities]]
level = 3
share = 0.3
ttft_ms = 3000
tpot_ms = 300
EOF
  fi
}

# bench DIR PORT WORKLOAD [FLAGS...]: one load run against the router; report in DIR/report.json.
bench() {
  local dir=$1 port=$2 wl=$3; shift 3
  timeout 900 "$BIN" bench --target "http://$HOST:$port" --workload "$wl" --out "$dir" --quiet \
    "$@" >"$dir.txt" 2>&1 || { echo "error: bench failed, see $dir.txt" >&2; cat "$dir.txt" >&2; exit 1; }
}

PY=$OUT/soak.py
cat >"$PY" <<'EOF'
"""Helpers of scripts/soak.sh: reading bench reports and router metrics, polling breakers,
timing slot release after a client disconnect. Standard library only; loopback only."""
import http.client, json, socket, statistics, sys, time

def get_json(host, port, path, conn=None):
    c = conn or http.client.HTTPConnection(host, port, timeout=5)
    c.request("GET", path)
    r = c.getresponse()
    body = r.read()
    return json.loads(body)

def report(path):
    return json.load(open(path))["reports"][0]

def metrics(host, port):
    c = http.client.HTTPConnection(host, port, timeout=5)
    c.request("GET", "/metrics")
    return c.getresponse().read().decode()

def counters(text, name):
    out = {}
    for line in text.splitlines():
        if line.startswith(name):
            key, value = line.rsplit(" ", 1)
            out[key[len(name):]] = float(value)
    return out

def fmt(v, unit=""):
    return "-" if v is None else f"{v:.0f}{unit}"

def cmd_capacity(path):
    r = report(path)
    # Completions per second while every admission slot was busy.
    print(f"{r['overall']['completed'] / r['duration_s']:.1f}")

def cmd_overload(path, host, port, p1_target):
    p1_target = float(p1_target)
    r = report(path)
    print(f"  offered {r['offered_rps']:.1f} req/s for {r['duration_s']:.0f} s: "
          f"{r['overall']['requests']} requests, {r['overall']['completed']} completed")
    print("  | priority | requests | completed | 429 | other errors | TTFT p50 | TTFT p99 | TTFT target |")
    print("  |---|---|---|---|---|---|---|---|")
    targets = {1: int(p1_target), 2: 3000, 3: 3000}
    for s in r["by_priority"]:
        e = dict(s["errors_by_kind"])
        n429 = e.pop("http_429", 0)
        t = s["ttft_ms"]
        print(f"  | {s['priority']} | {s['requests']} | {s['completed']} | {n429} | "
              f"{sum(e.values())} {e if e else ''} | {fmt(t['p50'], ' ms')} | {fmt(t['p99'], ' ms')} | "
              f"{targets[s['priority']]} ms |")
    p1 = next(s for s in r["by_priority"] if s["priority"] == 1)
    p99 = p1["ttft_ms"]["p99"]
    held = p99 is not None and p99 <= p1_target
    print(f"  priority-1 TTFT p99 {fmt(p99, ' ms')} vs target {p1_target:.0f} ms: "
          f"{'within target' if held else 'MISSED'}")
    shed = counters(metrics(host, port), "qoe_router_shed_total")
    print("  router sheds (429) by priority and reason: " +
          (", ".join(f"{k} {v:.0f}" for k, v in sorted(shed.items())) or "none"))

def cmd_poll(host, port, out, seconds):
    """Writes every breaker/health change of every endpoint with its wall time, every 50 ms."""
    conn = http.client.HTTPConnection(host, port, timeout=5)
    last, end = {}, time.time() + float(seconds)
    with open(out, "w") as f:
        while time.time() < end:
            try:
                e = get_json(host, port, "/engines", conn)
            except Exception:
                conn = http.client.HTTPConnection(host, port, timeout=5)
                time.sleep(0.05)
                continue
            t = time.time()
            for ep in e["endpoints"]:
                state = (ep["breaker"], ep["healthy"])
                if last.get(ep["url"]) != state:
                    last[ep["url"]] = state
                    f.write(json.dumps({"t": t, "url": ep["url"], "breaker": state[0],
                                        "healthy": state[1]}) + "\n")
                    f.flush()
            time.sleep(0.05)

def first_after(changes, url, t0, pred):
    for c in changes:
        if c["url"] == url and c["t"] >= t0 and pred(c):
            return c["t"] - t0
    return None

def cmd_chaos(path, events, changes, host, port):
    r = report(path)
    ev = {}
    for line in open(events):
        t, name, url = line.split()
        ev[name] = (float(t), url)
    ch = [json.loads(l) for l in open(changes)]
    o = r["overall"]
    e = dict(o["errors_by_kind"])
    before_stream = {k: v for k, v in e.items() if k.startswith("http_") or k == "connect"}
    timeouts_504 = before_stream.pop("http_504", 0)
    in_stream = e.get("stream", 0) + e.get("truncated", 0)
    print(f"  {o['requests']} requests at {r['offered_rps']:.1f} req/s over {r['duration_s']:.0f} s, "
          f"{o['completed']} completed")
    print(f"  lost before streaming (error status or no connection, hung engine aside): "
          f"{sum(before_stream.values())} {before_stream if before_stream else ''}")
    print(f"  timed out on the hung engine (504, by design not retried): {timeouts_504}")
    print(f"  ended by an SSE error event after streaming began (crash, kill): {in_stream}")
    m = metrics(host, port)
    retries = sum(counters(m, "qoe_router_retries_total").values())
    print(f"  retried on another endpoint before any byte reached the client: {retries:.0f}")
    fails = counters(m, "qoe_router_upstream_failures_total")
    print("  upstream failures seen by the router: " +
          ", ".join(f"{k} {v:.0f}" for k, v in sorted(fails.items())))
    def line(label, start, url, pred):
        d = first_after(ch, url, start, pred)
        return f"    {label}: {'not seen' if d is None else f'{d * 1000:.0f} ms'}"
    t, url = ev["errors_on"]
    print("  breaker (3 consecutive failures open it; 2 s open; 2 successes close it):")
    print(line("500s injected → breaker open", t, url, lambda c: c["breaker"] == "open"))
    t, url = ev["errors_off"]
    print(line("engine healed → breaker closed", t, url, lambda c: c["breaker"] == "closed"))
    t, url = ev["hang_on"]
    print(line("hang injected → breaker open", t, url, lambda c: c["breaker"] == "open"))
    t, url = ev["hang_off"]
    print(line("hang healed → breaker closed", t, url, lambda c: c["breaker"] == "closed"))
    t, url = ev["killed"]
    print(line("engine killed (SIGKILL) → marked down", t, url,
               lambda c: c["breaker"] == "open" or not c["healthy"]))
    t, url = ev["restarted"]
    print(line("engine restarted → healthy and closed", t, url,
               lambda c: c["breaker"] == "closed" and c["healthy"]))

def post_stream(host, port, max_tokens):
    body = json.dumps({"model": "sim-llama", "prompt": "hello", "max_tokens": max_tokens,
                       "ignore_eos": True, "stream": True})
    s = socket.create_connection((host, port), timeout=10)
    s.sendall((f"POST /v1/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
               f"content-length: {len(body)}\r\n\r\n{body}").encode())
    return s

def read_until_data(s):
    seen = b""
    while b"data:" not in seen:
        chunk = s.recv(4096)
        if not chunk:
            raise RuntimeError("closed before the first event")
        seen += chunk

def wait_zero(host, port, path, field, limit_s=5.0):
    conn = http.client.HTTPConnection(host, port, timeout=5)
    start = time.perf_counter()
    while time.perf_counter() - start < limit_s:
        if get_json(host, port, path, conn)[field] == 0:
            return time.perf_counter() - start
    return None

def router_idle(host, port, conn):
    e = get_json(host, port, "/engines", conn)
    return all(ep["load"]["in_prefill"] == 0 and ep["load"]["in_decode"] == 0 for ep in e["endpoints"])

def cmd_disconnect(host, rport, eport, n):
    n = int(n)
    rport, eport = int(rport), int(eport)
    engine_ms, router_ms = [], []
    rconn = http.client.HTTPConnection(host, rport, timeout=5)
    for _ in range(n):
        s = post_stream(host, rport, 4000)
        read_until_data(s)
        t0 = time.perf_counter()
        s.close()
        got_router = None
        econn = http.client.HTTPConnection(host, eport, timeout=5)
        while time.perf_counter() - t0 < 5:
            if got_router is None and router_idle(host, rport, rconn):
                got_router = time.perf_counter() - t0
            if get_json(host, eport, "/admin/stats", econn)["running"] == 0:
                engine_ms.append((time.perf_counter() - t0) * 1000)
                break
        while got_router is None and time.perf_counter() - t0 < 5:
            if router_idle(host, rport, rconn):
                got_router = time.perf_counter() - t0
        router_ms.append(None if got_router is None else got_router * 1000)
        time.sleep(0.05)
    ok = [x for x in engine_ms if x is not None]
    rok = [x for x in router_ms if x is not None]
    def stats(xs):
        xs = sorted(xs)
        return (f"p50 {statistics.median(xs):.1f} ms, p90 {xs[int(0.9 * (len(xs) - 1))]:.1f} ms, "
                f"max {xs[-1]:.1f} ms") if xs else "none"
    print(f"  mid-stream disconnects: {n}; engine slot freed (engine /admin/stats running → 0) in "
          f"{len(ok)}: {stats(ok)}")
    print(f"  router load counters back to 0 in {len(rok)}: {stats(rok)}")

def cmd_disconnect_queued(host, rport, eport, n):
    """With --max-num-seqs 1, a held stream occupies the engine; a second request waits in the
    engine's queue before its first byte; its client leaves."""
    n, rport, eport = int(n), int(rport), int(eport)
    holder = post_stream(host, rport, 4000)
    read_until_data(holder)
    times = []
    econn = http.client.HTTPConnection(host, eport, timeout=5)
    for _ in range(n):
        s = post_stream(host, rport, 10)
        start = time.perf_counter()
        while get_json(host, eport, "/admin/stats", econn)["waiting"] != 1:
            if time.perf_counter() - start > 5:
                raise RuntimeError("the request never queued")
        t0 = time.perf_counter()
        s.close()
        while time.perf_counter() - t0 < 5:
            if get_json(host, eport, "/admin/stats", econn)["waiting"] == 0:
                times.append((time.perf_counter() - t0) * 1000)
                break
    holder.close()
    xs = sorted(times)
    print(f"  disconnects while queued in the engine before the first byte: {n}; engine queue freed "
          f"in {len(xs)}: " + (f"p50 {statistics.median(xs):.1f} ms, max {xs[-1]:.1f} ms" if xs else "none"))

def cmd_rss(path, samples, warm):
    r = report(path)
    o = r["overall"]
    xs = [l.split() for l in open(samples)]
    warm = float(warm)
    rss = [float(x[1]) / 1024 for x in xs]
    blocks = [x[2] for x in xs if len(x) > 2]
    rate = o["completed"] / r["duration_s"]
    e = o["errors_by_kind"]
    print(f"  {o['requests']} requests in {r['duration_s']:.0f} s ({rate:.0f} req/s completed), "
          f"errors: {sum(e.values())} {e if e else ''}")
    print(f"  router RSS after warm-up {warm / 1024:.1f} MiB; during the run min {min(rss):.1f}, "
          f"max {max(rss):.1f}, last {rss[-1]:.1f} MiB ({len(rss)} samples)")
    half = len(rss) // 2
    if half:
        print(f"  mean RSS first half {statistics.mean(rss[:half]):.1f} MiB, "
              f"second half {statistics.mean(rss[half:]):.1f} MiB")
    t0 = float(xs[0][0])
    print("  samples (s: MiB): " + " ".join(f"{float(x[0]) - t0:.0f}:{float(x[1]) / 1024:.1f}" for x in xs[::6]))
    if blocks and blocks[-1] != "-":
        print(f"  QoE prefix index entries: {blocks[0]} at the start, {blocks[-1]} at the end")
    print(f"  one million requests at this rate: {1e6 / rate / 60:.1f} min")

if __name__ == "__main__":
    globals()["cmd_" + sys.argv[1]](*sys.argv[2:])
EOF

summary() { echo; echo "== $1 ($(date +%T))"; }

# ---------------------------------------------------------------------------------------------
# Overload: two engines at a tenth of the tiny profile's speed, admission on (8 in flight per
# engine, SLA shedding). Capacity is measured first (completions per second with every slot busy),
# then the mixed workload (20% priority 1) runs at twice that.
if [[ " $PHASES " == *" overload "* ]]; then
  summary "overload: priority 1 at 2x capacity, 20% priority-1 traffic"
  D=$OUT/overload; mkdir -p "$D"
  P1_TTFT_MS=${SOAK_P1_TTFT_MS:-500}
  E1=$((BASE + 1)); E2=$((BASE + 2)); R=$BASE
  engine o1 $E1 --speed 0.1 --seed 1
  engine o2 $E2 --speed 0.1 --seed 2
  ROUTER_FLAGS=(--static-backends "http://$HOST:$E1,http://$HOST:$E2" --routing-logic qoe
    --max-inflight-per-endpoint 8 --sla-enforcement shed --queue-max 64 --queue-timeout 5
    --log-level warn)
  router $R "${ROUTER_FLAGS[@]}"
  workload "$D/probe.toml" 80 15 32 yes
  bench "$D/probe" $R "$D/probe.toml"
  CAP=$(python3 "$PY" capacity "$D/probe/report.json")
  RATE=$(python3 -c "print(round(2 * $CAP, 1))")
  echo "  capacity (completions/s, every admission slot busy): $CAP req/s; offering 2x = $RATE req/s"
  # A fresh router: the probe's statistics and counters do not carry over.
  stop "$ROUTER_PID"
  router $R "${ROUTER_FLAGS[@]}"
  workload "$D/overload.toml" "$RATE" 30 32 yes
  bench "$D/run" $R "$D/overload.toml"
  python3 "$PY" overload "$D/run/report.json" $HOST $R "$P1_TTFT_MS"
  stop "$ROUTER_PID" "$ENGINE_PID_o1" "$ENGINE_PID_o2"
fi

# ---------------------------------------------------------------------------------------------
# Chaos: three engines, steady load well below capacity, faults injected one after another:
# 500s, mid-stream crashes, a hang, a SIGKILL and a restart. Round-robin by default
# (SOAK_CHAOS_POLICY), so every engine keeps getting traffic and the breaker, not the policy's
# reliability term, is what steers it away and probes it back.
if [[ " $PHASES " == *" chaos "* ]]; then
  summary "chaos: errors, crashes, a hang, a kill and a restart under load"
  D=$OUT/chaos; mkdir -p "$D"
  P1_TTFT_MS=500
  C1=$((BASE + 11)); C2=$((BASE + 12)); C3=$((BASE + 13)); R=$((BASE + 10))
  engine c1 $C1 --speed 0.1 --seed 11
  engine c2 $C2 --speed 0.1 --seed 12
  engine c3 $C3 --speed 0.1 --seed 13
  router $R --static-backends "http://$HOST:$C1,http://$HOST:$C2,http://$HOST:$C3" \
    --routing-logic "${SOAK_CHAOS_POLICY:-roundrobin}" --first-byte-timeout-ms 2000 --breaker-failures 3 --breaker-successes 2 \
    --breaker-open-secs 2 --health-check-interval 0.5 --unhealthy-threshold 2 \
    --retry-backoff-ms 10 --log-level info
  DURATION=50
  workload "$D/chaos.toml" 20 $DURATION 32 yes
  python3 "$PY" poll $HOST $R "$D/changes.jsonl" $((DURATION + 10)) &
  POLLER=$!; PIDS+=($POLLER)
  EV=$D/events.txt; : >"$EV"
  fault() { curl -sf -o /dev/null -X POST "http://$HOST:$1/admin/config" -H 'content-type: application/json' -d "$2"; }
  (
    sleep 5;  fault $C1 '{"error_rate":1.0,"error_status":500}'; echo "$(now) errors_on http://$HOST:$C1" >>"$EV"
    sleep 5;  fault $C1 '{"error_rate":0.0}';                    echo "$(now) errors_off http://$HOST:$C1" >>"$EV"
    sleep 3;  fault $C2 '{"crash_rate":0.3}';                    echo "$(now) crash_on http://$HOST:$C2" >>"$EV"
    sleep 5;  fault $C2 '{"crash_rate":0.0}';                    echo "$(now) crash_off http://$HOST:$C2" >>"$EV"
    sleep 3;  fault $C3 '{"hang_rate":1.0}';                     echo "$(now) hang_on http://$HOST:$C3" >>"$EV"
    sleep 5;  fault $C3 '{"hang_rate":0.0}';                     echo "$(now) hang_off http://$HOST:$C3" >>"$EV"
  ) &
  FAULTS=$!; PIDS+=($FAULTS)
  bench "$D/run" $R "$D/chaos.toml" &
  BENCH=$!; PIDS+=($BENCH)
  sleep 32
  kill -9 "$ENGINE_PID_c1"; echo "$(now) killed http://$HOST:$C1" >>"$EV"
  { wait "$ENGINE_PID_c1"; } 2>/dev/null || true; forget "$ENGINE_PID_c1"
  sleep 6
  engine c1 $C1 --speed 0.1 --seed 11
  echo "$(now) restarted http://$HOST:$C1" >>"$EV"
  wait "$FAULTS"; forget "$FAULTS"
  wait "$BENCH"; forget "$BENCH"
  sleep 3
  python3 "$PY" chaos "$D/run/report.json" "$EV" "$D/changes.jsonl" $HOST $R
  stop "$POLLER" "$ROUTER_PID" "$ENGINE_PID_c1" "$ENGINE_PID_c2" "$ENGINE_PID_c3"
fi

# ---------------------------------------------------------------------------------------------
# Client disconnects: how fast the engine's slot and the router's load counters free up.
if [[ " $PHASES " == *" disconnect "* ]]; then
  summary "client disconnect: slot release"
  E=$((BASE + 21)); R=$((BASE + 20))
  engine d1 $E --speed 0.05 --max-num-seqs 1
  router $R --static-backends "http://$HOST:$E" --log-level warn
  python3 "$PY" disconnect $HOST $R $E 20
  python3 "$PY" disconnect_queued $HOST $R $E 10
  stop "$ROUTER_PID" "$ENGINE_PID_d1"
fi

# ---------------------------------------------------------------------------------------------
# Memory: many short requests (1 output token) through the router; its RSS sampled every 5 s.
if [[ " $PHASES " == *" rss "* ]]; then
  summary "memory: router RSS over a long run ($RSS_SECS s at $RSS_RATE req/s offered)"
  D=$OUT/rss; mkdir -p "$D"
  E1=$((BASE + 26)); E2=$((BASE + 27)); R=$((BASE + 25))
  engine r1 $E1 --seed 1
  engine r2 $E2 --seed 2
  router $R --static-backends "http://$HOST:$E1,http://$HOST:$E2" --routing-logic "${SOAK_RSS_POLICY:-qoe}" --log-level warn ${SOAK_RSS_FLAGS:-}
  rss() { awk '/VmRSS/ {print $2}' "/proc/$ROUTER_PID/status"; }
  echo "  router RSS at start: $(($(rss) / 1024)) MiB"
  PROMPT_MIN=8 PROMPT_MAX=32 workload "$D/warm.toml" "$RSS_RATE" 15 1 no
  bench "$D/warm" $R "$D/warm.toml"
  WARM=$(rss)
  PROMPT_MIN=8 PROMPT_MAX=32 workload "$D/rss.toml" "$RSS_RATE" "$RSS_SECS" 1 no
  : >"$D/samples.txt"
  # RSS in KiB, and the QoE policy's prefix index entries (bounded by --prefix-index-blocks).
  blocks() { curl -sf "http://$HOST:$R/engines" | jq -r '.policy_state.prefix_index_blocks // "-"' 2>/dev/null || echo -; }
  ( while kill -0 "$ROUTER_PID" 2>/dev/null; do echo "$(now) $(rss) $(blocks)" >>"$D/samples.txt"; sleep 5; done ) &
  SAMPLER=$!; PIDS+=($SAMPLER)
  bench "$D/run" $R "$D/rss.toml" --max-in-flight 512
  sleep 2
  echo "$(now) $(rss) $(blocks)" >>"$D/samples.txt"
  stop "$SAMPLER"
  python3 "$PY" rss "$D/run/report.json" "$D/samples.txt" "$WARM"
  stop "$ROUTER_PID" "$ENGINE_PID_r1" "$ENGINE_PID_r2"
fi
echo
echo "reports and logs: $OUT"
