#!/usr/bin/env bash
# Builds the runtime image from the project's Dockerfile with podman, here, without a registry:
#   - the base is a Debian bookworm made by mmdebstrap from Debian's archive and imported as
#     BASE_IMAGE (default localhost/debian:bookworm-slim), cached under .local/image/;
#   - the binaries come from the Dockerfile's `prebuilt` stage: cargo builds them on this host
#     (bookworm too, so the same glibc and OpenSSL as the image), and they are staged into a build
#     context of their own. The Dockerfile's `builder` stage needs a Rust toolchain image, which
#     only a registry has; both stages feed the same runtime stage.
#
#   deploy/image.sh [--profile release|dev|PROFILE] [--image NAME]
#   BASE_IMAGE=docker.io/library/debian:bookworm-slim deploy/image.sh   # where a registry is reachable
#
# `make image` builds with the release profile (6 to 45 minutes of compiling on 2 cores when
# nothing is built yet); `make image-test` with dev, whose binaries `make test` has already built.
# Installs podman, runc and mmdebstrap with apt-get when they are missing. Prints the image's
# size and layer count.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE="$ROOT/.local/image"
CONTEXT="$ROOT/.local/image-context"
PROFILE=release
IMAGE=""
BASE_IMAGE=${BASE_IMAGE:-localhost/debian:bookworm-slim}
# The podman settings these machines need (runc, no default ulimits): see the file.
export CONTAINERS_CONF=${CONTAINERS_CONF:-$ROOT/deploy/image/containers.conf}

log() { printf 'image: %s\n' "$*" >&2; }
die() { printf 'image: error: %s\n' "$*" >&2; exit 1; }

while (($#)); do
  case $1 in
    --profile) PROFILE=$2; shift 2 ;;
    --image) IMAGE=$2; shift 2 ;;
    *) die "unknown argument $1 (deploy/image.sh [--profile PROFILE] [--image NAME])" ;;
  esac
done

as_root_or_sudo() {
  if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

started=$SECONDS
missing=()
command -v objcopy >/dev/null || missing+=(binutils)
command -v podman >/dev/null || missing+=(podman)
[[ -x /usr/sbin/runc ]] || missing+=(runc)
if [[ $BASE_IMAGE == localhost/* ]]; then
  command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
fi
if ((${#missing[@]})); then
  log "installing ${missing[*]} with apt-get"
  as_root_or_sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root_or_sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  log "installed in $((SECONDS - started)) s"
fi

# ---------------------------------------------------------------------------------------------
# The base: what debian:bookworm-slim is, made from Debian's archive. The dpkg excludes are the
# ones the official slim images use (no man pages, docs but copyright files, locales), so the
# size printed here is close to what a registry's base gives. Where a registry is reachable,
# BASE_IMAGE=docker.io/library/debian:bookworm-slim is pulled instead; the Dockerfile is the same.
BASE_RECIPE=(
  mmdebstrap --variant=apt --include=ca-certificates,libssl3,zlib1g
  '--dpkgopt=path-exclude=/usr/share/man/*'
  '--dpkgopt=path-exclude=/usr/share/doc/*'
  '--dpkgopt=path-include=/usr/share/doc/*/copyright'
  '--dpkgopt=path-exclude=/usr/share/info/*'
  '--dpkgopt=path-exclude=/usr/share/locale/*'
  '--dpkgopt=path-exclude=/usr/share/groff/*'
  '--dpkgopt=path-exclude=/usr/share/lintian/*'
  bookworm
)
recipe=$(printf '%s\n' "${BASE_RECIPE[@]}" | sha256sum | cut -c1-16)
base_tar="$CACHE/debian-bookworm-$recipe.tar"
# The image id podman gave the imported tarball: a base under the same name made otherwise (or by
# an older recipe) is replaced, never silently built upon.
base_id_file="$CACHE/debian-bookworm-$recipe.image-id"
mkdir -p "$CACHE"
base_id=$(podman image inspect --format '{{.Id}}' "$BASE_IMAGE" 2>/dev/null || true)
if [[ $BASE_IMAGE != localhost/* ]]; then
  if [[ -z $base_id ]]; then
    log "pulling $BASE_IMAGE"
    podman pull --quiet "$BASE_IMAGE" >/dev/null
  fi
elif [[ -z $base_id || $base_id != "$(cat "$base_id_file" 2>/dev/null)" ]]; then
  if [[ ! -f $base_tar ]]; then
    step=$SECONDS
    log "making the base with mmdebstrap (Debian's archive, once; cached in ${base_tar#"$ROOT"/})"
    "${BASE_RECIPE[@]}" --format=tar "$base_tar.partial" >"$CACHE/mmdebstrap.log" 2>&1 \
      || die "mmdebstrap failed; see $CACHE/mmdebstrap.log"
    mv "$base_tar.partial" "$base_tar"
    log "base made in $((SECONDS - step)) s"
  fi
  # The settings Debian's own images carry, which a tarball import does not.
  podman import --quiet \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' \
    "$base_tar" "$BASE_IMAGE" >/dev/null
  base_id=$(podman image inspect --format '{{.Id}}' "$BASE_IMAGE")
  echo "$base_id" >"$base_id_file"
  log "imported the base as $BASE_IMAGE"
fi

# ---------------------------------------------------------------------------------------------
# The binaries: cargo says where it put each executable (whatever the target directory and
# profile), and a build that is up to date costs a few seconds, so staged binaries are never
# older than the sources.
BINARIES=$(sed -n 's/^ARG BINARIES="\(.*\)"$/\1/p' "$ROOT/Dockerfile")
[[ -n $BINARIES ]] || die "the Dockerfile has no ARG BINARIES=\"...\" line"
step=$SECONDS
log "cargo build --profile $PROFILE --workspace --bins"
executables=$(cd "$ROOT" && cargo build --locked --profile "$PROFILE" --workspace --bins \
  --message-format=json-render-diagnostics \
  | python3 -c '
import json, sys
for line in sys.stdin:
    message = json.loads(line)
    if message.get("reason") == "compiler-artifact" and message.get("executable"):
        print(message["target"]["name"], message["executable"])
')
log "binaries up to date in $((SECONDS - step)) s"
rm -rf "$CONTEXT"
mkdir -p "$CONTEXT/bin"
for bin in $BINARIES; do
  path=$(awk -v bin="$bin" '$1 == bin { print $2 }' <<<"$executables")
  [[ -n $path && -x $path ]] || die "cargo built no executable named $bin"
  # Without debug info, as the builder stage does: the release profile keeps line tables of every
  # dependency, 80 MB of ticket-publisher's 100 MB. Symbols stay, so a backtrace still names
  # its functions.
  objcopy --strip-debug "$path" "$CONTEXT/bin/$bin"
done

# ---------------------------------------------------------------------------------------------
# The image. Labels follow the OCI image spec's annotations.
eval "$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps | python3 -c '
import json, sys
packages = {p["name"]: p for p in json.load(sys.stdin)["packages"]}
print("VERSION=" + packages["ticket-publisher"]["version"])
')"
REVISION=$(git -C "$ROOT" rev-parse HEAD)
if [[ -n $(git -C "$ROOT" status --porcelain --untracked-files=no) ]]; then
  REVISION="$REVISION-dirty"
fi
# The clone's own repository when it has a URL; else (no remote, or a clone of a local folder,
# as CI's is) the Dockerfile's default for SOURCE: a path on some machine is no source to link.
SOURCE=$(sed -n 's/^ARG SOURCE=//p' "$ROOT/Dockerfile")
if origin=$(git -C "$ROOT" remote get-url origin 2>/dev/null) \
    && [[ $origin == https://* || $origin == ssh://* || $origin == *@*:* ]]; then
  SOURCE=$origin
fi
# The labels are also set on the command line: buildah's layer cache (1.28) reuses a LABEL layer
# whose build arguments changed, which left a new image with the previous build's revision.
label_args=(
  --label "org.opencontainers.image.source=$SOURCE"
  --label "org.opencontainers.image.revision=$REVISION"
  --label "org.opencontainers.image.version=$VERSION"
)
if [[ -z $IMAGE ]]; then
  IMAGE="localhost/ticket-triage:$VERSION"
  [[ $PROFILE == release ]] || IMAGE="$IMAGE-$PROFILE"
fi

previous_id=$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
step=$SECONDS
log "podman build $IMAGE (binaries: prebuilt, $PROFILE; base: $BASE_IMAGE)"
# Host network for the runtime stage's apt-get, which reaches Debian's archive as the host does.
podman build --quiet --pull=never --network=host \
  --file "$ROOT/Dockerfile" \
  --build-arg BINARIES_FROM=prebuilt \
  --build-arg RUNTIME_IMAGE="$BASE_IMAGE" \
  --build-arg VERSION="$VERSION" \
  --build-arg REVISION="$REVISION" \
  --build-arg SOURCE="$SOURCE" \
  "${label_args[@]}" \
  --tag "$IMAGE" \
  "$CONTEXT" >"$CACHE/build.log" 2>&1 || { cat "$CACHE/build.log" >&2; die "podman build failed"; }
log "built in $((SECONDS - step)) s"
# The image this one replaced under the same name, unless something still uses it. (Each build
# also leaves its binaries' stage untagged; `podman image prune` removes those, and other
# users' images too, so it is left to whoever owns the machine.)
if [[ -n $previous_id && $previous_id != "$(podman image inspect --format '{{.Id}}' "$IMAGE")" ]]; then
  podman rmi "$previous_id" >/dev/null 2>&1 || true
fi

read -r size layers < <(podman image inspect --format '{{.Size}} {{len .RootFS.Layers}}' "$IMAGE")
log "$IMAGE: $((size / 1000000)) MB in $layers layers, revision $REVISION ($((SECONDS - started)) s in all)"
