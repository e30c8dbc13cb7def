#!/usr/bin/env bash
# `make bench`: runs every benchmark script in deploy/bench/ (or only those named as arguments),
# each of which prints its figures and the command behind them. Results go to bench/ in cargo's target directory.
# Benchmarks build in release mode; the figures in docs/BENCHMARKS.md come from these scripts.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# shellcheck source=deploy/lib/cargo-target.sh
source deploy/lib/cargo-target.sh
OUT="$(cargo_target_dir)/bench"
mkdir -p "$OUT"
cargo build --release --workspace --bins --quiet
selected=("$@")
for script in deploy/bench/*.sh; do
  name=$(basename "$script" .sh)
  if ((${#selected[@]})) && [[ ! " ${selected[*]} " == *" $name "* ]]; then continue; fi
  echo "== bench: $name"
  bash "$script" | tee "$OUT/$name.txt"
done
