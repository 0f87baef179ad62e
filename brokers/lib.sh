# shellcheck shell=bash
# Helpers shared by the broker scripts. Sourced after env.sh.

log() { printf '%s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# tcp_open PORT -> 0 if something accepts connections on 127.0.0.1:PORT.
tcp_open() {
  timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

# tcp_open_addr HOST:PORT (for external brokers).
tcp_open_addr() {
  local host=${1%:*} port=${1##*:}
  timeout 2 bash -c "exec 3<>/dev/tcp/$host/$port" 2>/dev/null
}

# wait_port_free PORT SECONDS
wait_port_free() {
  local port=$1 deadline=$((SECONDS + $2))
  while tcp_open "$port"; do
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
}

# --- processes we started, by recorded PID --------------------------------
# A PID file holds the PID on its first line and, on its second, a string
# that must appear in that process's command line; this guards against
# signalling an unrelated process that reused the PID after ours died.

pidfile_alive() { # PIDFILE -> 0 if the recorded process still runs
  local f=$1 pid marker
  [[ -f $f ]] || return 1
  { read -r pid; read -r marker; } <"$f" || true
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  [[ -r /proc/$pid/cmdline ]] || return 1
  # A zombie (dead, not yet reaped) counts as gone.
  [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$marker"
}

pidfile_pid() { head -n1 "$1" 2>/dev/null; }

record_pid() { # PIDFILE PID MARKER
  mkdir -p "$(dirname "$1")"
  printf '%s\n%s\n' "$2" "$3" >"$1"
}

# stop_pidfile PIDFILE [GRACE_SECONDS] [SIGNAL] [THEN_SIGNAL]: send SIGNAL (default
# TERM) to the recorded process and wait; if it is still there, send THEN_SIGNAL (if
# given) and wait up to 10 s more; then SIGKILL. Removes the PID file.
stop_pidfile() {
  local f=$1 grace=${2:-20} sig=${3:-TERM} then=${4:-} pid deadline
  if pidfile_alive "$f"; then
    pid=$(pidfile_pid "$f")
    kill -"$sig" "$pid" 2>/dev/null || true
    deadline=$((SECONDS + grace))
    while pidfile_alive "$f" && ((SECONDS < deadline)); do sleep 0.2; done
    if [[ -n $then ]] && pidfile_alive "$f"; then
      log "  pid $pid did not stop within ${grace}s: SIG$then"
      kill -"$then" "$pid" 2>/dev/null || true
      deadline=$((SECONDS + 10))
      while pidfile_alive "$f" && ((SECONDS < deadline)); do sleep 0.2; done
    fi
    if pidfile_alive "$f"; then
      log "  pid $pid did not stop within ${grace}s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      deadline=$((SECONDS + 10))
      while pidfile_alive "$f" && ((SECONDS < deadline)); do sleep 0.2; done
    fi
  fi
  rm -f "$f"
}

# start_bg LOGFILE PIDFILE MARKER CMD... : start CMD detached (own session,
# no stdin, output to LOGFILE) and record its PID. Prints nothing.
start_bg() {
  local logf=$1 pidf=$2 marker=$3
  shift 3
  mkdir -p "$(dirname "$logf")"
  printf '\n=== %s: %s\n' "$(date '+%F %T')" "$*" >>"$logf"
  # Job control is off in scripts, so the background subshell is not a
  # process group leader and setsid execs in place: $! is CMD's PID.
  # fd 9 is brokers.sh's lock: the broker must not keep holding it.
  setsid "$@" </dev/null >>"$logf" 2>&1 9>&- &
  record_pid "$pidf" "$!" "$marker"
}

# wait_for SECONDS DESCRIPTION CMD... : poll CMD until it succeeds.
wait_for() {
  local secs=$1 what=$2
  local deadline=$((SECONDS + secs))
  shift 2
  until "$@"; do
    if ((SECONDS >= deadline)); then
      log "  timed out after ${secs}s waiting for $what"
      return 1
    fi
    sleep 0.3
  done
}

# --- installing ----------------------------------------------------------------
_TIDEMILL_APT_UPDATED=
as_root() {
  if [[ $(id -u) -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo -n "$@"
  else
    die "need root to run: $* (install it yourself, or run as root)"
  fi
}

apt_install() { # PACKAGE...
  log "  apt-get install $*"
  export DEBIAN_FRONTEND=noninteractive
  if [[ -z $_TIDEMILL_APT_UPDATED ]]; then
    as_root apt-get update -qq >&2 || die "apt-get update failed"
    _TIDEMILL_APT_UPDATED=1
  fi
  # Never let a package start its service (rabbitmq-server would take port
  # 5672 and an epmd): a policy-rc.d that says "no" is honoured by
  # invoke-rc.d, whether or not systemd runs. Keep an existing one.
  local policy=/usr/sbin/policy-rc.d made_policy=
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\n# tidemill brokers: do not start services during install\nexit 101\n' |
      as_root tee "$policy" >/dev/null && as_root chmod 755 "$policy" && made_policy=1
  fi
  local rc=0
  as_root apt-get install -y -q --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@" >&2 || rc=$?
  if [[ -n $made_policy ]]; then as_root rm -f "$policy"; fi
  ((rc == 0)) || die "apt-get install $* failed"
}
