//! Publishing to JetStream: pipelined publishes, PubAcks awaited in windows, retries of
//! transient failures (deduplicated by the stream through `Nats-Msg-Id`).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::{PublishAckFuture, PublishError, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::Client;
use tidemill_core::{Error, Message, Result};
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;

use super::{Streams, Target};
use crate::codec::{self, Identity, Outgoing};
use crate::config::NatsConfig;
use crate::wire::LazyWire;
use crate::BROKER;

/// What went wrong with one message of a batch.
enum Failure {
    /// Retry after a pause.
    Transient(String),
    /// Retry after re-resolving the topic's stream (it vanished).
    NoStream(String),
    /// Retrying will not help.
    Permanent(Error),
}

pub(crate) struct JsPublisher {
    client: Client,
    streams: Streams,
    config: Arc<NatsConfig>,
    /// PubAcks in flight across every publish call of this publisher. A window takes all
    /// its permits at once, so concurrent calls never hold part of a window while waiting
    /// for the rest (which could deadlock).
    inflight: Arc<Semaphore>,
    /// Bumped on every reconnect: PubAcks still awaited then are lost with the old
    /// connection, so the messages are sent again at once instead of after the timeout.
    reconnects: watch::Receiver<u64>,
    identity: Identity,
    /// For messages async-nats cannot express (see [`crate::wire`]); opened on first use.
    raw: LazyWire,
}

impl JsPublisher {
    pub(crate) fn new(
        client: Client,
        reconnects: watch::Receiver<u64>,
        config: Arc<NatsConfig>,
    ) -> Self {
        let ctx = super::context(&client, &config);
        JsPublisher {
            reconnects,
            inflight: Arc::new(Semaphore::new(config.jetstream.max_ack_inflight)),
            streams: super::Streams::new(ctx, config.clone()),
            identity: Identity::new(config.uuid_header.clone()),
            raw: LazyWire::new(config.clone()),
            client,
            config,
        }
    }

    /// Closes the raw connection, if one was opened.
    pub(crate) async fn close(&self) {
        self.raw.close().await;
    }

    /// Makes sure `topic`'s stream exists (created as publishing would) and that consumer
    /// group `group` has its durable consumer, so the group finds every message published
    /// from now on even if the stream's retention is `interest` or `work_queue`.
    pub(crate) async fn retain_for(&self, topic: &str, group: &str) -> Result<()> {
        let target = self.streams.target(topic).await?;
        super::subscriber::create_consumer_on(
            &self.streams,
            &self.config,
            &target,
            Some(group),
            None,
        )
        .await?;
        Ok(())
    }

    /// Like `publish`, but fails with `Error::Unroutable` when no stream captures the
    /// topic's subject (and none may be created), or when its stream keeps messages only
    /// for existing consumers (`interest` retention) and has none.
    pub(crate) async fn publish_mandatory(&self, topic: &str, messages: &[Message]) -> Result<()> {
        let Some(first) = messages.first() else {
            return Ok(());
        };
        let unroutable = || Error::Unroutable {
            broker: BROKER,
            topic: topic.to_owned(),
            uuid: first.uuid().to_owned(),
        };
        let target = match self.streams.target(topic).await {
            Ok(t) => t,
            Err(e) if !e.is_transient() && !self.config.jetstream.create_streams => {
                tracing::debug!(broker = BROKER, topic, error = %e, "no stream for a mandatory publish");
                return Err(unroutable());
            }
            Err(e) => return Err(e),
        };
        let ctx = self.streams.context();
        let mut stream = ctx.get_stream(target.stream.as_str()).await.map_err(|e| {
            Error::transient(BROKER, topic, format!("read stream `{}`", target.stream), e)
        })?;
        let info = stream.info().await.map_err(|e| {
            Error::transient(BROKER, topic, format!("read stream `{}`", target.stream), e)
        })?;
        if info.config.retention == async_nats::jetstream::stream::RetentionPolicy::Interest
            && info.state.consumer_count == 0
        {
            return Err(unroutable());
        }
        self.publish(topic, messages).await
    }

    /// Publishes one message with a raw header block on the raw connection and waits for
    /// its PubAck.
    async fn publish_raw(
        &self,
        target: &Target,
        message: &Message,
        headers: bytes::Bytes,
        payload: bytes::Bytes,
        retry: bool,
    ) -> std::result::Result<(), Failure> {
        let wire = self
            .raw
            .get()
            .await
            .map_err(|e| Failure::Transient(format!("raw connection: {e}")))?;
        let subject = bytes::Bytes::copy_from_slice(target.subject.as_bytes());
        let reply = wire
            .request(subject, Some(headers), payload, self.config.request_timeout)
            .await
            .map_err(|e| Failure::Transient(format!("no PubAck: {e}")))?;
        if reply.status() == Some(503) {
            return Err(Failure::NoStream(format!(
                "no stream captures subject `{}` (stream `{}` was expected)",
                target.subject, target.stream
            )));
        }
        #[derive(serde::Deserialize)]
        struct ApiError {
            code: u16,
            #[serde(default)]
            err_code: u64,
            #[serde(default)]
            description: String,
        }
        #[derive(serde::Deserialize)]
        struct Ack {
            #[serde(default)]
            error: Option<ApiError>,
            #[serde(default)]
            stream: Option<String>,
            #[serde(default)]
            seq: u64,
            #[serde(default)]
            duplicate: bool,
        }
        match serde_json::from_slice::<Ack>(&reply.payload) {
            Ok(Ack {
                error: None,
                stream: Some(_),
                seq,
                duplicate,
            }) => {
                if duplicate {
                    dropped_as_duplicate(target, message, seq, retry);
                }
                Ok(())
            }
            Ok(Ack { error: Some(e), .. }) if e.code < 500 && !in_process(e.err_code) => {
                Err(Failure::Permanent(Error::permanent(
                    BROKER,
                    target.topic.as_str(),
                    format!(
                        "publish message {} to stream `{}`",
                        message.uuid(),
                        target.stream
                    ),
                    format!("{} (code {})", e.description, e.code),
                )))
            }
            Ok(Ack { error: Some(e), .. }) => Err(Failure::Transient(format!(
                "{} (code {})",
                e.description, e.code
            ))),
            _ => Err(Failure::Transient(format!(
                "unexpected PubAck {:?}",
                String::from_utf8_lossy(&reply.payload)
            ))),
        }
    }

    pub(crate) async fn publish(&self, topic: &str, messages: &[Message]) -> Result<()> {
        if messages.is_empty() {
            return Ok(());
        }
        let deadline = Instant::now() + self.config.publish_timeout;
        let mut target = self.streams.target(topic).await?;
        let mut pending: Vec<usize> = (0..messages.len()).collect();
        let mut pause = Duration::from_millis(50);
        let mut no_stream_since: Option<Instant> = None;
        let mut retry = false;
        loop {
            let (failed, failure) = self.attempt(&target, messages, &pending, retry).await;
            retry = true;
            let Some(failure) = failure else {
                return Ok(());
            };
            let reason = match failure {
                Failure::Permanent(e) => return Err(e),
                Failure::Transient(reason) => reason,
                Failure::NoStream(reason) => {
                    // Nobody serves the stream's subject. In a cluster that is most often
                    // a leader election (the stream's leader died; a new one is elected
                    // within seconds), during which the JetStream API that would look the
                    // stream up again may wait for an election itself (up to
                    // `request_timeout`). So the same stream is tried again first, and
                    // looked up again (re-created if it vanished) once it stayed
                    // unreachable for `request_timeout`.
                    let since = *no_stream_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= self.config.request_timeout {
                        self.streams.forget(topic);
                        no_stream_since = None;
                    }
                    reason
                }
            };
            if Instant::now() + pause >= deadline {
                return Err(Error::transient(
                    BROKER,
                    topic,
                    format!(
                        "publish ({} of {} messages unconfirmed after {:?}, `publish_timeout`)",
                        failed.len(),
                        messages.len(),
                        self.config.publish_timeout
                    ),
                    reason,
                ));
            }
            tracing::debug!(
                broker = BROKER,
                topic,
                unconfirmed = failed.len(),
                %reason,
                "publish failed; retrying"
            );
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
            match self.streams.target(topic).await {
                Ok(t) => target = t,
                Err(e) if e.is_transient() => {}
                Err(e) => return Err(e),
            }
            pending = failed;
        }
    }

    /// Publishes `messages[i]` for every `i` in `indices`, window by window; returns the
    /// indices that were not confirmed and the first failure.
    async fn attempt(
        &self,
        target: &Target,
        messages: &[Message],
        indices: &[usize],
        retry: bool,
    ) -> (Vec<usize>, Option<Failure>) {
        let max_payload = self.client.max_payload();
        let ctx = self.streams.context();
        let window = self.config.jetstream.publish_window;
        let mut failed = Vec::new();
        let mut failure: Option<Failure> = None;
        let note = |f: Failure, failure: &mut Option<Failure>| {
            // A permanent failure outranks transient ones.
            if failure.is_none() || matches!(f, Failure::Permanent(_)) {
                *failure = Some(f);
            }
        };
        let mut reconnected = self.reconnects.clone();
        reconnected.borrow_and_update();
        let mut chunks = indices.chunks(window);
        while let Some(chunk) = chunks.next() {
            let permits = match self.inflight.acquire_many(chunk.len() as u32).await {
                Ok(p) => p,
                Err(_) => {
                    // Never closed; treat as transient to be safe.
                    failed.extend_from_slice(chunk);
                    note(
                        Failure::Transient("publisher shut down".into()),
                        &mut failure,
                    );
                    break;
                }
            };
            // Runs of messages async-nats can send, pipelined; a message it cannot
            // express (raw header bytes) goes alone on the raw connection, after the run
            // before it was confirmed, so the order holds.
            let mut encoded: Vec<(usize, Outgoing, bytes::Bytes)> = Vec::with_capacity(chunk.len());
            for &i in chunk {
                match codec::encode(
                    &messages[i],
                    &target.topic,
                    &target.subject,
                    max_payload,
                    &self.identity,
                ) {
                    Ok(e) => encoded.push((i, e.headers, e.payload)),
                    Err(e) => {
                        note(Failure::Permanent(e), &mut failure);
                        failed.push(i);
                    }
                }
            }
            let mut broken = false;
            let mut rest = encoded.into_iter().peekable();
            while rest.peek().is_some() {
                if broken {
                    failed.extend(rest.by_ref().map(|(i, _, _)| i));
                    break;
                }
                if matches!(rest.peek(), Some((_, Outgoing::Raw(_), _))) {
                    let Some((i, Outgoing::Raw(headers), payload)) = rest.next() else {
                        break;
                    };
                    if let Err(f) = self
                        .publish_raw(target, &messages[i], headers, payload, retry)
                        .await
                    {
                        broken = !matches!(f, Failure::Permanent(_));
                        note(f, &mut failure);
                        failed.push(i);
                    }
                    continue;
                }
                let mut acks: Vec<(usize, PublishAckFuture)> = Vec::new();
                let mut unsent = Vec::new();
                while let Some((_, Outgoing::Map(_), _)) = rest.peek() {
                    let Some((i, Outgoing::Map(headers), payload)) = rest.next() else {
                        break;
                    };
                    if broken {
                        unsent.push(i);
                        continue;
                    }
                    let publish = PublishMessage::build().payload(payload).headers(headers);
                    match ctx.send_publish(target.subject.clone(), publish).await {
                        Ok(ack) => acks.push((i, ack)),
                        Err(e) => {
                            // The connection is likely down: do not try the rest one by one.
                            note(classify(target, &messages[i], max_payload, e), &mut failure);
                            failed.push(i);
                            broken = true;
                        }
                    }
                }
                failed.extend(unsent);
                // Awaited together: each PubAck's timeout starts when it is first polled, so
                // awaiting them one by one would add the timeouts up when the connection
                // dropped.
                let sent: Vec<usize> = acks.iter().map(|(i, _)| *i).collect();
                let all = futures::future::join_all(
                    acks.into_iter()
                        .map(|(i, ack)| async move { (i, ack.await) }),
                );
                tokio::select! {
                    results = all => {
                        for (i, result) in results {
                            match result {
                                Ok(ack) if ack.duplicate => {
                                    dropped_as_duplicate(target, &messages[i], ack.sequence, retry);
                                }
                                Ok(_) => {}
                                Err(e) => {
                                    note(classify(target, &messages[i], max_payload, e), &mut failure);
                                    failed.push(i);
                                }
                            }
                        }
                    }
                    _ = reconnected.changed() => {
                        note(Failure::Transient("connection lost while awaiting PubAcks".into()), &mut failure);
                        failed.extend(sent);
                        broken = true;
                    }
                }
            }
            drop(permits);
            if broken {
                for rest in chunks.by_ref() {
                    failed.extend_from_slice(rest);
                }
            }
        }
        failed.sort_unstable();
        (failed, failure)
    }
}

/// Reports a PubAck saying the stream did not store `message` because it stored one with
/// the same `Nats-Msg-Id` within `duplicate_window` (its sequence `seq`). Expected for a
/// retry whose first attempt was stored; otherwise the same message was published before
/// (or another one with the same id: a `Nats-Msg-Id` set in the metadata, e.g. kept from a
/// consumed message, or the bare uuid of `UuidHeader::NatsMsgId`), so it is a warning:
/// the publish succeeded, but nothing new was stored.
fn dropped_as_duplicate(target: &Target, message: &Message, seq: u64, retry: bool) {
    if retry {
        tracing::debug!(
            broker = BROKER,
            topic = %target.topic,
            uuid = message.uuid(),
            seq,
            "a retried publish was already stored"
        );
    } else {
        tracing::warn!(
            broker = BROKER,
            topic = %target.topic,
            stream = %target.stream,
            uuid = message.uuid(),
            seq,
            "the stream dropped the message as a duplicate: it stored one with the same \
             Nats-Msg-Id within its duplicate window (message {seq}); publish it with another \
             uuid, other content or without a Nats-Msg-Id in its metadata to store it again"
        );
    }
}

/// JetStream's "duplicate message id is in process" (409, error code 10158): a clustered
/// stream's leader has a message with this `Nats-Msg-Id` on its way through Raft (a retry
/// sent while the first attempt, whose PubAck was lost with a connection or a node, is
/// still being replicated). The first attempt's outcome decides: the retry a moment later
/// gets the usual duplicate PubAck if it was stored, or stores the message if it was not.
fn in_process(err_code: u64) -> bool {
    err_code == async_nats::jetstream::ErrorCode::STREAM_DUPLICATE_MESSAGE_CONFLICT.0
}

fn classify(target: &Target, message: &Message, max_payload: usize, e: PublishError) -> Failure {
    match e.kind() {
        PublishErrorKind::StreamNotFound => Failure::NoStream(format!(
            "no stream captures subject `{}` (stream `{}` was expected): {e}",
            target.subject, target.stream
        )),
        PublishErrorKind::TimedOut
        | PublishErrorKind::BrokenPipe
        | PublishErrorKind::MaxAckPending => Failure::Transient(e.to_string()),
        PublishErrorKind::MaxPayloadExceeded => Failure::Permanent(Error::MessageTooLarge {
            broker: BROKER,
            topic: target.topic.clone(),
            uuid: message.uuid().to_owned(),
            size: message.payload().len(),
            limit: max_payload,
        }),
        PublishErrorKind::WrongLastMessageId | PublishErrorKind::WrongLastSequence => {
            Failure::Permanent(Error::permanent(
                BROKER,
                target.topic.as_str(),
                format!("publish message {}", message.uuid()),
                e,
            ))
        }
        PublishErrorKind::Other => {
            let api = std::error::Error::source(&e)
                .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>())
                .map(|je| (je.code(), je.error_code().0));
            match api {
                // An API error: 503 (unavailable) may clear, and so does "a message with
                // this id is in process" (see `in_process`); the rest (limits, bad
                // headers, ...) will not.
                Some((code, err_code)) if code < 500 && !in_process(err_code) => {
                    Failure::Permanent(Error::permanent(
                        BROKER,
                        target.topic.as_str(),
                        format!(
                            "publish message {} to stream `{}`",
                            message.uuid(),
                            target.stream
                        ),
                        e,
                    ))
                }
                _ => Failure::Transient(e.to_string()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::in_process;

    #[test]
    fn a_message_id_in_process_is_retried_other_conflicts_are_not() {
        assert!(in_process(10158)); // duplicate message id is in process
        assert!(!in_process(10071)); // wrong last sequence
        assert!(!in_process(0));
    }
}
