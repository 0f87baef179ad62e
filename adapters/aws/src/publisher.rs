//! [`SqsPublisher`]: `PublishBatch` to the topic's SNS topic (or `SendMessageBatch` to its
//! queue in [`Mode::Queues`]).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

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

/// How often the entries of a batch that the service failed for its own reasons (or left
/// out of its answer) are sent again before `publish` fails; the first resend waits
/// [`RESEND_PAUSE`], each further one twice as long.
const ENTRY_RESENDS: u32 = 3;
const RESEND_PAUSE: Duration = Duration::from_millis(50);

/// Publishes messages to SNS topics (fanned out to every consumer group's queue), or
/// straight to SQS queues in [`Mode::Queues`].
///
/// `publish` returns once the service accepted every message, in order: messages are sent
/// in batches of up to 10 (and 256 KiB), one batch after the other; on a FIFO topic each
/// key's messages keep their order. The service answers for each entry of a batch: entries
/// it failed for its own reasons, or left out of its answer, are sent again (up to 3 times,
/// 50 ms apart and doubling; on FIFO the deduplication id, the uuid, keeps a resend from
/// being delivered twice), entries it rejected as the sender's fault fail the call at once. Topics (and in queue mode, queues) are created on first
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
        let mut resend = Resend::new(batch.len());
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
            let entries = resend
                .pending
                .iter()
                .map(|&i| sns_entry(i, &batch[i]))
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
                    let answered = resend.answered(
                        topic,
                        uuids,
                        out.successful().iter().filter_map(|s| s.id()),
                        out.failed().iter().map(sns_failure),
                    )?;
                    if answered {
                        return Ok(());
                    }
                    resend.pause().await;
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
        let mut resend = Resend::new(batch.len());
        loop {
            let queue = res.queue(topic, &name).await?;
            let entries = resend
                .pending
                .iter()
                .map(|&i| sqs_entry(i, &batch[i]))
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
                    let answered = resend.answered(
                        topic,
                        uuids,
                        out.successful().iter().map(|s| s.id()),
                        out.failed().iter().map(sqs_failure),
                    )?;
                    if answered {
                        return Ok(());
                    }
                    resend.pause().await;
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

/// A failed entry of a batch answer: id, code, message, whether it is the sender's fault.
type Failure<'a> = (&'a str, &'a str, Option<&'a str>, bool);

/// Both SDKs' `BatchResultErrorEntry` have the same shape.
macro_rules! failure_of {
    ($name:ident, $ty:ty) => {
        fn $name(f: &$ty) -> Failure<'_> {
            (f.id(), f.code(), f.message(), f.sender_fault())
        }
    };
}
failure_of!(sns_failure, aws_sdk_sns::types::BatchResultErrorEntry);
failure_of!(sqs_failure, aws_sdk_sqs::types::BatchResultErrorEntry);

/// Which entries of one batch are still to be sent (their indexes, which are also their
/// entry ids), and how often they were sent again.
struct Resend {
    pending: Vec<usize>,
    resends: u32,
}

impl Resend {
    fn new(entries: usize) -> Self {
        Resend {
            pending: (0..entries).collect(),
            resends: 0,
        }
    }

    /// Reads a batch call's answer. `Ok(true)`: every entry was accepted. `Ok(false)`: the
    /// entries the service failed for its own reasons or did not answer for are pending
    /// again, to be sent after [`pause`](Self::pause). Fails naming the message when an
    /// entry was rejected as the sender's fault, or when entries are still unaccepted
    /// after [`ENTRY_RESENDS`] resends.
    fn answered<'a>(
        &mut self,
        topic: &str,
        uuids: &[&str],
        successful: impl Iterator<Item = &'a str>,
        failed: impl Iterator<Item = Failure<'a>>,
    ) -> Result<bool> {
        let uuid = |id: &str| {
            id.parse::<usize>()
                .ok()
                .and_then(|i| uuids.get(i))
                .copied()
                .unwrap_or("?")
        };
        let accepted: HashSet<&str> = successful.collect();
        let mut causes: HashMap<usize, String> = HashMap::new();
        for (id, code, message, sender_fault) in failed {
            let cause = format!("{code}: {}", message.unwrap_or("no detail"));
            if sender_fault {
                let context = format!("publish message {}", uuid(id));
                return Err(Error::permanent(BROKER, topic, context, cause));
            }
            if let Ok(i) = id.parse::<usize>() {
                causes.insert(i, cause);
            }
        }
        self.pending
            .retain(|i| !accepted.contains(i.to_string().as_str()) || causes.contains_key(i));
        let Some(&first) = self.pending.first() else {
            return Ok(true);
        };
        let cause = causes.remove(&first).unwrap_or_else(|| {
            "the service's answer named the entry neither accepted nor failed".to_owned()
        });
        if self.resends >= ENTRY_RESENDS {
            let context = format!(
                "publish message {} (after {ENTRY_RESENDS} resends)",
                uuid(&first.to_string())
            );
            return Err(Error::transient(BROKER, topic, context, cause));
        }
        self.resends += 1;
        tracing::warn!(
            topic,
            uuid = uuid(&first.to_string()),
            entries = self.pending.len(),
            resend = self.resends,
            cause,
            "the service did not accept every entry of a batch; sending those again"
        );
        Ok(false)
    }

    /// Waits before a resend: 50 ms, then twice as long each time.
    async fn pause(&self) {
        tokio::time::sleep(RESEND_PAUSE * 2u32.pow(self.resends.saturating_sub(1))).await;
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    const UUIDS: [&str; 3] = ["u0", "u1", "u2"];

    #[test]
    fn entries_left_out_of_the_answer_are_sent_again() {
        let mut resend = Resend::new(3);
        // Entry 1 is in neither list (an emulator that dropped it), entry 2 failed on the
        // service's side.
        let failed = [("2", "InternalError", Some("busy"), false)];
        let done = resend
            .answered("t", &UUIDS, ["0"].into_iter(), failed.into_iter())
            .unwrap();
        assert!(!done);
        assert_eq!(resend.pending, vec![1, 2]);
        let done = resend
            .answered("t", &UUIDS, ["1", "2"].into_iter(), std::iter::empty())
            .unwrap();
        assert!(done);
        assert!(resend.pending.is_empty());
    }

    #[test]
    fn a_sender_fault_fails_at_once_naming_the_message() {
        let mut resend = Resend::new(3);
        let failed = [("1", "InvalidParameter", Some("too long"), true)];
        let err = resend
            .answered("t", &UUIDS, ["0", "2"].into_iter(), failed.into_iter())
            .unwrap_err();
        assert!(!err.is_transient(), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("u1") && text.contains("InvalidParameter"),
            "{text}"
        );
    }

    #[test]
    fn entries_never_accepted_fail_after_the_resends() {
        let mut resend = Resend::new(2);
        for _ in 0..ENTRY_RESENDS {
            let done = resend
                .answered("t", &UUIDS, ["0"].into_iter(), std::iter::empty())
                .unwrap();
            assert!(!done);
            assert_eq!(resend.pending, vec![1]);
        }
        let err = resend
            .answered("t", &UUIDS, std::iter::empty(), std::iter::empty())
            .unwrap_err();
        assert!(err.is_transient(), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("u1") && text.contains("neither accepted nor failed"),
            "{text}"
        );
    }
}
