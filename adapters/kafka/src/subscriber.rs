//! [`KafkaSubscriber`].

use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use tidemill_core::{DeliveryStream, Error, Result, SubscribeOptions, Subscriber};
use tokio::sync::oneshot::error::TryRecvError;

use crate::client::{blocking, broker_error, check_topic_name, creation_error, LogContext, Topics};
use crate::subscription::{self, resolve_positions, Running};
use crate::{KafkaConfig, BROKER};

/// Consumes Kafka topics.
///
/// Each [`subscribe`](Subscriber::subscribe) runs its own librdkafka consumer on a thread
/// of its own:
///
/// - with a group (`SubscribeOptions::group("g")`), a member of Kafka consumer group
///   `g`: the group's members share the topic's partitions, each group gets every
///   message;
/// - without one, a consumer that reads every partition itself (joining no group and
///   committing nothing), from [`start_from`](KafkaConfig::start_from).
///
/// `subscribe` returns once the subscription is effective: group joined, partitions
/// assigned, start positions resolved (and, for a group without committed offsets,
/// committed): a message published after it returns is received.
///
/// ```no_run
/// use futures::StreamExt;
/// use tidemill_core::{SubscribeOptions, Subscriber};
/// use tidemill_kafka::{KafkaConfig, KafkaSubscriber};
///
/// # async fn run() -> tidemill_core::Result<()> {
/// let subscriber = KafkaSubscriber::connect(KafkaConfig::new("127.0.0.1:9092")).await?;
/// let mut orders = subscriber.subscribe("orders", SubscribeOptions::group("billing")).await?;
/// while let Some(delivery) = orders.next().await {
///     let delivery = delivery?; // Err items report broker trouble; the stream goes on
///     println!("{}", delivery.message());
///     delivery.ack().await?; // its offset is committed (contiguously) within commit_interval
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct KafkaSubscriber {
    inner: Arc<Inner>,
}

struct Inner {
    config: KafkaConfig,
    topics: Topics,
    closed: AtomicBool,
    running: Mutex<Vec<Running>>,
}

impl KafkaSubscriber {
    /// Checks the configuration and that the brokers answer within
    /// `config.connect_timeout` (an `Error::Connect` naming `config.brokers` otherwise).
    pub async fn connect(config: KafkaConfig) -> Result<Self> {
        config.validate()?;
        // Creating a client checks every librdkafka property without connecting.
        config
            .consumer_client("tidemill-config-check")
            .create_native_config()
            .map_err(|e| creation_error("consumer", e))?;
        let topics = Topics::connect(&config).await?;
        Ok(KafkaSubscriber {
            inner: Arc::new(Inner {
                config,
                topics,
                closed: AtomicBool::new(false),
                running: Mutex::new(Vec::new()),
            }),
        })
    }

    /// The configuration this subscriber was created with.
    pub fn config(&self) -> &KafkaConfig {
        &self.inner.config
    }

    fn check_open(&self, topic: &str) -> Result<()> {
        if self.inner.closed.load(AtomicOrdering::Acquire) {
            return Err(Error::SubscriberClosed {
                broker: BROKER,
                topic: topic.to_owned(),
            });
        }
        Ok(())
    }

    /// Commits start positions for `group` on every partition of `topic` it has no
    /// committed offset for, so that the group receives everything published from now on
    /// (or, with `start_from = earliest`, everything in the topic).
    async fn pin_group(&self, topic: &str, group: &str) -> Result<()> {
        let config = &self.inner.config;
        let partitions = self.inner.topics.partitions(topic).await?.ok_or_else(|| {
            Error::permanent(BROKER, topic, "initialize", "the topic does not exist")
        })?;
        // A consumer with the group's id that never joins: it reads and commits offsets.
        let consumer: BaseConsumer<LogContext> = config
            .consumer_client(&config.group_id(group))
            .create_with_context(LogContext)
            .map_err(|e| creation_error("consumer", e))?;
        let (t, start_from, timeout) =
            (topic.to_owned(), config.start_from, config.request_timeout);
        let context = format!("initialize group `{group}`");
        blocking(move || {
            let (_, fresh) =
                resolve_positions(&consumer, &t, &partitions, start_from, timeout, true)?;
            if fresh.count() > 0 {
                consumer.commit(&fresh, CommitMode::Sync)?;
            }
            Ok(())
        })
        .await
        .map_err(|e| Error::transient(BROKER, topic, context.clone(), e))?
        .map_err(|e| broker_error(topic, context, e))
    }
}

fn check_group(topic: &str, options: &SubscribeOptions) -> Result<()> {
    if options.consumer_group() == Some("") {
        return Err(Error::permanent(
            BROKER,
            topic,
            "subscribe",
            "the consumer group name is empty",
        ));
    }
    Ok(())
}

#[async_trait]
impl Subscriber for KafkaSubscriber {
    async fn subscribe(&self, topic: &str, options: SubscribeOptions) -> Result<DeliveryStream> {
        self.check_open(topic)?;
        check_topic_name(topic)?;
        check_group(topic, &options)?;
        self.inner.topics.ensure(topic).await?;
        let (stream, running) = subscription::start(
            &self.inner.config,
            &self.inner.topics,
            topic,
            options.consumer_group(),
        )
        .await?;
        {
            let mut list = self.inner.running.lock();
            if self.inner.closed.load(AtomicOrdering::Acquire) {
                running.shared.stop();
                return Err(Error::SubscriberClosed {
                    broker: BROKER,
                    topic: topic.to_owned(),
                });
            }
            // Forget subscriptions that ended by themselves.
            list.retain_mut(|r| matches!(r.done.try_recv(), Err(TryRecvError::Empty)));
            list.push(running);
        }
        Ok(DeliveryStream::new(stream).with_options(&options))
    }

    /// Creates the topic if needed and, for a group, commits its start positions (see
    /// [`start_from`](KafkaConfig::start_from)) where it has none, so the group keeps every
    /// message published from now on even before its first member subscribes.
    async fn initialize(&self, topic: &str, options: &SubscribeOptions) -> Result<()> {
        self.check_open(topic)?;
        check_topic_name(topic)?;
        check_group(topic, options)?;
        self.inner.topics.ensure(topic).await?;
        match options.consumer_group() {
            Some(group) => self.pin_group(topic, group).await,
            None => Ok(()),
        }
    }

    /// Ends every stream of this subscriber: each subscription commits the offsets of what
    /// was acked and leaves its group. Deliveries still held stay valid, but settling them
    /// afterwards commits nothing (Kafka redelivers them to the group).
    async fn close(&self) -> Result<()> {
        self.inner.closed.store(true, AtomicOrdering::Release);
        let running: Vec<Running> = std::mem::take(&mut *self.inner.running.lock());
        for r in &running {
            r.shared.stop();
        }
        let all = futures::future::join_all(running.into_iter().map(|r| r.done));
        if tokio::time::timeout(self.inner.config.close_timeout, all)
            .await
            .is_err()
        {
            tracing::warn!(
                timeout = ?self.inner.config.close_timeout,
                "some Kafka consumers did not finish closing in time; they finish in the background"
            );
        }
        Ok(())
    }
}
