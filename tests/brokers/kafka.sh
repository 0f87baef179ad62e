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

# Tansu 0.6's `header` table has no index on (topition, offset_id): every fetched record
# scans all header rows, so fetches slow down as the database grows (runs of the suite and
# the benches leave hundreds of thousands of rows). Add the index once Tansu created its
# schema; it changes nothing else. Skipped quietly where python3 or the table is missing.
kafka_after_ready() {
  local db="$KAFKA_DIR/data/tansu.db" i
  command -v python3 >/dev/null 2>&1 || return 0
  for i in 1 2 3 4 5 6 7 8 9 10; do
    python3 - "$db" <<'PY' && return 0
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], timeout=10)
if not db.execute("select 1 from sqlite_master where type='table' and name='header'").fetchone():
    sys.exit(1)
db.execute("create index if not exists header_topition_offset on header (topition, offset_id)")
db.commit()
PY
    sleep 0.5
  done
  log "  note: could not add the header index to $db (fetches may slow down as it grows)"
}
kafka_stop() { stop_pidfile "$KAFKA_DIR/run/tansu.pid" 20; }
kafka_start_timeout() { echo 30; }
