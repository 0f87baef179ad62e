# shellcheck shell=bash
# A local AWS API for the SQS and SNS tests: moto's server mode (`moto_server`, PyPI
# `moto[server]`, pinned by TIDEMILL_MOTO_VERSION), installed into a venv under the cache
# dir and run on 127.0.0.1. It accepts any credentials and serves every region.
#
# In memory only: a restart (`brokers.sh restart aws`) loses every queue, topic,
# subscription and message. The adapter recreates the queues and topics it needs; a test
# that restarts this broker must not expect the messages sent before the restart.

AWS_DIR="$TIDEMILL_BROKERS_DIR/aws"
AWS_VENV="$TIDEMILL_CACHE_DIR/moto-$TIDEMILL_MOTO_VERSION"

aws_addr() { echo "$TIDEMILL_AWS_URL"; }
aws_ports() { echo "$TIDEMILL_AWS_PORT"; }
aws_var() { echo TIDEMILL_AWS_URL; }
aws_log() { echo "$AWS_DIR/log/moto.log"; }
aws_pid() { pidfile_pid "$AWS_DIR/run/moto.pid"; }

# A Python 3 that can make a venv with pip in it (Debian splits venv and ensurepip into
# python3-venv): the one on PATH, else Debian's.
aws_python() {
  local py
  for py in "$(command -v python3 2>/dev/null)" /usr/bin/python3; do
    [[ -n $py && -x $py ]] || continue
    if "$py" -c 'import venv, ensurepip' >/dev/null 2>&1; then
      echo "$py"
      return 0
    fi
  done
  return 1
}

# Bumped when aws_patch changes: a venv patched by an older version is patched again.
AWS_PATCH_LEVEL="tidemill-patch 7"

# Installed = the venv's pip install and our patch went through (the `installed` file,
# written last, lists the packages and ends with the patch level).
aws_installed() {
  [[ -x $AWS_VENV/bin/moto_server && -f $AWS_VENV/installed ]] &&
    grep -qxF "$AWS_PATCH_LEVEL" "$AWS_VENV/installed"
}
aws_apt_packages() { aws_installed || aws_python >/dev/null || echo python3 python3-venv; }

aws_install() {
  local py
  if [[ -x $AWS_VENV/bin/moto_server &&
    $("$AWS_VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("moto"))' 2>/dev/null) == "$TIDEMILL_MOTO_VERSION" ]]; then
    log "  moto $TIDEMILL_MOTO_VERSION is in $AWS_VENV already: patching it"
  else
    py=$(aws_python) || die "aws: no python3 with the venv module (Debian: apt-get install python3-venv)"
    log "  pip install moto[server]==$TIDEMILL_MOTO_VERSION (venv $AWS_VENV)"
    rm -rf "$AWS_VENV"
    if ! { "$py" -m venv "$AWS_VENV" >&2 &&
      "$AWS_VENV/bin/pip" install -q --disable-pip-version-check \
        "moto[server]==$TIDEMILL_MOTO_VERSION" >&2 &&
      [[ -x $AWS_VENV/bin/moto_server ]]; }; then
      rm -rf "$AWS_VENV"
      die "aws: installing moto[server]==$TIDEMILL_MOTO_VERSION from PyPI failed"
    fi
  fi
  rm -f "$AWS_VENV/installed"
  local rc=0
  aws_patch || rc=$?
  if ((rc == 3)); then
    # Patched by an older version of this script that kept no pristine copy: start over.
    log "  $AWS_VENV was patched without a pristine copy: installing it again"
    rm -rf "$AWS_VENV"
    aws_install
    return
  fi
  ((rc == 0)) || die "aws: patching moto in $AWS_VENV failed (not moto $TIDEMILL_MOTO_VERSION?)"
  { "$AWS_VENV/bin/pip" freeze --disable-pip-version-check && echo "$AWS_PATCH_LEVEL"; } >"$AWS_VENV/installed"
}

# Speed only, same behaviour: moto 5.2.6 reads two queue settings (ContentBasedDeduplication
# on each send, MessageRetentionPeriod for each message received) through the queue's
# whole attribute map, which counts the visible, in-flight and delayed messages by walking
# the queue (a few datetime calls per message): every send and every received message cost
# O(backlog), so with 2,000 messages queued a consumer got about 10-20 messages a second.
# The patch reads those two settings from the queue object instead (the same values the
# map gives).
#
# One behaviour fix, to match SQS: a FIFO receive decides which message groups are in
# flight once, when it starts. A long poll that waits then takes messages of a group that
# another receive got in the meantime (two receives hold one group's messages and the
# group's order is lost: the conformance suite's order_per_key failed with two concurrent
# receives), and leaves alone a group whose message was deleted meanwhile until it
# returns (up to 20 s for each message of a key). The patch checks the groups in flight
# on each pass over the queue (a group skipped once stays skipped for that pass, so a
# delete finishing mid-pass cannot let a later message of the group go first), still
# letting one receive take several messages of a group it took first (as SQS does); it
# reads the set of in-flight messages through a copy, as moto
# serves requests on threads and another one may change the set meanwhile ("Set changed
# size during iteration", an HTTP 500 after the messages were taken). And one race fix:
# a delete rebuilds the queue's message list without the lock sends take, so a message
# sent (or deleted) meanwhile vanished from the list until another delete that had read
# the old list put it back (FIFO groups out of order, deleted messages back); deletes now
# take that lock, and so do a receive's passes over the queue (two receives on threads
# could both take one message: a FIFO group's message delivered twice) and visibility
# changes. A long poll that finds only messages of groups in flight no longer spins
# (wait_for returns at once while any message is visible): it pauses 20 ms per pass.
# Only the venv's copy of moto/sqs/models.py is changed.
aws_patch() {
  "$AWS_VENV/bin/python" - <<'PATCH'
import pathlib, sys, sysconfig
moto = pathlib.Path(sysconfig.get_paths()["purelib"]) / "moto"


def patch(models, edits):
    # Every patch level starts from moto's own file, kept beside it as models.py.orig.
    orig = models.with_name("models.py.orig")
    if not orig.exists():
        current = models.read_text()
        if "self.content_based_deduplication\n" in current or "taken_groups" in current:
            sys.exit(3)  # patched before pristine copies were kept
        orig.write_text(current)
    src = orig.read_text()
    for old, new, count in edits:
        if src.count(old) != count:
            sys.exit(f"{models}: expected {count} x {old!r}, found {src.count(old)}")
        src = src.replace(old, new)
    models.write_text(src)
    print(f"  patched {models}", file=sys.stderr)


sqs_edits = [
    ('self.attributes.get("ContentBasedDeduplication") == "true"',
     "self.content_based_deduplication", 1),
    ('queue.attributes.get("ContentBasedDeduplication") == "false"',
     "not queue.content_based_deduplication", 2),
    ('queue.attributes.get("ContentBasedDeduplication") == "true"',
     "(queue.fifo_queue and queue.content_based_deduplication)", 1),
    ('self.get_queue_attributes(\n            queue_name, ["MessageRetentionPeriod"]\n        )["MessageRetentionPeriod"]',
     "self.get_queue(queue_name).message_retention_period", 1),
    ('                if message.group_id and queue.fifo_queue:\n'
     '                    if message.group_id in currently_pending_groups:\n',
     '                if message.group_id and queue.fifo_queue:\n'
     '                    if message.group_id in skipped_groups or (\n'
     '                        message.group_id not in taken_groups\n'
     '                        and message.group_id in queue.pending_message_groups\n'
     '                    ):\n'
     '                        skipped_groups.add(message.group_id)\n', 1),
    ('            messages_to_dlq: list[Message] = []\n',
     '            messages_to_dlq: list[Message] = []\n'
     '            skipped_groups: set[str] = set()\n', 1),
    # One pass over the queue at a time (the lock sends and deletes take): two receives
    # on threads could both take one message. Legal Python: the block's body is indented
    # deeper than its header.
    ('            for message in queue.messages:\n',
     '            with queue._messages_lock:\n'
     '              for message in queue.messages:\n', 1),
    # A pass that found visible messages but could take none (their groups in flight)
    # waited for nothing (wait_for returns at once while any message is visible) and
    # went round again at once, holding a CPU for the whole long poll: pause briefly.
    ('                queue.wait_for_messages(1)\n                continue\n',
     '                queue.wait_for_messages(1)\n'
     '                __import__("time").sleep(0.02)\n'
     '                continue\n', 1),
    ('                queue.pending_messages.add(message)\n'
     '                message.mark_received(visibility_timeout=visibility_timeout)\n',
     '                queue.pending_messages.add(message)\n'
     '                if message.group_id:\n'
     '                    taken_groups.add(message.group_id)\n'
     '                message.mark_received(visibility_timeout=visibility_timeout)\n', 1),
    ('        currently_pending_groups = deepcopy(queue.pending_message_groups)\n\n'
     '        # queue.messages only contains visible messages\n',
     '        currently_pending_groups = deepcopy(queue.pending_message_groups)\n'
     '        taken_groups: set[str] = set()\n\n'
     '        # queue.messages only contains visible messages\n', 1),
    ('            message.group_id\n'
     '            for message in self._pending_messages\n',
     '            message.group_id\n'
     '            for message in self._pending_messages.copy()\n', 1),
    ('        # Delete message from queue regardless of pending state\n'
     '        new_messages = []\n'
     '        for message in self._messages:\n'
     '            if message.had_receipt_handle(receipt_handle):\n'
     '                self.pending_messages.discard(message)\n'
     '                self.deleted_messages.update(message.all_receipt_handles)  # type: ignore\n'
     '                continue\n'
     '            new_messages.append(message)\n'
     '        self._messages = new_messages\n',
     '        # Delete message from queue regardless of pending state\n'
     '        with self._messages_lock:\n'
     '            new_messages = []\n'
     '            for message in self._messages:\n'
     '                if message.had_receipt_handle(receipt_handle):\n'
     '                    self.pending_messages.discard(message)\n'
     '                    self.deleted_messages.update(message.all_receipt_handles)  # type: ignore\n'
     '                    continue\n'
     '                new_messages.append(message)\n'
     '            self._messages = new_messages\n', 1),
    ('\nsqs_backends = BackendDict(SQSBackend, "sqs")\n',
     '\n\ndef _tidemill_locked(method):\n'
     '    # One request at a time per queue while it changes a message.\n'
     '    def locked(self, queue_name, *args, **kwargs):\n'
     '        with self.get_queue(queue_name)._messages_lock:\n'
     '            return method(self, queue_name, *args, **kwargs)\n'
     '    return locked\n\n\n'
     'SQSBackend.change_message_visibility = _tidemill_locked(\n'
     '    SQSBackend.change_message_visibility\n'
     ')\n\n'
     'sqs_backends = BackendDict(SQSBackend, "sqs")\n', 1),
]
sns_edits = [
    # A publish reads the topic's subscriptions by walking every subscription of the
    # region; a subscribe or unsubscribe on another thread meanwhile raised "OrderedDict
    # mutated during iteration". Walk a copy.
    ("        return [sub for sub in self.subscriptions.values() if sub.topic == topic]\n",
     "        return [sub for sub in list(self.subscriptions.values()) if sub.topic == topic]\n", 1),
    # PublishBatch answered an entry whose publish raised anything but
    # InvalidParameterValue in neither its successful nor its failed list: the message was
    # lost with no error. Answer it as failed on the service's side (SNS's InternalError),
    # and print the error to the log.
    ("                            \"SenderFault\": True,\n"
     "                        }\n"
     "                    )\n"
     "        return successful, failed\n",
     "                            \"SenderFault\": True,\n"
     "                        }\n"
     "                    )\n"
     "                else:\n"
     "                    __import__(\"traceback\").print_exc()\n"
     "                    failed.append(\n"
     "                        {\n"
     "                            \"Id\": entry[\"Id\"],\n"
     "                            \"Code\": \"InternalError\",\n"
     "                            \"Message\": f\"{type(e).__name__}: {e}\",\n"
     "                            \"SenderFault\": False,\n"
     "                        }\n"
     "                    )\n"
     "        return successful, failed\n", 1),
]
patch(moto / "sqs" / "models.py", sqs_edits)
patch(moto / "sns" / "models.py", sns_edits)
PATCH
}

aws_running() { pidfile_alive "$AWS_DIR/run/moto.pid"; }

# Ready when SQS answers a ListQueues (the query protocol; moto takes the service from the
# credential scope and checks no signature).
aws_ready() {
  curl -fsS -m 3 "http://127.0.0.1:$TIDEMILL_AWS_PORT/" \
    -H 'Authorization: AWS4-HMAC-SHA256 Credential=testing/20200101/us-east-1/sqs/aws4_request, SignedHeaders=host, Signature=0' \
    --data 'Action=ListQueues&Version=2012-11-05' 2>/dev/null | grep -q ListQueuesResponse
}

aws_start() {
  aws_installed || die "aws: moto is not installed ($AWS_VENV)"
  mkdir -p "$AWS_DIR"/{log,run}
  # moto_server is a Python script: the process is the venv's python with
  # `…/moto_server -H 127.0.0.1 -p PORT` as its arguments (the marker).
  start_bg "$AWS_DIR/log/moto.log" "$AWS_DIR/run/moto.pid" "moto_server -H 127.0.0.1 -p $TIDEMILL_AWS_PORT" \
    "$AWS_VENV/bin/moto_server" -H 127.0.0.1 -p "$TIDEMILL_AWS_PORT"
}

# The endpoint's HOST:PORT (for `status` of an external one): the URL's `endpoint=`, else
# the region's public SQS endpoint.
aws_endpoint_hostport() {
  local url=$1 ep region
  if [[ $url == *[?\&]endpoint=* ]]; then
    ep=${url#*[?&]endpoint=}
    ep=${ep%%&*}
    ep=${ep//%3A/:} ep=${ep//%3a/:} ep=${ep//%2F//} ep=${ep//%2f//}
    case $ep in
      https://*) ep=${ep#https://}; ep=${ep%%/*}; [[ $ep == *:* ]] || ep="$ep:443" ;;
      *) ep=${ep#http://}; ep=${ep%%/*}; [[ $ep == *:* ]] || ep="$ep:80" ;;
    esac
    echo "$ep"
  else
    region=${url#*://}
    region=${region%%[/?]*}
    echo "sqs.${region:-us-east-1}.amazonaws.com:443"
  fi
}

# `brokers.sh env aws`: the AWS SDK reads its credentials from the standard chain (the
# environment first), and moto accepts any. Printed unless AWS_ACCESS_KEY_ID is set, and
# not for an external address without `endpoint=` (real AWS: the caller's own chain,
# profile or instance role, must not be shadowed by test keys). AWS_REGION only if unset.
aws_env_credentials() {
  [[ -z ${AWS_ACCESS_KEY_ID:-} ]] || return 0
  if tidemill_external aws && [[ $TIDEMILL_AWS_URL != *[?\&]endpoint=* ]]; then return 0; fi
  printf 'export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing'
  [[ -n ${AWS_REGION:-} ]] || printf ' AWS_REGION=us-east-1'
  printf '\n'
}

aws_after_ready() { :; }
aws_stop() { stop_pidfile "$AWS_DIR/run/moto.pid" 10; }
aws_start_timeout() { echo 30; }
