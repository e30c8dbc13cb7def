#!/usr/bin/env bash
# The whole pipeline (release binaries, 2 workers) through the HTTP ingress, two runs:
# - latency: 3,000 tickets at 50/s, under a 6,000 RPM llm-sim limit (log-normal latency p50
#   300 ms, p99 1.2 s): ticket accepted -> LLM request started and end to end;
# - saturation: 3,000 tickets at 100/s against a 3,000 RPM limit: throughput as a share of it.
# Each writes bench/pipeline.{json,svg} in the target directory (the second overwrites the first's files).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
cargo build --release --quiet --workspace --bins
# shellcheck source=deploy/lib/cargo-target.sh
source deploy/lib/cargo-target.sh
TARGET_DIR=$(cargo_target_dir)
"$TARGET_DIR/release/pipeline" bench --tickets 3000 --rate 50 --rpm 6000 --workers 2
cp "$TARGET_DIR/bench/pipeline.svg" "$TARGET_DIR/bench/pipeline-latency.svg"
"$TARGET_DIR/release/pipeline" bench --tickets 3000 --rate 100 --rpm 3000 --workers 2
