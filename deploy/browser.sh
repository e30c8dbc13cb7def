#!/usr/bin/env bash
# The triage console's browser tests need headless Chromium and its WebDriver: Debian's
# `chromium` and `chromium-driver`, installed with apt-get when missing (make test runs this).
set -euo pipefail

log() { echo "browser: $*"; }
as_root_or_sudo() {
  if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

started=$SECONDS
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
if ((${#missing[@]})); then
  log "installing ${missing[*]} with apt-get"
  as_root_or_sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root_or_sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  log "installed in $((SECONDS - started)) s"
fi
log "$(chromium --version 2>/dev/null | head -1); $(chromedriver --version | head -1)"
