//! [`SqsPublisher`]: `PublishBatch` to the topic's SNS topic (or `SendMessageBatch` to its
//! queue in [`Mode::Queues`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use tidemill_core::{ConnectionState, Error, Message, Publisher, Result};

use crate::client::{self, CallError, Clients};
use crate::codec::{self, Encoded};
use crate::config::{AwsConfig, Mode};
use crate::record::{Attribute, AttributeValue};
use crate::resources::{self, Resources};
use crate::BROKER;

/// The most one `PublishBatch` / `SendMessageBatch` carries: 10 entries, 256 KiB in all.
const BATCH_ENTRIES: usize = 10;
const BATCH_BYTES: usize = 256 * 1024;

/// Publishes messages to SNS topics (fanned out to every consumer group's queue), or
/// straight to SQS queues in [`Mode::Queues`].
///
/// `publish` returns once the service accepted every message, in order: messages are sent
/// in batches of up to 10 (and 256 KiB), one batch after the other; on a FIFO topic each
/// key's messages keep their order. Topics (and in queue mode, queues) are created on first
/// use unless [`AwsConfig::create_resources`] is off. A message over
/// [`AwsConfig::max_message_bytes`] fails before anything is sent. Cloning is cheap; clones
/// share the SDK clients.
#[derive(Clone)]
pub struct SqsPublisher {
    inner: Arc<Inner>,
}

struct Inner {
    res: Resources,
    closed: AtomicBool,
}

impl std::fmt::Debug for SqsPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqsPublisher")
            .field("address", &self.inner.res.config.address())
            .field("mode", &self.inner.res.config.mode)
            .field("fifo", &self.inner.res.config.fifo)
            .field("closed", &self.inner.closed.load(Ordering::Relaxed))
            .finish()
    }
}

impl SqsPublisher {
    /// Loads the SDK configuration and checks the endpoint answers; fails within
    /// `connect_timeout` naming it when it does not.
    pub async fn connect(config: AwsConfig) -> Result<Self> {
        let clients = Clients::connect(&config).await?;
        Ok(SqsPublisher {
            inner: Arc::new(Inner {
                res: Resources::new(clients, config),
                closed: AtomicBool::new(false),
            }),
        })
    }

    /// The configuration this publisher runs with.
    pub fn config(&self) -> &AwsConfig {
        &self.inner.res.config
    }

    async fn send(&self, topic: &str, messages: Vec<Message>, mandatory: bool) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(Error::PublisherClosed {
                broker: BROKER,
                topic: topic.to_owned(),
            });
        }
        if messages.is_empty() {
            return Ok(());
        }
        let config = &self.inner.res.config;
        let encoded = messages
            .iter()
            .map(|m| codec::encode(m, topic, config.max_message_bytes, config.fifo))
            .collect::<Result<Vec<_>>>()?;
        let mut start = 0;
        while start < encoded.len() {
            let mut end = start + 1;
            let mut bytes = encoded[start].size;
            while end < encoded.len()
                && end - start < BATCH_ENTRIES
                && bytes + encoded[end].size <= BATCH_BYTES
            {
                bytes += encoded[end].size;
                end += 1;
            }
            let batch = &encoded[start..end];
            let uuids: Vec<&str> = messages[start..end].iter().map(Message::uuid).collect();
            match config.mode {
                Mode::Topics => self.publish_topic(topic, batch, &uuids, mandatory).await?,
                Mode::Queues => self.send_queue(topic, batch, &uuids).await?,
            }
            start = end;
        }
        Ok(())
    }

    async fn publish_topic(
        &self,
        topic: &str,
        batch: &[Encoded],
        uuids: &[&str],
        mandatory: bool,
    ) -> Result<()> {
        let res = &self.inner.res;
        let mut retried = false;
        loop {
            let arn = res.topic_arn(topic).await?;
            if mandatory {
                match res.try_subscriptions(&arn).await {
                    Ok(subs) if subs.is_empty() => {
                        return Err(Error::Unroutable {
                            broker: BROKER,
                            topic: topic.to_owned(),
                            uuid: uuids[0].to_owned(),
                        })
                    }
                    Ok(_) => {}
                    Err(e) if resources::missing(&e) && !retried => {
                        // The topic went away: whatever subscribed to it went with it.
                        tracing::warn!(topic, error = %e, "SNS topic missing; looking it up again");
                        res.forget(topic);
                        retried = true;
                        continue;
                    }
                    Err(e) => return Err(e.into_error(topic, "list the SNS topic's subscriptions")),
                }
            }
            let entries = batch
                .iter()
                .enumerate()
                .map(|(i, e)| sns_entry(i, e))
                .collect::<Result<Vec<_>>>()?;
            let sns = &res.clients.sns;
            let result = client::call(&res.state, res.config.command_timeout, || {
                sns.publish_batch()
                    .topic_arn(arn.as_ref())
                    .set_publish_batch_request_entries(Some(entries.clone()))
                    .send()
            })
            .await;
            match result {
                Ok(out) => {
                    let failed = out.failed().first();
                    return entry_result(
                        topic,
                        uuids,
                        failed.map(|f| (f.id(), f.code(), f.message(), f.sender_fault())),
                    );
                }
                Err(e) if resources::missing(&e) && !retried && res.config.create_resources => {
                    // The topic went away (deleted, or an emulator restarted): create it again.
                    tracing::warn!(topic, error = %e, "SNS topic missing; creating it again");
                    res.forget(topic);
                    retried = true;
                }
                Err(e) => return Err(publish_error(e, topic, uuids)),
            }
        }
    }

    async fn send_queue(&self, topic: &str, batch: &[Encoded], uuids: &[&str]) -> Result<()> {
        let res = &self.inner.res;
        let name = res.config.topic_name(topic);
        let mut retried = false;
        loop {
            let queue = res.queue(topic, &name).await?;
            let entries = batch
                .iter()
                .enumerate()
                .map(|(i, e)| sqs_entry(i, e))
                .collect::<Result<Vec<_>>>()?;
            let sqs = &res.clients.sqs;
            let result = client::call(&res.state, res.config.command_timeout, || {
                sqs.send_message_batch()
                    .queue_url(queue.url.as_ref())
                    .set_entries(Some(entries.clone()))
                    .send()
            })
            .await;
            match result {
                Ok(out) => {
                    let failed = out.failed().first();
                    return entry_result(
                        topic,
                        uuids,
                        failed.map(|f| (f.id(), f.code(), f.message(), f.sender_fault())),
                    );
                }
                Err(e) if resources::missing(&e) && !retried && res.config.create_resources => {
                    tracing::warn!(topic, error = %e, "SQS queue missing; creating it again");
                    res.forget_queue(&name);
                    retried = true;
                }
                Err(e) => return Err(publish_error(e, topic, uuids)),
            }
        }
    }
}

fn publish_error(e: CallError, topic: &str, uuids: &[&str]) -> Error {
    let context = match uuids {
        [one] => format!("publish message {one}"),
        [first, ..] => format!("publish {} messages from {first}", uuids.len()),
        [] => "publish".to_owned(),
    };
    e.into_error(topic, context)
}

/// The outcome of a batch call that was answered: its first failed entry (id, code,
/// message, sender's fault) as an error naming the message, or `Ok`.
fn entry_result(
    topic: &str,
    uuids: &[&str],
    failed: Option<(&str, &str, Option<&str>, bool)>,
) -> Result<()> {
    let Some((id, code, message, sender_fault)) = failed else {
        return Ok(());
    };
    let uuid = id
        .parse::<usize>()
        .ok()
        .and_then(|i| uuids.get(i))
        .copied()
        .unwrap_or("?");
    let cause = format!("{code}: {}", message.unwrap_or("no detail"));
    let context = format!("publish message {uuid}");
    Err(if sender_fault {
        Error::permanent(BROKER, topic, context, cause)
    } else {
        Error::transient(BROKER, topic, context, cause)
    })
}

fn build_error(topic_hint: &str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::permanent(BROKER, topic_hint, "build a request", e)
}

fn sns_entry(i: usize, e: &Encoded) -> Result<aws_sdk_sns::types::PublishBatchRequestEntry> {
    use aws_sdk_sns::types::PublishBatchRequestEntry;
    let mut b = PublishBatchRequestEntry::builder()
        .id(i.to_string())
        .message(&e.body);
    for (name, attr) in &e.attributes {
        b = b.message_attributes(name, sns_attribute(attr).map_err(|e| build_error("", e))?);
    }
    if let Some((group_id, dedup_id)) = &e.fifo {
        b = b
            .message_group_id(group_id)
            .message_deduplication_id(dedup_id);
    }
    b.build().map_err(|e| build_error("", e))
}

fn sns_attribute(
    attr: &Attribute,
) -> std::result::Result<aws_sdk_sns::types::MessageAttributeValue, aws_sdk_sns::error::BuildError>
{
    let b = aws_sdk_sns::types::MessageAttributeValue::builder().data_type(&attr.data_type);
    match &attr.value {
        AttributeValue::Text(s) => b.string_value(s),
        AttributeValue::Binary(v) => b.binary_value(aws_sdk_sns::primitives::Blob::new(v.to_vec())),
    }
    .build()
}

fn sqs_entry(i: usize, e: &Encoded) -> Result<aws_sdk_sqs::types::SendMessageBatchRequestEntry> {
    use aws_sdk_sqs::types::{MessageAttributeValue, SendMessageBatchRequestEntry};
    let mut b = SendMessageBatchRequestEntry::builder()
        .id(i.to_string())
        .message_body(&e.body);
    for (name, attr) in &e.attributes {
        let v = MessageAttributeValue::builder().data_type(&attr.data_type);
        let v = match &attr.value {
            AttributeValue::Text(s) => v.string_value(s),
            AttributeValue::Binary(bytes) => {
                v.binary_value(aws_sdk_sqs::primitives::Blob::new(bytes.to_vec()))
            }
        }
        .build()
        .map_err(|e| build_error("", e))?;
        b = b.message_attributes(name, v);
    }
    if let Some((group_id, dedup_id)) = &e.fifo {
        b = b
            .message_group_id(group_id)
            .message_deduplication_id(dedup_id);
    }
    b.build().map_err(|e| build_error("", e))
}

#[async_trait]
impl Publisher for SqsPublisher {
    async fn publish(&self, topic: &str, messages: Vec<Message>) -> Result<()> {
        self.send(topic, messages, false).await
    }

    /// Fails with [`Error::Unroutable`] when no queue is subscribed to the topic (queue
    /// mode: the queue keeps every message, so this is `publish`).
    async fn publish_mandatory(&self, topic: &str, messages: Vec<Message>) -> Result<()> {
        self.send(topic, messages, true).await
    }

    /// Creates the group's queue, subscribed to the topic (queue mode: the topic's
    /// queue), so messages published from now on wait for the group. Asks the services
    /// each time (every call it makes is idempotent) rather than trusting what this
    /// publisher saw before: the topic or queue may have been deleted since.
    async fn retain_for(&self, topic: &str, group: &str) -> Result<()> {
        let res = &self.inner.res;
        res.forget(topic);
        res.forget_queue(&res.config.queue_name(topic, group));
        res.group_queue(topic, group).await.map(|_| ())
    }

    async fn close(&self) -> Result<()> {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.res.state.set(ConnectionState::Closed);
        Ok(())
    }

    fn connection_state(&self) -> ConnectionState {
        self.inner.res.state.get()
    }
}
