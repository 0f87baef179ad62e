# shellcheck shell=bash
# A Kafka-protocol broker: Nisshi (the Kafka-compatible broker written in Rust
# that was called Tansu until its 0.7 releases) with its SQLite storage engine,
# so data and committed offsets survive a restart. Built once with
# `cargo install` into the cache dir, outside the clone, so that later runs
# (and `cargo clean`) do not rebuild it.
#
# Why not Tansu 0.6.0 (the last release under that name, used before): its
# group coordinator never hands a crashed member's partitions to the others
# (see README.md, "Kafka protocol"), and its idempotent-producer check panics
# after a restart. Nisshi 0.8.1 has a rewritten coordinator that does.

: "${TIDEMILL_NISSHI_VERSION:=0.8.1}"
KAFKA_DIR="$TIDEMILL_BROKERS_DIR/kafka"
NISSHI_ROOT="$TIDEMILL_CACHE_DIR/nisshi-$TIDEMILL_NISSHI_VERSION"
NISSHI_BIN="$NISSHI_ROOT/bin/nisshi"

kafka_addr() { echo "$TIDEMILL_KAFKA_BROKERS"; }
kafka_ports() { echo "$TIDEMILL_KAFKA_PORT"; }
kafka_installed() { [[ -x $NISSHI_BIN ]]; }
kafka_apt_packages() { :; }

# The Rust that builds nisshi: its lock file wants rustc 1.96 or later (rama
# 0.4 declares it). The default toolchain if it is recent enough, else the
# pinned $TIDEMILL_NISSHI_RUST through rustup, installed when missing (minimal
# profile, a few seconds): a fresh machine's one toolchain may be older.
: "${TIDEMILL_NISSHI_RUST:=1.96}"
nisshi_cargo() {
  local v
  v=$(rustc --version 2>/dev/null | awk '{print $2}')
  if [[ $v =~ ^1\.([0-9]+)\. ]] && ((BASH_REMATCH[1] >= 96)); then
    echo cargo
    return 0
  fi
  command -v rustup >/dev/null 2>&1 || return 1
  if ! rustup run "$TIDEMILL_NISSHI_RUST" rustc --version >/dev/null 2>&1; then
    log "  installing Rust $TIDEMILL_NISSHI_RUST for nisshi (rustup, minimal profile)"
    rustup toolchain install "$TIDEMILL_NISSHI_RUST" --profile minimal --no-self-update >&2 ||
      return 1
  fi
  echo "rustup run $TIDEMILL_NISSHI_RUST cargo"
}

kafka_install() {
  command -v cargo >/dev/null 2>&1 || die "cargo is needed to build nisshi"
  local cargo
  cargo=$(nisshi_cargo) ||
    die "building nisshi $TIDEMILL_NISSHI_VERSION needs rustc 1.96 or later: the default toolchain is older and rustup could not install $TIDEMILL_NISSHI_RUST"
  log "  $cargo install nisshi --version $TIDEMILL_NISSHI_VERSION --locked --features libsql"
  log "  (a one-time build of about 8 CPU-minutes, 4-6 minutes on 2 cores; the binary is kept in $NISSHI_ROOT)"
  mkdir -p "$NISSHI_ROOT"
  # Its own target dir: do not hold the workspace's build lock meanwhile.
  # The Rust code unoptimized, the C code (SQLite, where a broker of this
  # storage engine spends its time) at -O2: 466 s of CPU to build, against
  # 878 s at opt-level 1 (measured on the 2-core machine), for 0.85-0.95x the
  # throughput of that build in the Kafka bench; a test broker does not need
  # the rest. TIDEMILL_NISSHI_OPT_LEVEL and TIDEMILL_NISSHI_CFLAGS change them.
  # shellcheck disable=SC2086 # $cargo may be "rustup run 1.96 cargo"
  CARGO_TARGET_DIR="$TIDEMILL_CACHE_DIR/nisshi-build" \
    CARGO_PROFILE_RELEASE_OPT_LEVEL="${TIDEMILL_NISSHI_OPT_LEVEL:-0}" \
    CFLAGS="${TIDEMILL_NISSHI_CFLAGS:--O2}" \
    CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_INCREMENTAL=0 \
    $cargo install nisshi --version "$TIDEMILL_NISSHI_VERSION" --locked \
    --no-default-features --features libsql \
    --root "$NISSHI_ROOT" >&2 || die "building nisshi failed"
  rm -rf "$TIDEMILL_CACHE_DIR/nisshi-build"
}

# The PID and log files keep the names they had with Tansu (brokers.sh knows them).
kafka_running() { pidfile_alive "$KAFKA_DIR/run/tansu.pid"; }

kafka_ready() {
  # nisshi answers the Kafka protocol as soon as it listens.
  tcp_open "$TIDEMILL_KAFKA_PORT"
}

kafka_start() {
  mkdir -p "$KAFKA_DIR"/{data,log,run}
  # The sqlite path is relative to the working directory: start it from its
  # data dir. A database of Tansu 0.6 (tansu.db) has another schema and is
  # left alone.
  # --group-initial-rebalance-delay 0s: a new group forms at once instead of
  # waiting 3 s for more members (Kafka's group.initial.rebalance.delay.ms,
  # which test setups set to 0 too); later rebalances are not delayed anyway.
  (
    cd "$KAFKA_DIR/data" || exit 1
    start_bg "$KAFKA_DIR/log/tansu.log" "$KAFKA_DIR/run/tansu.pid" "$NISSHI_BIN" \
      "$NISSHI_BIN" broker \
      --listener-url "tcp://127.0.0.1:$TIDEMILL_KAFKA_PORT" \
      --advertised-listener-url "tcp://127.0.0.1:$TIDEMILL_KAFKA_PORT" \
      --storage-engine "sqlite://nisshi.db" \
      --group-initial-rebalance-delay 0s
  )
}

kafka_after_ready() { :; }
kafka_stop() { stop_pidfile "$KAFKA_DIR/run/tansu.pid" 20; }
kafka_start_timeout() { echo 30; }
