#!/usr/bin/env bash
# Fails when a script, the Makefile or Rust code spells out cargo's output folder
# (target/debug, target/release): with CARGO_TARGET_DIR set, that path is missing or, worse,
# holds a stale binary from an older build. Locate builds with deploy/lib/cargo-target.sh in
# shell and triage_test_support::{workspace_binary, target_dir} in Rust. Part of `make lint`.
#
# Not checked: docs/ (prose), vendor/ (not ours) and the Dockerfile's builder stage, whose
# target directory is the container's own.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
pattern='target/(debug|release)'
if hits=$(grep -rnE "$pattern" Makefile .ci deploy crates services tools \
    --include='*.rs' --include='*.sh' --include='Makefile' --include='run' --include='*.toml' \
    | grep -v '^deploy/check-target-paths.sh:'); then
  echo "check-target-paths: hard-coded cargo output paths (use deploy/lib/cargo-target.sh or triage_test_support::workspace_binary):" >&2
  echo "$hits" >&2
  exit 1
fi
