#!/usr/bin/env bash
# The whole pipeline (release binaries) at 100 tickets/s against a 6,000 RPM llm-sim with
# log-normal latency (p50 300 ms, p99 1.2 s); writes target/bench/pipeline.{json,svg}.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
cargo build --release --quiet --workspace --bins
target/release/pipeline bench --tickets 3000 --rate 100 --rpm 6000 --workers 2
