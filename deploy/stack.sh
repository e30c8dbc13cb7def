#!/usr/bin/env bash
# The local stack: Apache Kafka (KRaft, combined mode, one node), Redis and PostgreSQL on loopback.
#
#   deploy/stack.sh up                 install what is missing, start what is down, wait, write .local/stack.env
#   deploy/stack.sh down               stop everything this script started
#   deploy/stack.sh status             one line per component
#   deploy/stack.sh restart COMPONENT  kafka | redis | postgres (used by the chaos suite)
#   deploy/stack.sh kill COMPONENT     kill -9, no clean shutdown
#
# Idempotent: `up` on a running stack only checks it and rewrites the env file. Everything lives
# under .local/ (git-ignored). Ports come from KAFKA_PORT, KAFKA_CONTROLLER_PORT, REDIS_PORT and
# POSTGRES_PORT when set.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STACK_DIR="$ROOT/.local"
KAFKA_PORT=${KAFKA_PORT:-9092}
KAFKA_CONTROLLER_PORT=${KAFKA_CONTROLLER_PORT:-9093}
REDIS_PORT=${REDIS_PORT:-6379}
POSTGRES_PORT=${POSTGRES_PORT:-5432}
KAFKA_VERSION=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$ROOT/deploy/kafka/pom.xml")
KAFKA_HEAP=${KAFKA_HEAP:-1g}

log() { printf 'stack: %s\n' "$*" >&2; }
die() { printf 'stack: error: %s\n' "$*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_for STATE SECONDS COMMAND...: polls COMMAND until it succeeds or the deadline passes, then
# logs STATE ("kafka is up").
wait_for() {
  local what=$1 seconds=$2; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      return 1
    fi
    sleep 0.3
  done
  log "$what"
}

as_root_or_sudo() {
  if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

apt_install() {
  log "installing $* with apt-get"
  as_root_or_sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root_or_sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# ---------------------------------------------------------------------------------------------
# Kafka

KAFKA_DIR="$STACK_DIR/kafka"
KAFKA_LIBS="$KAFKA_DIR/libs-$KAFKA_VERSION"
KAFKA_PID="$KAFKA_DIR/kafka.pid"

kafka_install() {
  [[ -f "$KAFKA_LIBS/.complete" ]] && return
  command -v java >/dev/null || die "java (17+) is required for the Kafka broker"
  command -v mvn >/dev/null || apt_install maven
  log "resolving Apache Kafka $KAFKA_VERSION from Maven Central"
  mkdir -p "$KAFKA_LIBS"
  mvn -q -B -f "$ROOT/deploy/kafka/pom.xml" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$KAFKA_LIBS" >"$KAFKA_DIR/maven.log" 2>&1 \
    || die "maven could not resolve Kafka; see $KAFKA_DIR/maven.log"
  touch "$KAFKA_LIBS/.complete"
}

# ZGC, not G1: with G1 the broker stopped for 20-40 ms young collections every few seconds
# (GC log under the pipeline bench), and every ticket in flight then waited; those pauses were
# the pipeline's p99. ZGC's pauses stay under a millisecond. A fixed heap (Xms = Xmx) avoids
# resizing. KAFKA_GC_LOG=FILE writes the broker's GC log there.
# A JVM without ZGC falls back to G1 with short pause goals.
kafka_broker_jvm_opts() {
  local gc=(-XX:+UseZGC)
  java -XX:+UseZGC -version >/dev/null 2>&1 || gc=(-XX:+UseG1GC -XX:MaxGCPauseMillis=20)
  KAFKA_BROKER_JVM_OPTS=("-Xms$KAFKA_HEAP" "-Xmx$KAFKA_HEAP" "${gc[@]}"
    ${KAFKA_GC_LOG:+"-Xlog:gc:file=$KAFKA_GC_LOG"})
}
# The command-line tools (storage format, topic listing) run briefly: a small default heap.
KAFKA_JVM_OPTS=(-Djava.awt.headless=true
  "-Dlog4j2.configurationFile=$KAFKA_DIR/log4j2.properties" "-Dkafka.logs.dir=$KAFKA_DIR/logs")

kafka_java() { java "${KAFKA_JVM_OPTS[@]}" -cp "$KAFKA_LIBS/*" "$@"; }

kafka_configure() {
  mkdir -p "$KAFKA_DIR/data" "$KAFKA_DIR/logs"
  cat >"$KAFKA_DIR/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$KAFKA_DIR/data
num.partitions=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
group.initial.rebalance.delay.ms=0
delete.topic.enable=true
log.retention.hours=24
log.segment.bytes=16777216
EOF
  cat >"$KAFKA_DIR/log4j2.properties" <<EOF
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = $KAFKA_DIR/logs/server.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = warn
logger.apache.name = org.apache.kafka
logger.apache.level = warn
# Start and shutdown lines, so a broker that went away says when and how.
logger.raftserver.name = kafka.server.KafkaRaftServer
logger.raftserver.level = info
logger.brokerserver.name = kafka.server.BrokerServer
logger.brokerserver.level = info
logger.kafkamain.name = kafka.Kafka$
logger.kafkamain.level = info
EOF
  if [[ ! -f "$KAFKA_DIR/data/meta.properties" ]]; then
    local cluster_id
    cluster_id=$(kafka_java kafka.tools.StorageTool random-uuid)
    log "formatting Kafka storage (cluster $cluster_id)"
    kafka_java kafka.tools.StorageTool format -t "$cluster_id" -c "$KAFKA_DIR/server.properties" \
      >"$KAFKA_DIR/logs/format.log" 2>&1 || die "kafka storage format failed; see $KAFKA_DIR/logs/format.log"
  fi
}

kafka_up() {
  if pid_alive "$KAFKA_PID" && port_open "$KAFKA_PORT"; then return; fi
  if port_open "$KAFKA_PORT"; then
    die "port $KAFKA_PORT is taken by something this script did not start"
  fi
  kafka_install
  kafka_configure
  log "starting Kafka $KAFKA_VERSION on 127.0.0.1:$KAFKA_PORT"
  kafka_broker_jvm_opts
  (exec nohup java "${KAFKA_BROKER_JVM_OPTS[@]}" "${KAFKA_JVM_OPTS[@]}" -cp "$KAFKA_LIBS/*" kafka.Kafka "$KAFKA_DIR/server.properties" \
    >"$KAFKA_DIR/logs/stdout.log" 2>&1) &
  echo $! >"$KAFKA_PID"
  # Every test makes its own topics, so a developer's broker collects thousands of partitions,
  # and loading them at start takes minutes: slow is not failed. `wipe` clears them.
  wait_for "kafka is up" 300 kafka_ready \
    || die "Kafka did not start; see $KAFKA_DIR/logs/ (many leftover test topics? deploy/stack.sh wipe)"
}

# The broker answers on its port before its metadata is ready; listing topics proves both.
kafka_ready() {
  port_open "$KAFKA_PORT" || return 1
  kafka_java org.apache.kafka.tools.TopicCommand --bootstrap-server "127.0.0.1:$KAFKA_PORT" --list
}

kafka_down() {
  pid_alive "$KAFKA_PID" || return 0
  log "stopping Kafka"
  kill "$(cat "$KAFKA_PID")" 2>/dev/null || true
  local deadline=$((SECONDS + 30))
  while pid_alive "$KAFKA_PID" && ((SECONDS < deadline)); do sleep 0.3; done
  pid_alive "$KAFKA_PID" && kill -9 "$(cat "$KAFKA_PID")" 2>/dev/null || true
  rm -f "$KAFKA_PID"
}

kafka_kill() { pid_alive "$KAFKA_PID" && kill -9 "$(cat "$KAFKA_PID")" || true; rm -f "$KAFKA_PID"; }

# ---------------------------------------------------------------------------------------------
# Redis

REDIS_DIR="$STACK_DIR/redis"
REDIS_PID="$REDIS_DIR/redis.pid"

redis_up() {
  if port_open "$REDIS_PORT"; then return; fi
  command -v redis-server >/dev/null || apt_install redis-server
  mkdir -p "$REDIS_DIR"
  log "starting Redis on 127.0.0.1:$REDIS_PORT"
  # appendonly: the result cache and leases survive a Redis restart, as they would in production.
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --daemonize yes --pidfile "$REDIS_PID" \
    --dir "$REDIS_DIR" --logfile "$REDIS_DIR/redis.log" --appendonly yes --appendfsync everysec \
    --save "" --protected-mode no
  wait_for "redis is up" 20 redis-cli -p "$REDIS_PORT" ping || die "Redis did not start; see $REDIS_DIR/redis.log"
}

redis_down() {
  port_open "$REDIS_PORT" || return 0
  pid_alive "$REDIS_PID" || return 0
  log "stopping Redis"
  # Read before the shutdown: Redis deletes its pid file on the way out.
  local pid
  pid=$(cat "$REDIS_PID")
  redis-cli -p "$REDIS_PORT" shutdown >/dev/null 2>&1 || true
  wait_for "redis stopped" 10 bash -c "! kill -0 $pid" || true
}

redis_kill() { pid_alive "$REDIS_PID" && kill -9 "$(cat "$REDIS_PID")" || true; }

# ---------------------------------------------------------------------------------------------
# PostgreSQL

PG_DIR="$STACK_DIR/postgres"

# As root, PostgreSQL runs as `postgres`, which must reach its data folder. A checkout under a
# private folder (a home directory with mode 700) is out of its reach; the data then lives under
# /var/tmp, in a folder named after the checkout so that two checkouts never share one.
resolve_pg_dir() {
  if [[ $(id -u) -eq 0 ]] && id postgres >/dev/null 2>&1 && ! runuser -u postgres -- test -x "$ROOT"; then
    PG_DIR="/var/tmp/triage-stack-$(printf %s "$ROOT" | md5sum | cut -c1-8)/postgres"
  fi
}

pg_bin() {
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [[ -n $dir ]] && echo "$dir"
}

# PostgreSQL refuses to run as root; as root we run it as the `postgres` user Debian creates.
as_pg() {
  if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_up() {
  if port_open "$POSTGRES_PORT"; then return; fi
  [[ -n $(pg_bin) ]] || apt_install postgresql
  resolve_pg_dir
  local bin
  bin=$(pg_bin)
  mkdir -p "$PG_DIR"
  if [[ $(id -u) -eq 0 ]]; then chown postgres:postgres "$PG_DIR"; fi
  if ! as_pg test -w "$PG_DIR"; then
    die "$PG_DIR is not writable by the postgres user (a parent folder may not be traversable)"
  fi
  if [[ ! -f "$PG_DIR/data/PG_VERSION" ]]; then
    log "initialising PostgreSQL in $PG_DIR/data"
    as_pg "$bin/initdb" -D "$PG_DIR/data" -U postgres --auth=trust -E UTF8 >"$PG_DIR/initdb.log" 2>&1 \
      || die "initdb failed; see $PG_DIR/initdb.log"
  fi
  log "starting PostgreSQL on 127.0.0.1:$POSTGRES_PORT"
  as_pg "$bin/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/postgres.log" -w -t 60 start \
    -o "-c listen_addresses=127.0.0.1 -p $POSTGRES_PORT -k $PG_DIR -c max_connections=300" >/dev/null \
    || die "PostgreSQL did not start; see $PG_DIR/postgres.log"
  wait_for "postgres is up" 30 "$bin/pg_isready" -h 127.0.0.1 -p "$POSTGRES_PORT" || die "PostgreSQL is not ready"
  if ! psql -h 127.0.0.1 -p "$POSTGRES_PORT" -U postgres -tAc "select 1 from pg_roles where rolname='triage'" | grep -q 1; then
    psql -h 127.0.0.1 -p "$POSTGRES_PORT" -U postgres -qc "create role triage login createdb" >/dev/null
    psql -h 127.0.0.1 -p "$POSTGRES_PORT" -U postgres -qc "create database triage owner triage" >/dev/null
  fi
}

pg_down() {
  resolve_pg_dir
  [[ -f "$PG_DIR/data/postmaster.pid" ]] || return 0
  log "stopping PostgreSQL"
  as_pg "$(pg_bin)/pg_ctl" -D "$PG_DIR/data" -m fast -w stop >/dev/null || true
}

pg_kill() {
  resolve_pg_dir
  [[ -f "$PG_DIR/data/postmaster.pid" ]] || return 0
  as_pg "$(pg_bin)/pg_ctl" -D "$PG_DIR/data" -m immediate -w stop >/dev/null || true
}

# ---------------------------------------------------------------------------------------------

write_env() {
  cat >"$STACK_DIR/stack.env" <<EOF
KAFKA_BOOTSTRAP=127.0.0.1:$KAFKA_PORT
REDIS_URL=redis://127.0.0.1:$REDIS_PORT
DATABASE_URL=postgres://triage@127.0.0.1:$POSTGRES_PORT/triage
EOF
  log "endpoints written to $STACK_DIR/stack.env"
}

status() {
  printf 'kafka     127.0.0.1:%s  %s\n' "$KAFKA_PORT" "$(port_open "$KAFKA_PORT" && echo up || echo down)"
  printf 'redis     127.0.0.1:%s  %s\n' "$REDIS_PORT" "$(port_open "$REDIS_PORT" && echo up || echo down)"
  printf 'postgres  127.0.0.1:%s  %s\n' "$POSTGRES_PORT" "$(port_open "$POSTGRES_PORT" && echo up || echo down)"
}

mkdir -p "$STACK_DIR"
case "${1:-}" in
  up)
    # Redis and PostgreSQL start while the JVM warms up.
    redis_up
    pg_up
    kafka_up
    write_env
    ;;
  down)
    kafka_down
    redis_down
    pg_down
    ;;
  status) status ;;
  wipe)
    # Stops everything and deletes its data (test topics, schemas, keys); `up` starts afresh.
    kafka_down
    redis_down
    pg_down
    resolve_pg_dir
    rm -rf "$KAFKA_DIR/data" "$REDIS_DIR" "$PG_DIR"
    log "stack data deleted; deploy/stack.sh up starts afresh"
    ;;
  restart)
    case "${2:-}" in
      kafka) kafka_down; kafka_up ;;
      redis) redis_down; redis_up ;;
      postgres) pg_down; pg_up ;;
      *) die "restart takes kafka, redis or postgres" ;;
    esac
    ;;
  kill)
    case "${2:-}" in
      kafka) kafka_kill ;;
      redis) redis_kill ;;
      postgres) pg_kill ;;
      *) die "kill takes kafka, redis or postgres" ;;
    esac
    ;;
  *) die "usage: $0 up|down|status|wipe|restart COMPONENT|kill COMPONENT" ;;
esac
