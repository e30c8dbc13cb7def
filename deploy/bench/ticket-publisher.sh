#!/usr/bin/env bash
# Benchmark of ticket-publisher's ingress on the local stack (`make bench BENCH=ticket-publisher`).
#
# Starts the release publisher (ingress only; the dispatch stage is benchmarked end to end
# elsewhere) on its own topics, then drives it with tools/loadgen over HTTP and gRPC:
#   - max throughput: closed loop, CONCURRENCY clients, for DURATION;
#   - latency at 1,000/s: open loop at RATE requests/s (latency from when each request was due).
# Each measurement runs RUNS times; the medians are printed as markdown rows for
# docs/BENCHMARKS.md, and every run's JSON goes to bench/ticket-publisher.jsonl in the target directory.
# Everything (broker, publisher, load generator) shares this machine's cores.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"

RUNS=${RUNS:-3}
DURATION=${DURATION:-15s}
RATE=${RATE:-1000}
CONCURRENCY=${CONCURRENCY:-64}
HTTP_PORT=${HTTP_PORT:-18080}
GRPC_PORT=${GRPC_PORT:-15051}
ADMIN_PORT=${ADMIN_PORT:-19090}
API_KEY=bench-$(date +%s)-$RANDOM
# shellcheck source=deploy/lib/cargo-target.sh
source deploy/lib/cargo-target.sh
TARGET_DIR=$(cargo_target_dir)
OUT="$TARGET_DIR/bench"
mkdir -p "$OUT"
JSONL="$OUT/ticket-publisher.jsonl"
: >"$JSONL"

# shellcheck disable=SC1091
[[ -f .local/stack.env ]] && source .local/stack.env
cargo build --release --quiet -p ticket-publisher -p loadgen

KEYS_FILE=$(mktemp)
echo "bench:$(printf '%s' "$API_KEY" | sha256sum | cut -d' ' -f1)" >"$KEYS_FILE"

export TRIAGE_KAFKA__BOOTSTRAP_SERVERS=${KAFKA_BOOTSTRAP:-127.0.0.1:9092}
export TRIAGE_REDIS__URL=${REDIS_URL:-redis://127.0.0.1:6379}
export TRIAGE_TOPICS__TICKETS_CREATED=bench.ticket-publisher.tickets-created
export TRIAGE_TOPICS__INFERENCE_TASKS=bench.ticket-publisher.inference
export TRIAGE_TOPICS__RESULTS=bench.ticket-publisher.results
export TRIAGE_TOPICS__DEAD_LETTERS=bench.ticket-publisher.dlq
export TRIAGE_TOPIC_PROVISIONING__PARTITIONS=6
# One broker: the production defaults (3 copies, 2 in sync) lowered explicitly.
export TRIAGE_TOPIC_PROVISIONING__REPLICATION_FACTOR=1
export TRIAGE_TOPIC_PROVISIONING__MIN_INSYNC_REPLICAS=1
export TRIAGE_TOPIC_PROVISIONING__RETENTION=1h
export TRIAGE_DISPATCH__ENABLED=false
export TRIAGE_INGRESS__HTTP_LISTEN=127.0.0.1:$HTTP_PORT
export TRIAGE_INGRESS__GRPC_LISTEN=127.0.0.1:$GRPC_PORT
export TRIAGE_ADMIN__LISTEN=127.0.0.1:$ADMIN_PORT
export TRIAGE_AUTH__KEYS_FILE=$KEYS_FILE
export TRIAGE_INGRESS__RATE_LIMIT_PER_SECOND=1000000
export TRIAGE_INGRESS__RATE_LIMIT_BURST=1000000
export TRIAGE_TELEMETRY__LOG_LEVEL=warn

"$TARGET_DIR/release/ticket-publisher" >"$OUT/ticket-publisher.log" 2>&1 &
PUBLISHER=$!
cleanup() {
  kill "$PUBLISHER" 2>/dev/null || true
  wait "$PUBLISHER" 2>/dev/null || true
  rm -f "$KEYS_FILE"
}
trap cleanup EXIT

for _ in $(seq 1 100); do
  if curl -fsS "http://127.0.0.1:$ADMIN_PORT/readyz" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$PUBLISHER" 2>/dev/null; then cat "$OUT/ticket-publisher.log"; exit 1; fi
  sleep 0.2
done
curl -fsS "http://127.0.0.1:$ADMIN_PORT/readyz" >/dev/null

CLK_TCK=$(getconf CLK_TCK)
publisher_cpu_ticks() { awk '{print $14 + $15}' "/proc/$PUBLISHER/stat"; }

# One loadgen run; its JSON line gets the publisher's CPU time over the run (warm-up included)
# and the machine's 1-minute load average, since the broker and other work share the cores.
loadgen() {
  local transport=$1; shift
  local target
  if [[ $transport == http ]]; then target=(--url "http://127.0.0.1:$HTTP_PORT"); else target=(--addr "http://127.0.0.1:$GRPC_PORT"); fi
  local before after report
  before=$(publisher_cpu_ticks)
  report=$("$TARGET_DIR/release/loadgen" "$transport" "${target[@]}" --api-key "$API_KEY" --duration "$DURATION" "$@")
  report=${report%%$'\n'*}
  after=$(publisher_cpu_ticks)
  python3 -c 'import json,sys; r=json.loads(sys.argv[1]); r["publisher_cpu_s"]=(int(sys.argv[2])-int(sys.argv[3]))/int(sys.argv[4]); r["load_avg_1m"]=float(open("/proc/loadavg").read().split()[0]); print(json.dumps(r))' \
    "$report" "$after" "$before" "$CLK_TCK" | tee -a "$JSONL"
}

echo "machine: $(nproc) cores, $(uname -sr), $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
for transport in http grpc; do
  for run in $(seq 1 "$RUNS"); do
    echo "== $transport max throughput, run $run" >&2
    loadgen "$transport" --concurrency "$CONCURRENCY" --label max >/dev/null
    echo "== $transport open loop at $RATE/s, run $run" >&2
    loadgen "$transport" --rate "$RATE" --concurrency "$CONCURRENCY" --label "rate" >/dev/null
  done
done

python3 - "$JSONL" "$RUNS" "$DURATION" "$RATE" "$CONCURRENCY" <<'PY'
import json, statistics, sys
path, runs, duration, rate, concurrency = sys.argv[1:]
reports = [json.loads(line) for line in open(path) if line.strip()]
def median(values): return statistics.median(values)
print()
print("| transport | load | accepted/s (median) | p50 ms | p99 ms | max ms (worst run) | publisher CPU µs/ticket | load avg (1 min) | refused | runs |")
print("|---|---|---|---|---|---|---|---|---|---|")
for transport in ("http", "grpc"):
    for label, load in (("max", f"closed loop, {concurrency} clients"), ("rate", f"open loop, {rate}/s")):
        group = [r for r in reports if r["transport"] == transport and r["label"] == label]
        if not group: continue
        refused = {}
        for r in group:
            for k, v in r["refused"].items(): refused[k] = refused.get(k, 0) + v
        # CPU is measured over warm-up plus window; tickets over the window, scaled to both.
        cpu_per_ticket = median([r["publisher_cpu_s"] * 1e6 / max(1.0, r["accepted_per_s"] * (r["duration_s"] + 2.0)) for r in group])
        print(f"| {transport} | {load} | {median([r['accepted_per_s'] for r in group]):,.0f} | "
              f"{median([r['p50_ms'] for r in group]):.2f} | {median([r['p99_ms'] for r in group]):.2f} | "
              f"{max(r['max_ms'] for r in group):.1f} | ≈{cpu_per_ticket:.0f} | "
              f"{min(r['load_avg_1m'] for r in group):.1f}–{max(r['load_avg_1m'] for r in group):.1f} | "
              f"{refused or 'none'} | {len(group)} × {duration} |")
PY
