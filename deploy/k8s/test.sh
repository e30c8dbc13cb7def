#!/usr/bin/env bash
# make k8s-test: the Helm chart in a real kube-apiserver with the real lag-autoscaler on the real
# broker (services/lag-autoscaler/tests/k8s.rs). Starts the loopback control plane
# (control-plane.sh, which builds it on first use), runs the tests one at a time (the
# APIService they install is one per cluster), then stops the control plane again.
# Needs the local stack (make stack-up) and helm (make helm-check); make k8s-test runs both.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CARGO="${CARGO:-cargo}"
started=$SECONDS

"$ROOT/deploy/k8s/control-plane.sh" up
trap '"$ROOT/deploy/k8s/control-plane.sh" down' EXIT
set -a
eval "$("$ROOT/deploy/k8s/control-plane.sh" env)"
set +a
cd "$ROOT"
"$CARGO" test -p lag-autoscaler --test k8s -- --test-threads=1 --nocapture
printf 'k8s-test: passed in %d s (control plane start included)\n' "$((SECONDS - started))"
