# shellcheck shell=bash
# Redis from Debian's redis-server package, run directly as a server of our own
# (no config file, no system service) with the append-only file on, so streams
# and consumer groups survive `brokers.sh restart redis`.

REDIS_DIR="$TIDEMILL_BROKERS_DIR/redis"

redis_addr() { echo "$TIDEMILL_REDIS_URL"; }
redis_ports() { echo "$TIDEMILL_REDIS_PORT"; }
redis_var() { echo TIDEMILL_REDIS_URL; }
redis_log() { echo "$REDIS_DIR/log/redis.log"; }
redis_pid() { pidfile_pid "$REDIS_DIR/run/redis.pid"; }

redis_installed() { command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1; }
redis_apt_packages() { redis_installed || echo redis-server redis-tools; }

redis_running() { pidfile_alive "$REDIS_DIR/run/redis.pid"; }

# PONG only once the server accepts commands (a server still loading its
# append-only file answers LOADING).
redis_ready() {
  [[ $(redis-cli -h 127.0.0.1 -p "$TIDEMILL_REDIS_PORT" ping 2>/dev/null) == PONG ]]
}

redis_start() {
  mkdir -p "$REDIS_DIR"/{data,log,run}
  # appendfsync everysec: what a publish was acknowledged with survives a
  # graceful restart (SIGTERM flushes the file); no RDB snapshots.
  # (Redis rewrites its process title to "redis-server 127.0.0.1:PORT": the marker.)
  start_bg "$REDIS_DIR/log/redis.log" "$REDIS_DIR/run/redis.pid" "127.0.0.1:$TIDEMILL_REDIS_PORT" \
    redis-server --bind 127.0.0.1 --port "$TIDEMILL_REDIS_PORT" --protected-mode yes \
    --dir "$REDIS_DIR/data" --appendonly yes --appendfsync everysec --save "" \
    --daemonize no --loglevel notice
}

redis_after_ready() { :; }
redis_stop() { stop_pidfile "$REDIS_DIR/run/redis.pid" 20; }
redis_start_timeout() { echo 30; }
