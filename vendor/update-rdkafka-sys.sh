#!/usr/bin/env bash
# Re-creates vendor/rdkafka-sys: the published rdkafka-sys crate, pruned to what its build needs,
# with every patch under vendor/patches/ applied. Run it after changing RDKAFKA_SYS_VERSION (and
# the `rdkafka` requirement in Cargo.toml); if a patch no longer applies, check whether upstream
# fixed it and drop the patch, and `[patch.crates-io]` with it once none is left.
#
#   vendor/update-rdkafka-sys.sh            # the version below
#   RDKAFKA_SYS_VERSION=4.10.0+2.12.1 vendor/update-rdkafka-sys.sh
set -euo pipefail
cd "$(dirname "$0")"

VERSION=${RDKAFKA_SYS_VERSION:-4.10.0+2.12.1}
DEST=rdkafka-sys

# Let Cargo fetch the published crate through whatever registry it is configured for, from a
# scratch project outside this workspace (whose `[patch]` would otherwise hide it).
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$scratch/src"
touch "$scratch/src/lib.rs"
cat >"$scratch/Cargo.toml" <<EOF
[package]
name = "fetch-rdkafka-sys"
version = "0.0.0"
edition = "2021"
[dependencies]
rdkafka-sys = "=${VERSION%%+*}"
EOF
cargo fetch --manifest-path "$scratch/Cargo.toml" >/dev/null
source=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -maxdepth 2 -type d -name "rdkafka-sys-$VERSION" | head -1)
[ -n "$source" ] || { echo "rdkafka-sys $VERSION not found after cargo fetch" >&2; exit 1; }

rm -rf "$DEST"
cp -a "$source" "$DEST"
# Not needed by `./configure && make libs` (what its build.rs runs without the cmake feature):
# librdkafka's tests, examples, packaging and Windows/Debian files, about half of the crate.
(cd "$DEST/librdkafka" &&
  find packaging -mindepth 1 -maxdepth 1 ! -name get_version.py -exec rm -rf {} + &&
  rm -rf tests examples win32 debian CMakeLists.txt Doxyfile mainpage.doxy vcpkg.json service.yml)
rm -f "$DEST/.cargo_vcs_info.json" "$DEST/.cargo-ok"

for patch in patches/*.patch; do
  echo "applying $patch"
  patch --quiet --strip=0 --directory="$DEST" --forward <"$patch"
done
# rdkafka-sys's build.rs copies librdkafka into its OUT_DIR once and reuses that copy, so a
# changed source here would not be compiled until the old build output is gone.
(cd .. && cargo clean --quiet -p rdkafka-sys && cargo clean --quiet --release -p rdkafka-sys)
echo "vendor/$DEST is rdkafka-sys $VERSION with $(ls patches/*.patch | wc -l) patch(es)"
