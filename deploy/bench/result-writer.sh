#!/usr/bin/env bash
# result-writer benchmark: results written per second into PostgreSQL, and the time from a result
# on the topic to its row being readable.
#
# Each run: a fresh topic (12 partitions) is filled with N InferenceResult records; the release
# writer then starts against a fresh schema and drains it (throughput = rows / time between the
# first and last batch's written_at); with the writer caught up, M more results are produced at
# RATE/s and timed from the broker's acknowledgement to their announcement on the writer's live
# stream, which it sends only after the row committed. Prints each run and the medians.
#
#   deploy/bench/result-writer.sh            # RUNS=3 N=100000 M=5000 RATE=1000
#   RUNS=5 N=200000 deploy/bench/result-writer.sh
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
RUNS=${RUNS:-3}
N=${N:-100000}
M=${M:-5000}
RATE=${RATE:-1000}
# shellcheck disable=SC1091
source .local/stack.env
cargo build --release -p result-writer --bins --quiet
# shellcheck source=deploy/lib/cargo-target.sh
source deploy/lib/cargo-target.sh
TARGET_DIR=$(cargo_target_dir)
BENCH="$TARGET_DIR/release/result-writer-bench"
WRITER="$TARGET_DIR/release/result-writer"
OUT="$TARGET_DIR/bench/result-writer"
mkdir -p "$OUT"
KEY="bench-key-$RANDOM$RANDOM"
KEYS_FILE="$OUT/keys"
echo "bench:$(printf %s "$KEY" | sha256sum | cut -d' ' -f1)" > "$KEYS_FILE"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
median() { sort -n | awk '{v[NR]=$1} END {if (NR%2) print v[(NR+1)/2]; else printf "%.1f\n", (v[NR/2]+v[NR/2+1])/2}'; }

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -sr)"
echo "command: RUNS=$RUNS N=$N M=$M RATE=$RATE deploy/bench/result-writer.sh"
: > "$OUT/throughput.txt"; : > "$OUT/p50.txt"; : > "$OUT/p99.txt"; : > "$OUT/per_cpu.txt"
for run in $(seq 1 "$RUNS"); do
  id="$(date +%s)-$run-$RANDOM"
  topic="bench.result-writer.$id.results"
  dlq="bench.result-writer.$id.dlq"
  schema="bench_rw_${id//-/_}"
  "$BENCH" --bootstrap "$KAFKA_BOOTSTRAP" produce --topic "$topic" --count "$N" --partitions 12
  api_port=$(free_port); admin_port=$(free_port)
  TRIAGE_KAFKA__BOOTSTRAP_SERVERS="$KAFKA_BOOTSTRAP" \
  TRIAGE_TOPICS__RESULTS="$topic" TRIAGE_TOPICS__DEAD_LETTERS="$dlq" \
  TRIAGE_CONSUMER__GROUP_ID="bench-result-writer-$id" \
  TRIAGE_DATABASE__URL="$DATABASE_URL" TRIAGE_DATABASE__SCHEMA="$schema" \
  TRIAGE_API__LISTEN="127.0.0.1:$api_port" TRIAGE_ADMIN__LISTEN="127.0.0.1:$admin_port" \
  TRIAGE_AUTH__KEYS_FILE="$KEYS_FILE" TRIAGE_TELEMETRY__LOG_LEVEL=warn \
    "$WRITER" > "$OUT/writer-$run.log" 2>&1 &
  writer_pid=$!
  line=$("$BENCH" throughput --database-url "$DATABASE_URL" --schema "$schema" --count "$N")
  # CPU the writer used (user + system, start-up included): rows per CPU-second shows what it
  # costs even when other work shares the two cores.
  cpu_seconds=$(awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$writer_pid/stat")
  line="$line writer_cpu_seconds=$cpu_seconds rows_per_cpu_second=$(awk -v n="$N" -v c="$cpu_seconds" 'BEGIN {printf "%.0f", n / c}') load_avg_1m=$(cut -d' ' -f1 /proc/loadavg)"
  echo "run $run: $line"
  echo "$line" | sed -n 's/.*rows_per_cpu_second=\([0-9.]*\).*/\1/p' >> "$OUT/per_cpu.txt"
  echo "$line" | sed -n 's/.*throughput_rows_per_s=\([0-9.]*\).*/\1/p' >> "$OUT/throughput.txt"
  line=$("$BENCH" --bootstrap "$KAFKA_BOOTSTRAP" latency --topic "$topic" --api "http://127.0.0.1:$api_port" \
    --key "$KEY" --rate "$RATE" --count "$M")
  echo "run $run: $line"
  echo "$line" | sed -n 's/.*p50_ms=\([0-9.]*\).*/\1/p' >> "$OUT/p50.txt"
  echo "$line" | sed -n 's/.*p99_ms=\([0-9.]*\).*/\1/p' >> "$OUT/p99.txt"
  kill -TERM "$writer_pid"; wait "$writer_pid" || true
  "$BENCH" --bootstrap "$KAFKA_BOOTSTRAP" cleanup --database-url "$DATABASE_URL" --schema "$schema" --topics "$topic" "$dlq" || true
done
echo "median of $RUNS runs: throughput_rows_per_s=$(median < "$OUT/throughput.txt") rows_per_cpu_second=$(median < "$OUT/per_cpu.txt") topic_to_readable_p50_ms=$(median < "$OUT/p50.txt") p99_ms=$(median < "$OUT/p99.txt") (at $RATE/s)"
