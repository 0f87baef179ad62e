#!/usr/bin/env bash
# `make test`: every test of the workspace, with the real brokers up for the
# adapter suites (tests/brokers/with-brokers.sh starts them and always takes
# down the ones it started).
set -euo pipefail
cd "$(dirname "$0")/.."
exec bash tests/brokers/with-brokers.sh cargo test --workspace "$@"
