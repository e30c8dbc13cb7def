#!/usr/bin/env bash
# inference-worker against llm-sim, both release builds, on the local stack. Each scenario is
# one JSON line (see services/inference-worker/examples/bench.rs).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
cargo build --release --quiet -p inference-worker -p llm-sim --bins
cargo build --release --quiet -p inference-worker --example bench
# shellcheck source=deploy/lib/cargo-target.sh
source deploy/lib/cargo-target.sh
BENCH="$(cargo_target_dir)/release/examples/bench"
echo "# throughput against a 1,200 RPM limit, 500 ms latency, 2,000 tasks, 64 in flight"
"$BENCH" --tasks 2000 --rpm 1200 --latency-ms 500 --max-in-flight 64
echo "# the article's model: the same worker with one task in flight (200 tasks)"
"$BENCH" --tasks 200 --rpm 1200 --latency-ms 500 --max-in-flight 1
echo "# CPU per task: no latency, no effective limit, 10,000 tasks"
"$BENCH" --tasks 10000 --rpm 10000000 --latency-ms 0 --max-in-flight 256
echo "# memory with 1,000 tasks in flight (5 s latency, 3,000 tasks)"
"$BENCH" --tasks 3000 --rpm 10000000 --latency-ms 5000 --max-in-flight 1000
