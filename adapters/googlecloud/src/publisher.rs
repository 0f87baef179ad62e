//! The publisher: one batching Pub/Sub publisher per topic over one shared connection.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use google_cloud_gax::error::rpc::Code;
use google_cloud_pubsub::client::{BasePublisher, Publisher as TopicPublisher};
use google_cloud_pubsub::error::PublishError;
use google_cloud_pubsub::model::ListTopicSubscriptionsRequest;
use parking_lot::{Mutex, RwLock};
use tidemill_core::{Error, Message, Publisher, Result};
use tokio_util::task::TaskTracker;

use crate::client::{self, admin_call, Admin, Endpoint, Liveness};
use crate::config::GoogleCloudConfig;
use crate::convert::{encode, Encoded, Encoding};
use crate::names::{group_subscription, topic_name, TopicName};
use crate::BROKER;

/// Publishes to Pub/Sub topics. Cheap to clone (clones share the connection and the
/// per-topic batching publishers).
///
/// `publish` returns once Pub/Sub answered the publish request of every message (each has
/// a message id). Topics are created on first use unless `create_topics` is off.
///
/// Pub/Sub drops what is published to a topic without subscriptions. Failure destinations
/// (dead letter, poison) therefore call [`retain_for`](Publisher::retain_for), which
/// creates the subscription a consumer group would consume, and publish with
/// [`publish_mandatory`](Publisher::publish_mandatory), which fails with
/// `Error::Unroutable` when the topic has no subscription at all.
///
/// ```no_run
/// use tidemill_core::{Message, Publisher};
/// use tidemill_googlecloud::{GoogleCloudConfig, GoogleCloudPublisher};
///
/// # async fn run() -> tidemill_core::Result<()> {
/// let publisher = GoogleCloudPublisher::connect(GoogleCloudConfig::new("my-project")).await?;
/// publisher.publish_one("orders", Message::new("tea").with_key("ord-1")).await?;
/// publisher.close().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct GoogleCloudPublisher {
    inner: Arc<Inner>,
}

struct Inner {
    config: GoogleCloudConfig,
    endpoint: Endpoint,
    base: BasePublisher,
    admin: Admin,
    topics: RwLock<HashMap<String, Topic>>,
    /// When each topic (full name) was last seen with a subscription, for
    /// `publish_mandatory`.
    routable: Mutex<HashMap<String, Instant>>,
    /// The subscriptions `retain_for` made, per topic (full name): re-created with the
    /// topic if it vanishes.
    retained: Mutex<HashMap<String, HashSet<String>>>,
    /// `true` once `close` began; read-locked while a publish registers itself.
    closed: RwLock<bool>,
    in_flight: TaskTracker,
    /// Whether the service answers (checked only once the state was asked for).
    liveness: Arc<Liveness>,
}

#[derive(Clone)]
struct Topic {
    name: Arc<TopicName>,
    publisher: TopicPublisher,
}

impl GoogleCloudPublisher {
    /// Validates `config`, connects and checks that the service answers (within
    /// `connect_timeout`; the error names the address).
    pub async fn connect(config: GoogleCloudConfig) -> Result<Self> {
        config.validate()?;
        let endpoint = Endpoint::resolve(&config)?;
        let topics = endpoint.topic_admin().await?;
        endpoint
            .probe(&topics, &config.project_id, config.connect_timeout)
            .await?;
        let base = endpoint.base_publisher(config.publish_timeout).await?;
        let subscriptions = endpoint.subscription_admin().await?;
        tracing::debug!(address = %endpoint.address, project = %config.project_id, "pubsub publisher connected");
        let liveness = Liveness::new(topics.clone(), &config, &endpoint);
        Ok(GoogleCloudPublisher {
            inner: Arc::new(Inner {
                liveness,
                admin: Admin {
                    topics,
                    subscriptions: Some(subscriptions),
                    timeout: config.operation_timeout,
                },
                config,
                endpoint,
                base,
                topics: RwLock::new(HashMap::new()),
                routable: Mutex::new(HashMap::new()),
                retained: Mutex::new(HashMap::new()),
                closed: RwLock::new(false),
                in_flight: TaskTracker::new(),
            }),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &GoogleCloudConfig {
        &self.inner.config
    }

    /// The address errors name: the emulator's `host:port` or the endpoint URL.
    pub fn address(&self) -> &str {
        &self.inner.endpoint.address
    }
}

impl Inner {
    /// The batching publisher of `topic`, making sure the topic exists on first use.
    async fn topic(&self, topic: &str) -> Result<Topic> {
        if let Some(t) = self.topics.read().get(topic) {
            return Ok(t.clone());
        }
        let name = topic_name(&self.config.project_id, topic)?;
        self.admin
            .ensure_topic(&name, self.config.create_topics)
            .await?;
        let publisher = self
            .base
            .publisher(name.path.clone())
            .set_message_count_threshold(self.config.batch_max_messages)
            .set_byte_threshold(self.config.batch_max_bytes)
            .set_delay_threshold(self.config.batch_max_delay)
            .build();
        let t = Topic {
            name: Arc::new(name),
            publisher,
        };
        Ok(self
            .topics
            .write()
            .entry(topic.to_owned())
            .or_insert(t)
            .clone())
    }

    /// Publishes `batch` through `topic`'s publisher; the indexes (into `batch`) and errors
    /// of the messages that failed.
    async fn send(&self, topic: &Topic, batch: Vec<Encoded>) -> Vec<(usize, PublishError)> {
        let mut keys = Vec::new();
        let futures: Vec<_> = batch
            .into_iter()
            .map(|e| {
                keys.push(e.ordering_key);
                topic.publisher.publish(e.message)
            })
            .collect();
        let results = futures::future::join_all(futures).await;
        let mut failed = Vec::new();
        for (i, r) in results.into_iter().enumerate() {
            if let Err(e) = r {
                if let Some(key) = keys[i].take() {
                    // A failure pauses the ordering key; resume it so a retry can go through.
                    topic.publisher.resume_publish(key);
                }
                failed.push((i, e));
            }
        }
        failed
    }

    /// Whether `topic` has at least one subscription (a positive answer is trusted for
    /// [`ROUTABLE_TTL`]).
    async fn routable(&self, topic: &TopicName) -> Result<bool> {
        if let Some(seen) = self.routable.lock().get(&topic.path) {
            if seen.elapsed() < ROUTABLE_TTL {
                return Ok(true);
            }
        }
        let call = self
            .admin
            .topics
            .list_topic_subscriptions()
            .with_request(
                ListTopicSubscriptionsRequest::new()
                    .set_topic(&topic.path)
                    .set_page_size(1),
            )
            .send();
        let page = admin_call(
            self.config.operation_timeout,
            &topic.path,
            "list subscriptions",
            call,
        )
        .await
        .map_err(|e| e.into_error(&topic.path, "list the topic's subscriptions"))?;
        let found = !page.subscriptions.is_empty();
        if found {
            self.mark_routable(&topic.path);
        }
        Ok(found)
    }

    fn mark_routable(&self, topic: &str) {
        self.routable
            .lock()
            .insert(topic.to_owned(), Instant::now());
    }

    fn publish_error(&self, topic: &str, err: PublishError) -> Error {
        match err {
            PublishError::Rpc(e) => {
                let transient = client::is_transient(&e);
                let source = format!("{e}");
                if transient {
                    Error::transient(BROKER, topic, "publish", source)
                } else {
                    Error::permanent(BROKER, topic, "publish", source)
                }
            }
            PublishError::Shutdown => Error::PublisherClosed {
                broker: BROKER,
                topic: topic.to_owned(),
            },
            other => Error::transient(BROKER, topic, "publish", other),
        }
    }
}

/// How long `publish_mandatory` trusts having seen a subscription on a topic.
const ROUTABLE_TTL: Duration = Duration::from_secs(60);

fn is_not_found(err: &PublishError) -> bool {
    matches!(err, PublishError::Rpc(e) if client::code(e) == Some(Code::NotFound))
}

#[async_trait]
impl Publisher for GoogleCloudPublisher {
    async fn publish(&self, topic: &str, messages: Vec<Message>) -> Result<()> {
        let inner = &self.inner;
        let _in_flight = {
            let closed = inner.closed.read();
            if *closed {
                return Err(Error::PublisherClosed {
                    broker: BROKER,
                    topic: topic.to_owned(),
                });
            }
            inner.in_flight.token()
        };
        if messages.is_empty() {
            return Ok(());
        }
        let t = inner.topic(topic).await?;
        inner.send_all(&t, messages, false).await
    }

    async fn retain_for(&self, topic: &str, group: &str) -> Result<()> {
        let inner = &self.inner;
        if *inner.closed.read() {
            return Err(Error::PublisherClosed {
                broker: BROKER,
                topic: topic.to_owned(),
            });
        }
        let config = &inner.config;
        let name = topic_name(&config.project_id, topic)?;
        let subscription = group_subscription(
            &config.project_id,
            &config.subscription_prefix,
            &name,
            group,
        )?;
        inner
            .admin
            .ensure_subscription(config, &name, &subscription, false)
            .await?;
        inner.mark_routable(&name.path);
        inner
            .retained
            .lock()
            .entry(name.path.clone())
            .or_default()
            .insert(subscription.clone());
        tracing::debug!(topic = %name.path, %subscription, "topic retains messages for group `{group}`");
        Ok(())
    }

    async fn publish_mandatory(&self, topic: &str, messages: Vec<Message>) -> Result<()> {
        let inner = &self.inner;
        let _in_flight = {
            let closed = inner.closed.read();
            if *closed {
                return Err(Error::PublisherClosed {
                    broker: BROKER,
                    topic: topic.to_owned(),
                });
            }
            inner.in_flight.token()
        };
        let Some(first) = messages.first() else {
            return Ok(());
        };
        let t = inner.topic(topic).await?;
        if !inner.routable(&t.name).await? {
            return Err(Error::Unroutable {
                broker: BROKER,
                topic: t.name.path.clone(),
                uuid: first.uuid().to_owned(),
            });
        }
        inner.send_all(&t, messages, true).await
    }

    /// Whether the service answers, as the last background check found (see
    /// [`health_check_interval`](GoogleCloudConfig::health_check_interval); the first call
    /// starts the checks): disconnected while it does not, closed once `close` was called.
    /// No round trip on the call itself.
    fn connection_state(&self) -> tidemill_core::ConnectionState {
        if *self.inner.closed.read() {
            return tidemill_core::ConnectionState::Closed;
        }
        self.inner.liveness.state()
    }

    async fn close(&self) -> Result<()> {
        let inner = &self.inner;
        *inner.closed.write() = true;
        inner.liveness.stop();
        inner.in_flight.close();
        inner.in_flight.wait().await;
        let topics: Vec<Topic> = inner.topics.write().drain().map(|(_, t)| t).collect();
        for t in &topics {
            t.publisher.flush().await;
        }
        Ok(())
    }
}

impl Inner {
    /// Encodes and publishes `messages` through `t`, re-creating the topic once if it
    /// vanished; `Ok` once Pub/Sub accepted every message.
    async fn send_all(&self, t: &Topic, messages: Vec<Message>, mandatory: bool) -> Result<()> {
        let inner = self;
        let config = &inner.config;
        let how = Encoding {
            ordering: config.message_ordering,
            limit: config.max_message_bytes,
            uuid_attribute: &config.uuid_attribute,
        };
        let encode_all = |msgs: &mut dyn Iterator<Item = Message>| {
            msgs.map(|m| encode(m, &how, &t.name.path))
                .collect::<Result<Vec<_>>>()
        };
        // Messages are cheap to clone (reference counted): kept to send again if the topic
        // has to be re-created.
        let encoded = encode_all(&mut messages.iter().cloned())?;
        let publish = async {
            let mut failed = inner.send(t, encoded).await;
            if !failed.is_empty()
                && config.create_topics
                && failed.iter().all(|(_, e)| is_not_found(e))
            {
                // The topic vanished (deleted, or an emulator restarted): create it again
                // and send what failed once more.
                tracing::warn!(topic = %t.name.path, "topic not found while publishing; creating it again");
                inner.admin.ensure_topic(&t.name, true).await?;
                if mandatory {
                    // Its subscriptions went with it: re-create those `retain_for` made,
                    // and refuse to publish into a topic nobody subscribes to.
                    inner.routable.lock().remove(&t.name.path);
                    let retained: Vec<String> = inner
                        .retained
                        .lock()
                        .get(&t.name.path)
                        .map(|s| s.iter().cloned().collect())
                        .unwrap_or_default();
                    for subscription in &retained {
                        inner
                            .admin
                            .ensure_subscription(config, &t.name, subscription, false)
                            .await?;
                    }
                    if retained.is_empty() {
                        return Err(Error::Unroutable {
                            broker: BROKER,
                            topic: t.name.path.clone(),
                            uuid: messages[failed[0].0].uuid().to_owned(),
                        });
                    }
                    inner.mark_routable(&t.name.path);
                }
                let retry = encode_all(&mut failed.iter().map(|(i, _)| messages[*i].clone()))?;
                failed = inner.send(t, retry).await;
            }
            match failed.into_iter().next() {
                None => Ok(()),
                Some((_, e)) => Err(inner.publish_error(&t.name.path, e)),
            }
        };
        // The client retries transient failures for `publish_timeout`; the outer limit only
        // guards against a batch that never completes.
        let limit = config.publish_timeout + config.operation_timeout;
        match tokio::time::timeout(limit, publish).await {
            Ok(result) => result,
            Err(_) => Err(Error::transient(
                BROKER,
                &t.name.path,
                "publish",
                format!(
                    "no confirmation from {} within {limit:?}",
                    inner.endpoint.address
                ),
            )),
        }
    }
}

impl std::fmt::Debug for GoogleCloudPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GoogleCloudPublisher")
            .field("address", &self.inner.endpoint.address)
            .field("project", &self.inner.config.project_id)
            .field("closed", &*self.inner.closed.read())
            .finish()
    }
}
