#!/usr/bin/env bash
# `make bench`: every benchmark (in-memory router and middleware, raw client vs Tidemill on
# each real broker, request-reply round trips), then BENCHMARKS.md from the rows they
# recorded (see tidemill_testkit::bench). Not part of `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."

BENCHES=(
  "-p tidemill-core --bench router"
  "-p tidemill-middleware --bench stack"
  "-p tidemill-middleware --features testing --bench request_reply"
  "-p tidemill-kafka --bench throughput"
  "-p tidemill-amqp --bench throughput"
  "-p tidemill-nats --bench throughput"
  "-p tidemill-nats --bench request_reply"
  "-p tidemill-googlecloud --bench throughput"
)

if [[ ${1:-} == --inner ]]; then
  status=0
  for bench in "${BENCHES[@]}"; do
    echo "==> cargo bench $bench"
    # shellcheck disable=SC2086
    cargo bench $bench || { echo "FAILED: cargo bench $bench"; status=1; }
  done
  exit $status
fi

report="$PWD/target/bench/report.jsonl"
mkdir -p target/bench
rm -f "$report"
echo "==> building the benchmarks"
for bench in "${BENCHES[@]}"; do
  # shellcheck disable=SC2086
  cargo bench --no-run $bench
done
cargo build --quiet -p tidemill-testkit --bin bench-report

status=0
TIDEMILL_BENCH_REPORT="$report" bash tests/brokers/with-brokers.sh bash tests/bench-all.sh --inner \
  || status=$?
cargo run --quiet -p tidemill-testkit --bin bench-report -- "$report" "make bench" > BENCHMARKS.md
echo "==> wrote BENCHMARKS.md ($(grep -c '^| ' BENCHMARKS.md) table lines)"
exit $status
