# Sourced by the scripts that start built binaries. Cargo decides where builds go
# (CARGO_TARGET_DIR, build.target-dir in a cargo config, or ./target); `cargo metadata` reports
# its decision, so a script never runs a stale binary that an older build left in ./target.
#
#   source deploy/lib/cargo-target.sh
#   "$(cargo_target_dir)/release/llm-sim" ...

cargo_target_dir() {
  local metadata
  metadata=$(cargo metadata --format-version 1 --no-deps --offline 2>/dev/null || cargo metadata --format-version 1 --no-deps)
  # The JSON is one line; the field is a plain string (cargo escapes nothing in a path but
  # quotes and backslashes, which a target directory here does not contain).
  sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p' <<<"$metadata"
}
