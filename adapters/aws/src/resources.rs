//! SNS topics, SQS queues and the subscriptions between them: created as needed (or looked
//! up, naming what is missing), remembered per client.

use std::collections::HashMap;
use std::sync::Arc;

use aws_sdk_sqs::types::QueueAttributeName;
use parking_lot::Mutex;
use tidemill_core::{Error, Result};

use crate::client::{self, CallError, Clients, Failure, StateCell};
use crate::config::{AwsConfig, Mode};
use crate::BROKER;

/// An SQS queue.
#[derive(Clone, Debug)]
pub(crate) struct Queue {
    pub(crate) name: Arc<str>,
    pub(crate) url: Arc<str>,
    pub(crate) arn: Arc<str>,
}

/// Subscription ARNs by (topic ARN, queue ARN).
type Subscribed = HashMap<(Arc<str>, Arc<str>), Arc<str>>;

/// What one publisher or subscriber knows exists.
#[derive(Debug)]
pub(crate) struct Resources {
    pub(crate) clients: Clients,
    pub(crate) config: AwsConfig,
    pub(crate) state: StateCell,
    topics: Mutex<HashMap<String, Arc<str>>>,
    queues: Mutex<HashMap<String, Queue>>,
    /// Topic ARN + queue ARN pairs known to be subscribed.
    subscribed: Mutex<Subscribed>,
}

impl Resources {
    pub(crate) fn new(clients: Clients, config: AwsConfig) -> Self {
        Resources {
            clients,
            config,
            state: StateCell::default(),
            topics: Mutex::default(),
            queues: Mutex::default(),
            subscribed: Mutex::default(),
        }
    }

    fn deadline(&self) -> std::time::Duration {
        self.config.command_timeout
    }

    /// The ARN of `topic`'s SNS topic, created when missing (unless creation is off).
    pub(crate) async fn topic_arn(&self, topic: &str) -> Result<Arc<str>> {
        if let Some(arn) = self.topics.lock().get(topic) {
            return Ok(arn.clone());
        }
        let name = self.config.topic_name(topic);
        let arn: Arc<str> = if self.config.create_resources {
            let sns = &self.clients.sns;
            let out = client::call(&self.state, self.deadline(), || {
                let mut req = sns.create_topic().name(&name);
                if self.config.fifo {
                    req = req.attributes("FifoTopic", "true");
                }
                req.send()
            })
            .await
            .map_err(|e| e.into_error(topic, format!("create SNS topic `{name}`")))?;
            out.topic_arn().unwrap_or_default().into()
        } else {
            self.find_topic(topic, &name).await?
        };
        self.topics.lock().insert(topic.to_owned(), arn.clone());
        Ok(arn)
    }

    async fn find_topic(&self, topic: &str, name: &str) -> Result<Arc<str>> {
        let suffix = format!(":{name}");
        let mut token: Option<String> = None;
        loop {
            let sns = &self.clients.sns;
            let out = client::call(&self.state, self.deadline(), || {
                sns.list_topics().set_next_token(token.clone()).send()
            })
            .await
            .map_err(|e| e.into_error(topic, format!("look up SNS topic `{name}`")))?;
            if let Some(arn) = out
                .topics()
                .iter()
                .filter_map(|t| t.topic_arn())
                .find(|arn| arn.ends_with(&suffix))
            {
                return Ok(arn.into());
            }
            match out.next_token() {
                Some(next) => token = Some(next.to_owned()),
                None => {
                    return Err(Error::permanent(
                        BROKER,
                        topic,
                        "look up SNS topic",
                        format!("SNS topic `{name}` does not exist and create_resources is off"),
                    ))
                }
            }
        }
    }

    /// Forgets what is known about `topic` and its queues (after the service said
    /// something no longer exists), so the next use creates or looks them up again.
    pub(crate) fn forget(&self, topic: &str) {
        if let Some(arn) = self.topics.lock().remove(topic) {
            self.subscribed.lock().retain(|(t, _), _| *t != arn);
        }
    }

    /// Forgets queue `name`.
    pub(crate) fn forget_queue(&self, name: &str) {
        if let Some(q) = self.queues.lock().remove(name) {
            self.subscribed
                .lock()
                .retain(|(_, queue), _| *queue != q.arn);
        }
    }

    /// Queue `name` (for `topic`), created when missing (unless creation is off).
    pub(crate) async fn queue(&self, topic: &str, name: &str) -> Result<Queue> {
        self.make_queue(topic, name, false).await
    }

    /// A private queue `name` of `topic`: created (whatever `create_resources` says, as it
    /// is the subscription's own) with the tags that mark it private and its heartbeat.
    pub(crate) async fn private_queue(&self, topic: &str, name: &str) -> Result<Queue> {
        self.make_queue(topic, name, true).await
    }

    async fn make_queue(&self, topic: &str, name: &str, private: bool) -> Result<Queue> {
        if let Some(q) = self.queues.lock().get(name) {
            return Ok(q.clone());
        }
        let sqs = &self.clients.sqs;
        let url: String = if self.config.create_resources || private {
            let beat = now_secs().to_string();
            let out = client::call(&self.state, self.deadline(), || {
                let mut req = sqs.create_queue().queue_name(name);
                if private {
                    req = req.tags(PRIVATE_TAG, "true").tags(HEARTBEAT_TAG, &beat);
                }
                if self.config.fifo {
                    req = req.attributes(QueueAttributeName::FifoQueue, "true");
                }
                if let Some(r) = self.config.message_retention {
                    req = req.attributes(
                        QueueAttributeName::MessageRetentionPeriod,
                        r.as_secs().to_string(),
                    );
                }
                req.send()
            })
            .await
            .map_err(|e| e.into_error(topic, format!("create SQS queue `{name}`")))?;
            out.queue_url().unwrap_or_default().to_owned()
        } else {
            let out = client::call(&self.state, self.deadline(), || {
                sqs.get_queue_url().queue_name(name).send()
            })
            .await
            .map_err(|e| match e.failure {
                Failure::Missing => Error::permanent(
                    BROKER,
                    topic,
                    "look up SQS queue",
                    format!("SQS queue `{name}` does not exist and create_resources is off"),
                ),
                _ => e.into_error(topic, format!("look up SQS queue `{name}`")),
            })?;
            out.queue_url().unwrap_or_default().to_owned()
        };
        let out = client::call(&self.state, self.deadline(), || {
            sqs.get_queue_attributes()
                .queue_url(&url)
                .attribute_names(QueueAttributeName::QueueArn)
                .send()
        })
        .await
        .map_err(|e| e.into_error(topic, format!("read the attributes of SQS queue `{name}`")))?;
        let arn = out
            .attributes()
            .and_then(|a| a.get(&QueueAttributeName::QueueArn))
            .cloned()
            .unwrap_or_default();
        let queue = Queue {
            name: name.into(),
            url: url.into(),
            arn: arn.into(),
        };
        self.queues.lock().insert(name.to_owned(), queue.clone());
        Ok(queue)
    }

    /// The queue of consumer group `group` of `topic`, subscribed to the topic (Topics
    /// mode), or the topic's queue (Queues mode).
    pub(crate) async fn group_queue(&self, topic: &str, group: &str) -> Result<Queue> {
        let name = self.config.queue_name(topic, group);
        match self.config.mode {
            Mode::Queues => self.queue(topic, &name).await,
            Mode::Topics => {
                let arn = self.topic_arn(topic).await?;
                let queue = self.queue(topic, &name).await?;
                self.subscribe_queue(topic, &arn, &queue).await?;
                Ok(queue)
            }
        }
    }

    /// Subscribes `queue` to the topic `topic_arn` with raw message delivery, allowing the
    /// topic to send to the queue when the queue has no policy yet. Returns the
    /// subscription's ARN.
    pub(crate) async fn subscribe_queue(
        &self,
        topic: &str,
        topic_arn: &Arc<str>,
        queue: &Queue,
    ) -> Result<Arc<str>> {
        let pair = (topic_arn.clone(), queue.arn.clone());
        if let Some(sub) = self.subscribed.lock().get(&pair) {
            return Ok(sub.clone());
        }
        let sns = &self.clients.sns;
        let sub: Arc<str> = if self.config.create_resources {
            self.allow_topic(topic, topic_arn, queue).await?;
            let out = client::call(&self.state, self.deadline(), || {
                sns.subscribe()
                    .topic_arn(topic_arn.as_ref())
                    .protocol("sqs")
                    .endpoint(queue.arn.as_ref())
                    .attributes("RawMessageDelivery", "true")
                    .return_subscription_arn(true)
                    .send()
            })
            .await
            .map_err(|e| {
                e.into_error(
                    topic,
                    format!("subscribe SQS queue `{}` to the SNS topic", queue.name),
                )
            })?;
            out.subscription_arn().unwrap_or_default().into()
        } else {
            self.subscriptions(topic, topic_arn)
                .await?
                .into_iter()
                .find(|(endpoint, _)| endpoint.as_str() == queue.arn.as_ref())
                .map(|(_, sub)| Arc::<str>::from(sub))
                .ok_or_else(|| {
                    Error::permanent(
                        BROKER,
                        topic,
                        "look up the subscription",
                        format!(
                            "SQS queue `{}` is not subscribed to SNS topic `{topic_arn}` and \
                             create_resources is off",
                            queue.name
                        ),
                    )
                })?
        };
        self.subscribed.lock().insert(pair, sub.clone());
        Ok(sub)
    }

    /// Gives the queue a policy letting the topic send to it, when it has none.
    async fn allow_topic(&self, topic: &str, topic_arn: &str, queue: &Queue) -> Result<()> {
        let sqs = &self.clients.sqs;
        let out = client::call(&self.state, self.deadline(), || {
            sqs.get_queue_attributes()
                .queue_url(queue.url.as_ref())
                .attribute_names(QueueAttributeName::Policy)
                .send()
        })
        .await
        .map_err(|e| {
            e.into_error(
                topic,
                format!("read the policy of SQS queue `{}`", queue.name),
            )
        })?;
        if let Some(policy) = out
            .attributes()
            .and_then(|a| a.get(&QueueAttributeName::Policy))
        {
            if !policy.contains(topic_arn) {
                tracing::warn!(
                    queue = %queue.name,
                    topic_arn,
                    "the queue has a policy of its own that does not name the topic: SNS may \
                     not be allowed to deliver to it"
                );
            }
            return Ok(());
        }
        let policy = serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [{
                "Sid": "tidemill-sns",
                "Effect": "Allow",
                "Principal": { "Service": "sns.amazonaws.com" },
                "Action": "sqs:SendMessage",
                "Resource": queue.arn.as_ref(),
                "Condition": { "ArnEquals": { "aws:SourceArn": topic_arn } }
            }]
        })
        .to_string();
        client::call(&self.state, self.deadline(), || {
            sqs.set_queue_attributes()
                .queue_url(queue.url.as_ref())
                .attributes(QueueAttributeName::Policy, &policy)
                .send()
        })
        .await
        .map_err(|e| {
            e.into_error(
                topic,
                format!("set the policy of SQS queue `{}`", queue.name),
            )
        })?;
        Ok(())
    }

    /// The (endpoint, subscription ARN) pairs of the topic's subscriptions.
    pub(crate) async fn subscriptions(
        &self,
        topic: &str,
        topic_arn: &str,
    ) -> Result<Vec<(String, String)>> {
        self.try_subscriptions(topic_arn)
            .await
            .map_err(|e| e.into_error(topic, "list the SNS topic's subscriptions"))
    }

    /// [`subscriptions`](Self::subscriptions), with the SDK's error (to tell a topic that
    /// no longer exists).
    pub(crate) async fn try_subscriptions(
        &self,
        topic_arn: &str,
    ) -> std::result::Result<Vec<(String, String)>, CallError> {
        let mut all = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let sns = &self.clients.sns;
            let out = client::call(&self.state, self.deadline(), || {
                sns.list_subscriptions_by_topic()
                    .topic_arn(topic_arn)
                    .set_next_token(token.clone())
                    .send()
            })
            .await?;
            all.extend(out.subscriptions().iter().map(|s| {
                (
                    s.endpoint().unwrap_or_default().to_owned(),
                    s.subscription_arn().unwrap_or_default().to_owned(),
                )
            }));
            match out.next_token() {
                Some(next) => token = Some(next.to_owned()),
                None => return Ok(all),
            }
        }
    }

    /// Removes a private queue and its subscription (best effort: logged when it fails).
    pub(crate) async fn delete_private(&self, topic: &str, queue: &Queue, sub: Option<&str>) {
        if let Some(sub) = sub {
            let sns = &self.clients.sns;
            if let Err(e) = client::call(&self.state, self.deadline(), || {
                sns.unsubscribe().subscription_arn(sub).send()
            })
            .await
            {
                tracing::warn!(topic, queue = %queue.name, error = %e, "could not remove the subscription of a private queue");
            }
        }
        let sqs = &self.clients.sqs;
        match client::call(&self.state, self.deadline(), || {
            sqs.delete_queue().queue_url(queue.url.as_ref()).send()
        })
        .await
        {
            Ok(_) => {}
            Err(e) if e.failure == Failure::Missing => {}
            Err(e) => {
                tracing::warn!(topic, queue = %queue.name, error = %e, "could not delete a private queue")
            }
        }
        self.forget_queue(&queue.name);
    }
}

/// The tag marking a private queue.
const PRIVATE_TAG: &str = "tidemill-private";
/// The tag holding a private queue's last heartbeat (Unix seconds).
const HEARTBEAT_TAG: &str = "tidemill-heartbeat";

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

impl Resources {
    /// Refreshes a private queue's heartbeat tag (best effort).
    pub(crate) async fn heartbeat(&self, topic: &str, queue: &Queue) {
        let sqs = &self.clients.sqs;
        let beat = now_secs().to_string();
        if let Err(e) = client::call(&self.state, self.deadline(), || {
            sqs.tag_queue()
                .queue_url(queue.url.as_ref())
                .tags(HEARTBEAT_TAG, &beat)
                .send()
        })
        .await
        {
            tracing::warn!(topic, queue = %queue.name, error = %e, "could not refresh a private queue's heartbeat");
        }
    }

    /// Deletes the private queues of `topic` (names starting with `prefix`) whose
    /// heartbeat is older than `private_queue_expiry`: left behind by processes that ended
    /// without deleting them. Best effort: failures are logged.
    pub(crate) async fn remove_expired_private(&self, topic: &str, prefix: &str) {
        if let Err(e) = self.try_remove_expired(topic, prefix).await {
            tracing::warn!(topic, error = %e, "could not look for expired private queues");
        }
    }

    async fn try_remove_expired(&self, topic: &str, prefix: &str) -> Result<()> {
        let sqs = &self.clients.sqs;
        let out = client::call(&self.state, self.deadline(), || {
            sqs.list_queues()
                .queue_name_prefix(prefix)
                .max_results(1000)
                .send()
        })
        .await
        .map_err(|e| e.into_error(topic, "list private queues"))?;
        let oldest = now_secs().saturating_sub(self.config.private_queue_expiry.as_secs());
        let mut expired = Vec::new();
        for url in out.queue_urls() {
            let tags = client::call(&self.state, self.deadline(), || {
                sqs.list_queue_tags().queue_url(url).send()
            })
            .await
            .map_err(|e| e.into_error(topic, "read a private queue's tags"))?;
            let tags = tags.tags();
            let private = tags
                .and_then(|t| t.get(PRIVATE_TAG))
                .is_some_and(|v| v == "true");
            let beat = tags
                .and_then(|t| t.get(HEARTBEAT_TAG))
                .and_then(|v| v.parse::<u64>().ok());
            if private && beat.is_some_and(|b| b < oldest) {
                expired.push(url.clone());
            }
        }
        if expired.is_empty() {
            return Ok(());
        }
        let subscriptions = match self.config.mode {
            Mode::Topics => {
                let arn = self.topic_arn(topic).await?;
                self.subscriptions(topic, &arn).await?
            }
            Mode::Queues => Vec::new(),
        };
        for url in expired {
            let attrs = client::call(&self.state, self.deadline(), || {
                sqs.get_queue_attributes()
                    .queue_url(&url)
                    .attribute_names(QueueAttributeName::QueueArn)
                    .send()
            })
            .await
            .map_err(|e| e.into_error(topic, "read a private queue's attributes"))?;
            let arn = attrs
                .attributes()
                .and_then(|a| a.get(&QueueAttributeName::QueueArn))
                .cloned()
                .unwrap_or_default();
            let name = url.rsplit('/').next().unwrap_or(&url).to_owned();
            let sub = subscriptions
                .iter()
                .find(|(endpoint, _)| *endpoint == arn)
                .map(|(_, s)| s.as_str());
            tracing::info!(topic, queue = %name, "deleting an expired private queue (its subscriber ended without deleting it)");
            let queue = Queue {
                name: name.into(),
                url: url.into(),
                arn: arn.into(),
            };
            self.delete_private(topic, &queue, sub).await;
        }
        Ok(())
    }
}

/// Whether `e` says a queue or topic no longer exists.
pub(crate) fn missing(e: &CallError) -> bool {
    e.failure == Failure::Missing
}
