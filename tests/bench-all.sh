#!/usr/bin/env bash
# `make bench`: every benchmark (in-memory router and middleware, raw client vs Tidemill on
# each real broker, request-reply round trips), then BENCHMARKS.md from the rows they
# recorded (see tidemill_testkit::bench). Not part of `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."

# In-memory benches run first, before any broker starts: idle brokers (the Pub/Sub
# emulator's JVM, RabbitMQ's Erlang VM) take CPU from a 2-core machine: beside them the
# router's layers/plain ratio came out at 0.77-0.82x, against 0.88-0.93x alone.
MEMORY_BENCHES=(
  "-p tidemill-core --bench router"
  "-p tidemill-otel --bench router"
  "-p tidemill-middleware --bench stack"
  "-p tidemill-middleware --features testing --bench request_reply"
)
BROKER_BENCHES=(
  "-p tidemill-kafka --bench throughput"
  "-p tidemill-amqp --bench throughput"
  "-p tidemill-amqp --bench consume"
  "-p tidemill-nats --bench throughput"
  "-p tidemill-nats --bench request_reply"
  "-p tidemill-googlecloud --bench throughput"
  "-p tidemill-redis --bench throughput"
  "-p tidemill-sql --bench throughput"
  "-p tidemill-aws --bench throughput"
)

# Runs the benches given as arguments (each one string of cargo arguments).
run_benches() {
  local status=0 bench
  for bench in "$@"; do
    echo "==> cargo bench $bench"
    # shellcheck disable=SC2086
    cargo bench $bench || { echo "FAILED: cargo bench $bench"; status=1; }
  done
  return $status
}

if [[ ${1:-} == --inner ]]; then
  run_benches "${BROKER_BENCHES[@]}"
  exit $?
fi

report="$PWD/target/bench/report.jsonl"
mkdir -p target/bench
rm -f "$report"
echo "==> building the benchmarks"
for bench in "${MEMORY_BENCHES[@]}" "${BROKER_BENCHES[@]}"; do
  # shellcheck disable=SC2086
  cargo bench --no-run $bench
done
cargo build --quiet -p tidemill-testkit --bin bench-report

status=0
export TIDEMILL_BENCH_REPORT="$report"
run_benches "${MEMORY_BENCHES[@]}" || status=$?
bash brokers/with-brokers.sh bash tests/bench-all.sh --inner \
  || status=$?
# Sections other benches write themselves (`make bench-scaling`) are kept.
kept=$(awk '/^## Consume scaling across processes/{keep=1} /^## /&&!/^## Consume scaling/{keep=0} keep' BENCHMARKS.md 2>/dev/null || true)
cargo run --quiet -p tidemill-testkit --bin bench-report -- "$report" "make bench" > BENCHMARKS.md
if [[ -n $kept ]]; then printf '\n%s\n' "$kept" >> BENCHMARKS.md; fi
echo "==> wrote BENCHMARKS.md ($(grep -c '^| ' BENCHMARKS.md) table lines)"
exit $status
