# shellcheck shell=bash
# Google Cloud Pub/Sub emulator: Google's in-memory fake (pstest) from
# Debian's golang-google-cloud-dev, served by our small Go program
# (brokers/pubsub-emulator) with gRPC and REST/JSON on one fixed port.
# In-memory: a restart loses every topic, subscription and message.

PUBSUB_DIR="$TIDEMILL_BROKERS_DIR/pubsub"
PUBSUB_SRC="$TIDEMILL_ROOT/brokers/pubsub-emulator"
PUBSUB_BIN="$PUBSUB_DIR/build/pubsub-emulator"
PSTEST_FAKE=/usr/share/gocode/src/cloud.google.com/go/pubsub/pstest/fake.go

pubsub_addr() { echo "$PUBSUB_EMULATOR_HOST"; }
pubsub_ports() { echo "$TIDEMILL_PUBSUB_PORT"; }

pubsub_go() { # the Debian toolchain, whatever else is on PATH
  if [[ -x /usr/lib/go/bin/go ]]; then echo /usr/lib/go/bin/go; else command -v go; fi
}

pubsub_installed() {
  [[ -f $PSTEST_FAKE ]] && pubsub_go >/dev/null 2>&1 && [[ -x $PUBSUB_BIN ]] &&
    [[ -z $(find "$PUBSUB_SRC" -newer "$PUBSUB_BIN" -name '*.go' 2>/dev/null) ]]
}
pubsub_apt_packages() {
  if [[ ! -f $PSTEST_FAKE ]] || ! pubsub_go >/dev/null 2>&1; then
    echo golang-go golang-google-cloud-dev
  fi
}

pubsub_install() {
  # Build from a local copy of pstest's fake.go with the streaming-pull
  # channel buffered: stock 0.56 hands each stream one message per 10 ms
  # tick (about 100 msg/s). The copy is swapped in with `go build -overlay`;
  # nothing outside target/ is modified.
  local build="$PUBSUB_DIR/build" go
  go=$(pubsub_go) || die "go is not installed"
  mkdir -p "$build"
  sed 's/msgc:       make(chan \*pb.ReceivedMessage),/msgc:       make(chan *pb.ReceivedMessage, 1000),/' \
    "$PSTEST_FAKE" >"$build/fake.go"
  grep -q 'make(chan \*pb.ReceivedMessage, 1000)' "$build/fake.go" ||
    die "could not patch $PSTEST_FAKE (unexpected pstest version?)"
  printf '{"Replace":{"%s":"%s"}}\n' "$PSTEST_FAKE" "$build/fake.go" >"$build/overlay.json"
  log "  go build pubsub-emulator (GOPATH mode, Debian's golang-google-cloud-dev)"
  (
    cd "$PUBSUB_SRC"
    GO111MODULE=off GOPATH=/usr/share/gocode GOFLAGS='' GOTOOLCHAIN=local \
      "$go" build -overlay "$build/overlay.json" -o "$PUBSUB_BIN.tmp" .
  ) >&2 || die "building the Pub/Sub emulator failed"
  mv -f "$PUBSUB_BIN.tmp" "$PUBSUB_BIN"
}

pubsub_running() { pidfile_alive "$PUBSUB_DIR/run/pubsub.pid"; }

pubsub_ready() {
  [[ "$(curl -fsS -m 3 "http://127.0.0.1:$TIDEMILL_PUBSUB_PORT/" 2>/dev/null)" == Ok* ]]
}

pubsub_start() {
  mkdir -p "$PUBSUB_DIR"/{log,run}
  start_bg "$PUBSUB_DIR/log/pubsub.log" "$PUBSUB_DIR/run/pubsub.pid" "$PUBSUB_BIN" \
    "$PUBSUB_BIN" -addr "127.0.0.1:$TIDEMILL_PUBSUB_PORT"
}

pubsub_after_ready() { :; }
pubsub_stop() { stop_pidfile "$PUBSUB_DIR/run/pubsub.pid" 10; }
pubsub_start_timeout() { echo 20; }
