# shellcheck shell=bash
# A three-node RabbitMQ cluster on 127.0.0.1 (opt-in: `brokers.sh up rabbitmq-cluster`),
# from the same Debian rabbitmq-server as rabbitmq.sh, run the same way (no system service,
# everything under our own directory), for quorum queues and node failover tests.
# Node i (1..3):
#   node name  tidemill-c$i@localhost
#   AMQP       TIDEMILL_RABBITMQ_CLUSTER_PORT_BASE + i       (5681 5682 5683)
#   Erlang     TIDEMILL_RABBITMQ_CLUSTER_DIST_PORT_BASE + i  (25681 25682 25683)
#   files      $TIDEMILL_BROKERS_DIR/rabbitmq-cluster/n$i/{mnesia,log,run}, n$i/rabbitmq.conf
# Shared: one epmd on TIDEMILL_RABBITMQ_CLUSTER_EPMD_PORT (4371), one Erlang cookie
# (rabbitmq-cluster/home). Nodes 2 and 3 join node 1 on their first start (stop_app,
# join_cluster, start_app); later starts find the cluster in their data.
# Needs rabbitmq.sh (RABBITMQ_SBIN, rabbitmq_installed), which brokers.sh sources first.
#
# Run directly, `bash brokers/rabbitmq-cluster.sh ctl I ARG...` runs rabbitmqctl
# against node I (e.g. `ctl 1 list_queues name type leader members`).

RMQC_DIR="$TIDEMILL_BROKERS_DIR/rabbitmq-cluster"

_rmqc_node() { echo "tidemill-c$1@localhost"; }
_rmqc_port() { echo $((TIDEMILL_RABBITMQ_CLUSTER_PORT_BASE + $1)); }
_rmqc_dist_port() { echo $((TIDEMILL_RABBITMQ_CLUSTER_DIST_PORT_BASE + $1)); }
_rmqc_server_pidfile() { echo "$RMQC_DIR/n$1/run/server.pid"; }
_rmqc_beam_pidfile() { echo "$RMQC_DIR/n$1/run/beam.pidrec"; }
# What the node's Erlang VM has on its command line (an argument of ours that Erlang
# ignores; nothing else there names the node), to check a PID before signalling it.
_rmqc_marker() { echo "-tidemill_cluster_node $RMQC_DIR/n$1"; }

rabbitmq-cluster_addr() { echo "$TIDEMILL_AMQP_CLUSTER_URL"; }
rabbitmq-cluster_var() { echo TIDEMILL_AMQP_CLUSTER_URL; }
rabbitmq-cluster_ports() {
  local i out=()
  for i in 1 2 3; do out+=("$(_rmqc_port "$i")" "$(_rmqc_dist_port "$i")"); done
  echo "${out[@]}" "$TIDEMILL_RABBITMQ_CLUSTER_EPMD_PORT"
}
rabbitmq-cluster_installed() { rabbitmq_installed; }
rabbitmq-cluster_install() { rabbitmq_installed || die "rabbitmq-server is not installed"; }
rabbitmq-cluster_apt_packages() { rabbitmq_installed || echo rabbitmq-server; }
# The first start boots three nodes on two cores and joins two of them (about 40 s).
rabbitmq-cluster_start_timeout() { echo 240; }
rabbitmq-cluster_log() { echo "$RMQC_DIR/n1/log/server.log"; }
rabbitmq-cluster_pid() { pidfile_pid "$(_rmqc_server_pidfile 1)"; }

_rmqc_env() { # I: the environment of node I (for the server and for rabbitmqctl)
  local i=$1 d="$RMQC_DIR/n$1"
  export HOME="$RMQC_DIR/home" # the shared Erlang cookie lives here
  export RABBITMQ_NODENAME
  RABBITMQ_NODENAME=$(_rmqc_node "$i")
  export RABBITMQ_USE_LONGNAME=false
  export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
  export RABBITMQ_NODE_PORT
  RABBITMQ_NODE_PORT=$(_rmqc_port "$i")
  export RABBITMQ_DIST_PORT
  RABBITMQ_DIST_PORT=$(_rmqc_dist_port "$i")
  export ERL_EPMD_ADDRESS=127.0.0.1
  export ERL_EPMD_PORT="$TIDEMILL_RABBITMQ_CLUSTER_EPMD_PORT"
  export RABBITMQ_MNESIA_BASE="$d/mnesia"
  export RABBITMQ_LOG_BASE="$d/log"
  export RABBITMQ_PID_FILE="$d/run/beam.pid"
  export RABBITMQ_CONFIG_FILE="$d/rabbitmq" # .conf appended
  export RABBITMQ_ADVANCED_CONFIG_FILE="$d/advanced.config"
  export RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins"
  export RABBITMQ_CONF_ENV_FILE="$d/rabbitmq-env.conf"
  export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS
  # +sbwt none: idle schedulers sleep instead of spinning (three idle nodes would otherwise
  # take CPU from the tests running beside them on a 2-core machine).
  RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1} +sbwt none +sbwtdcpu none +sbwtdio none $(_rmqc_marker "$i")"
  export RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
}

_rmqc_ctl() { # I ARG...: rabbitmqctl against node I
  local i=$1
  shift
  (
    _rmqc_env "$i"
    timeout "${RMQC_CTL_TIMEOUT:-180}" "$RABBITMQ_SBIN/rabbitmqctl" -n "$(_rmqc_node "$i")" "$@"
  )
}

_rmqc_prepare() { # I
  local i=$1 d="$RMQC_DIR/n$1"
  mkdir -p "$RMQC_DIR"/{home,log,run} "$d"/{mnesia,log,run}
  chmod 700 "$RMQC_DIR/home"
  # One cookie for the three nodes and rabbitmqctl (Erlang makes one when it is missing,
  # but three nodes starting at once would race for it).
  if [[ ! -s $RMQC_DIR/home/.erlang.cookie ]]; then
    (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$RMQC_DIR/home/.erlang.cookie")
  fi
  chmod 400 "$RMQC_DIR/home/.erlang.cookie"
  [[ -f $d/rabbitmq.conf ]] || cat >"$d/rabbitmq.conf" <<CONF
# Written by brokers/rabbitmq-cluster.sh (node $i of 3).
listeners.tcp.default = 127.0.0.1:$(_rmqc_port "$i")
loopback_users.guest = true
log.console = false
log.file.level = info
# Three nodes share this small machine: a fixed memory watermark per node (a relative one
# would let each of the three count on most of the machine's memory), and a 50 MB disk
# limit, so a busy test neither blocks publishers nor drives the machine into swap.
vm_memory_high_watermark.absolute = 1GB
disk_free_limit.absolute = 50MB
CONF
  [[ -f $d/advanced.config ]] || echo '[].' >"$d/advanced.config"
  [[ -f $d/enabled_plugins ]] || echo '[].' >"$d/enabled_plugins"
  : >"$d/rabbitmq-env.conf"
}

_rmqc_epmd() { # our own epmd, so that no node spawns one we could not stop by PID
  pidfile_alive "$RMQC_DIR/run/epmd.pid" && return 0
  start_bg "$RMQC_DIR/log/epmd.log" "$RMQC_DIR/run/epmd.pid" \
    "-port $TIDEMILL_RABBITMQ_CLUSTER_EPMD_PORT" \
    "$(command -v epmd)" -port "$TIDEMILL_RABBITMQ_CLUSTER_EPMD_PORT" -address 127.0.0.1
  wait_for 10 "the cluster's epmd" tcp_open "$TIDEMILL_RABBITMQ_CLUSTER_EPMD_PORT"
}

rabbitmq-cluster_start_node() { # I: start node I (its data kept); returns at once
  local i=$1
  pidfile_alive "$(_rmqc_server_pidfile "$i")" && return 0
  _rmqc_prepare "$i"
  _rmqc_epmd || return 1
  (
    _rmqc_env "$i"
    cd "$RMQC_DIR/n$i" || exit 1
    rm -f "$RABBITMQ_PID_FILE"
    start_bg "$RMQC_DIR/n$i/log/server.log" "$(_rmqc_server_pidfile "$i")" \
      "rabbitmq-server" "$RABBITMQ_SBIN/rabbitmq-server"
  )
}

_rmqc_await() { # I: wait until node I has booted
  # await_startup fails at once while the node is not registered yet: first wait for its
  # distribution port, which opens early in the boot.
  wait_for 60 "node $1's Erlang distribution" tcp_open "$(_rmqc_dist_port "$1")" || return 1
  _rmqc_ctl "$1" -q await_startup --timeout 120 >/dev/null
}

_rmqc_join() { # I: node I joins node 1's cluster (first start only)
  local i=$1 out
  _rmqc_await "$i" || return 1
  _rmqc_ctl "$i" -q stop_app >/dev/null || return 1
  if ! out=$(_rmqc_ctl "$i" -q join_cluster "$(_rmqc_node 1)" 2>&1); then
    [[ $out == *already_member* || $out == *"already a member"* ]] || {
      log "rabbitmq-cluster: node $i could not join node 1: $out"
      _rmqc_ctl "$i" -q start_app >/dev/null 2>&1
      return 1
    }
  fi
  _rmqc_ctl "$i" -q start_app >/dev/null || return 1
  touch "$RMQC_DIR/n$i/joined"
  log "rabbitmq-cluster: node $i joined node 1"
}

rabbitmq-cluster_start() {
  local i
  for i in 1 2 3; do rabbitmq-cluster_start_node "$i" || return 1; done
  # First start: every node boots as a cluster of its own; 2 and 3 then join node 1.
  [[ -f $RMQC_DIR/n2/joined && -f $RMQC_DIR/n3/joined ]] && return 0
  _rmqc_await 1 || return 1
  for i in 2 3; do
    [[ -f $RMQC_DIR/n$i/joined ]] || _rmqc_join "$i" || return 1
  done
}

# Running: every node's Erlang VM (or its wrapper, while it starts) is alive.
rabbitmq-cluster_running() {
  local i
  for i in 1 2 3; do
    pidfile_alive "$(_rmqc_server_pidfile "$i")" || pidfile_alive "$(_rmqc_beam_pidfile "$i")" ||
      return 1
  done
}

# Ready: every node's AMQP listener is open (it opens at the end of the boot) and node 1
# sees all three nodes running in its cluster.
rabbitmq-cluster_ready() {
  local i status
  for i in 1 2 3; do tcp_open "$(_rmqc_port "$i")" || return 1; done
  status=$(RMQC_CTL_TIMEOUT=30 _rmqc_ctl 1 -q cluster_status --formatter json 2>/dev/null) ||
    return 1
  python3 -c '
import json, sys
running = json.load(sys.stdin).get("running_nodes") or []
sys.exit(0 if all("tidemill-c%d@localhost" % i in running for i in (1, 2, 3)) else 1)' \
    <<<"$status"
}

_rmqc_record_beam() { # I: record the VM's PID (RabbitMQ wrote it) with its marker
  local i=$1 pid
  pid=$(cat "$RMQC_DIR/n$i/run/beam.pid" 2>/dev/null || true)
  [[ $pid =~ ^[0-9]+$ ]] || return 0
  record_pid "$(_rmqc_beam_pidfile "$i")" "$pid" "$(_rmqc_marker "$i")"
  pidfile_alive "$(_rmqc_beam_pidfile "$i")" || rm -f "$(_rmqc_beam_pidfile "$i")"
}

rabbitmq-cluster_after_ready() {
  local i
  for i in 1 2 3; do _rmqc_record_beam "$i"; done
  return 0
}

rabbitmq-cluster_kill_node() { # I: SIGKILL node I's Erlang VM by its PID
  local i=$1 f pid deadline
  f=$(_rmqc_beam_pidfile "$i")
  pidfile_alive "$f" || _rmqc_record_beam "$i"
  if ! pidfile_alive "$f"; then
    log "rabbitmq-cluster: node $i is not running"
    return 1
  fi
  pid=$(pidfile_pid "$f")
  kill -KILL "$pid"
  deadline=$((SECONDS + 10))
  while pidfile_alive "$f" && ((SECONDS < deadline)); do sleep 0.1; done
  # The wrapper shell exits with its VM.
  while pidfile_alive "$(_rmqc_server_pidfile "$i")" && ((SECONDS < deadline)); do sleep 0.1; done
  rm -f "$f"
  log "rabbitmq-cluster: node $i (pid $pid) killed"
}

rabbitmq-cluster_stop() {
  # SIGTERM to each wrapper stops its node cleanly; the three stop at once (a restart
  # starts them together, so none waits for a peer that stopped after it).
  local i pids=()
  for i in 1 2 3; do
    stop_pidfile "$(_rmqc_server_pidfile "$i")" 60 &
    pids+=($!)
  done
  wait "${pids[@]}" || true
  for i in 1 2 3; do stop_pidfile "$(_rmqc_beam_pidfile "$i")" 30; done
  stop_pidfile "$RMQC_DIR/run/epmd.pid" 10
}

# Direct use: rabbitmqctl against one node.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  set -euo pipefail
  _here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
  # shellcheck source=brokers/env.sh
  source "$_here/env.sh"
  # shellcheck source=brokers/lib.sh
  source "$_here/lib.sh"
  # shellcheck source=brokers/rabbitmq.sh
  source "$_here/rabbitmq.sh"
  RMQC_DIR="$TIDEMILL_BROKERS_DIR/rabbitmq-cluster"
  case "${1:-}" in
    ctl)
      [[ ${2:-} =~ ^[123]$ ]] || die "usage: $0 ctl I ARG... (I = 1..3)"
      i=$2
      shift 2
      _rmqc_ctl "$i" "$@"
      ;;
    *) die "usage: $0 ctl I ARG... (rabbitmqctl against node I = 1..3)" ;;
  esac
fi
