# shellcheck shell=bash
# PostgreSQL from Debian's postgresql package, run as a cluster of our own in
# target/brokers/postgres (initdb once; no system service, no pg_ctlcluster), on
# 127.0.0.1:5433 so that a system PostgreSQL on 5432 is never touched.
#
# PostgreSQL refuses to run as root: when these scripts run as root, initdb and the
# server run as the `postgres` system user the package creates (setpriv, which execs
# in place, so the PID we record is the postmaster's); otherwise as the calling user.

POSTGRES_DIR="$TIDEMILL_BROKERS_DIR/postgres"
POSTGRES_DATA="$POSTGRES_DIR/data"
# The server's user when we are root (the package's system user).
POSTGRES_OS_USER=postgres
if [[ $(id -u) -eq 0 ]]; then
  POSTGRES_AS_USER=(setpriv "--reuid=$POSTGRES_OS_USER" "--regid=$POSTGRES_OS_USER" --init-groups --)
else
  POSTGRES_AS_USER=()
fi
# The test role, its password and database (the default TIDEMILL_POSTGRES_URL).
POSTGRES_ROLE=tidemill
POSTGRES_PASSWORD=tidemill
POSTGRES_DB=tidemill

# The address without its password (for what these scripts print).
postgres_addr() {
  local url=$TIDEMILL_POSTGRES_URL
  if [[ $url =~ ^([a-z]+://[^:/@]*):[^@/]*@(.*)$ ]]; then
    url="${BASH_REMATCH[1]}:***@${BASH_REMATCH[2]}"
  fi
  echo "$url"
}
postgres_ports() { echo "$TIDEMILL_POSTGRES_PORT"; }
postgres_var() { echo TIDEMILL_POSTGRES_URL; }
postgres_log() { echo "$POSTGRES_DIR/log/postgres.log"; }
postgres_pid() { pidfile_pid "$POSTGRES_DIR/run/postgres.pid"; }

# The server's binaries: those of the version the data directory was made with, else
# the highest version installed (/usr/lib/postgresql/<version>/bin).
postgres_bindir() {
  local v d
  if [[ -f $POSTGRES_DATA/PG_VERSION ]]; then
    v=$(<"$POSTGRES_DATA/PG_VERSION")
    d=/usr/lib/postgresql/$v/bin
    if [[ -x $d/postgres && -x $d/initdb ]]; then echo "$d"; return 0; fi
    return 1
  fi
  for d in $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V -r); do
    if [[ -x $d/postgres && -x $d/initdb ]]; then echo "$d"; return 0; fi
  done
  return 1
}

postgres_installed() {
  postgres_bindir >/dev/null && command -v psql >/dev/null 2>&1 &&
    { [[ $(id -u) -ne 0 ]] || id -u "$POSTGRES_OS_USER" >/dev/null 2>&1; }
}
postgres_apt_packages() { postgres_installed || echo postgresql postgresql-client; }

# The package creates a default cluster (`main`, port 5432) and enables the
# `postgresql` service, which starts every cluster marked `auto` on boot. apt_install's
# policy-rc.d keeps it from starting now; the clusters this install created are then
# set to `manual`, so nothing of ours starts on boot either. Clusters that were
# there before are left as they were.
_POSTGRES_CLUSTERS_BEFORE=
postgres_before_install() {
  _POSTGRES_CLUSTERS_BEFORE=" $(printf '%s ' /etc/postgresql/*/*/start.conf) "
}
postgres_after_install() {
  local f
  for f in /etc/postgresql/*/*/start.conf; do
    [[ -f $f && $_POSTGRES_CLUSTERS_BEFORE != *" $f "* ]] || continue
    if grep -qx auto "$f"; then
      log "  postgres: the package's cluster $(dirname "$f") starts on boot: set it to manual"
      as_root sed -i 's/^auto$/manual/' "$f" || log "  warning: could not edit $f"
    fi
  done
}

postgres_running() { pidfile_alive "$POSTGRES_DIR/run/postgres.pid"; }

# Ready = the test role logs in over TCP (scram-sha-256) and runs a query, which a
# server still recovering or starting up refuses.
postgres_ready() {
  [[ $(PGCONNECT_TIMEOUT=3 timeout 10 psql -X -A -t -q -d "$TIDEMILL_POSTGRES_URL" \
    -c 'select 1' 2>/dev/null) == 1 ]]
}

# The server's user must reach our directory: when one of its parents is closed to it
# (a clone under /root, mode 0700), grant that user, and only it, the right to pass
# through (an ACL, execute only: it cannot list or read anything there).
postgres_grant_path() {
  ((${#POSTGRES_AS_USER[@]})) || return 0
  "${POSTGRES_AS_USER[@]}" test -x "$POSTGRES_DIR" && return 0
  command -v setfacl >/dev/null 2>&1 || apt_install acl
  local parts part p=
  IFS=/ read -r -a parts <<<"${POSTGRES_DIR#/}"
  for part in "${parts[@]}"; do
    [[ -n $part ]] || continue
    p+="/$part"
    if ! "${POSTGRES_AS_USER[@]}" test -x "$p"; then
      log "  postgres: user $POSTGRES_OS_USER cannot pass through $p: setfacl -m u:$POSTGRES_OS_USER:x $p"
      setfacl -m "u:$POSTGRES_OS_USER:x" "$p" || die "postgres: could not give $POSTGRES_OS_USER access to $p"
    fi
  done
  "${POSTGRES_AS_USER[@]}" test -x "$POSTGRES_DIR" ||
    die "postgres: user $POSTGRES_OS_USER cannot reach $POSTGRES_DIR (set TIDEMILL_BROKERS_DIR elsewhere)"
}

# The socket directory, or nothing when its path would be too long for a Unix socket
# (108 bytes with the file name): then the server listens on TCP only.
postgres_socket_dir() {
  local d=$POSTGRES_DIR/sock
  ((${#d} + 16 < 108)) && echo "$d"
}

# Our configuration (rewritten at every start; initdb's postgresql.conf in the data
# directory is not used).
postgres_write_config() {
  local sock
  sock=$(postgres_socket_dir) || true
  cat >"$POSTGRES_DIR/postgresql.conf" <<EOF
# Written by brokers/postgres.sh at every start: edit the script, not this file.
listen_addresses = '127.0.0.1'
port = $TIDEMILL_POSTGRES_PORT
unix_socket_directories = '$sock'
unix_socket_permissions = 0700
hba_file = '$POSTGRES_DIR/pg_hba.conf'
ident_file = '$POSTGRES_DIR/pg_ident.conf'
cluster_name = 'tidemill-test'
# Several test suites run side by side, each with its own pool.
max_connections = 400
shared_buffers = 128MB
# Durable: a committed transaction survives a restart (and a crash).
fsync = on
synchronous_commit = on
full_page_writes = on
password_encryption = scram-sha-256
logging_collector = off
log_line_prefix = '%m [%p] %q%u@%d '
log_timezone = 'UTC'
timezone = 'UTC'
lc_messages = 'C'
EOF
  cat >"$POSTGRES_DIR/pg_hba.conf" <<EOF
# Written by brokers/postgres.sh at every start.
# The socket directory and socket are 0700: only the server's user (and root) reach it.
local all all trust
host all all 127.0.0.1/32 scram-sha-256
EOF
  : >"$POSTGRES_DIR/pg_ident.conf"
  chmod 644 "$POSTGRES_DIR/postgresql.conf" "$POSTGRES_DIR/pg_hba.conf" "$POSTGRES_DIR/pg_ident.conf"
}

# initdb, then the test role and database (single-user mode, before the server
# listens). Once: `initialized` records that both went through.
postgres_init() {
  local bin=$1 out
  [[ -f $POSTGRES_DIR/initialized && -f $POSTGRES_DATA/PG_VERSION ]] && return 0
  log "  postgres: initdb $POSTGRES_DATA ($("$bin/postgres" --version))"
  rm -rf "$POSTGRES_DATA"
  mkdir -m 700 "$POSTGRES_DATA"
  ((${#POSTGRES_AS_USER[@]} == 0)) || chown "$POSTGRES_OS_USER:" "$POSTGRES_DATA"
  if ! "${POSTGRES_AS_USER[@]}" "$bin/initdb" -D "$POSTGRES_DATA" -U postgres --no-locale -E UTF8 \
    --auth-local=trust --auth-host=scram-sha-256 >>"$POSTGRES_DIR/log/initdb.log" 2>&1; then
    tail -n 20 "$POSTGRES_DIR/log/initdb.log" >&2
    die "postgres: initdb failed (log: $POSTGRES_DIR/log/initdb.log)"
  fi
  out=$("${POSTGRES_AS_USER[@]}" "$bin/postgres" --single -D "$POSTGRES_DATA" \
    -c "config_file=$POSTGRES_DIR/postgresql.conf" postgres 2>&1 <<EOF
CREATE ROLE $POSTGRES_ROLE LOGIN PASSWORD '$POSTGRES_PASSWORD';
CREATE DATABASE $POSTGRES_DB OWNER $POSTGRES_ROLE;
EOF
  ) || { printf '%s\n' "$out" >&2; die "postgres: creating the test role and database failed"; }
  printf '%s\n' "$out" >>"$POSTGRES_DIR/log/initdb.log"
  if grep -qE '(ERROR|FATAL|PANIC):' <<<"$out"; then
    printf '%s\n' "$out" >&2
    die "postgres: creating the test role and database failed"
  fi
  touch "$POSTGRES_DIR/initialized"
}

postgres_previous_gone() {
  local pid
  [[ -f $POSTGRES_DATA/postmaster.pid ]] || return 0
  pid=$(head -n1 "$POSTGRES_DATA/postmaster.pid" 2>/dev/null) || return 0
  [[ $pid =~ ^[0-9]+$ && -e /proc/$pid ]] || return 0
  # A zombie, or a postmaster on our data directory: wait.
  [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" == Z ]] && return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "-D $POSTGRES_DATA -c" && return 1
  # Another process reused the PID (after a reboot): the file is stale.
  log "  postgres: removing the stale $POSTGRES_DATA/postmaster.pid (PID $pid is not a postmaster of ours)"
  rm -f "$POSTGRES_DATA/postmaster.pid"
}

postgres_start() {
  local bin sock
  bin=$(postgres_bindir) ||
    die "postgres: no server binaries for the data in $POSTGRES_DATA (PostgreSQL $(cat "$POSTGRES_DATA/PG_VERSION" 2>/dev/null)); remove that directory to start afresh"
  mkdir -p "$POSTGRES_DIR"/{log,run}
  chmod 755 "$POSTGRES_DIR"
  postgres_grant_path
  sock=$(postgres_socket_dir) || log "  postgres: $POSTGRES_DIR is too deep for a Unix socket: TCP only"
  if [[ -n $sock ]]; then
    mkdir -p "$sock"
    chmod 700 "$sock"
    ((${#POSTGRES_AS_USER[@]} == 0)) || chown "$POSTGRES_OS_USER:" "$sock"
  fi
  postgres_write_config
  postgres_init "$bin"
  # A postmaster that was killed (SIGKILL) may linger as a zombie for a moment, and
  # PostgreSQL refuses to start while the PID in postmaster.pid exists.
  if ! wait_for 15 "the previous postmaster to be gone" postgres_previous_gone; then
    die "postgres: $POSTGRES_DATA/postmaster.pid names PID $(head -n1 "$POSTGRES_DATA/postmaster.pid"), which still exists (a server these scripts did not start?)"
  fi
  ((${#POSTGRES_AS_USER[@]} == 0)) || chown "$POSTGRES_OS_USER:" "$POSTGRES_DATA"
  # The postmaster keeps its command line (its children rename theirs): the marker.
  start_bg "$POSTGRES_DIR/log/postgres.log" "$POSTGRES_DIR/run/postgres.pid" "-D $POSTGRES_DATA -c config_file" \
    "${POSTGRES_AS_USER[@]}" "$bin/postgres" -D "$POSTGRES_DATA" \
    -c "config_file=$POSTGRES_DIR/postgresql.conf"
}

postgres_after_ready() { :; }

# Fast shutdown (SIGINT: open transactions roll back, clients are disconnected, a
# checkpoint is written); SIGTERM would wait for every client to leave. Then SIGQUIT
# (immediate: crash recovery on the next start), then SIGKILL.
postgres_stop() {
  local f=$POSTGRES_DIR/run/postgres.pid
  stop_pidfile "$f" 60 INT QUIT
}
postgres_start_timeout() { echo 60; }
