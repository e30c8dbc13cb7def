#!/usr/bin/env bash
# A real Kubernetes control plane on loopback, without Docker or a kubelet: etcd,
# kube-apiserver and kube-controller-manager v1.37.2, built from the Go module proxy
# (deploy/k8s/controlplane) and started as local processes. `make k8s-test` uses it to install
# the Helm chart into a real API server and watch the HPAs scale on real Kafka lag.
#
# Usage: deploy/k8s/control-plane.sh build   build the binaries into .local/k8s/bin (cached)
#        deploy/k8s/control-plane.sh up      build, make certificates, start, wait until ready
#        deploy/k8s/control-plane.sh down    stop what `up` started (by the pids it recorded)
#        deploy/k8s/control-plane.sh env     print the variables the tests read
#
# Pods stay Pending (there is no kubelet), but everything the API server and the controllers do
# is real: admission, validation, RBAC, the aggregator, the HPA and Deployment controllers.
# The binaries are rebuilt only when the module files change; a cold build takes about 11 minutes
# on 2 cores and each link peaks at about 2.6 GB.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
MODULE="$ROOT/deploy/k8s/controlplane"
STATE="$ROOT/.local/k8s"
BIN="$STATE/bin"
PKI="$STATE/pki"
RUN="$STATE/run"
LOGS="$STATE/logs"
# Ports away from the usual 6443/2379 so a developer's own cluster or etcd is left alone.
APISERVER_PORT="${K8S_TEST_APISERVER_PORT:-16443}"
ETCD_CLIENT_PORT="${K8S_TEST_ETCD_PORT:-12379}"
ETCD_PEER_PORT="$((ETCD_CLIENT_PORT + 1))"
CONTROLLER_MANAGER_PORT="${K8S_TEST_CONTROLLER_MANAGER_PORT:-10257}"

say() { printf 'control-plane: %s\n' "$*"; }

if ! command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then
  export PATH="/usr/local/go/bin:$PATH"
fi

# The stamp names everything that decides the binaries: the module files and the Go toolchain.
build_stamp() {
  { cat "$MODULE/go.mod" "$MODULE/go.sum" "$MODULE/etcd/main.go"; go version; } | sha256sum | cut -d' ' -f1
}

build() {
  command -v go >/dev/null 2>&1 || { say "go is needed to build the control plane"; exit 1; }
  mkdir -p "$BIN"
  local stamp
  stamp="$(build_stamp)"
  if [ "$(cat "$BIN/.stamp" 2>/dev/null)" = "$stamp" ] \
      && [ -x "$BIN/etcd" ] && [ -x "$BIN/kube-apiserver" ] && [ -x "$BIN/kube-controller-manager" ]; then
    say "binaries are up to date in .local/k8s/bin"
    return
  fi
  say "building etcd, kube-apiserver and kube-controller-manager v1.37.2 (about 11 minutes cold on 2 cores)"
  local started=$SECONDS
  # Two packages at a time by default (K8S_TEST_GO_BUILD_JOBS): the machine is shared with other builds.
  (cd "$MODULE" && CGO_ENABLED=0 GOFLAGS=-mod=mod nice -n 10 go build -p "${K8S_TEST_GO_BUILD_JOBS:-2}" \
    -trimpath -ldflags '-s -w' -o "$BIN/" \
    ./etcd k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager)
  echo "$stamp" >"$BIN/.stamp"
  say "built in $((SECONDS - started)) s"
}

# openssl: a cluster CA (serving, admin client, controller-manager client), a front-proxy CA
# (the aggregator's client certificate, checked by extension API servers) and the
# service-account signing key. Made once per state directory.
certs() {
  mkdir -p "$PKI"
  [ -f "$PKI/.done" ] && return
  say "creating certificates in .local/k8s/pki"
  local days=3650
  cd "$PKI"
  openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days "$days" \
    -subj "/CN=k8s-test-ca" 2>/dev/null
  openssl req -x509 -newkey rsa:2048 -nodes -keyout front-proxy-ca.key -out front-proxy-ca.crt \
    -days "$days" -subj "/CN=k8s-test-front-proxy-ca" 2>/dev/null
  # name, CA, subject, extensions
  issue() {
    openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "$3" 2>/dev/null
    printf '%s\n' "$4" >"$1.ext"
    openssl x509 -req -in "$1.csr" -CA "$2.crt" -CAkey "$2.key" -CAcreateserial -out "$1.crt" \
      -days "$days" -extfile "$1.ext" 2>/dev/null
    rm -f "$1.csr" "$1.ext"
  }
  issue apiserver ca "/CN=kube-apiserver" \
    "$(printf 'subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment')"
  issue admin ca "/O=system:masters/CN=k8s-test-admin" \
    "$(printf 'extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature,keyEncipherment')"
  issue controller-manager ca "/CN=system:kube-controller-manager" \
    "$(printf 'extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature,keyEncipherment')"
  issue front-proxy-client front-proxy-ca "/CN=front-proxy-client" \
    "$(printf 'extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature,keyEncipherment')"
  # Signed by the front-proxy CA but not an allowed request-header name: the tests show that
  # lag-autoscaler refuses it.
  issue front-proxy-stranger front-proxy-ca "/CN=not-the-aggregator" \
    "$(printf 'extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature,keyEncipherment')"
  openssl genrsa -out sa.key 2048 2>/dev/null
  openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  chmod 600 ./*.key
  touch .done
  cd - >/dev/null
}

kubeconfig() { # user, cert name, output
  cat >"$3" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: k8s-test
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    certificate-authority: $PKI/ca.crt
users:
- name: $1
  user:
    client-certificate: $PKI/$2.crt
    client-key: $PKI/$2.key
contexts:
- name: k8s-test
  context: {cluster: k8s-test, user: $1}
current-context: k8s-test
EOF
}

# curl rather than kubectl, so that nothing beyond curl and openssl is needed.
admin_get() {
  curl -fsS --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" \
    "https://127.0.0.1:$APISERVER_PORT$1"
}

running() { [ -f "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }

start() { # name, command...
  local name="$1"; shift
  if running "$name"; then return; fi
  nohup "$@" >"$LOGS/$name.log" 2>&1 &
  echo $! >"$RUN/$name.pid"
}

wait_for() { # what, seconds, command...
  local what="$1" limit="$2" deadline=$((SECONDS + $2)); shift 2
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      say "$what not ready after ${limit}s; last log lines:"; tail -n 20 "$LOGS"/*.log; exit 1
    fi
    sleep 0.5
  done
}

up() {
  build
  certs
  mkdir -p "$RUN" "$LOGS"
  kubeconfig admin admin "$STATE/admin.kubeconfig"
  kubeconfig system:kube-controller-manager controller-manager "$STATE/controller-manager.kubeconfig"
  local started=$SECONDS
  # A fresh store every time: the tests' objects from an earlier run must not leak into this one.
  if ! running etcd; then rm -rf "$STATE/etcd-data"; fi
  start etcd "$BIN/etcd" --data-dir "$STATE/etcd-data" \
    --listen-client-url "http://127.0.0.1:$ETCD_CLIENT_PORT" --listen-peer-url "http://127.0.0.1:$ETCD_PEER_PORT"
  wait_for etcd 30 curl -fsS "http://127.0.0.1:$ETCD_CLIENT_PORT/health"
  # --advertise-address=127.0.0.1 needs --endpoint-reconciler-type=none (the reconciler refuses
  # loopback endpoints). --enable-aggregator-routing=false sends APIService traffic to the
  # Service (an ExternalName to localhost here), not to endpoints that cannot hold 127.0.0.1.
  start kube-apiserver "$BIN/kube-apiserver" \
    --bind-address=127.0.0.1 --secure-port="$APISERVER_PORT" --advertise-address=127.0.0.1 \
    --endpoint-reconciler-type=none \
    --etcd-servers="http://127.0.0.1:$ETCD_CLIENT_PORT" \
    --service-cluster-ip-range=10.0.0.0/24 \
    --authorization-mode=Node,RBAC \
    --client-ca-file="$PKI/ca.crt" \
    --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
    --service-account-issuer=https://kubernetes.default.svc \
    --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
    --requestheader-client-ca-file="$PKI/front-proxy-ca.crt" \
    --requestheader-allowed-names=front-proxy-client \
    --requestheader-username-headers=X-Remote-User \
    --requestheader-group-headers=X-Remote-Group \
    --requestheader-extra-headers-prefix=X-Remote-Extra- \
    --proxy-client-cert-file="$PKI/front-proxy-client.crt" \
    --proxy-client-key-file="$PKI/front-proxy-client.key" \
    --enable-aggregator-routing=false \
    --anonymous-auth=true
  wait_for kube-apiserver 120 admin_get /readyz
  start kube-controller-manager "$BIN/kube-controller-manager" \
    --kubeconfig="$STATE/controller-manager.kubeconfig" \
    --authentication-kubeconfig="$STATE/controller-manager.kubeconfig" \
    --authorization-kubeconfig="$STATE/controller-manager.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="$CONTROLLER_MANAGER_PORT" \
    --controllers='*' --leader-elect=false --use-service-account-credentials=true \
    --service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
    --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
    --horizontal-pod-autoscaler-sync-period=5s
  wait_for kube-controller-manager 60 curl -fsSk "https://127.0.0.1:$CONTROLLER_MANAGER_PORT/healthz"
  # The default namespace's ServiceAccount is made by a controller; namespaces made by the tests
  # need the same, so this also proves the controllers are working.
  wait_for "default ServiceAccount" 60 admin_get /api/v1/namespaces/default/serviceaccounts/default
  say "up in $((SECONDS - started)) s: https://127.0.0.1:$APISERVER_PORT (kubeconfig .local/k8s/admin.kubeconfig)"
}

down() {
  for name in kube-controller-manager kube-apiserver etcd; do
    if running "$name"; then
      kill "$(cat "$RUN/$name.pid")" 2>/dev/null || true
      say "stopped $name"
    fi
    rm -f "$RUN/$name.pid"
  done
}

env_vars() {
  echo "K8S_TEST_KUBECONFIG=$STATE/admin.kubeconfig"
  echo "K8S_TEST_PKI=$PKI"
  echo "K8S_TEST_APISERVER=https://127.0.0.1:$APISERVER_PORT"
}

case "${1:-}" in
  build) build ;;
  up) up ;;
  down) down ;;
  env) env_vars ;;
  *) echo "usage: $0 build|up|down|env" >&2; exit 2 ;;
esac
