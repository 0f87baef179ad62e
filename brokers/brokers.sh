#!/usr/bin/env bash
# Test brokers for Tidemill's adapter suites: RabbitMQ, NATS (JetStream), a
# Kafka-protocol broker (Nisshi), a Google Cloud Pub/Sub emulator, Redis,
# PostgreSQL and a local AWS API (moto: SQS, SNS), all on 127.0.0.1. See
# brokers/README.md.
#
#   brokers.sh up [NAME...]       install if missing, start, wait until ready
#   brokers.sh down [NAME...]     stop (by recorded PID); no process, no port left
#   brokers.sh status [NAME...]   report each; exit 1 unless all are healthy
#   brokers.sh restart NAME...    stop and start again, keeping data on disk
#   brokers.sh env [NAME...]      print `export VAR=...` lines for the addresses
#                                 (aws: also test credentials, unless AWS_ACCESS_KEY_ID is set)
#   brokers.sh running            print the names of the brokers running now
#   brokers.sh down-except "NAME..."  stop the running brokers not named (those a
#                                 script started itself, given what ran before it)
#   brokers.sh rabbitmqctl ARG... run rabbitmqctl against our RabbitMQ node
#   brokers.sh kill-node CLUSTER I   SIGKILL node I (1..3) of a running cluster
#   brokers.sh start-node CLUSTER I  start node I again (its data kept); waits
#                                 until the whole cluster is ready
#
# NAME is one of: rabbitmq nats kafka pubsub redis postgres aws (default: all seven), or a
# three-node cluster, only when named: nats-cluster rabbitmq-cluster (`down`
# with no names stops the clusters too).
# Exit status 3 from restart: the broker is external (not ours to restart).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=brokers/env.sh
source "$HERE/env.sh"
# shellcheck source=brokers/lib.sh
source "$HERE/lib.sh"
for _b in $TIDEMILL_BROKERS; do
  # shellcheck source=/dev/null
  source "$HERE/$_b.sh"
done
_clusters=()
for _b in $TIDEMILL_CLUSTERS; do
  [[ -f $HERE/$_b.sh ]] || continue
  # shellcheck source=/dev/null
  source "$HERE/$_b.sh"
  _clusters+=("$_b")
done
TIDEMILL_CLUSTERS="${_clusters[*]:-}"

usage() { sed -n '2,/^# Exit status/p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

names() { # validate NAME args, default to all single-node brokers
  if (($# == 0)); then echo "$TIDEMILL_BROKERS"; return; fi
  local n out=()
  for n in "$@"; do
    case " $TIDEMILL_BROKERS $TIDEMILL_CLUSTERS " in
      *" $n "*) out+=("$n") ;;
      *) log "unknown broker '$n' (known: $TIDEMILL_BROKERS $TIDEMILL_CLUSTERS)"; exit 2 ;;
    esac
  done
  echo "${out[@]}"
}

healthy() { "$1_running" && "$1_ready"; }

# Ports of a broker that are taken although our broker is not running.
foreign_ports() {
  local p busy=()
  for p in $("$1_ports"); do
    tcp_open "$p" && busy+=("$p")
  done
  echo "${busy[@]:-}"
}

cmd_up() {
  local list n pkgs=() kafka_build_pid=
  read -r -a list <<<"$(names "$@")"
  mkdir -p "$TIDEMILL_BROKERS_DIR"
  local t0=$SECONDS

  # 1. Install what is missing. The Nisshi build (minutes, only the first
  #    time) runs in the background while the rest installs and starts.
  for n in "${list[@]}"; do
    tidemill_external "$n" && continue
    if [[ $n == kafka ]] && ! kafka_installed; then
      log "kafka: installing Tansu in the background (log: $TIDEMILL_BROKERS_DIR/kafka-install.log)"
      (kafka_install) >"$TIDEMILL_BROKERS_DIR/kafka-install.log" 2>&1 &
      kafka_build_pid=$!
    fi
    local more=()
    case $n in
      rabbitmq) rabbitmq_installed || read -r -a more <<<"$(rabbitmq_apt_packages)" || true ;;
      pubsub | redis | postgres | aws | *-cluster) read -r -a more <<<"$("${n}_apt_packages")" || true ;;
    esac
    pkgs+=("${more[@]}")
  done
  if ((${#pkgs[@]})); then
    # A broker may prepare for its packages and tidy up after them (postgres: the
    # package's own cluster must not start on boot).
    for n in "${list[@]}"; do
      if declare -F "${n}_before_install" >/dev/null; then "${n}_before_install"; fi
    done
    apt_install "${pkgs[@]}"
    for n in "${list[@]}"; do
      if declare -F "${n}_after_install" >/dev/null; then "${n}_after_install"; fi
    done
  fi
  for n in "${list[@]}"; do
    tidemill_external "$n" && continue
    case $n in
      nats) nats_installed || { log "nats: installing"; nats_install; } ;;
      pubsub) pubsub_installed || { log "pubsub: building the emulator"; pubsub_install; } ;;
      redis) redis_installed || die "redis-server is not installed" ;;
      postgres) postgres_installed || die "PostgreSQL (Debian postgresql) is not installed" ;;
      aws) aws_installed || { log "aws: installing moto $TIDEMILL_MOTO_VERSION"; aws_install; } ;;
      rabbitmq) rabbitmq_installed || die "rabbitmq-server is not installed" ;;
      *-cluster) "${n}_installed" || { log "$n: installing"; "${n}_install"; } ;;
    esac
  done

  # 2. Start; the Kafka broker last, once its build is done.
  local failed=0
  for n in "${list[@]}"; do
    [[ $n == kafka && -n $kafka_build_pid ]] && continue
    up_one "$n" || failed=1
  done
  if [[ -n $kafka_build_pid ]]; then
    log "kafka: waiting for the Nisshi build"
    if wait "$kafka_build_pid"; then
      up_one kafka || failed=1
    else
      log "kafka: building Tansu failed; see $TIDEMILL_BROKERS_DIR/kafka-install.log"
      tail -n 30 "$TIDEMILL_BROKERS_DIR/kafka-install.log" >&2 || true
      failed=1
    fi
  fi
  log "brokers-up took $((SECONDS - t0))s"
  return "$failed"
}

up_one() {
  local n=$1 busy
  if tidemill_external "$n"; then
    printf '%-9s external  %s (not managed here)\n' "$n" "$("${n}_addr")"
    return 0
  fi
  if healthy "$n"; then
    printf '%-9s running   %s\n' "$n" "$("${n}_addr")"
    return 0
  fi
  if ! "${n}_running"; then
    "${n}_stop" # clear stale PID files (and leftovers of a half-dead start)
    busy=$(foreign_ports "$n")
    if [[ -n $busy ]]; then
      log "$n: port(s) $busy already in use by a process these scripts did not start;"
      log "  stop it, or set the address variable to use it (see brokers/README.md)"
      return 1
    fi
    "${n}_start"
  fi
  if ! wait_for "$("${n}_start_timeout")" "$n to be ready" healthy "$n"; then
    log "$n: not ready; last lines of its log:"
    tail -n 30 "$(log_of "$n")" >&2 || true
    return 1
  fi
  "${n}_after_ready"
  printf '%-9s started   %s\n' "$n" "$("${n}_addr")"
}

log_of() {
  case $1 in
    rabbitmq) echo "$RABBITMQ_DIR/log/server.log" ;;
    nats) echo "$NATS_DIR/log/nats.log" ;;
    kafka) echo "$KAFKA_DIR/log/tansu.log" ;;
    pubsub) echo "$PUBSUB_DIR/log/pubsub.log" ;;
    *) "${1}_log" ;;
  esac
}

down_one() {
  local n=$1 p failed=0
  if tidemill_external "$n"; then
    printf '%-9s external  (left alone)\n' "$n"
    return 0
  fi
  "${n}_stop"
  for p in $("${n}_ports"); do
    if ! wait_port_free "$p" 15; then
      log "$n: port $p is still in use (by a process these scripts did not start?)"
      failed=1
    fi
  done
  printf '%-9s stopped\n' "$n"
  return "$failed"
}

cmd_down() {
  local list n failed=0
  if (($# == 0)); then
    read -r -a list <<<"$TIDEMILL_BROKERS $TIDEMILL_CLUSTERS"
  else
    read -r -a list <<<"$(names "$@")"
  fi
  for n in "${list[@]}"; do down_one "$n" || failed=1; done
  return "$failed"
}

cmd_status() {
  local list n failed=0 addr
  read -r -a list <<<"$(names "$@")"
  for n in "${list[@]}"; do
    addr=$("${n}_addr")
    if tidemill_external "$n"; then
      local hp=$addr
      case $n in
        rabbitmq) hp=${addr#*://}; hp=${hp#*@}; hp=${hp%%/*} ;;
        nats) hp=${addr#*://}; hp=${hp#*@}; hp=${hp%%/*}; hp=${hp%%,*} ;;
        kafka) hp=${addr%%,*} ;;
        redis) hp=${addr#*://}; hp=${hp#*@}; hp=${hp%%/*} ;;
        postgres)
          hp=${TIDEMILL_POSTGRES_URL#*://}; hp=${hp##*@}; hp=${hp%%[/?]*}; hp=${hp%%,*}
          [[ $hp == *:* ]] || hp="$hp:5432"
          ;;
        aws) hp=$(aws_endpoint_hostport "$addr") ;;
        *-cluster) hp=${addr%%,*}; hp=${hp#*://}; hp=${hp#*@}; hp=${hp%%/*} ;;
      esac
      if tcp_open_addr "$hp"; then
        printf '%-9s external  %s (reachable)\n' "$n" "$addr"
      else
        printf '%-9s external  %s (UNREACHABLE)\n' "$n" "$addr"
        failed=1
      fi
    elif healthy "$n"; then
      printf '%-9s healthy   %s (pid %s)\n' "$n" "$addr" "$(main_pid "$n")"
    elif "${n}_running"; then
      printf '%-9s starting  %s (running, not ready)\n' "$n" "$addr"
      failed=1
    else
      printf '%-9s down\n' "$n"
      failed=1
    fi
  done
  return "$failed"
}

main_pid() {
  case $1 in
    rabbitmq) pidfile_pid "$RABBITMQ_DIR/run/server.pid" ;;
    nats) pidfile_pid "$NATS_DIR/run/nats.pid" ;;
    kafka) pidfile_pid "$KAFKA_DIR/run/tansu.pid" ;;
    pubsub) pidfile_pid "$PUBSUB_DIR/run/pubsub.pid" ;;
    *) "${1}_pid" ;;
  esac
}

cmd_restart() {
  (($# > 0)) || { log "restart: name a broker ($TIDEMILL_BROKERS)"; exit 2; }
  local list n t0
  read -r -a list <<<"$(names "$@")"
  for n in "${list[@]}"; do
    if tidemill_external "$n"; then
      log "$n is external ($("${n}_addr")): not restarting it"
      exit 3
    fi
  done
  for n in "${list[@]}"; do
    t0=$SECONDS
    down_one "$n" || return 1
    up_one "$n" || return 1
    log "$n restarted in $((SECONDS - t0))s"
  done
}

cmd_env() {
  local list n var
  read -r -a list <<<"$(names "$@")"
  for n in "${list[@]}"; do
    case $n in
      rabbitmq) var=TIDEMILL_AMQP_URL ;;
      nats) var=TIDEMILL_NATS_URL ;;
      kafka) var=TIDEMILL_KAFKA_BROKERS ;;
      pubsub) var=PUBSUB_EMULATOR_HOST ;;
      *) var=$("${n}_var") ;;
    esac
    printf 'export %s=%q\n' "$var" "${!var}"
    if [[ $n == redis && -n ${TIDEMILL_REDIS_TLS_URL:-} ]]; then
      printf 'export TIDEMILL_REDIS_TLS_URL=%q TIDEMILL_REDIS_TLS_CA=%q\n' \
        "$TIDEMILL_REDIS_TLS_URL" "$TIDEMILL_REDIS_TLS_CA"
    fi
    if [[ $n == aws ]]; then aws_env_credentials; fi
  done
}

cmd_running() {
  local n out=()
  for n in $TIDEMILL_BROKERS $TIDEMILL_CLUSTERS; do
    tidemill_external "$n" && continue
    "${n}_running" && out+=("$n")
  done
  echo "${out[@]:-}"
}

cmd_down_except() {
  local keep=" $* " n stop=()
  for n in $(cmd_running); do
    [[ $keep == *" $n "* ]] || stop+=("$n")
  done
  ((${#stop[@]})) || return 0
  log "stopping ${stop[*]}"
  cmd_down "${stop[@]}"
}

(($# > 0)) || usage
cmd=$1
shift

# One up/down/restart at a time (two test runs starting the brokers at once
# would otherwise race for the same ports and PID files). The first `up`
# may build Tansu for many minutes, hence the long wait.
case $cmd in
  up | down | down-except | restart)
    mkdir -p "$TIDEMILL_BROKERS_DIR"
    exec 9>"$TIDEMILL_BROKERS_DIR/.lock"
    if ! flock -w 1800 9; then
      log "another brokers.sh $cmd holds $TIDEMILL_BROKERS_DIR/.lock; gave up waiting"
      exit 1
    fi
    ;;
esac
case $cmd in
  up) cmd_up "$@" ;;
  down) cmd_down "$@" ;;
  down-except) cmd_down_except "$@" ;;
  status) cmd_status "$@" ;;
  restart) cmd_restart "$@" ;;
  env) cmd_env "$@" ;;
  running) cmd_running ;;
  kill-node | start-node)
    if ! { (($# == 2)) && [[ " $TIDEMILL_CLUSTERS " == *" $1 "* ]] && [[ $2 =~ ^[123]$ ]]; }; then
      log "$cmd: give a cluster ($TIDEMILL_CLUSTERS) and a node number 1..3"
      exit 2
    fi
    tidemill_external "$1" && { log "$1 is external ($("${1}_addr")): not ours to $cmd"; exit 3; }
    if [[ $cmd == kill-node ]]; then
      "${1}_kill_node" "$2"
    else
      "${1}_start_node" "$2"
      wait_for "$("${1}_start_timeout")" "$1 to be ready" healthy "$1" || exit 1
    fi
    ;;
  rabbitmqctl)
    rabbitmq_env
    exec "$RABBITMQ_SBIN/rabbitmqctl" "$@"
    ;;
  -h | --help | help) usage ;;
  *) log "unknown command '$cmd'"; usage ;;
esac
