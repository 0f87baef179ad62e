#!/usr/bin/env bash
# `make test`: every test of the workspace.
#
# 1. Build every test binary (no brokers needed for that).
# 2. Bring the real brokers up (tests/brokers/with-brokers.sh installs what is missing),
#    run unit, in-memory conformance and adapter conformance tests, then the tests that
#    restart a shared broker (marked #[ignore], run one at a time), then the doctests and
#    the demo; the brokers started here are always taken down, also on failure.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ ${1:-} == --inner ]]; then
  status=0
  if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast || status=1
    echo "==> tests that restart a shared broker (one at a time)"
    cargo nextest run --workspace --no-fail-fast --run-ignored only --test-threads 1 \
      --no-tests pass || status=1
  else
    cargo test --workspace --no-fail-fast || status=1
    echo "==> tests that restart a shared broker (one at a time)"
    cargo test --workspace --no-fail-fast -- --ignored --test-threads 1 || status=1
  fi
  echo "==> doctests"
  cargo test --workspace --doc || status=1
  echo "==> examples"
  timeout 60 cargo run --quiet --example demo >/dev/null || { echo "demo failed"; status=1; }
  exit $status
fi

echo "==> building the tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-run
else
  cargo test --workspace --no-run
fi
cargo build --examples --quiet

echo "==> running the tests against the in-memory broker and the real brokers"
exec bash tests/brokers/with-brokers.sh bash tests/run-all.sh --inner
