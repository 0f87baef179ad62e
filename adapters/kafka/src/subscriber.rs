//! [`KafkaSubscriber`].

use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::Mutex;
use tidemill_core::{DeliveryStream, Error, Result, SubscribeOptions, Subscriber};
use tokio::sync::oneshot::error::TryRecvError;

use crate::client::{check_topic_name, creation_error, Topics};
use crate::subscription::{self, Running};
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
            .map_err(|e| creation_error(&config.secrets(), "consumer", e))?;
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
            Some(group) => {
                self.inner
                    .topics
                    .pin_group(topic, group, "initialize")
                    .await
            }
            None => Ok(()),
        }
    }

    /// The connection of its subscriptions' consumers as librdkafka reports it, without a
    /// round trip: disconnected while any of them lost every broker connection (its
    /// `AllBrokersDown` error) and no statistics report since (every
    /// [`statistics_interval`](KafkaConfig::statistics_interval)) showed one up again;
    /// closed once `close` was called. Connected without subscriptions, and always when
    /// `statistics_interval` is zero.
    fn connection_state(&self) -> tidemill_core::ConnectionState {
        if self.inner.closed.load(AtomicOrdering::Acquire) {
            return tidemill_core::ConnectionState::Closed;
        }
        if self.inner.config.statistics_interval.is_zero() {
            return tidemill_core::ConnectionState::Connected;
        }
        let down = self
            .inner
            .running
            .lock()
            .iter()
            .any(|r| r.shared.link.is_down());
        if down {
            tidemill_core::ConnectionState::Disconnected
        } else {
            tidemill_core::ConnectionState::Connected
        }
    }

    /// Ends every stream of this subscriber, polled or not: each subscription commits the
    /// offsets of what was acked and leaves its group, so the group's other members get
    /// everything else it had received (at their next heartbeat, then a rejoin). Deliveries
    /// still held stay valid, but settling them afterwards commits nothing (Kafka
    /// redelivers them to the group).
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
