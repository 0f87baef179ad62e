# shellcheck shell=bash
# Redis from Debian's redis-server package, run directly as a server of our own
# (no config file, no system service) with the append-only file on, so streams
# and consumer groups survive `brokers.sh restart redis`.

REDIS_DIR="$TIDEMILL_BROKERS_DIR/redis"

redis_addr() { echo "$TIDEMILL_REDIS_URL"; }
redis_ports() { echo "$TIDEMILL_REDIS_PORT $TIDEMILL_REDIS_TLS_PORT"; }
redis_var() { echo TIDEMILL_REDIS_URL; }
redis_log() { echo "$REDIS_DIR/log/redis.log"; }
redis_pid() { pidfile_pid "$REDIS_DIR/run/redis.pid"; }

redis_installed() {
  command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1 &&
    command -v openssl >/dev/null 2>&1
}
redis_apt_packages() { redis_installed || echo redis-server redis-tools openssl; }

# A test CA and a certificate for 127.0.0.1 signed by it (made once), for the TLS port:
# clients trust the CA through TIDEMILL_REDIS_TLS_CA (tidemill-redis: tls_ca_file).
redis_tls_files() {
  local d=$REDIS_DIR/tls
  [[ -f $d/redis.crt && -f $d/ca.crt ]] && return 0
  mkdir -p "$d"
  if ! { openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=tidemill test CA" \
    -keyout "$d/ca.key" -out "$d/ca.crt" >/dev/null 2>&1 &&
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
      -keyout "$d/redis.key" -out "$d/redis.csr" >/dev/null 2>&1 &&
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$d/san.ext" &&
    openssl x509 -req -in "$d/redis.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
      -days 3650 -extfile "$d/san.ext" -out "$d/redis.crt" >/dev/null 2>&1; }; then
    die "redis: could not make the test TLS certificates in $d"
  fi
}

redis_running() { pidfile_alive "$REDIS_DIR/run/redis.pid"; }

# PONG only once the server accepts commands (a server still loading its
# append-only file answers LOADING).
redis_ready() {
  [[ $(redis-cli -h 127.0.0.1 -p "$TIDEMILL_REDIS_PORT" ping 2>/dev/null) == PONG ]]
}

redis_start() {
  mkdir -p "$REDIS_DIR"/{data,log,run}
  redis_tls_files
  # appendfsync everysec: what a publish was acknowledged with survives a
  # graceful restart (SIGTERM flushes the file); no RDB snapshots.
  # (Redis rewrites its process title to "redis-server 127.0.0.1:PORT": the marker.)
  start_bg "$REDIS_DIR/log/redis.log" "$REDIS_DIR/run/redis.pid" "127.0.0.1:$TIDEMILL_REDIS_PORT" \
    redis-server --bind 127.0.0.1 --port "$TIDEMILL_REDIS_PORT" --protected-mode yes \
    --dir "$REDIS_DIR/data" --appendonly yes --appendfsync everysec --save "" \
    --daemonize no --loglevel notice \
    --tls-port "$TIDEMILL_REDIS_TLS_PORT" --tls-auth-clients no \
    --tls-cert-file "$REDIS_DIR/tls/redis.crt" --tls-key-file "$REDIS_DIR/tls/redis.key" \
    --tls-ca-cert-file "$REDIS_DIR/tls/ca.crt"
}

redis_after_ready() { :; }
redis_stop() { stop_pidfile "$REDIS_DIR/run/redis.pid" 20; }
redis_start_timeout() { echo 30; }
