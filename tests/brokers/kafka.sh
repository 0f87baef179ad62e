# shellcheck shell=bash
# A Kafka-protocol broker: Tansu (a Kafka-compatible broker written in Rust)
# with its SQLite storage engine, so data and committed offsets survive a
# restart. Built once with `cargo install` into the cache dir, outside the
# clone, so that later runs (and `cargo clean`) do not rebuild it.

KAFKA_DIR="$TIDEMILL_BROKERS_DIR/kafka"
TANSU_ROOT="$TIDEMILL_CACHE_DIR/tansu-$TIDEMILL_TANSU_VERSION"
TANSU_BIN="$TANSU_ROOT/bin/tansu"

kafka_addr() { echo "$TIDEMILL_KAFKA_BROKERS"; }
kafka_ports() { echo "$TIDEMILL_KAFKA_PORT"; }
kafka_installed() { [[ -x $TANSU_BIN ]]; }
kafka_apt_packages() { :; }

kafka_install() {
  command -v cargo >/dev/null 2>&1 || die "cargo is needed to build tansu"
  log "  cargo install tansu --version $TIDEMILL_TANSU_VERSION --locked --features libsql"
  log "  (a one-time build of several minutes; the binary is kept in $TANSU_ROOT)"
  mkdir -p "$TANSU_ROOT"
  # Its own target dir: do not hold the workspace's build lock meanwhile.
  # opt-level 1 instead of 3 cuts the build time a lot on 2 cores; a test
  # broker does not need the last bit of speed.
  CARGO_TARGET_DIR="$TIDEMILL_CACHE_DIR/tansu-build" \
    CARGO_PROFILE_RELEASE_OPT_LEVEL="${TIDEMILL_TANSU_OPT_LEVEL:-1}" \
    CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_INCREMENTAL=0 \
    cargo install tansu --version "$TIDEMILL_TANSU_VERSION" --locked --features libsql \
    --root "$TANSU_ROOT" >&2 || die "building tansu failed"
  rm -rf "$TIDEMILL_CACHE_DIR/tansu-build"
}

kafka_running() { pidfile_alive "$KAFKA_DIR/run/tansu.pid"; }

kafka_ready() {
  # tansu answers the Kafka protocol as soon as it listens.
  tcp_open "$TIDEMILL_KAFKA_PORT"
}

kafka_start() {
  mkdir -p "$KAFKA_DIR"/{data,log,run}
  # Tansu takes the sqlite path relative to its working directory (an
  # absolute path gets the working directory put in front of it): start it
  # from its data dir with a relative path.
  (
    cd "$KAFKA_DIR/data" || exit 1
    start_bg "$KAFKA_DIR/log/tansu.log" "$KAFKA_DIR/run/tansu.pid" "$TANSU_BIN" \
      "$TANSU_BIN" broker \
      --listener-url "tcp://127.0.0.1:$TIDEMILL_KAFKA_PORT" \
      --advertised-listener-url "tcp://127.0.0.1:$TIDEMILL_KAFKA_PORT" \
      --storage-engine "sqlite://tansu.db"
  )
}

kafka_after_ready() { :; }
kafka_stop() { stop_pidfile "$KAFKA_DIR/run/tansu.pid" 20; }
kafka_start_timeout() { echo 30; }
