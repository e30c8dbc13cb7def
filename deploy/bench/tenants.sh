#!/usr/bin/env bash
# Tenants: one tenant scaling out over 1, 2 and 4 workers, and a small tenant's latency behind a
# big tenant's backlog (services/inference-worker/examples/tenants.rs). Release builds of the
# worker and llm-sim run as separate processes on the local stack.
# Sizes can be lowered for a small machine: TASKS=… BACKLOG=… deploy/bench/tenants.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
cargo build --release --quiet -p inference-worker -p llm-sim --bins --example tenants
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
BENCH=("$TARGET_DIR/release/examples/tenants" --bin-dir "$TARGET_DIR/release")
echo "# one tenant scales out: 2 s latency, no effective provider limit, ${TASKS:-1500} tickets of one tenant"
"${BENCH[@]}" scale-out --tasks "${TASKS:-1500}" --latency-ms 2000 --window 64 --workers 1,2,4
echo "# fairness: tenant A's backlog of ${BACKLOG:-20000} tasks, then tenant B's 20 tickets; 6,000 RPM, 500 ms"
"${BENCH[@]}" fairness --backlog "${BACKLOG:-20000}" --small 20 --spacing-ms 250 --rpm 6000 --latency-ms 500
