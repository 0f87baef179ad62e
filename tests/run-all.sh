#!/usr/bin/env bash
# shellcheck disable=SC2086 # $FEATURES is split into arguments on purpose
# `make test`: every test of the workspace.
#
# 1. Start the real brokers in the background (brokers/brokers.sh installs what is
#    missing) while every test binary and example builds.
# 2. Run unit, in-memory conformance and adapter conformance tests, then the tests that
#    restart or kill a shared broker (marked #[ignore]; one at a time per broker, the
#    failover scenarios alone: .config/nextest.toml's `restarts` profile), the doctests, then
#    the examples end to end: the demo and the reliability example (in-memory), and the
#    order flow (examples/order_flow/), the CQRS, the batch and the outbox examples on every
#    backend (memory + the real brokers: Kafka, RabbitMQ, NATS, Pub/Sub, Redis, PostgreSQL and
#    SQS/SNS on the local AWS API once the facade has its `aws` feature), each of which checks
#    its own outcome and exits non-zero when it is wrong. The brokers started here are always
#    taken down, also on failure.
set -euo pipefail
cd "$(dirname "$0")/.."

# Tests and examples are built with every adapter (one feature set, so nothing is rebuilt
# between them, the facade's tests cover every broker URL, and one example binary runs on
# any broker).
FEATURES="--features tidemill/all-brokers,tidemill/otel"
# The AWS adapter (tidemill-aws) as well, once the facade has its feature: its examples run
# only then (its own tests run with the workspace either way, and skip without
# TIDEMILL_AWS_URL).
if grep -qE '^aws *=' Cargo.toml; then
  HAVE_AWS=1
  FEATURES+=",tidemill/aws"
else
  HAVE_AWS=
fi
build_examples() {
  cargo build --quiet --examples $FEATURES
}

# Tests run at once. Most of a test's time is spent waiting on a broker (a redelivery
# coming due, a consumer group forming, a restart), so more of them than cores keeps the
# 2-core machine busy; nextest's default is one per core. The restart tests use the
# `restarts` profile of .config/nextest.toml, whose groups keep tests that disturb the
# same broker apart.
TEST_THREADS=${TIDEMILL_TEST_THREADS:-6}

# Seconds one example run may take (Kafka consumer groups take a while to form).
EXAMPLE_TIMEOUT=${TIDEMILL_EXAMPLE_TIMEOUT:-240}

# run_example NAME BROKER_LABEL URL [ARG...]: runs a built example with TIDEMILL_BROKER=URL
# and prints one line with the result (and the end of its output when it failed).
# Returns non-zero on failure.
run_example() {
  local name=$1 label=$2 url=$3 start rc log
  shift 3
  local bin="${CARGO_TARGET_DIR:-target}/debug/examples/$name"
  log="$example_logs/$name-$label.log"
  start=$SECONDS
  rc=0
  env -u BROKER TIDEMILL_BROKER="$url" \
    timeout -k 10 "$EXAMPLE_TIMEOUT" "$bin" "$@" >"$log" 2>&1 </dev/null || rc=$?
  local took=$((SECONDS - start))
  if ((rc == 0)); then
    printf '  %-11s %-8s ok (%ss)\n' "$name" "$label" "$took"
    return 0
  fi
  if ((rc == 124 || rc == 137)); then
    printf '  %-11s %-8s FAILED: timed out after %ss (%s)\n' "$name" "$label" "$EXAMPLE_TIMEOUT" "$url"
  else
    printf '  %-11s %-8s FAILED: exit %s after %ss (%s); last lines:\n' "$name" "$label" "$rc" "$took" "$url"
  fi
  tail -n 25 "$log" | sed 's/^/      | /'
  return 1
}

# Every example × every broker whose address is exported (unset = not started: skipped).
run_examples() {
  local status=0 label url examples=(order_flow)
  if [[ -f examples/cqrs.rs || -f examples/cqrs/main.rs ]]; then
    examples+=(cqrs batch)
  else
    echo "  (examples/cqrs.rs does not exist yet: not run)"
  fi
  example_logs=$(mktemp -d)
  build_examples || return 1
  run_example demo memory memory:// || status=1
  # The reliability stack (in-memory only): retried, dead-lettered and poisoned orders.
  run_example reliability memory memory:// || status=1
  local brokers=("memory memory://")
  # add_broker LABEL VARIABLE URL: the broker, if its address variable is set.
  add_broker() {
    if [[ -n ${!2:-} ]]; then
      brokers+=("$1 $3")
    else
      echo "  $1: skipped ($2 not set)"
    fi
  }
  add_broker kafka TIDEMILL_KAFKA_BROKERS "kafka://${TIDEMILL_KAFKA_BROKERS:-}"
  add_broker amqp TIDEMILL_AMQP_URL "${TIDEMILL_AMQP_URL:-}"
  add_broker nats TIDEMILL_NATS_URL "${TIDEMILL_NATS_URL:-}"
  add_broker pubsub PUBSUB_EMULATOR_HOST "pubsub://tidemill-test?emulator=${PUBSUB_EMULATOR_HOST:-}"
  add_broker redis TIDEMILL_REDIS_URL "${TIDEMILL_REDIS_URL:-}"
  add_broker postgres TIDEMILL_POSTGRES_URL "${TIDEMILL_POSTGRES_URL:-}"
  if [[ -n $HAVE_AWS ]]; then
    # Credentials come from the standard AWS chain: `brokers.sh env aws` exports test ones.
    add_broker aws TIDEMILL_AWS_URL "${TIDEMILL_AWS_URL:-}"
  else
    echo "  aws: skipped (the facade has no \`aws\` feature yet)"
  fi
  # The outbox example needs the order service's database (PostgreSQL); its events go
  # through each broker in turn.
  if [[ -f examples/outbox.rs && -n ${TIDEMILL_POSTGRES_URL:-} ]]; then
    examples+=(outbox)
  else
    echo "  outbox: skipped (TIDEMILL_POSTGRES_URL not set)"
  fi
  for example in "${examples[@]}"; do
    for b in "${brokers[@]}"; do
      label=${b%% *}
      url=${b#* }
      if [[ $example == order_flow ]]; then
        run_example "$example" "$label" "$url" "$url" || status=1
      else
        run_example "$example" "$label" "$url" || status=1
      fi
    done
  done
  rm -rf "$example_logs"
  return $status
}

# `tests/run-all.sh --examples`: only the examples, on the brokers whose address variables
# are set (e.g. after `eval "$(bash brokers/brokers.sh env)"`).
if [[ ${1:-} == --examples ]]; then
  run_examples
  exit
fi

if [[ ${1:-} == --inner ]]; then
  status=0
  if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace $FEATURES --no-fail-fast --test-threads "$TEST_THREADS" || status=1
    echo "==> tests that restart or kill a shared broker (one at a time per broker, failover scenarios alone)"
    cargo nextest run --workspace $FEATURES --no-fail-fast --profile restarts --run-ignored only \
      --test-threads "$TEST_THREADS" --no-tests pass || status=1
  else
    cargo test --workspace $FEATURES --no-fail-fast || status=1
    echo "==> tests that restart a shared broker (one at a time)"
    cargo test --workspace $FEATURES --no-fail-fast -- --ignored --test-threads 1 || status=1
  fi
  echo "==> doctests"
  cargo test --workspace $FEATURES --doc || status=1
  echo "==> examples (each checks its own outcome)"
  run_examples || status=1
  exit $status
fi

# The single-node brokers and the three-node NATS and RabbitMQ clusters (the failover tests
# of the serial phase use the clusters); TIDEMILL_BROKERS_ONLY="nats kafka" runs fewer.
export TIDEMILL_BROKERS_ONLY="${TIDEMILL_BROKERS_ONLY:-rabbitmq nats kafka pubsub redis postgres aws nats-cluster rabbitmq-cluster}"

# The brokers install and start in the background while the tests build (a fresh machine
# spends minutes on each); the ones started here are stopped on the way out, whatever happens.
brokers_sh=brokers/brokers.sh
before=" $(bash "$brokers_sh" running) "
mkdir -p target/brokers
up_log=target/brokers/up.log
# shellcheck disable=SC2086 # word splitting of the name list is intended
bash "$brokers_sh" up ${TIDEMILL_BROKERS_ONLY:-} >"$up_log" 2>&1 &
up_pid=$!
# shellcheck disable=SC2317 # invoked by the trap
stop_ours() {
  trap '' PIPE
  kill "$up_pid" 2>/dev/null && wait "$up_pid" 2>/dev/null
  # shellcheck disable=SC2086 # the name list is split on purpose
  bash "$brokers_sh" down-except $before || echo "warning: brokers-down failed" >&2
}
trap stop_ours EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "==> building the tests (brokers starting meanwhile: $up_log)"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace $FEATURES --no-run
else
  cargo test --workspace $FEATURES --no-run
fi
build_examples

echo "==> waiting for the brokers"
up_status=0
wait "$up_pid" || up_status=$?
cat "$up_log"
if ((up_status != 0)); then
  echo "the brokers did not all come up (log above)" >&2
  exit 1
fi

echo "==> running the tests against the in-memory broker and the real brokers"
bash brokers/with-brokers.sh bash tests/run-all.sh --inner
