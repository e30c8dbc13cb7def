#!/usr/bin/env bash
# Checks the deployment artefacts offline: installs helm (pinned, from the Go module proxy) and
# builds kubevalidate into .local/bin when missing, then for every value set under
# helm/ticket-triage/ci/: `helm lint --strict`, `helm template`, and strict decoding of every
# rendered object into the typed API of Kubernetes 1.33 (k8s.io/api v0.33, deploy/kubevalidate).
# Finally it checks deploy/docker-compose.yml's structure, and the Dockerfile with hadolint when
# it is installed. The rendered manifests stay in .local/helm-rendered/ for reading.
#
# Usage: deploy/helm-check.sh            (make helm-check; make test runs it before cargo test)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$ROOT/.local/bin"
CHART="$ROOT/helm/ticket-triage"
RENDERED="$ROOT/.local/helm-rendered"
HELM_VERSION="${HELM_VERSION:-v3.22.0}"
# The Kubernetes version the chart is rendered and validated for; kubevalidate's k8s.io/api
# (deploy/kubevalidate/go.mod) is the same minor version.
KUBE_VERSION="1.33.0"

say() { printf 'helm-check: %s\n' "$*"; }

mkdir -p "$BIN" "$RENDERED"
if ! command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then
  export PATH="/usr/local/go/bin:$PATH"
fi

# A go-installed helm reports only its minor version, so the exact one is kept beside it.
if [ ! -x "$BIN/helm" ] || [ "$(cat "$BIN/.helm-version" 2>/dev/null)" != "$HELM_VERSION" ]; then
  command -v go >/dev/null 2>&1 || { say "go is needed to install helm (go install from the module proxy)"; exit 1; }
  say "installing helm $HELM_VERSION into .local/bin (go install, a few minutes on 2 cores)"
  GOBIN="$BIN" GOFLAGS=-mod=mod go install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  echo "$HELM_VERSION" >"$BIN/.helm-version"
fi

KUBEVALIDATE_SRC="$ROOT/deploy/kubevalidate"
if [ ! -x "$BIN/kubevalidate" ] || [ -n "$(find "$KUBEVALIDATE_SRC" -newer "$BIN/kubevalidate" -type f)" ]; then
  command -v go >/dev/null 2>&1 || { say "go is needed to build deploy/kubevalidate"; exit 1; }
  say "building deploy/kubevalidate"
  (cd "$KUBEVALIDATE_SRC" && go build -o "$BIN/kubevalidate" .)
fi

# NOTES.txt is rendered only by `helm install`, which wants a cluster; a copy of the chart that
# renders it as an ordinary template lets every value set's NOTES be rendered (and read) here.
NOTES_CHART="$ROOT/.local/helm-notes-chart"
rm -rf "$NOTES_CHART" && cp -r "$CHART" "$NOTES_CHART"
{ echo '{{- define "tt.notesForCheck" -}}'; cat "$CHART/templates/NOTES.txt"; echo '{{- end -}}'; } \
  >"$NOTES_CHART/templates/_notes_check.tpl"
printf 'notes: |\n{{ include "tt.notesForCheck" . | indent 2 }}\n' >"$NOTES_CHART/templates/notes-check.yaml"

failures=0
for values in "$CHART"/ci/*-values.yaml; do
  name="$(basename "$values" -values.yaml)"
  out="$RENDERED/$name.yaml"
  if ! "$BIN/helm" lint --strict "$CHART" --values "$values" --kube-version "$KUBE_VERSION" >"$RENDERED/$name.lint" 2>&1; then
    say "helm lint failed for $name:"; cat "$RENDERED/$name.lint"; failures=$((failures + 1)); continue
  fi
  if ! "$BIN/helm" template triage "$CHART" --namespace triage --values "$values" \
      --kube-version "$KUBE_VERSION" >"$out" 2>"$RENDERED/$name.err"; then
    say "helm template failed for $name:"; cat "$RENDERED/$name.err"; failures=$((failures + 1)); continue
  fi
  if ! result="$("$BIN/kubevalidate" "$out")"; then
    say "$name does not validate against Kubernetes $KUBE_VERSION:"; echo "$result"; failures=$((failures + 1)); continue
  fi
  if ! "$BIN/helm" template triage "$NOTES_CHART" --namespace triage --values "$values" \
      --show-only templates/notes-check.yaml >"$RENDERED/$name.notes" 2>&1; then
    say "NOTES.txt does not render for $name:"; cat "$RENDERED/$name.notes"; failures=$((failures + 1)); continue
  fi
  say "$name: lint ok, $(grep -c '^kind:' "$out") objects rendered, NOTES ok; ${result#kubevalidate: }"
done

# A typo in values must fail at install: values.schema.json refuses unknown keys.
if "$BIN/helm" template triage "$CHART" --kube-version "$KUBE_VERSION" --set inferenceWorker.llm.baseURL=x >/dev/null 2>&1; then
  say "values.schema.json accepted an unknown key"; failures=$((failures + 1))
else
  say "values.schema.json refuses unknown keys"
fi

# docker-compose.yml: no Docker engine (nor compose plugin) here, so its structure is checked
# with PyYAML, or with `docker compose config` where compose exists.
COMPOSE="$ROOT/deploy/docker-compose.yml"
if docker compose version >/dev/null 2>&1; then
  docker compose -f "$COMPOSE" config --quiet && say "docker-compose.yml: docker compose config ok"
elif python3 -c 'import yaml' 2>/dev/null; then
  python3 - "$COMPOSE" <<'PY' || failures=$((failures + 1))
import sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
services = doc["services"]
wanted = {"kafka", "redis", "postgres", "llm-sim", "ticket-publisher", "inference-worker",
          "result-writer", "dlq-alerter", "lag-autoscaler"}
missing = wanted - services.keys()
assert not missing, f"services missing: {sorted(missing)}"
for name, service in services.items():
    assert "image" in service, f"{name}: no image"
    for dependency in service.get("depends_on", {}):
        assert dependency in services, f"{name} depends on unknown {dependency}"
    for key in service.get("environment", {}):
        assert not key.startswith("TRIAGE_") or key == key.upper(), f"{name}: {key}"
print(f"helm-check: docker-compose.yml: {len(services)} services, structure ok (PyYAML)")
PY
else
  say "docker-compose.yml: neither docker compose nor PyYAML available, not checked"
fi

if command -v hadolint >/dev/null 2>&1; then
  hadolint "$ROOT/Dockerfile" && say "Dockerfile: hadolint ok"
else
  say "Dockerfile: hadolint not installed, not linted"
fi

if [ "$failures" -gt 0 ]; then
  say "$failures check(s) failed"; exit 1
fi
say "all value sets lint, render and validate against Kubernetes $KUBE_VERSION"
