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
use crate::codec;
use crate::config::NatsConfig;
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
            client,
            config,
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
        loop {
            let (failed, failure) = self.attempt(&target, messages, &pending).await;
            let Some(failure) = failure else {
                return Ok(());
            };
            let reason = match failure {
                Failure::Permanent(e) => return Err(e),
                Failure::Transient(reason) => reason,
                Failure::NoStream(reason) => {
                    self.streams.forget(topic);
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
            let mut acks: Vec<(usize, PublishAckFuture)> = Vec::with_capacity(chunk.len());
            let mut unsent: &[usize] = &[];
            for (pos, &i) in chunk.iter().enumerate() {
                let encoded = match codec::encode(&messages[i], &target.topic, max_payload) {
                    Ok(e) => e,
                    Err(e) => {
                        note(Failure::Permanent(e), &mut failure);
                        failed.push(i);
                        continue;
                    }
                };
                let publish = PublishMessage::build()
                    .payload(encoded.payload)
                    .headers(encoded.headers);
                match ctx.send_publish(target.subject.clone(), publish).await {
                    Ok(ack) => acks.push((i, ack)),
                    Err(e) => {
                        // The connection is likely down: do not try the rest one by one.
                        note(classify(target, &messages[i], max_payload, e), &mut failure);
                        failed.push(i);
                        unsent = &chunk[pos + 1..];
                        break;
                    }
                }
            }
            // Awaited together: each PubAck's timeout starts when it is first polled, so
            // awaiting them one by one would add the timeouts up when the connection dropped.
            let sent: Vec<usize> = acks.iter().map(|(i, _)| *i).collect();
            let all = futures::future::join_all(
                acks.into_iter()
                    .map(|(i, ack)| async move { (i, ack.await) }),
            );
            tokio::select! {
                results = all => {
                    for (i, result) in results {
                        if let Err(e) = result {
                            note(classify(target, &messages[i], max_payload, e), &mut failure);
                            failed.push(i);
                        }
                    }
                }
                _ = reconnected.changed() => {
                    note(Failure::Transient("connection lost while awaiting PubAcks".into()), &mut failure);
                    failed.extend(sent);
                }
            }
            drop(permits);
            if !unsent.is_empty() {
                failed.extend_from_slice(unsent);
                for rest in chunks.by_ref() {
                    failed.extend_from_slice(rest);
                }
            }
        }
        failed.sort_unstable();
        (failed, failure)
    }
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
                .map(|je| je.code());
            match api {
                // An API error: 503 (unavailable) may clear, the rest (limits, bad
                // headers, ...) will not.
                Some(code) if code < 500 => Failure::Permanent(Error::permanent(
                    BROKER,
                    target.topic.as_str(),
                    format!(
                        "publish message {} to stream `{}`",
                        message.uuid(),
                        target.stream
                    ),
                    e,
                )),
                _ => Failure::Transient(e.to_string()),
            }
        }
    }
}
