//! Core NATS (no JetStream): at most once.
//!
//! Publishing writes the messages and then waits for the server to have processed them: a
//! request to a subject nobody serves, sent after them on the same connection, comes back
//! as "no responders" only once the server handled everything before it (handing each
//! message to every matching subscription on that server). Subscribing waits the same way
//! for the server to have registered the subscription. Nothing is stored: messages published
//! while nobody subscribes are gone, a nack does not bring a message back.

use std::sync::Arc;

use async_nats::{Client, RequestErrorKind, Subject};
use bytes::Bytes;
use futures::Stream;
use tidemill_core::{AckFuture, Acknowledger, Delivery, Error, Message, Result};

use crate::codec::{self, Identity, Origin, Outgoing};
use crate::config::NatsConfig;
use crate::naming;
use crate::wire::{LazyWire, Wire, SUBSCRIPTION_CAPACITY};
use crate::BROKER;

/// Waits until the server processed everything this client sent before (see the module
/// docs).
pub(crate) async fn round_trip(
    client: &Client,
    probe: &Subject,
    config: &NatsConfig,
) -> std::result::Result<(), String> {
    let request = async_nats::Request::new()
        .payload(Bytes::new())
        .timeout(Some(config.request_timeout));
    match client.send_request(probe.clone(), request).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == RequestErrorKind::NoResponders => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

/// A subject no one subscribes to, unique to this client.
pub(crate) fn probe_subject(client: &Client) -> Subject {
    format!("{}.tidemill-confirm", client.new_inbox()).into()
}

pub(crate) struct CorePublisher {
    client: Client,
    config: Arc<NatsConfig>,
    probe: Subject,
    identity: Identity,
    /// For messages async-nats cannot express (see [`crate::wire`]); opened on first use.
    raw: LazyWire,
}

impl CorePublisher {
    pub(crate) fn new(client: Client, config: Arc<NatsConfig>) -> Self {
        CorePublisher {
            probe: probe_subject(&client),
            identity: Identity::new(config.uuid_header.clone()),
            raw: LazyWire::new(config.clone()),
            client,
            config,
        }
    }

    pub(crate) async fn close(&self) {
        self.raw.close().await;
    }

    pub(crate) async fn publish(&self, topic: &str, messages: &[Message]) -> Result<()> {
        if messages.is_empty() {
            return Ok(());
        }
        let subject = naming::subject_for(&self.config.subject_prefix, topic)?;
        let max_payload = self.client.max_payload();
        let encoded = messages
            .iter()
            .map(|m| codec::encode(m, topic, &subject, max_payload, &self.identity))
            .collect::<Result<Vec<_>>>()?;
        let subject: Subject = subject.into();
        let send = async {
            // Messages with raw header bytes go on the raw connection; switching
            // connections waits until the server processed what went before, so the
            // order holds.
            let mut on_raw = false;
            let mut on_client = false;
            for e in encoded {
                match e.headers {
                    Outgoing::Map(headers) => {
                        if on_raw {
                            self.raw
                                .get()
                                .await
                                .map_err(|e| e.to_string())?
                                .flush()
                                .await
                                .map_err(|e| e.to_string())?;
                            on_raw = false;
                        }
                        on_client = true;
                        self.client
                            .publish_with_headers(subject.clone(), headers, e.payload)
                            .await
                            .map_err(|e| e.to_string())?;
                    }
                    Outgoing::Raw(headers) => {
                        if on_client {
                            round_trip(&self.client, &self.probe, &self.config).await?;
                            on_client = false;
                        }
                        on_raw = true;
                        let wire = self.raw.get().await.map_err(|e| e.to_string())?;
                        wire.publish(
                            Bytes::copy_from_slice(subject.as_bytes()),
                            None,
                            Some(headers),
                            e.payload,
                        )
                        .map_err(|e| e.to_string())?;
                    }
                }
            }
            if on_raw {
                self.raw
                    .get()
                    .await
                    .map_err(|e| e.to_string())?
                    .flush()
                    .await
                    .map_err(|e| e.to_string())?;
            }
            if on_client {
                round_trip(&self.client, &self.probe, &self.config).await?;
            }
            Ok::<(), String>(())
        };
        match tokio::time::timeout(self.config.publish_timeout, send).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(Error::transient(
                BROKER,
                topic,
                "publish (not confirmed by the server; the messages may or may not have been delivered)",
                reason,
            )),
            Err(_) => Err(Error::transient(
                BROKER,
                topic,
                "publish (not confirmed by the server; the messages may or may not have been delivered)",
                format!("no confirmation within {:?} (`publish_timeout`)", self.config.publish_timeout),
            )),
        }
    }
}

/// Core NATS deliveries have nothing to settle.
struct NoAck;

impl Acknowledger for NoAck {
    fn ack(self: Box<Self>) -> AckFuture {
        AckFuture::ready(Ok(()))
    }

    fn nack(self: Box<Self>, _delay: Option<std::time::Duration>) -> AckFuture {
        // At most once: the message is gone.
        tracing::trace!(
            broker = BROKER,
            "nack in core NATS mode: the message is not redelivered"
        );
        AckFuture::ready(Ok(()))
    }

    fn nack_on_drop(self: Box<Self>) {}
}

pub(crate) struct CoreSubscriber {
    wire: Wire,
    config: Arc<NatsConfig>,
    identity: Identity,
}

impl CoreSubscriber {
    pub(crate) fn new(wire: Wire, config: Arc<NatsConfig>) -> Self {
        CoreSubscriber {
            identity: Identity::new(config.uuid_header.clone()),
            wire,
            config,
        }
    }

    /// Subscribes (a queue subscription for a group); returns once the server registered
    /// the subscription.
    pub(crate) async fn subscribe(
        &self,
        topic: &str,
        group: Option<&str>,
    ) -> Result<impl Stream<Item = Result<Delivery>> + Send + 'static> {
        let subject = naming::subject_for(&self.config.subject_prefix, topic)?;
        if let Some(group) = group {
            if group.is_empty() || group.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(Error::permanent(
                    BROKER,
                    topic,
                    "subscribe",
                    format!(
                        "consumer group {group:?} is not a valid NATS queue group name (no spaces)"
                    ),
                ));
            }
        }
        let sub = self.wire.subscribe(&subject, group, SUBSCRIPTION_CAPACITY);
        self.wire.flush().await.map_err(|e| {
            Error::transient(BROKER, topic, "subscribe (waiting for the server)", e)
        })?;
        let identity = self.identity.clone();
        let inbox = sub.inbox().clone();
        Ok(futures::stream::poll_fn(move |cx| {
            // The subscription lives as long as the stream.
            let _keep = &sub;
            inbox.poll_next(cx).map(|msg| {
                msg.map(|msg| {
                    let message = codec::decode(msg, Origin::Subject, &identity);
                    Ok(Delivery::new(message, NoAck))
                })
            })
        }))
    }
}
