#!/usr/bin/env bash
# `make demo`: the local stack, the five services, and (once the stages exist) tickets being
# triaged. Stops everything it started on Ctrl-C.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# shellcheck disable=SC1091
source .local/stack.env

cargo build --workspace --bins --quiet

LOG_DIR="$ROOT/.local/demo"
mkdir -p "$LOG_DIR"
PIDS=()
cleanup() {
  echo
  echo "demo: stopping services"
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

port=9101
for service in ticket-publisher inference-worker result-writer dlq-alerter lag-autoscaler; do
  TRIAGE_KAFKA__BOOTSTRAP_SERVERS="$KAFKA_BOOTSTRAP" TRIAGE_ADMIN__LISTEN="127.0.0.1:$port" \
    TRIAGE_TELEMETRY__LOG_FORMAT=json "target/debug/$service" >"$LOG_DIR/$service.log" 2>&1 &
  PIDS+=($!)
  printf 'demo: %-17s admin http://127.0.0.1:%s/readyz  logs %s\n' "$service" "$port" "$LOG_DIR/$service.log"
  port=$((port + 1))
done

for p in 9101 9102 9103 9104 9105; do
  for _ in $(seq 1 100); do
    curl -fs "http://127.0.0.1:$p/readyz" >/dev/null && break
    sleep 0.2
  done
done
echo "demo: all five services are up and ready against Kafka at $KAFKA_BOOTSTRAP"
echo "demo: not yet built: ticket ingress, dispatch, LLM calls, result storage, alerts and lag"
echo "demo: (issues 3-10); until then this demo only shows the services starting. Ctrl-C stops them."
wait
