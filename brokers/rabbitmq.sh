# shellcheck shell=bash
# RabbitMQ from Debian's rabbitmq-server package, run directly (not through
# the packaged service wrapper, which wants systemd and su) as a node of our
# own whose data, logs, cookie and epmd all belong to these scripts.

RABBITMQ_SBIN=/usr/lib/rabbitmq/bin
RABBITMQ_DIR="$TIDEMILL_BROKERS_DIR/rabbitmq"
RABBITMQ_NODE="tidemill@localhost"

rabbitmq_addr() { echo "$TIDEMILL_AMQP_URL"; }
rabbitmq_ports() { echo "$TIDEMILL_RABBITMQ_PORT $TIDEMILL_RABBITMQ_DIST_PORT $TIDEMILL_RABBITMQ_EPMD_PORT"; }

rabbitmq_installed() { [[ -x $RABBITMQ_SBIN/rabbitmq-server ]] && command -v epmd >/dev/null 2>&1; }
rabbitmq_apt_packages() { echo rabbitmq-server; }

rabbitmq_env() {
  # Everything the node and rabbitmqctl need to find each other, all
  # under RABBITMQ_DIR; nothing of the system-wide installation is used.
  export HOME="$RABBITMQ_DIR/home" # the Erlang cookie lives here
  export RABBITMQ_NODENAME="$RABBITMQ_NODE"
  export RABBITMQ_USE_LONGNAME=false
  export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
  export RABBITMQ_NODE_PORT="$TIDEMILL_RABBITMQ_PORT"
  export RABBITMQ_DIST_PORT="$TIDEMILL_RABBITMQ_DIST_PORT"
  export ERL_EPMD_ADDRESS=127.0.0.1
  export ERL_EPMD_PORT="$TIDEMILL_RABBITMQ_EPMD_PORT"
  export RABBITMQ_MNESIA_BASE="$RABBITMQ_DIR/mnesia"
  export RABBITMQ_LOG_BASE="$RABBITMQ_DIR/log"
  export RABBITMQ_PID_FILE="$RABBITMQ_DIR/run/beam.pid"
  export RABBITMQ_CONFIG_FILE="$RABBITMQ_DIR/rabbitmq" # .conf appended
  export RABBITMQ_ADVANCED_CONFIG_FILE="$RABBITMQ_DIR/advanced.config"
  export RABBITMQ_ENABLED_PLUGINS_FILE="$RABBITMQ_DIR/enabled_plugins"
  export RABBITMQ_CONF_ENV_FILE="$RABBITMQ_DIR/rabbitmq-env.conf"
  # Erlang distribution (server and CLI) on loopback only.
  export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
  export RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
}

rabbitmq_prepare() {
  mkdir -p "$RABBITMQ_DIR"/{home,mnesia,log,run}
  chmod 700 "$RABBITMQ_DIR/home"
  [[ -f $RABBITMQ_DIR/rabbitmq.conf ]] || cat >"$RABBITMQ_DIR/rabbitmq.conf" <<CONF
# Written by brokers/rabbitmq.sh
listeners.tcp.default = 127.0.0.1:$TIDEMILL_RABBITMQ_PORT
loopback_users.guest = true
log.console = false
log.file.level = info
# Tests publish in bursts; never block publishers on this small machine.
vm_memory_high_watermark.relative = 0.8
disk_free_limit.absolute = 50MB
CONF
  [[ -f $RABBITMQ_DIR/advanced.config ]] || echo '[].' >"$RABBITMQ_DIR/advanced.config"
  [[ -f $RABBITMQ_DIR/enabled_plugins ]] || echo '[].' >"$RABBITMQ_DIR/enabled_plugins"
  : >"$RABBITMQ_DIR/rabbitmq-env.conf"
}

rabbitmq_running() {
  pidfile_alive "$RABBITMQ_DIR/run/server.pid" || pidfile_alive "$RABBITMQ_DIR/run/beam.pidrec"
}

rabbitmq_ready() {
  # The AMQP listener opens at the end of the boot; only then ask
  # rabbitmqctl (an Erlang VM of its own, too heavy to poll with).
  tcp_open "$TIDEMILL_RABBITMQ_PORT" && (
    rabbitmq_env
    timeout 30 "$RABBITMQ_SBIN/rabbitmqctl" -q await_startup --timeout 20 >/dev/null 2>&1
  )
}

rabbitmq_start() {
  rabbitmq_prepare
  (
    rabbitmq_env
    cd "$RABBITMQ_DIR" || exit 1
    # Our own epmd, started first so that the node does not spawn one we
    # could not stop by PID (epmd outlives the node otherwise).
    if ! pidfile_alive "$RABBITMQ_DIR/run/epmd.pid"; then
      start_bg "$RABBITMQ_DIR/log/epmd.log" "$RABBITMQ_DIR/run/epmd.pid" "-port $TIDEMILL_RABBITMQ_EPMD_PORT" \
        "$(command -v epmd)" -port "$TIDEMILL_RABBITMQ_EPMD_PORT" -address 127.0.0.1
      wait_for 10 "epmd" tcp_open "$TIDEMILL_RABBITMQ_EPMD_PORT" || exit 1
    fi
    rm -f "$RABBITMQ_PID_FILE"
    start_bg "$RABBITMQ_DIR/log/server.log" "$RABBITMQ_DIR/run/server.pid" "rabbitmq-server" \
      "$RABBITMQ_SBIN/rabbitmq-server"
  )
}

rabbitmq_after_ready() {
  # The Erlang VM (beam.smp) is a child of the rabbitmq-server shell
  # wrapper; record its own PID (RabbitMQ wrote it) so that `down` can
  # finish it even if the wrapper is gone.
  local pid
  pid=$(cat "$RABBITMQ_DIR/run/beam.pid" 2>/dev/null || true)
  [[ $pid =~ ^[0-9]+$ ]] && record_pid "$RABBITMQ_DIR/run/beam.pidrec" "$pid" "$RABBITMQ_MNESIA_BASE_MARK"
  return 0
}
RABBITMQ_MNESIA_BASE_MARK="$TIDEMILL_BROKERS_DIR/rabbitmq/mnesia"

rabbitmq_stop() {
  # SIGTERM to the wrapper makes it stop the node cleanly (rabbitmqctl stop
  # semantics); then make sure the VM and our epmd are gone too.
  stop_pidfile "$RABBITMQ_DIR/run/server.pid" 60
  stop_pidfile "$RABBITMQ_DIR/run/beam.pidrec" 30
  stop_pidfile "$RABBITMQ_DIR/run/epmd.pid" 10
}

rabbitmq_start_timeout() { echo 90; }
