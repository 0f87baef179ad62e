#!/usr/bin/env bash
# with-brokers.sh CMD [ARG...]
#
# Brings the test brokers up (installing them if needed), exports their
# addresses (TIDEMILL_AMQP_URL, TIDEMILL_NATS_URL, TIDEMILL_KAFKA_BROKERS,
# PUBSUB_EMULATOR_HOST, TIDEMILL_REDIS_URL, TIDEMILL_POSTGRES_URL, TIDEMILL_AWS_URL and
# moto's test credentials), runs CMD, and then always takes down the brokers it
# started itself (also when CMD fails or the run is interrupted); brokers
# that were already running, or that are external (address variable set),
# are left as they were. Exits with CMD's status.
#
# TIDEMILL_BROKERS_ONLY="nats kafka" limits which brokers are started.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BROKERS="$HERE/brokers.sh"

if (($# == 0)); then
  echo "usage: $0 CMD [ARG...]" >&2
  exit 2
fi

before=" $(bash "$BROKERS" running) "

# shellcheck disable=SC2317 # invoked by the trap
cleanup() {
  # Our output may go to a pipe that is gone already (e.g. `| tee` killed by
  # Ctrl-C): do not let SIGPIPE stop the cleanup.
  trap '' PIPE
  # shellcheck disable=SC2086 # the name list is split on purpose
  bash "$BROKERS" down-except $before >&2 || echo "with-brokers: warning: brokers-down failed" >&2
}
trap cleanup EXIT
# Until CMD runs, a signal just ends the script (and cleanup runs).
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# shellcheck disable=SC2086 # word splitting of the name list is intended
if ! bash "$BROKERS" up ${TIDEMILL_BROKERS_ONLY:-}; then
  echo "with-brokers: the brokers did not all come up (see above); not running: $*" >&2
  exit 1
fi
# Only the addresses of the brokers that are up: a test whose variable is
# unset skips itself.
# shellcheck disable=SC2086
eval "$(bash "$BROKERS" env ${TIDEMILL_BROKERS_ONLY:-})"

# CMD runs in a session of its own, so that a signal sent to this script
# alone (by CI, `timeout`, kill) can be passed on to CMD's whole process tree
# (cargo and the test binaries it runs) before the brokers go down. Ctrl-C in
# a terminal reaches this script and is passed on the same way.
setsid "$@" <&0 &
child=$!
sig=
# shellcheck disable=SC2317 # invoked by the traps
forward() {
  sig=$1
  kill -TERM -- "-$child" 2>/dev/null || kill -TERM "$child" 2>/dev/null || true
}
trap 'forward 130' INT
trap 'forward 143' TERM
trap 'forward 129' HUP
rc=0
while :; do
  wait "$child"
  rc=$?
  # wait returns early when a trapped signal arrives: wait again until CMD
  # has really finished.
  kill -0 "$child" 2>/dev/null || break
done
exit "${sig:-$rc}"
