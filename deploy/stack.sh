#!/usr/bin/env bash
# The local stack: Apache Kafka (KRaft, combined mode, one node), Redis and PostgreSQL on loopback.
#
#   deploy/stack.sh up                 install what is missing, start what is down, wait, write .local/stack.env
#   deploy/stack.sh down               stop everything this script started
#   deploy/stack.sh status             one line per component
#   deploy/stack.sh restart COMPONENT  kafka | redis | postgres (used by the chaos suite)
#   deploy/stack.sh kill COMPONENT     kill -9, no clean shutdown
#
#   deploy/stack.sh up --brokers 3     a three-node KRaft cluster (ports 19092-19094) beside it,
#                                      sharing Redis and PostgreSQL; writes .local/cluster.env
#   deploy/stack.sh --brokers 3 down|status|wipe
#   deploy/stack.sh --brokers 3 kill-broker I | start-broker I | restart-broker I | rolling-restart
#   deploy/stack.sh --brokers 3 tx-coordinator PREFIX   the node coordinating each transactional id
#
# Idempotent: `up` on a running stack only checks it and rewrites the env file. Everything lives
# under .local/ (git-ignored). Ports come from KAFKA_PORT, KAFKA_CONTROLLER_PORT, REDIS_PORT and
# POSTGRES_PORT when set; the cluster's from KAFKA_CLUSTER_PORT and KAFKA_CLUSTER_CONTROLLER_PORT
# (first node; the others count up).
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

# kafka_write_log4j DIR: the broker's log configuration, logs under DIR/logs.
kafka_write_log4j() {
  local dir=$1
  cat >"$dir/log4j2.properties" <<EOF
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = $dir/logs/server.log
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
}

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
  kafka_write_log4j "$KAFKA_DIR"
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
# Kafka cluster (`--brokers N`, N > 1): N KRaft nodes in combined mode (broker and controller),
# each with its own ports and data under .local/kafka-cluster/node-I, from the same jars. Node I
# listens on KAFKA_CLUSTER_PORT + I - 1 (clients) and KAFKA_CLUSTER_CONTROLLER_PORT + I - 1
# (quorum), so the cluster runs beside the one-broker stack. Replication factor 3 (or N, when
# smaller) and min.insync.replicas 2 are the defaults of every topic, the transaction log and
# the offsets topic: a produce with acks=all survives one broker down.

CLUSTER_DIR="$STACK_DIR/kafka-cluster"
KAFKA_CLUSTER_PORT=${KAFKA_CLUSTER_PORT:-19092}
KAFKA_CLUSTER_CONTROLLER_PORT=${KAFKA_CLUSTER_CONTROLLER_PORT:-19192}
KAFKA_CLUSTER_HEAP=${KAFKA_CLUSTER_HEAP:-1g}

node_dir() { echo "$CLUSTER_DIR/node-$1"; }
node_port() { echo $((KAFKA_CLUSTER_PORT + $1 - 1)); }
node_controller_port() { echo $((KAFKA_CLUSTER_CONTROLLER_PORT + $1 - 1)); }
node_pid() { echo "$(node_dir "$1")/kafka.pid"; }

cluster_nodes() { seq 1 "$BROKERS"; }

cluster_bootstrap() {
  local node servers=()
  for node in $(cluster_nodes); do servers+=("127.0.0.1:$(node_port "$node")"); done
  (IFS=,; echo "${servers[*]}")
}

cluster_replication() { echo $((BROKERS < 3 ? BROKERS : 3)); }
cluster_min_insync() { echo $((BROKERS < 3 ? 1 : 2)); }

# The command-line tools against the cluster (topics, transactions), with their own log folder.
cluster_java() {
  java -Djava.awt.headless=true "-Dlog4j2.configurationFile=$CLUSTER_DIR/tools-log4j2.properties" \
    -cp "$KAFKA_LIBS/*" "$@"
}

check_node() {
  [[ $1 =~ ^[0-9]+$ ]] && (($1 >= 1 && $1 <= BROKERS)) || die "no broker $1 in a cluster of $BROKERS"
}

cluster_configure() {
  local node voters=()
  for node in $(cluster_nodes); do voters+=("$node@127.0.0.1:$(node_controller_port "$node")"); done
  mkdir -p "$CLUSTER_DIR"
  cat >"$CLUSTER_DIR/tools-log4j2.properties" <<EOF
status = error
rootLogger.level = error
EOF
  if [[ ! -f "$CLUSTER_DIR/cluster.id" ]]; then
    cluster_java kafka.tools.StorageTool random-uuid >"$CLUSTER_DIR/cluster.id"
  fi
  for node in $(cluster_nodes); do
    local dir
    dir=$(node_dir "$node")
    mkdir -p "$dir/data" "$dir/logs"
    cat >"$dir/server.properties" <<EOF
process.roles=broker,controller
node.id=$node
controller.quorum.voters=$(IFS=,; echo "${voters[*]}")
listeners=PLAINTEXT://127.0.0.1:$(node_port "$node"),CONTROLLER://127.0.0.1:$(node_controller_port "$node")
advertised.listeners=PLAINTEXT://127.0.0.1:$(node_port "$node")
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$dir/data
num.partitions=1
default.replication.factor=$(cluster_replication)
min.insync.replicas=$(cluster_min_insync)
auto.create.topics.enable=false
offsets.topic.replication.factor=$(cluster_replication)
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=$(cluster_replication)
transaction.state.log.min.isr=$(cluster_min_insync)
transaction.state.log.num.partitions=4
group.initial.rebalance.delay.ms=0
delete.topic.enable=true
log.retention.hours=24
log.segment.bytes=16777216
# A killed leader's partitions move at once; the restarted node takes its leaderships back.
auto.leader.rebalance.enable=true
leader.imbalance.check.interval.seconds=30
EOF
    kafka_write_log4j "$dir"
    if [[ ! -f "$dir/data/meta.properties" ]]; then
      cluster_java kafka.tools.StorageTool format -t "$(cat "$CLUSTER_DIR/cluster.id")" \
        -c "$dir/server.properties" >"$dir/logs/format.log" 2>&1 \
        || die "kafka storage format of node $node failed; see $dir/logs/format.log"
    fi
  done
}

# node_start I: starts node I unless it runs; does not wait.
node_start() {
  local node=$1 dir port
  dir=$(node_dir "$node")
  port=$(node_port "$node")
  if pid_alive "$(node_pid "$node")"; then return; fi
  port_open "$port" && die "port $port is taken by something this script did not start"
  log "starting Kafka node $node on 127.0.0.1:$port"
  local KAFKA_HEAP=$KAFKA_CLUSTER_HEAP
  kafka_broker_jvm_opts
  (exec nohup java "${KAFKA_BROKER_JVM_OPTS[@]}" -Djava.awt.headless=true \
    "-Dlog4j2.configurationFile=$dir/log4j2.properties" "-Dkafka.logs.dir=$dir/logs" \
    -cp "$KAFKA_LIBS/*" kafka.Kafka "$dir/server.properties" >>"$dir/logs/stdout.log" 2>&1) &
  echo $! >"$(node_pid "$node")"
}

# The node answers metadata requests (a listing through it alone proves that it joined).
node_ready() {
  port_open "$(node_port "$1")" || return 1
  cluster_java org.apache.kafka.tools.TopicCommand --bootstrap-server "127.0.0.1:$(node_port "$1")" --list
}

# No partition without its full replica set: a rolling restart goes on only then, or the next
# stop would leave some partitions below min.insync.replicas.
cluster_fully_replicated() {
  local out
  out=$(cluster_java org.apache.kafka.tools.TopicCommand --bootstrap-server "$(cluster_bootstrap)" \
    --describe --under-replicated-partitions 2>/dev/null) || return 1
  [[ -z $out ]]
}

node_wait_ready() {
  wait_for "kafka node $1 is up" 180 node_ready "$1" || die "Kafka node $1 did not start; see $(node_dir "$1")/logs/"
}

# node_stop I: controlled shutdown (leaderships move first), then kill -9 after 60 s.
node_stop() {
  local pid_file
  pid_file=$(node_pid "$1")
  pid_alive "$pid_file" || return 0
  log "stopping Kafka node $1"
  kill "$(cat "$pid_file")" 2>/dev/null || true
  local deadline=$((SECONDS + 60))
  while pid_alive "$pid_file" && ((SECONDS < deadline)); do sleep 0.3; done
  pid_alive "$pid_file" && kill -9 "$(cat "$pid_file")" 2>/dev/null || true
  rm -f "$pid_file"
}

node_kill() {
  local pid_file
  pid_file=$(node_pid "$1")
  if pid_alive "$pid_file"; then
    log "kill -9 of Kafka node $1"
    kill -9 "$(cat "$pid_file")" || true
    while pid_alive "$pid_file"; do sleep 0.1; done
  fi
  rm -f "$pid_file"
}

# node_restart I: stop (or find dead), start, wait until it serves and every partition is fully
# replicated again.
node_restart() {
  node_stop "$1"
  node_start "$1"
  node_wait_ready "$1"
  wait_for "every partition fully replicated" 180 cluster_fully_replicated \
    || die "partitions still under-replicated 180 s after node $1 restarted"
}

cluster_up() {
  kafka_install
  cluster_configure
  local node
  # Every voter must start before any can elect a leader: start all, then wait.
  for node in $(cluster_nodes); do node_start "$node"; done
  for node in $(cluster_nodes); do node_wait_ready "$node"; done
}

cluster_down() {
  local node
  for node in $(cluster_nodes); do node_stop "$node"; done
}

cluster_status() {
  local node
  for node in $(cluster_nodes); do
    printf 'kafka-%s   127.0.0.1:%s  %s\n' "$node" "$(node_port "$node")" \
      "$(port_open "$(node_port "$node")" && echo up || echo down)"
  done
}

# tx-coordinator PREFIX: the node id coordinating each transactional id that starts with PREFIX,
# one "ID NODE" line each (FindCoordinator through the Kafka tools; librdkafka does not expose it).
cluster_tx_coordinators() {
  cluster_java org.apache.kafka.tools.TransactionsCommand --bootstrap-server "$(cluster_bootstrap)" list \
    | awk -v prefix="$1" 'NR > 1 && index($1, prefix) == 1 { print $1, $2 }'
}

write_cluster_env() {
  cat >"$STACK_DIR/cluster.env" <<EOF
KAFKA_BOOTSTRAP=$(cluster_bootstrap)
KAFKA_BROKERS=$BROKERS
KAFKA_REPLICATION_FACTOR=$(cluster_replication)
KAFKA_MIN_INSYNC_REPLICAS=$(cluster_min_insync)
REDIS_URL=redis://127.0.0.1:$REDIS_PORT
DATABASE_URL=postgres://triage@127.0.0.1:$POSTGRES_PORT/triage
REDIS_PORT=$REDIS_PORT
POSTGRES_PORT=$POSTGRES_PORT
EOF
  log "cluster endpoints written to $STACK_DIR/cluster.env"
}

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

# `--brokers N` may stand anywhere; without it (or with 1) every command means the one-broker
# stack, exactly as before the cluster existed.
BROKERS=1
ARGS=()
while (($#)); do
  case $1 in
    --brokers) [[ ${2:-} =~ ^[1-9][0-9]*$ ]] || die "--brokers takes a number"; BROKERS=$2; shift 2 ;;
    --brokers=*) BROKERS=${1#--brokers=}; shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
set -- "${ARGS[@]+"${ARGS[@]}"}"

mkdir -p "$STACK_DIR"
if ((BROKERS > 1)); then
  # The cluster shares Redis and PostgreSQL with the one-broker stack: `down` and `wipe` stop
  # and delete only the cluster's nodes.
  case "${1:-}" in
    up)
      redis_up
      pg_up
      cluster_up
      write_cluster_env
      ;;
    down) cluster_down ;;
    status) cluster_status ;;
    wipe)
      cluster_down
      rm -rf "$CLUSTER_DIR"
      log "cluster data deleted"
      ;;
    kill-broker) check_node "${2:-}"; node_kill "$2" ;;
    start-broker) check_node "${2:-}"; node_start "$2"; node_wait_ready "$2" ;;
    restart-broker) check_node "${2:-}"; node_restart "$2" ;;
    rolling-restart)
      for node in $(cluster_nodes); do node_restart "$node"; done
      ;;
    tx-coordinator) cluster_tx_coordinators "${2:?tx-coordinator takes a transactional id prefix}" ;;
    bootstrap) cluster_bootstrap ;;
    *) die "usage: $0 --brokers N up|down|status|wipe|kill-broker I|start-broker I|restart-broker I|rolling-restart|tx-coordinator PREFIX|bootstrap" ;;
  esac
  exit 0
fi

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
