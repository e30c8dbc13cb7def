#!/usr/bin/env bash
# A second, TLS-only stack beside the plain one of deploy/stack.sh, for the TLS tests: Apache Kafka
# with a SASL_SSL (SCRAM-SHA-512) listener and an SSL listener that requires client certificates,
# Redis with TLS only, and PostgreSQL with ssl=on that accepts the test role over TLS only.
#
#   deploy/tls-stack.sh up      fresh certificates, fresh data, start all three, write .local/tls-stack.env
#   deploy/tls-stack.sh down    stop them
#   deploy/tls-stack.sh status  one line per component
#
# Every `up` on a stopped stack starts from nothing: a new CA (and a second, unrelated "wrong" CA
# for the tests that must be refused), server certificates for 127.0.0.1 and localhost, a client
# certificate, a new SCRAM password, new data folders. Everything lives under .local/tls/
# (git-ignored); ports come from TLS_KAFKA_SASL_PORT, TLS_KAFKA_MTLS_PORT, TLS_KAFKA_INTERNAL_PORT,
# TLS_KAFKA_CONTROLLER_PORT, TLS_REDIS_PORT and TLS_POSTGRES_PORT, so it never touches the plain
# stack's 9092/6379/5432. It reuses the Kafka jars deploy/stack.sh resolved (`stack.sh up` first).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TLS_DIR="$ROOT/.local/tls"
CERTS="$TLS_DIR/certs"
SASL_PORT=${TLS_KAFKA_SASL_PORT:-19292}
MTLS_PORT=${TLS_KAFKA_MTLS_PORT:-19293}
INTERNAL_PORT=${TLS_KAFKA_INTERNAL_PORT:-19294}
CONTROLLER_PORT=${TLS_KAFKA_CONTROLLER_PORT:-19295}
REDIS_PORT=${TLS_REDIS_PORT:-16392}
POSTGRES_PORT=${TLS_POSTGRES_PORT:-15452}
KAFKA_VERSION=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$ROOT/deploy/kafka/pom.xml")
KAFKA_LIBS="$ROOT/.local/kafka/libs-$KAFKA_VERSION"
KAFKA_DIR="$TLS_DIR/kafka"
REDIS_DIR="$TLS_DIR/redis"
# Only for the local test broker's keystore file; it guards nothing outside .local/.
KEYSTORE_PASSWORD=local-test-keystore
SCRAM_USER=triage

log() { printf 'tls-stack: %s\n' "$*" >&2; }
die() { printf 'tls-stack: error: %s\n' "$*" >&2; exit 1; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for() {
  local what=$1 seconds=$2; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS >= deadline)) && return 1
    sleep 0.3
  done
  log "$what"
}

apt_install() {
  log "installing $* with apt-get"
  local sudo=()
  [[ $(id -u) -eq 0 ]] || sudo=(sudo)
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# ---------------------------------------------------------------------------------------------
# Certificates

tls_certs() {
  command -v openssl >/dev/null || apt_install openssl
  rm -rf "$CERTS"
  mkdir -p "$CERTS"
  local ca
  for ca in ca wrong-ca; do
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=triage local $ca" \
      -keyout "$CERTS/$ca.key" -out "$CERTS/$ca.crt" 2>/dev/null
  done
  tls_issue server "/CN=localhost" "subjectAltName=IP:127.0.0.1,DNS:localhost"
  tls_issue client "/CN=$SCRAM_USER" "extendedKeyUsage=clientAuth"
  openssl pkcs12 -export -in "$CERTS/server.crt" -inkey "$CERTS/server.key" \
    -out "$CERTS/server.p12" -passout "pass:$KEYSTORE_PASSWORD"
  # Random, so that nothing in the repository could be a working password.
  openssl rand -hex 16 | tr -d '\n' >"$CERTS/kafka-password"
  openssl rand -hex 16 | tr -d '\n' >"$CERTS/postgres-password"
  chmod 600 "$CERTS"/*.key "$CERTS"/*-password
  log "fresh CA, wrong CA, server and client certificates in $CERTS"
}

# tls_issue NAME SUBJECT EXTENSION: a key and a certificate signed by the test CA.
tls_issue() {
  local name=$1 subject=$2 extension=$3
  openssl req -newkey rsa:2048 -nodes -subj "$subject" \
    -keyout "$CERTS/$name.key" -out "$CERTS/$name.csr" 2>/dev/null
  openssl x509 -req -in "$CERTS/$name.csr" -CA "$CERTS/ca.crt" -CAkey "$CERTS/ca.key" \
    -CAcreateserial -days 2 -extfile <(printf '%s\n' "$extension") -out "$CERTS/$name.crt" 2>/dev/null
  rm -f "$CERTS/$name.csr"
}

# ---------------------------------------------------------------------------------------------
# Kafka: SASL_SSL with SCRAM-SHA-512, SSL with required client certificates. Broker-to-broker and
# controller traffic stays on loopback plaintext listeners the clients are never given.

tls_kafka_java() {
  java -Djava.awt.headless=true "-Dlog4j2.configurationFile=$KAFKA_DIR/log4j2.properties" \
    -cp "$KAFKA_LIBS/*" "$@"
}

tls_kafka_up() {
  [[ -f "$KAFKA_LIBS/.complete" ]] || die "Kafka jars missing: run deploy/stack.sh up first"
  rm -rf "$KAFKA_DIR"
  mkdir -p "$KAFKA_DIR/data" "$KAFKA_DIR/logs"
  cat >"$KAFKA_DIR/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$CONTROLLER_PORT
listeners=SASL_SSL://127.0.0.1:$SASL_PORT,SSL://127.0.0.1:$MTLS_PORT,INTERNAL://127.0.0.1:$INTERNAL_PORT,CONTROLLER://127.0.0.1:$CONTROLLER_PORT
advertised.listeners=SASL_SSL://127.0.0.1:$SASL_PORT,SSL://127.0.0.1:$MTLS_PORT,INTERNAL://127.0.0.1:$INTERNAL_PORT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,INTERNAL:PLAINTEXT,SASL_SSL:SASL_SSL,SSL:SSL
inter.broker.listener.name=INTERNAL
controller.listener.names=CONTROLLER
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
ssl.keystore.type=PKCS12
ssl.keystore.location=$CERTS/server.p12
ssl.keystore.password=$KEYSTORE_PASSWORD
ssl.truststore.type=PEM
ssl.truststore.location=$CERTS/ca.crt
listener.name.ssl.ssl.client.auth=required
log.dirs=$KAFKA_DIR/data
num.partitions=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=2
group.initial.rebalance.delay.ms=0
EOF
  cat >"$KAFKA_DIR/log4j2.properties" <<EOF
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = $KAFKA_DIR/logs/server.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = warn
rootLogger.appenderRef.file.ref = file
EOF
  local cluster_id
  cluster_id=$(tls_kafka_java kafka.tools.StorageTool random-uuid)
  # SCRAM credentials exist before the first start: the broker has no other user to create them.
  tls_kafka_java kafka.tools.StorageTool format -t "$cluster_id" -c "$KAFKA_DIR/server.properties" \
    --add-scram "SCRAM-SHA-512=[name=$SCRAM_USER,password=$(cat "$CERTS/kafka-password")]" \
    >"$KAFKA_DIR/logs/format.log" 2>&1 || die "kafka storage format failed; see $KAFKA_DIR/logs/format.log"
  log "starting Kafka (SASL_SSL 127.0.0.1:$SASL_PORT, mTLS 127.0.0.1:$MTLS_PORT)"
  (exec nohup java -Xms256m -Xmx512m -Djava.awt.headless=true \
    "-Dlog4j2.configurationFile=$KAFKA_DIR/log4j2.properties" -cp "$KAFKA_LIBS/*" \
    kafka.Kafka "$KAFKA_DIR/server.properties" >"$KAFKA_DIR/logs/stdout.log" 2>&1) &
  echo $! >"$KAFKA_DIR/kafka.pid"
}

tls_kafka_ready() {
  port_open "$SASL_PORT" && port_open "$MTLS_PORT" || return 1
  tls_kafka_java org.apache.kafka.tools.TopicCommand --bootstrap-server "127.0.0.1:$INTERNAL_PORT" --list
}

tls_kafka_down() {
  local pid_file="$KAFKA_DIR/kafka.pid"
  pid_alive "$pid_file" || return 0
  log "stopping Kafka"
  kill "$(cat "$pid_file")" 2>/dev/null || true
  wait_for "kafka stopped" 30 bash -c "! kill -0 $(cat "$pid_file")" || kill -9 "$(cat "$pid_file")" 2>/dev/null || true
  rm -f "$pid_file"
}

# ---------------------------------------------------------------------------------------------
# Redis: TLS only (`--port 0`). Client certificates are optional, so rediss:// with the CA alone
# connects and a client of the wrong CA is refused by its own verification.

tls_redis_up() {
  command -v redis-server >/dev/null || apt_install redis-server
  rm -rf "$REDIS_DIR"
  mkdir -p "$REDIS_DIR"
  log "starting Redis (TLS 127.0.0.1:$REDIS_PORT)"
  redis-server --bind 127.0.0.1 --port 0 --tls-port "$REDIS_PORT" \
    --tls-cert-file "$CERTS/server.crt" --tls-key-file "$CERTS/server.key" \
    --tls-ca-cert-file "$CERTS/ca.crt" --tls-auth-clients optional \
    --daemonize yes --pidfile "$REDIS_DIR/redis.pid" --dir "$REDIS_DIR" \
    --logfile "$REDIS_DIR/redis.log" --save "" --appendonly no --protected-mode no \
    || die "redis-server refused the TLS options (built without TLS?); see $REDIS_DIR/redis.log"
}

tls_redis_ready() {
  redis-cli --tls --cacert "$CERTS/ca.crt" -h 127.0.0.1 -p "$REDIS_PORT" ping | grep -q PONG
}

tls_redis_down() {
  pid_alive "$REDIS_DIR/redis.pid" || return 0
  log "stopping Redis"
  local pid
  pid=$(cat "$REDIS_DIR/redis.pid")
  kill "$pid" 2>/dev/null || true
  wait_for "redis stopped" 10 bash -c "! kill -0 $pid" || true
}

# ---------------------------------------------------------------------------------------------
# PostgreSQL: ssl=on; the `triage` role may connect only over TLS and with its password.

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

# As root PostgreSQL runs as `postgres`, which must reach its data folder (see deploy/stack.sh).
tls_pg_dir() {
  if [[ $(id -u) -eq 0 ]] && id postgres >/dev/null 2>&1 && ! runuser -u postgres -- test -x "$ROOT"; then
    echo "/var/tmp/triage-tls-stack-$(printf %s "$ROOT" | md5sum | cut -c1-8)/postgres"
  else
    echo "$TLS_DIR/postgres"
  fi
}

as_pg() { if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }

tls_pg_up() {
  [[ -n $(pg_bin) ]] || apt_install postgresql
  local bin dir
  bin=$(pg_bin)
  dir=$(tls_pg_dir)
  rm -rf "$dir"
  mkdir -p "$dir"
  cp "$CERTS/server.crt" "$CERTS/server.key" "$dir/"
  chmod 600 "$dir/server.key"
  printf '%s' "$(cat "$CERTS/postgres-password")" >"$dir/pwfile"
  if [[ $(id -u) -eq 0 ]]; then chown -R postgres:postgres "$dir"; fi
  as_pg "$bin/initdb" -D "$dir/data" -U postgres --auth-local=trust --auth-host=reject -E UTF8 \
    >"$dir/initdb.log" 2>&1 || die "initdb failed; see $dir/initdb.log"
  cat >"$dir/data/pg_hba.conf" <<EOF
local     all  postgres                  trust
hostssl   all  triage    127.0.0.1/32    scram-sha-256
host      all  all       127.0.0.1/32    reject
EOF
  log "starting PostgreSQL (TLS 127.0.0.1:$POSTGRES_PORT)"
  as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 start \
    -o "-c listen_addresses=127.0.0.1 -p $POSTGRES_PORT -k $dir -c ssl=on -c ssl_cert_file=$dir/server.crt -c ssl_key_file=$dir/server.key" \
    >/dev/null || die "PostgreSQL did not start; see $dir/postgres.log"
  as_pg "$bin/psql" -h "$dir" -p "$POSTGRES_PORT" -U postgres -qv ON_ERROR_STOP=1 \
    -c "create role triage login createdb password '$(cat "$CERTS/postgres-password")'" \
    -c "create database triage owner triage" >/dev/null
}

tls_pg_down() {
  local dir
  dir=$(tls_pg_dir)
  [[ -f "$dir/data/postmaster.pid" ]] || return 0
  log "stopping PostgreSQL"
  as_pg "$(pg_bin)/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null || true
}

# ---------------------------------------------------------------------------------------------

tls_write_env() {
  cat >"$TLS_DIR/tls-stack.env" <<EOF
TLS_CERTS=$CERTS
TLS_KAFKA_SASL_BOOTSTRAP=127.0.0.1:$SASL_PORT
TLS_KAFKA_MTLS_BOOTSTRAP=127.0.0.1:$MTLS_PORT
TLS_KAFKA_SASL_USERNAME=$SCRAM_USER
TLS_REDIS_URL=rediss://127.0.0.1:$REDIS_PORT
TLS_DATABASE_URL=postgres://triage@127.0.0.1:$POSTGRES_PORT/triage
EOF
  log "endpoints written to $TLS_DIR/tls-stack.env"
}

tls_running() {
  port_open "$SASL_PORT" && port_open "$REDIS_PORT" && port_open "$POSTGRES_PORT" \
    && [[ -f "$TLS_DIR/tls-stack.env" ]]
}

tls_down() {
  tls_kafka_down
  tls_redis_down
  tls_pg_down
  rm -f "$TLS_DIR/tls-stack.env"
}

case "${1:-}" in
  up)
    if tls_running; then
      log "already running"
      exit 0
    fi
    tls_down
    for port in "$SASL_PORT" "$MTLS_PORT" "$INTERNAL_PORT" "$CONTROLLER_PORT" "$REDIS_PORT" "$POSTGRES_PORT"; do
      port_open "$port" && die "port $port is taken by something this script did not start"
    done
    mkdir -p "$TLS_DIR"
    tls_certs
    tls_kafka_up
    tls_redis_up
    tls_pg_up
    wait_for "redis is up" 20 tls_redis_ready || die "Redis did not start; see $REDIS_DIR/redis.log"
    wait_for "kafka is up" 120 tls_kafka_ready || die "Kafka did not start; see $KAFKA_DIR/logs/"
    tls_write_env
    ;;
  down) tls_down ;;
  status)
    printf 'kafka     SASL_SSL 127.0.0.1:%s mTLS 127.0.0.1:%s  %s\n' "$SASL_PORT" "$MTLS_PORT" \
      "$(port_open "$SASL_PORT" && echo up || echo down)"
    printf 'redis     rediss 127.0.0.1:%s  %s\n' "$REDIS_PORT" "$(port_open "$REDIS_PORT" && echo up || echo down)"
    printf 'postgres  ssl 127.0.0.1:%s  %s\n' "$POSTGRES_PORT" "$(port_open "$POSTGRES_PORT" && echo up || echo down)"
    ;;
  *) die "usage: $0 up|down|status" ;;
esac
