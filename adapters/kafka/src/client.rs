//! What every librdkafka client of the adapter shares: logging through `tracing`, error
//! mapping, and topic administration (existence checks, creation, partition lists).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU8, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use serde::Deserialize;
use tidemill_core::{BoxError, ConnectionState, Error, Result};

use crate::config::{is_secret_name, Secrets};
use crate::subscription::resolve_positions;
use crate::{KafkaConfig, BROKER};

/// Sends librdkafka's log lines and global errors to `tracing` (target `librdkafka`),
/// with the configuration's secret values hidden, and follows the client's connection
/// ([`Link`]) from its errors and statistics.
#[derive(Clone, Debug, Default)]
pub(crate) struct LogContext {
    pub(crate) secrets: Arc<Secrets>,
    pub(crate) link: Arc<Link>,
}

impl LogContext {
    pub(crate) fn new(config: &KafkaConfig) -> Self {
        LogContext {
            secrets: config.secrets(),
            link: Arc::new(Link::default()),
        }
    }
}

impl ClientContext for LogContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_line(&self.secrets, level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.link.error(&error);
        log_error(&self.secrets, &error, reason);
    }

    fn stats_raw(&self, statistics: &[u8]) {
        if let Some(stats) = Statistics::parse(statistics) {
            self.link.statistics(&stats);
        }
    }
}

impl rdkafka::consumer::ConsumerContext for LogContext {}

/// A librdkafka client's connection to the cluster, as librdkafka tells it without a
/// round trip: down on its `AllBrokersDown` error, and from each statistics report
/// (`statistics.interval.ms`) up when a broker connection is up, down when none is.
#[derive(Debug, Default)]
pub(crate) struct Link(AtomicU8);

const LINK_UP: u8 = 0;
const LINK_DOWN: u8 = 1;
/// The client is gone (its subscription ended): it no longer counts.
const LINK_RETIRED: u8 = 2;

impl Link {
    /// Takes note of a global error.
    pub(crate) fn error(&self, error: &KafkaError) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.set(LINK_DOWN);
        }
    }

    /// Takes note of a statistics report.
    pub(crate) fn statistics(&self, stats: &Statistics) {
        self.set(if stats.any_broker_up() {
            LINK_UP
        } else {
            LINK_DOWN
        });
    }

    fn set(&self, state: u8) {
        // A retired link stays retired.
        let _ = self
            .0
            .fetch_update(AtomicOrdering::AcqRel, AtomicOrdering::Acquire, |s| {
                (s != LINK_RETIRED).then_some(state)
            });
    }

    /// The client was released: it no longer counts for the connection state.
    pub(crate) fn retire(&self) {
        self.0.store(LINK_RETIRED, AtomicOrdering::Release);
    }

    /// Whether it counts and is down.
    pub(crate) fn is_down(&self) -> bool {
        self.0.load(AtomicOrdering::Acquire) == LINK_DOWN
    }

    /// The state to report for a client that is not closed.
    pub(crate) fn state(&self) -> ConnectionState {
        if self.is_down() {
            ConnectionState::Disconnected
        } else {
            ConnectionState::Connected
        }
    }
}

/// What the adapter reads of librdkafka's statistics (its JSON report every
/// `statistics.interval.ms`); everything else in the report is skipped.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Statistics {
    #[serde(default)]
    brokers: HashMap<String, BrokerStatistics>,
    #[serde(default)]
    topics: HashMap<String, TopicStatistics>,
}

#[derive(Debug, Deserialize)]
struct BrokerStatistics {
    /// `configured`, `learned`, `internal` or `logical` (a group coordinator's alias).
    #[serde(default)]
    source: String,
    /// `INIT`, `DOWN`, `CONNECT`, ..., `UP`.
    #[serde(default)]
    state: String,
}

#[derive(Debug, Deserialize)]
struct TopicStatistics {
    #[serde(default)]
    partitions: HashMap<String, PartitionStatistics>,
}

#[derive(Debug, Deserialize)]
struct PartitionStatistics {
    partition: i32,
    /// The partition's high watermark from the last fetch response (-1001: unknown).
    #[serde(default = "unknown_offset")]
    hi_offset: i64,
}

fn unknown_offset() -> i64 {
    -1001
}

impl Statistics {
    /// The report, or `None` (logged at debug level) if it cannot be read.
    pub(crate) fn parse(json: &[u8]) -> Option<Statistics> {
        match serde_json::from_slice(json) {
            Ok(stats) => Some(stats),
            Err(e) => {
                tracing::debug!(error = %e, "cannot read librdkafka's statistics");
                None
            }
        }
    }

    /// Whether a connection to a real broker (not librdkafka's internal or logical ones)
    /// is up.
    pub(crate) fn any_broker_up(&self) -> bool {
        self.brokers.values().any(|b| {
            matches!(b.source.as_str(), "configured" | "learned")
                && matches!(b.state.as_str(), "UP" | "REAUTH")
        })
    }

    /// The last known high watermark of each partition of `topic` librdkafka fetches
    /// from.
    pub(crate) fn high_watermarks(&self, topic: &str) -> HashMap<i32, i64> {
        self.topics
            .get(topic)
            .map(|t| {
                t.partitions
                    .values()
                    .filter(|p| p.partition >= 0 && p.hi_offset >= 0)
                    .map(|p| (p.partition, p.hi_offset))
                    .collect()
            })
            .unwrap_or_default()
    }
}

pub(crate) fn log_line(secrets: &Secrets, level: RDKafkaLogLevel, fac: &str, msg: &str) {
    let msg = secrets.redact(msg);
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

pub(crate) fn log_error(secrets: &Secrets, error: &KafkaError, reason: &str) {
    let text = error.to_string();
    let (shown, reason) = (secrets.redact(&text), secrets.redact(reason));
    // Connection losses are routine (broker restarts, idle connections closed by the
    // broker); librdkafka reconnects by itself.
    match error.rdkafka_error_code() {
        Some(RDKafkaErrorCode::BrokerTransportFailure | RDKafkaErrorCode::AllBrokersDown) => {
            tracing::info!(target: "librdkafka", error = %shown, "{reason}")
        }
        _ => tracing::warn!(target: "librdkafka", error = %shown, "{reason}"),
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

/// [`broker_error`] with any secret value in librdkafka's text hidden.
pub(crate) fn broker_error_hiding(
    secrets: &Secrets,
    topic: &str,
    context: impl Into<String>,
    error: KafkaError,
) -> Error {
    let text = error.to_string();
    match secrets.redact(&text) {
        std::borrow::Cow::Borrowed(_) => broker_error(topic, context, error),
        std::borrow::Cow::Owned(hidden) if is_transient(&error) => {
            Error::transient(BROKER, topic, context, hidden)
        }
        std::borrow::Cow::Owned(hidden) => Error::permanent(BROKER, topic, context, hidden),
    }
}

/// A client creation failure: a bad librdkafka setting is a configuration error. The
/// text librdkafka gives may quote the setting's value: secret values are hidden.
pub(crate) fn creation_error(secrets: &Secrets, what: &str, error: KafkaError) -> Error {
    let text = match &error {
        KafkaError::ClientConfig(_, desc, key, _) if is_secret_name(key) => {
            format!(
                "invalid value for `{key}` (hidden): {}",
                secrets.redact(desc)
            )
        }
        other => secrets.redact(&other.to_string()).into_owned(),
    };
    Error::config(BROKER, format!("cannot create the {what}: {text}"))
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
    context: LogContext,
    admin: AdminClient<LogContext>,
    /// Answers metadata requests (a consumer without a group joins nothing).
    metadata: Arc<BaseConsumer<LogContext>>,
    known: Mutex<HashSet<String>>,
}

impl Topics {
    /// Connects an admin client and checks that the brokers answer within
    /// `connect_timeout`.
    pub(crate) async fn connect(config: &KafkaConfig) -> Result<Self> {
        let context = LogContext::new(config);
        let secrets = context.secrets.clone();
        let admin: AdminClient<LogContext> = config
            .base_client("admin")
            .create_with_context(context.clone())
            .map_err(|e| creation_error(&secrets, "admin client", e))?;
        let metadata: BaseConsumer<LogContext> = config
            .base_client("metadata")
            .create_with_context(context.clone())
            .map_err(|e| creation_error(&secrets, "metadata client", e))?;
        let topics = Topics {
            config: config.clone(),
            context,
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
                address: config.brokers_display(),
                source: secrets
                    .redact(&format!("no answer within {timeout:?}: {e}"))
                    .into_owned()
                    .into(),
            }),
            Err(e) => Err(Error::Connect {
                broker: BROKER,
                address: config.brokers_display(),
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
                        self.config.brokers_display()
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

    /// The secret values of the configuration, for error texts.
    pub(crate) fn secrets(&self) -> &Secrets {
        &self.context.secrets
    }

    /// Commits start positions for Tidemill group `group` on every partition of `topic`
    /// (which exists) it has no committed offset for, so that the group receives
    /// everything published from now on (or, with `start_from = earliest`, everything in
    /// the topic) even before its first member subscribes. `what` names the operation in
    /// errors.
    pub(crate) async fn pin_group(&self, topic: &str, group: &str, what: &str) -> Result<()> {
        let config = &self.config;
        let partitions = self
            .partitions(topic)
            .await?
            .ok_or_else(|| Error::permanent(BROKER, topic, what, "the topic does not exist"))?;
        // A consumer with the group's id that never joins: it reads and commits offsets.
        let consumer: BaseConsumer<LogContext> = config
            .consumer_client(&config.group_id(group))
            .create_with_context(self.context.clone())
            .map_err(|e| creation_error(self.secrets(), "consumer", e))?;
        let (t, start_from, timeout) =
            (topic.to_owned(), config.start_from, config.request_timeout);
        let context = format!("{what} (group `{group}`)");
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
