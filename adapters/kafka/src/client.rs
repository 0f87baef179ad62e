//! What every librdkafka client of the adapter shares: logging through `tracing`, error
//! mapping, and topic administration (existence checks, creation, partition lists).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use tidemill_core::{BoxError, Error, Result};

use crate::{KafkaConfig, BROKER};

/// Sends librdkafka's log lines and global errors to `tracing` (target `librdkafka`).
#[derive(Clone, Debug, Default)]
pub(crate) struct LogContext;

impl ClientContext for LogContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_line(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        log_error(&error, reason);
    }
}

impl rdkafka::consumer::ConsumerContext for LogContext {}

pub(crate) fn log_line(level: RDKafkaLogLevel, fac: &str, msg: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => tracing::error!(target: "librdkafka", facility = fac, "{msg}"),
        RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", facility = fac, "{msg}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", facility = fac, "{msg}")
        }
        RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", facility = fac, "{msg}"),
    }
}

pub(crate) fn log_error(error: &KafkaError, reason: &str) {
    // Connection losses are routine (broker restarts, idle connections closed by the
    // broker); librdkafka reconnects by itself.
    match error.rdkafka_error_code() {
        Some(RDKafkaErrorCode::BrokerTransportFailure | RDKafkaErrorCode::AllBrokersDown) => {
            tracing::info!(target: "librdkafka", error = %error, "{reason}")
        }
        _ => tracing::warn!(target: "librdkafka", error = %error, "{reason}"),
    }
}

/// Whether retrying after `error` may succeed.
pub(crate) fn is_transient(error: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    match error {
        KafkaError::ClientConfig(..)
        | KafkaError::ClientCreation(_)
        | KafkaError::Nul(_)
        | KafkaError::Subscription(_) => false,
        _ => !matches!(
            error.rdkafka_error_code(),
            Some(
                C::TopicAuthorizationFailed
                    | C::GroupAuthorizationFailed
                    | C::ClusterAuthorizationFailed
                    | C::SaslAuthenticationFailed
                    | C::InvalidTopic
                    | C::InvalidConfig
                    | C::InvalidRequest
                    | C::UnsupportedVersion
                    | C::InvalidReplicationFactor
                    | C::InvalidPartitions
                    | C::PolicyViolation
                    | C::MessageSizeTooLarge
                    | C::InvalidMessageSize
                    | C::Fatal
                    | C::InvalidArgument
            )
        ),
    }
}

/// A tidemill error for a failed librdkafka operation.
pub(crate) fn broker_error(topic: &str, context: impl Into<String>, error: KafkaError) -> Error {
    if is_transient(&error) {
        Error::transient(BROKER, topic, context, error)
    } else {
        Error::permanent(BROKER, topic, context, error)
    }
}

/// A client creation failure: a bad librdkafka setting is a configuration error.
pub(crate) fn creation_error(what: &str, error: KafkaError) -> Error {
    Error::config(BROKER, format!("cannot create the {what}: {error}"))
}

/// Whether `topic` is a legal Kafka topic name: 1 to 249 of `[a-zA-Z0-9._-]`, not `.`
/// or `..`.
pub(crate) fn check_topic_name(topic: &str) -> Result<()> {
    let legal = !topic.is_empty()
        && topic.len() <= 249
        && topic != "."
        && topic != ".."
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if legal {
        Ok(())
    } else {
        Err(Error::permanent(
            BROKER,
            topic,
            "check topic name",
            "a Kafka topic name is 1 to 249 characters of [a-zA-Z0-9._-] (and not `.` or `..`)",
        ))
    }
}

/// Creates topics and tells which exist; shared by the clones of a publisher or subscriber.
pub(crate) struct Topics {
    config: KafkaConfig,
    admin: AdminClient<LogContext>,
    /// Answers metadata requests (a consumer without a group joins nothing).
    metadata: Arc<BaseConsumer<LogContext>>,
    known: Mutex<HashSet<String>>,
}

impl Topics {
    /// Connects an admin client and checks that the brokers answer within
    /// `connect_timeout`.
    pub(crate) async fn connect(config: &KafkaConfig) -> Result<Self> {
        let admin: AdminClient<LogContext> = config
            .base_client("admin")
            .create_with_context(LogContext)
            .map_err(|e| creation_error("admin client", e))?;
        let metadata: BaseConsumer<LogContext> = config
            .base_client("metadata")
            .create_with_context(LogContext)
            .map_err(|e| creation_error("metadata client", e))?;
        let topics = Topics {
            config: config.clone(),
            admin,
            metadata: Arc::new(metadata),
            known: Mutex::new(HashSet::new()),
        };
        let client = topics.metadata.clone();
        let timeout = config.connect_timeout;
        let probe = blocking(move || client.fetch_metadata(None, timeout)).await;
        match probe {
            Ok(Ok(_)) => Ok(topics),
            Ok(Err(e)) => Err(Error::Connect {
                broker: BROKER,
                address: config.brokers.clone(),
                source: format!("no answer within {timeout:?}: {e}").into(),
            }),
            Err(e) => Err(Error::Connect {
                broker: BROKER,
                address: config.brokers.clone(),
                source: e,
            }),
        }
    }

    /// Makes sure `topic` exists: creates it when missing (unless `create_topics` is off,
    /// then fails naming it) and waits until its partitions are known. Cached per topic.
    pub(crate) async fn ensure(&self, topic: &str) -> Result<()> {
        if self.known.lock().contains(topic) {
            return Ok(());
        }
        check_topic_name(topic)?;
        if self.partitions(topic).await?.is_none() {
            if !self.config.create_topics {
                return Err(Error::permanent(
                    BROKER,
                    topic,
                    "find topic",
                    format!(
                        "the topic does not exist on {} and `create_topics` is off",
                        self.config.brokers
                    ),
                ));
            }
            self.create(topic).await?;
            // Wait until the brokers report it (creation propagates asynchronously).
            let deadline = tokio::time::Instant::now() + self.config.request_timeout;
            while self.partitions(topic).await?.is_none() {
                if tokio::time::Instant::now() >= deadline {
                    return Err(Error::transient(
                        BROKER,
                        topic,
                        "create topic",
                        format!(
                            "the topic was created but its metadata did not appear within {:?}",
                            self.config.request_timeout
                        ),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        self.known.lock().insert(topic.to_owned());
        Ok(())
    }

    async fn create(&self, topic: &str) -> Result<()> {
        let mut new = NewTopic::new(
            topic,
            self.config.partitions,
            TopicReplication::Fixed(self.config.replication_factor),
        );
        for (k, v) in &self.config.topic_config {
            new = new.set(k, v);
        }
        let opts = AdminOptions::new().request_timeout(Some(self.config.request_timeout));
        let results = self
            .admin
            .create_topics([&new], &opts)
            .await
            .map_err(|e| broker_error(topic, "create topic", e))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => {
                    return Err(broker_error(
                        topic,
                        format!(
                            "create topic ({} partitions, replication factor {})",
                            self.config.partitions, self.config.replication_factor
                        ),
                        KafkaError::AdminOp(code),
                    ))
                }
            }
        }
        tracing::info!(
            topic,
            partitions = self.config.partitions,
            "created Kafka topic"
        );
        Ok(())
    }

    /// The partition ids of `topic`, `None` if it does not exist.
    pub(crate) async fn partitions(&self, topic: &str) -> Result<Option<Vec<i32>>> {
        partitions(&self.metadata, topic, self.config.request_timeout).await
    }
}

/// The partition ids of `topic` according to `client`'s metadata, `None` if the topic
/// does not exist.
pub(crate) async fn partitions<C: rdkafka::consumer::ConsumerContext + 'static>(
    client: &Arc<BaseConsumer<C>>,
    topic: &str,
    timeout: Duration,
) -> Result<Option<Vec<i32>>> {
    let c = client.clone();
    let t = topic.to_owned();
    let md = blocking(move || c.fetch_metadata(Some(&t), timeout))
        .await
        .map_err(|e| Error::transient(BROKER, topic, "fetch metadata", e))?
        .map_err(|e| broker_error(topic, "fetch metadata", e))?;
    partitions_of(&md, topic)
}

/// The partition ids of `topic` in `md`, `None` if the topic does not exist.
pub(crate) fn partitions_of(
    md: &rdkafka::metadata::Metadata,
    topic: &str,
) -> Result<Option<Vec<i32>>> {
    let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
        return Ok(None);
    };
    match t.error() {
        None => {}
        Some(e) => {
            let code = RDKafkaErrorCode::from(e);
            if matches!(
                code,
                RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic
            ) {
                return Ok(None);
            }
            return Err(broker_error(
                topic,
                "fetch metadata",
                KafkaError::MetadataFetch(code),
            ));
        }
    }
    let mut ids: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
    if ids.is_empty() {
        return Ok(None);
    }
    ids.sort_unstable();
    Ok(Some(ids))
}

/// Runs a blocking librdkafka call off the async runtime.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> std::result::Result<T, BoxError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| -> BoxError { format!("blocking librdkafka call failed: {e}").into() })
}
