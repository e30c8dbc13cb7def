#!/usr/bin/env bash
# llm-sim throughput with zero latency: the simulator must never be the bottleneck of a pipeline
# benchmark (target: >= 5,000 requests/s on 2 cores). Starts the release binary on loopback with
# limits high enough never to refuse, drives it with wrk (installed from apt when missing) posting
# a triage request in JSON-schema mode, and prints requests/s and latency for each run and the
# median. Knobs: RUNS (5), DURATION (10s), CONNECTIONS (64), THREADS (1), PORT (18089).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
RUNS=${RUNS:-5}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-1}
PORT=${PORT:-18089}

if ! command -v wrk >/dev/null; then
  echo "installing wrk (apt-get)" >&2
  if [[ $(id -u) -eq 0 ]]; then apt-get install -y -qq wrk >/dev/null; else sudo apt-get install -y -qq wrk >/dev/null; fi
fi
cargo build --release -p llm-sim --quiet
# shellcheck source=deploy/lib/cargo-target.sh
source deploy/lib/cargo-target.sh
BINARY="$(cargo_target_dir)/release/llm-sim"

WORK=$(mktemp -d)
cleanup() {
  if [[ -n "${SIM_PID:-}" ]]; then kill "$SIM_PID" 2>/dev/null || true; wait "$SIM_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

"$BINARY" --listen "127.0.0.1:$PORT" --rpm 1000000000 --tpm 1000000000000 --latency-ms 0 \
  --log-level warn >"$WORK/llm-sim.log" 2>&1 &
SIM_PID=$!
for _ in $(seq 100); do
  curl -fsS "http://127.0.0.1:$PORT/v1/models" >/dev/null 2>&1 && break
  sleep 0.1
done

cat >"$WORK/post.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench"
wrk.body = [[{"model":"gpt-4o-mini","max_tokens":300,"messages":[{"role":"system","content":"You triage support tickets. Answer with JSON only."},{"role":"user","content":"Triage this ticket:\n<ticket>Hello, I was charged twice for my subscription this month and need a refund as soon as possible. Invoice INV-2291.</ticket>"}],"response_format":{"type":"json_schema","json_schema":{"name":"triage","strict":true,"schema":{"type":"object","properties":{"category":{"type":"string","enum":["billing","outage","login","bug","feature_request","other"]},"priority":{"type":"string","enum":["urgent","high","normal","low"]},"suggested_reply":{"type":"string"},"confidence":{"type":"number"}},"required":["category","priority","suggested_reply","confidence"],"additionalProperties":false}}}}]]
done = function(summary, latency, requests)
  local errors = summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout
  io.write(string.format("RESULT rps=%.0f p50_ms=%.2f p99_ms=%.2f errors=%d\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50) / 1000, latency:percentile(99) / 1000, errors))
end
LUA

# Warm-up, then the measured runs.
wrk -t "$THREADS" -c "$CONNECTIONS" -d 2s -s "$WORK/post.lua" "http://127.0.0.1:$PORT/v1/chat/completions" >/dev/null
echo "command: wrk -t $THREADS -c $CONNECTIONS -d $DURATION -s post.lua http://127.0.0.1:$PORT/v1/chat/completions (llm-sim --latency-ms 0, release build, $(nproc) cores shared by wrk and llm-sim)"
results=()
for run in $(seq "$RUNS"); do
  line=$(wrk -t "$THREADS" -c "$CONNECTIONS" -d "$DURATION" -s "$WORK/post.lua" \
    "http://127.0.0.1:$PORT/v1/chat/completions" | grep '^RESULT')
  echo "run $run: ${line#RESULT }"
  results+=("$line")
done
stats=$(curl -fsS "http://127.0.0.1:$PORT/_sim/stats")
median() { # median of the field $1 over all runs
  printf '%s\n' "${results[@]}" | grep -o "$1=[0-9.]*" | cut -d= -f2 | sort -n \
    | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'
}
echo "median of $RUNS runs: $(median rps) requests/s, p50 $(median p50_ms) ms, p99 $(median p99_ms) ms, errors $(median errors)"
echo "llm-sim status counts: $(echo "$stats" | grep -o '"by_status":{[^}]*}')"
