#!/usr/bin/env bash
# `make demo`: the local stack is up (make stack-up ran first); build, then run the whole
# pipeline with the sample tickets of deploy/demo/ and show what happens. Ctrl-C stops
# everything it started. Uses llm-sim unless TRIAGE_DEMO_LLM_BASE_URL and TRIAGE_DEMO_LLM_API_KEY
# name an OpenAI-compatible endpoint (TRIAGE_DEMO_LLM_MODEL, default gpt-4o-mini).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
echo "demo: building the workspace (the first build takes a few minutes)"
cargo build --workspace --bins --quiet
# shellcheck source=deploy/lib/cargo-target.sh
source deploy/lib/cargo-target.sh
exec "$(cargo_target_dir)/debug/pipeline" demo "$@"
