//! Picking a broker by configuration: a URL, a section of a TOML/YAML file, or environment
//! variables, all giving one [`BrokerConfig`] and, once connected, a [`Broker`]: an
//! `Arc<dyn Publisher>` and an `Arc<dyn Subscriber>`.
//!
//! | URL | broker | feature |
//! |---|---|---|
//! | `memory://?capacity=1024&retention=100` | embedded in-memory broker | always |
//! | `kafka://host:9092,host2:9092?start_from=earliest` | Kafka | `kafka` |
//! | `amqp://user:pass@host:5672/vhost?prefetch=50` (`amqps://` too) | RabbitMQ | `amqp` |
//! | `nats://host:4222?jetstream=false` | NATS (JetStream unless `jetstream=false`) | `nats` |
//! | `pubsub://my-project?emulator=127.0.0.1:8085` | Google Cloud Pub/Sub | `googlecloud` |
//! | `redis://user:pass@host:6379/0?claim_idle=45s` (`rediss://` for TLS) | Redis Streams | `redis` |
//! | `postgres://user:pass@host:5432/db?sslmode=require&lease=30s` (`postgresql://` too) | PostgreSQL | `postgres` |
//! | `sqs://eu-west-1?fifo=true&visibility_timeout=1m` (`sqs+fifo://` for `fifo=true`) | AWS SQS and SNS | `aws` |
//!
//! Query parameters set any field of the adapter's config type (`KafkaConfig`,
//! `AmqpConfig`, `NatsConfig`, `GoogleCloudConfig`, `RedisConfig`, `SqlConfig`,
//! `AwsConfig`, [`MemoryConfig`]), named as in its docs; one level of nesting goes with a dot
//! (`jetstream.ack_wait=30s`, `properties.linger.ms=5`). Durations are humantime strings
//! (`250ms`, `30s`). Unknown schemes, brokers this build lacks, unknown options and bad
//! values are errors naming the offending part.
//!
//! PostgreSQL URLs also carry the connection parameters the database client (sqlx) reads:
//! `sslmode`, `sslrootcert`, `sslcert`, `sslkey`, `application_name`, `options`,
//! `options[<setting>]`, `host`, `hostaddr`, `port`, `user`, `password`, `dbname`,
//! `statement-cache-capacity` (and sqlx's spellings `ssl-mode`, `ssl-root-cert`, `ssl-ca`,
//! `ssl-cert`, `ssl-key`). They stay in the URL the adapter connects with, as written;
//! every other parameter is a `SqlConfig` option (`table_prefix`, `prefetch`, `lease`, `poll_interval`, `start_from`,
//! `order_per_key`, `create_schema`, `max_connections`, `connect_timeout`, …). In a file
//! section or a `TIDEMILL_BROKER__*` variable, a connection parameter (`sslmode = "require"`)
//! is added to the URL's query the same way. Note that `connect_timeout` is Tidemill's, a
//! duration (`10s`), not libpq's number of seconds.
//!
//! An `sqs://` URL's host is the AWS region (`sqs://eu-west-1`); without one (`sqs://`,
//! `sqs:///?…`) the region comes from the environment (`AWS_REGION`, the profile's).
//! Credentials never go in the URL: the AWS SDK reads them from its standard chain
//! (environment, shared files, SSO, container and instance roles). `endpoint` points both
//! services elsewhere, such as a local emulator:
//! `sqs://us-east-1?endpoint=http://127.0.0.1:4566`.
//!
//! Values are taken as written, never silently fixed, whether they come from a URL, a file or
//! the environment:
//!
//! - an integer option takes an integer within its range: a negative or too large number is
//!   an error saying the range (`option \`capacity\`: expected an integer from 1 to …, got
//!   \`-5\``), and so are zero where it means nothing (the in-memory `capacity`), fractional
//!   numbers (`1.5`, `1e3`) and words (`yes`, `true`): nothing is rounded or converted;
//! - a boolean option takes `true` or `false` (from text also `yes`/`no`, `on`/`off`, `1`/`0`),
//!   never a number;
//! - a file section with both `url` and a `type` naming another broker is an error.
//!
//! Errors and the `Debug` of a [`BrokerConfig`] never show credentials: a URL's userinfo
//! (`user:password@`, or a token in the user position) is shown as `***`, and so are the
//! values of options whose names say they hold a secret (`password`, `token`,
//! `sasl.password`, …). [`redact_url`] does the same for your own logs.
//!
//! ```
//! use tidemill::{BrokerConfig, BrokerKind};
//!
//! let config = BrokerConfig::from_url("memory://?capacity=64")?;
//! assert_eq!(config.kind(), BrokerKind::Memory);
//!
//! let err = BrokerConfig::from_url("memory://?capacty=64").unwrap_err();
//! assert!(err.to_string().contains("capacty"), "{err}");
//!
//! let err = BrokerConfig::from_url("memory://?capacity=0").unwrap_err();
//! assert!(err.to_string().contains("expected an integer from 1 to"), "{err}");
//!
//! let err = BrokerConfig::from_url("memory://app:hunter2@localhost").unwrap_err();
//! assert!(!err.to_string().contains("hunter2"), "{err}");
//! # Ok::<(), tidemill::ConfigError>(())
//! ```

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use config::{Map, Source, Value, ValueKind};
use tidemill_core::{MemoryBroker, MemoryConfig, Publisher, Subscriber};

use crate::redact::{redact_debug, redact_text};
use crate::strict::{self, text};

pub use crate::redact::redact_url;
pub use crate::strict::OptionError;

/// Environment variable holding the broker URL for [`BrokerConfig::from_env`].
pub const BROKER_ENV: &str = "TIDEMILL_BROKER";

/// The brokers Tidemill knows, whether or not this build includes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BrokerKind {
    /// The embedded in-memory broker.
    Memory,
    /// Kafka (feature `kafka`).
    Kafka,
    /// RabbitMQ / AMQP 0-9-1 (feature `amqp`).
    Amqp,
    /// NATS, JetStream or core (feature `nats`).
    Nats,
    /// Google Cloud Pub/Sub (feature `googlecloud`).
    GoogleCloud,
    /// Redis Streams (feature `redis`).
    Redis,
    /// PostgreSQL (feature `postgres`).
    Postgres,
    /// AWS SQS and SNS (feature `aws`).
    Aws,
}

impl BrokerKind {
    /// The kind a URL scheme or `type` names.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name.to_ascii_lowercase().as_str() {
            "memory" | "mem" => BrokerKind::Memory,
            "kafka" => BrokerKind::Kafka,
            "amqp" | "amqps" | "rabbitmq" => BrokerKind::Amqp,
            "nats" => BrokerKind::Nats,
            "pubsub" | "googlecloud" | "gcp" => BrokerKind::GoogleCloud,
            "redis" | "rediss" => BrokerKind::Redis,
            "postgres" | "postgresql" => BrokerKind::Postgres,
            "sqs" | "aws" => BrokerKind::Aws,
            _ => return None,
        })
    }

    /// The Cargo feature that brings this broker in.
    pub fn feature(self) -> &'static str {
        match self {
            BrokerKind::Memory => "(none)",
            BrokerKind::Kafka => "kafka",
            BrokerKind::Amqp => "amqp",
            BrokerKind::Nats => "nats",
            BrokerKind::GoogleCloud => "googlecloud",
            BrokerKind::Redis => "redis",
            BrokerKind::Postgres => "postgres",
            BrokerKind::Aws => "aws",
        }
    }

    /// Whether this build includes the broker.
    pub fn is_available(self) -> bool {
        match self {
            BrokerKind::Memory => true,
            BrokerKind::Kafka => cfg!(feature = "kafka"),
            BrokerKind::Amqp => cfg!(feature = "amqp"),
            BrokerKind::Nats => cfg!(feature = "nats"),
            BrokerKind::GoogleCloud => cfg!(feature = "googlecloud"),
            BrokerKind::Redis => cfg!(feature = "redis"),
            BrokerKind::Postgres => cfg!(feature = "postgres"),
            BrokerKind::Aws => cfg!(feature = "aws"),
        }
    }
}

impl fmt::Display for BrokerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BrokerKind::Memory => "memory",
            BrokerKind::Kafka => "kafka",
            BrokerKind::Amqp => "amqp",
            BrokerKind::Nats => "nats",
            BrokerKind::GoogleCloud => "googlecloud",
            BrokerKind::Redis => "redis",
            BrokerKind::Postgres => "postgres",
            BrokerKind::Aws => "aws",
        })
    }
}

/// A configuration problem, naming the offending part. Its message never contains
/// credentials: URLs are shown through [`redact_url`], secret-looking options without their
/// values.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The URL has no `scheme://` (the URL as shown, credentials hidden).
    #[error(
        "broker URL `{0}` has no scheme: expected memory://, kafka://, amqp://, nats://, pubsub://, redis://, postgres:// or sqs://"
    )]
    NoScheme(String),
    /// The scheme names no broker Tidemill knows.
    #[error(
        "unknown broker scheme `{0}`: expected memory, kafka, amqp, amqps, nats, pubsub, redis, rediss, postgres, postgresql, sqs or sqs+fifo"
    )]
    UnknownScheme(String),
    /// The broker exists but this build leaves it out.
    #[error("built without {kind}: enable feature `{feature}` of the tidemill crate")]
    MissingFeature {
        /// The broker.
        kind: BrokerKind,
        /// The feature to enable.
        feature: &'static str,
    },
    /// A query parameter is malformed (`key=value` expected).
    #[error("broker URL parameter `{0}` is malformed: expected key=value")]
    BadParameter(String),
    /// A required part is missing, or a part is there that must not be.
    #[error("{kind}: {message}")]
    Missing {
        /// The broker.
        kind: BrokerKind,
        /// What is missing.
        message: String,
    },
    /// An option that does not fit the broker's config type: unknown, of the wrong kind, or
    /// out of its range.
    #[error("invalid {kind} configuration: {source}")]
    Invalid {
        /// The broker.
        kind: BrokerKind,
        /// The option and what it allows.
        #[source]
        source: OptionError,
    },
    /// The broker's config type accepted every option but refused their combination.
    #[error("invalid {kind} configuration: {message}")]
    Rejected {
        /// The broker.
        kind: BrokerKind,
        /// Why.
        message: String,
    },
    /// A file that could not be read or parsed.
    #[error("cannot read broker configuration from {path}: {message}")]
    File {
        /// The file.
        path: String,
        /// Why (the parser's explanation, without excerpts of the file).
        message: String,
    },
    /// The file has no such section, it names no broker, or its `url` and `type`
    /// disagree.
    #[error("{path}: section `{section}` {problem}")]
    Section {
        /// The file.
        path: String,
        /// The section.
        section: String,
        /// What is wrong with it.
        problem: String,
    },
}

/// The configuration of one broker, ready to [`connect`](BrokerConfig::connect).
///
/// Its `Debug` shows every option except credentials (URL userinfo, passwords, tokens).
#[derive(Clone)]
#[non_exhaustive]
// Built once per connection, never in bulk: variant sizes (which vary with the enabled
// features) do not matter.
#[allow(clippy::large_enum_variant)]
pub enum BrokerConfig {
    /// The embedded in-memory broker.
    Memory(MemoryConfig),
    /// Kafka.
    #[cfg(feature = "kafka")]
    Kafka(tidemill_kafka::KafkaConfig),
    /// RabbitMQ.
    #[cfg(feature = "amqp")]
    Amqp(tidemill_amqp::AmqpConfig),
    /// NATS.
    #[cfg(feature = "nats")]
    Nats(tidemill_nats::NatsConfig),
    /// Google Cloud Pub/Sub.
    #[cfg(feature = "googlecloud")]
    GoogleCloud(tidemill_googlecloud::GoogleCloudConfig),
    /// Redis Streams.
    #[cfg(feature = "redis")]
    Redis(tidemill_redis::RedisConfig),
    /// PostgreSQL.
    #[cfg(feature = "postgres")]
    Postgres(tidemill_sql::SqlConfig),
    /// AWS SQS and SNS.
    #[cfg(feature = "aws")]
    Aws(tidemill_aws::AwsConfig),
}

impl fmt::Debug for BrokerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn render(config: &dyn fmt::Debug, pretty: bool) -> String {
            let raw = if pretty {
                format!("{config:#?}")
            } else {
                format!("{config:?}")
            };
            redact_debug(&raw)
        }
        let pretty = f.alternate();
        let (variant, inner) = match self {
            BrokerConfig::Memory(c) => ("Memory", render(c, pretty)),
            #[cfg(feature = "kafka")]
            BrokerConfig::Kafka(c) => ("Kafka", render(c, pretty)),
            #[cfg(feature = "amqp")]
            BrokerConfig::Amqp(c) => ("Amqp", render(c, pretty)),
            #[cfg(feature = "nats")]
            BrokerConfig::Nats(c) => ("Nats", render(c, pretty)),
            #[cfg(feature = "googlecloud")]
            BrokerConfig::GoogleCloud(c) => ("GoogleCloud", render(c, pretty)),
            #[cfg(feature = "redis")]
            BrokerConfig::Redis(c) => ("Redis", render(c, pretty)),
            #[cfg(feature = "postgres")]
            BrokerConfig::Postgres(c) => ("Postgres", render(c, pretty)),
            #[cfg(feature = "aws")]
            BrokerConfig::Aws(c) => ("Aws", render(c, pretty)),
        };
        f.debug_tuple(variant).field(&Verbatim(&inner)).finish()
    }
}

/// Already-rendered `Debug` text.
struct Verbatim<'a>(&'a str);

impl fmt::Debug for Verbatim<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// A connected broker: one publisher and one subscriber, picked at run time.
#[derive(Clone)]
pub struct Broker {
    /// Which broker this is.
    pub kind: BrokerKind,
    /// Its publisher.
    pub publisher: Arc<dyn Publisher>,
    /// Its subscriber.
    pub subscriber: Arc<dyn Subscriber>,
}

impl fmt::Debug for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Broker").field("kind", &self.kind).finish()
    }
}

/// Options gathered from URL, file and environment, before they meet a config type.
type Options = Map<String, Value>;

impl BrokerConfig {
    /// Parses a broker URL (see the [module docs](self)).
    pub fn from_url(url: &str) -> Result<Self, ConfigError> {
        let (kind, options) = url_options(url)?;
        Self::build(kind, options)
    }

    /// Reads [`BROKER_ENV`] (`TIDEMILL_BROKER`, default `memory://`) and applies
    /// `TIDEMILL_BROKER__<OPTION>` variables on top (`__` nests:
    /// `TIDEMILL_BROKER__JETSTREAM__ACK_WAIT=30s`).
    pub fn from_env() -> Result<Self, ConfigError> {
        let url = std::env::var(BROKER_ENV).unwrap_or_else(|_| "memory://".to_owned());
        let (kind, mut options) = url_options(&url)?;
        let env = config::Environment::with_prefix(BROKER_ENV)
            .prefix_separator("__")
            .separator("__");
        let overrides = env.collect().map_err(|e| ConfigError::Rejected {
            kind,
            message: format!(
                "cannot read {BROKER_ENV}__* variables: {}",
                discreet_message(&e.to_string())
            ),
        })?;
        merge(&mut options, strict::mark_text(overrides));
        Self::build(kind, options)
    }

    /// Reads section `section` of a TOML or YAML file (by extension). The section holds
    /// either `url = "kafka://…"` or `type = "kafka"` (both only if they name the same
    /// broker), plus any options:
    ///
    /// ```toml
    /// [broker]
    /// url = "nats://127.0.0.1:4222"
    /// connection_name = "orders"
    /// jetstream = { ack_wait = "30s" }
    /// ```
    pub fn from_file(path: impl AsRef<Path>, section: &str) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        let file_err = |e: config::ConfigError| ConfigError::File {
            path: shown.clone(),
            message: discreet_message(&e.to_string()),
        };
        let file = match config::Config::builder()
            .add_source(config::File::from(path))
            .build()
        {
            Ok(file) => file,
            Err(e) => {
                // TOML integers are 64-bit: the parser refuses a larger one without naming
                // it. Read it as text instead, so the option's own range is reported.
                let toml = path.extension().is_some_and(|x| x == "toml");
                let text = std::fs::read_to_string(path).ok();
                match text.and_then(|t| quote_huge_integers(&t)) {
                    Some(quoted) if toml => config::Config::builder()
                        .add_source(config::File::from_str(&quoted, config::FileFormat::Toml))
                        .build()
                        .map_err(|_| file_err(e))?,
                    _ => return Err(file_err(e)),
                }
            }
        };
        let section_err = |problem: String| ConfigError::Section {
            path: shown.clone(),
            section: section.to_owned(),
            problem,
        };
        let mut table: Options = file
            .get_table(section)
            .map_err(|_| section_err("is missing or not a table".to_owned()))?;
        let mut string = |key: &str| match table.remove(key) {
            None => Ok(None),
            Some(Value {
                kind: ValueKind::String(s),
                ..
            }) => Ok(Some(s)),
            Some(_) => Err(section_err(format!("has a `{key}` that is not a string"))),
        };
        let url = string("url")?;
        let kind_name = string("type")?;
        let named = match kind_name {
            None => None,
            Some(name) => Some(
                BrokerKind::from_name(&name)
                    .ok_or_else(|| ConfigError::UnknownScheme(redact_url(&name).into_owned()))?,
            ),
        };
        let (kind, mut options) = match (url, named) {
            (Some(url), named) => {
                let by_scheme = url
                    .split_once("://")
                    .and_then(|(scheme, _)| scheme_kind(scheme))
                    .map(|(kind, _)| kind);
                if let (Some(kind), Some(named)) = (by_scheme, named) {
                    if kind != named {
                        return Err(section_err(format!(
                            "has `url = \"{}\"` ({kind}) and `type = \"{named}\"`, which \
                             disagree: keep one of them",
                            redact_url(&url)
                        )));
                    }
                }
                url_options(&url)?
            }
            (None, Some(kind)) => {
                if !kind.is_available() {
                    return Err(ConfigError::MissingFeature {
                        kind,
                        feature: kind.feature(),
                    });
                }
                (kind, Options::new())
            }
            (None, None) => {
                return Err(section_err(
                    "needs `url = \"…\"` or `type = \"…\"`".to_owned(),
                ))
            }
        };
        merge(&mut options, table);
        Self::build(kind, options)
    }

    /// Which broker this configures.
    pub fn kind(&self) -> BrokerKind {
        match self {
            BrokerConfig::Memory(_) => BrokerKind::Memory,
            #[cfg(feature = "kafka")]
            BrokerConfig::Kafka(_) => BrokerKind::Kafka,
            #[cfg(feature = "amqp")]
            BrokerConfig::Amqp(_) => BrokerKind::Amqp,
            #[cfg(feature = "nats")]
            BrokerConfig::Nats(_) => BrokerKind::Nats,
            #[cfg(feature = "googlecloud")]
            BrokerConfig::GoogleCloud(_) => BrokerKind::GoogleCloud,
            #[cfg(feature = "redis")]
            BrokerConfig::Redis(_) => BrokerKind::Redis,
            #[cfg(feature = "postgres")]
            BrokerConfig::Postgres(_) => BrokerKind::Postgres,
            #[cfg(feature = "aws")]
            BrokerConfig::Aws(_) => BrokerKind::Aws,
        }
    }

    /// Connects: one publisher and one subscriber. Each call makes new connections (for the
    /// in-memory broker, a new broker).
    ///
    /// A connection error never shows the credentials of this configuration, whatever the
    /// broker's client puts in its messages.
    pub async fn connect(&self) -> tidemill_core::Result<Broker> {
        self.connect_inner()
            .await
            .map_err(|e| discreet_error(e, &self.secrets()))
    }

    /// The credentials in this configuration (to keep them out of error messages), read
    /// from the fields that hold them: adapters' own `Debug` already hides them.
    fn secrets(&self) -> Vec<String> {
        let raw: String = match self {
            BrokerConfig::Memory(_) => String::new(),
            #[cfg(feature = "kafka")]
            BrokerConfig::Kafka(c) => format!(
                "{:?} {:?} {:?} brokers: {:?}",
                c.properties, c.producer_properties, c.consumer_properties, c.brokers
            ),
            #[cfg(feature = "amqp")]
            BrokerConfig::Amqp(c) => format!("url: {:?}", c.url),
            #[cfg(feature = "nats")]
            BrokerConfig::Nats(c) => format!(
                "url: {:?}, password: {:?}, token: {:?}",
                c.url, c.password, c.token
            ),
            #[cfg(feature = "googlecloud")]
            BrokerConfig::GoogleCloud(c) => format!(
                "emulator_host: {:?}, endpoint: {:?}",
                c.emulator_host, c.endpoint
            ),
            #[cfg(feature = "redis")]
            BrokerConfig::Redis(c) => format!("url: {:?}", c.url),
            #[cfg(feature = "postgres")]
            BrokerConfig::Postgres(c) => format!("url: {:?}", c.url),
            // Credentials come from the SDK's chain, never the config: only an endpoint
            // with a userinfo could hold one.
            #[cfg(feature = "aws")]
            BrokerConfig::Aws(c) => format!("endpoint: {:?}", c.endpoint),
        };
        crate::redact::secrets_in_debug(&raw)
    }

    async fn connect_inner(&self) -> tidemill_core::Result<Broker> {
        let kind = self.kind();
        let (publisher, subscriber): (Arc<dyn Publisher>, Arc<dyn Subscriber>) = match self {
            BrokerConfig::Memory(config) => {
                let broker = MemoryBroker::try_with_config(config.clone())?;
                (Arc::new(broker.publisher()), Arc::new(broker.subscriber()))
            }
            #[cfg(feature = "kafka")]
            BrokerConfig::Kafka(config) => (
                Arc::new(tidemill_kafka::KafkaPublisher::connect(config.clone()).await?),
                Arc::new(tidemill_kafka::KafkaSubscriber::connect(config.clone()).await?),
            ),
            #[cfg(feature = "amqp")]
            BrokerConfig::Amqp(config) => (
                Arc::new(tidemill_amqp::AmqpPublisher::connect(config.clone()).await?),
                Arc::new(tidemill_amqp::AmqpSubscriber::connect(config.clone()).await?),
            ),
            #[cfg(feature = "nats")]
            BrokerConfig::Nats(config) => (
                Arc::new(tidemill_nats::NatsPublisher::connect(config.clone()).await?),
                Arc::new(tidemill_nats::NatsSubscriber::connect(config.clone()).await?),
            ),
            #[cfg(feature = "googlecloud")]
            BrokerConfig::GoogleCloud(config) => (
                Arc::new(
                    tidemill_googlecloud::GoogleCloudPublisher::connect(config.clone()).await?,
                ),
                Arc::new(
                    tidemill_googlecloud::GoogleCloudSubscriber::connect(config.clone()).await?,
                ),
            ),
            #[cfg(feature = "redis")]
            BrokerConfig::Redis(config) => (
                Arc::new(tidemill_redis::RedisPublisher::connect(config.clone()).await?),
                Arc::new(tidemill_redis::RedisSubscriber::connect(config.clone()).await?),
            ),
            #[cfg(feature = "postgres")]
            BrokerConfig::Postgres(config) => (
                Arc::new(tidemill_sql::SqlPublisher::connect(config.clone()).await?),
                Arc::new(tidemill_sql::SqlSubscriber::connect(config.clone()).await?),
            ),
            #[cfg(feature = "aws")]
            BrokerConfig::Aws(config) => (
                Arc::new(tidemill_aws::SqsPublisher::connect(config.clone()).await?),
                Arc::new(tidemill_aws::SqsSubscriber::connect(config.clone()).await?),
            ),
        };
        Ok(Broker {
            kind,
            publisher,
            subscriber,
        })
    }

    fn build(kind: BrokerKind, mut options: Options) -> Result<Self, ConfigError> {
        if kind == BrokerKind::Nats {
            jetstream_switch(&mut options)?;
        }

        if !kind.is_available() {
            return Err(ConfigError::MissingFeature {
                kind,
                feature: kind.feature(),
            });
        }
        match kind {
            BrokerKind::Memory => {
                let config: MemoryConfig = deserialize(kind, options)?;
                config.validate().map_err(|e| ConfigError::Rejected {
                    kind,
                    message: discreet_message(&e.to_string()),
                })?;
                Ok(BrokerConfig::Memory(config))
            }
            #[cfg(feature = "kafka")]
            BrokerKind::Kafka => Ok(BrokerConfig::Kafka(deserialize(kind, options)?)),
            #[cfg(feature = "amqp")]
            BrokerKind::Amqp => Ok(BrokerConfig::Amqp(deserialize(kind, options)?)),
            #[cfg(feature = "nats")]
            BrokerKind::Nats => Ok(BrokerConfig::Nats(deserialize(kind, options)?)),
            #[cfg(feature = "googlecloud")]
            BrokerKind::GoogleCloud => Ok(BrokerConfig::GoogleCloud(deserialize(kind, options)?)),
            #[cfg(feature = "redis")]
            BrokerKind::Redis => {
                let config: tidemill_redis::RedisConfig = deserialize(kind, options)?;
                config.validate().map_err(|e| ConfigError::Rejected {
                    kind,
                    message: discreet_message(&e.to_string()),
                })?;
                Ok(BrokerConfig::Redis(config))
            }
            #[cfg(feature = "postgres")]
            BrokerKind::Postgres => {
                postgres_parameters_into_url(&mut options)?;
                let config: tidemill_sql::SqlConfig = deserialize(kind, options)?;
                config.validate().map_err(|e| ConfigError::Rejected {
                    kind,
                    message: discreet_message(&match e {
                        // The kind is named already: only the adapter's explanation.
                        tidemill_core::Error::Config { message, .. } => message,
                        other => other.to_string(),
                    }),
                })?;
                Ok(BrokerConfig::Postgres(config))
            }
            #[cfg(feature = "aws")]
            BrokerKind::Aws => {
                let config: tidemill_aws::AwsConfig = deserialize(kind, options)?;
                config.validate().map_err(|e| ConfigError::Rejected {
                    kind,
                    message: discreet_message(&match e {
                        // The kind is named already: only the adapter's explanation.
                        tidemill_core::Error::Config { message, .. } => message,
                        other => other.to_string(),
                    }),
                })?;
                Ok(BrokerConfig::Aws(config))
            }
            #[allow(unreachable_patterns)]
            _ => Err(ConfigError::MissingFeature {
                kind,
                feature: kind.feature(),
            }),
        }
    }
}

/// Connects to the broker `url` names (see [`BrokerConfig::from_url`]).
pub async fn connect(url: &str) -> Result<Broker, ConnectError> {
    let config = BrokerConfig::from_url(url)?;
    Ok(config.connect().await?)
}

/// Why [`connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL is wrong.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The broker could not be reached.
    #[error(transparent)]
    Broker(#[from] tidemill_core::Error),
}

fn deserialize<T: serde::de::DeserializeOwned>(
    kind: BrokerKind,
    options: Options,
) -> Result<T, ConfigError> {
    strict::from_options(options).map_err(|source| ConfigError::Invalid { kind, source })
}

/// A message from elsewhere (a parser, a client library), made safe to show: no excerpts of
/// the input (a TOML parse error quotes the offending line, which may hold a password), and
/// URLs without their userinfo.
fn discreet_message(message: &str) -> String {
    let kept: Vec<&str> = message
        .lines()
        .filter(|line| {
            // Excerpt lines look like `  |`, `3 | url = "…"`, `  |      ^`.
            let rest = line
                .trim_start()
                .trim_start_matches(|c: char| c.is_ascii_digit());
            !rest.trim_start().starts_with('|')
        })
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect();
    redact_text(&kept.join(" ")).into_owned()
}

/// TOML text with every `key = <integer beyond 64 bits>` written as a string instead;
/// `None` when there is none.
fn quote_huge_integers(text: &str) -> Option<String> {
    let mut changed = false;
    let lines: Vec<String> = text
        .lines()
        .map(|line| {
            let Some((key, rest)) = line.split_once('=') else {
                return line.to_owned();
            };
            let (value, comment) = match rest.find('#') {
                Some(at) => rest.split_at(at),
                None => (rest, ""),
            };
            let number = value.trim();
            let digits = number.trim_start_matches(['+', '-']);
            let is_integer = !digits.is_empty()
                && digits.chars().all(|c| c.is_ascii_digit() || c == '_')
                && digits.starts_with(|c: char| c.is_ascii_digit());
            if !is_integer || number.replace('_', "").parse::<i64>().is_ok() {
                return line.to_owned();
            }
            changed = true;
            format!("{key}= \"{}\" {comment}", number.replace('_', ""))
        })
        .collect();
    changed.then(|| lines.join("\n"))
}

/// `err` with `secrets` (and URL userinfo) hidden, wherever in its message they appear. An
/// error that shows none of them is returned untouched, its source chain included.
fn discreet_error(err: tidemill_core::Error, secrets: &[String]) -> tidemill_core::Error {
    use tidemill_core::Error;

    fn chain(err: &dyn std::error::Error) -> String {
        let mut text = err.to_string();
        let mut source = err.source();
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        text
    }
    let clean = |text: &str| {
        let mut text = redact_text(text).into_owned();
        for secret in secrets {
            text = text.replace(secret.as_str(), crate::redact::HIDDEN);
        }
        text
    };
    let full = chain(&err);
    if clean(&full) == full {
        return err;
    }
    let hidden = |source: &tidemill_core::BoxError| -> tidemill_core::BoxError {
        clean(&chain(source.as_ref())).into()
    };
    match err {
        Error::Connect {
            broker,
            address,
            source,
        } => Error::Connect {
            broker,
            address: clean(&address),
            source: hidden(&source),
        },
        Error::Config { broker, message } => Error::Config {
            broker,
            message: clean(&message),
        },
        Error::Broker {
            broker,
            topic,
            context,
            transient,
            source,
        } => Error::Broker {
            broker,
            topic,
            context: clean(&context),
            transient,
            source: hidden(&source),
        },
        // The other variants hold topics, uuids and sizes, no configuration.
        other => other,
    }
}

/// Adds `overrides` on top of `base`, merging nested tables.
fn merge(base: &mut Options, overrides: Options) {
    for (key, value) in overrides {
        match (base.get_mut(&key), value) {
            (Some(existing), value) => {
                let merged = match (existing.clone().into_table(), value.clone().into_table()) {
                    (Ok(mut a), Ok(b)) => {
                        merge(&mut a, b);
                        Value::from(a)
                    }
                    _ => value,
                };
                *existing = merged;
            }
            (None, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Splits a broker URL into its kind and options. Errors show the URL only through
/// [`redact_url`].
fn url_options(url: &str) -> Result<(BrokerKind, Options), ConfigError> {
    let no_scheme = || ConfigError::NoScheme(redact_url(url).into_owned());
    let (scheme, rest) = url.split_once("://").ok_or_else(no_scheme)?;
    if !crate::redact::is_scheme(scheme) {
        // `user:pass@host/x://…`: whatever this is, it starts with no scheme.
        return Err(no_scheme());
    }
    let (kind, fifo_scheme) =
        scheme_kind(scheme).ok_or_else(|| ConfigError::UnknownScheme(scheme.to_owned()))?;
    if !kind.is_available() {
        return Err(ConfigError::MissingFeature {
            kind,
            feature: kind.feature(),
        });
    }
    let (base, query) = match rest.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (rest, None),
    };
    let mut options = Options::new();
    // PostgreSQL's connection parameters, as written: they stay in the URL.
    let mut connection_parameters = Vec::new();
    for pair in query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair.split_once('=').ok_or_else(|| {
            // No `=`: a bare word, perhaps the tail of a password with a `&` in it.
            let shown = if crate::redact::is_secret_name(pair) || pair.len() > 64 {
                crate::redact::HIDDEN
            } else {
                pair
            };
            ConfigError::BadParameter(redact_url(shown).into_owned())
        })?;
        if kind == BrokerKind::Postgres && is_postgres_parameter(&percent_decode(key)) {
            connection_parameters.push(pair);
            continue;
        }
        set_option(&mut options, key, text(percent_decode(value)));
    }
    let shown = || redact_url(url).into_owned();
    match kind {
        BrokerKind::Memory => {
            if !base.trim_end_matches('/').is_empty() {
                return Err(ConfigError::Missing {
                    kind,
                    message: format!(
                        "memory:// takes no host or path (nor user or password), got `{}`",
                        shown()
                    ),
                });
            }
        }
        BrokerKind::Kafka => {
            let brokers = base.trim_end_matches('/');
            if brokers.is_empty() {
                return Err(ConfigError::Missing {
                    kind,
                    message: "kafka:// needs bootstrap brokers: kafka://host:9092[,host2:9092]"
                        .to_owned(),
                });
            }
            if brokers.contains('@') {
                return Err(ConfigError::Missing {
                    kind,
                    message: format!(
                        "kafka:// takes no user or password in the URL (got `{}`): set SASL \
                         credentials as properties (properties.sasl.username=…, \
                         properties.sasl.password=…)",
                        shown()
                    ),
                });
            }
            options.insert("brokers".to_owned(), Value::from(brokers));
        }
        BrokerKind::Amqp => {
            options.insert("url".to_owned(), Value::from(format!("{scheme}://{base}")));
        }
        BrokerKind::Nats => {
            let servers = base.trim_end_matches('/');
            // `nats://h1,h2` and `nats://h1,nats://h2` (a list of URLs, as a cluster's
            // seed list is often written) both name two servers.
            let url = servers
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| {
                    if s.contains("://") {
                        s.to_owned()
                    } else {
                        format!("nats://{s}")
                    }
                })
                .collect::<Vec<_>>()
                .join(",");
            options.insert("url".to_owned(), Value::from(url));
        }
        BrokerKind::GoogleCloud => {
            let project = base.trim_end_matches('/');
            if project.is_empty() {
                return Err(ConfigError::Missing {
                    kind,
                    message: "pubsub:// needs a project: pubsub://my-project".to_owned(),
                });
            }
            if project.contains(['@', '/']) {
                return Err(ConfigError::Missing {
                    kind,
                    message: format!(
                        "pubsub:// takes a project id only, got `{}`: credentials come from \
                         the environment (GOOGLE_APPLICATION_CREDENTIALS)",
                        shown()
                    ),
                });
            }
            options.insert("project_id".to_owned(), Value::from(project));
            if let Some(host) = options.remove("emulator") {
                options.insert("emulator_host".to_owned(), host);
            }
        }
        BrokerKind::Redis => {
            // The server part as written (`redis://[user:pass@]host:port/db`): the redis
            // client parses it, the query sets RedisConfig fields.
            options.insert("url".to_owned(), Value::from(format!("{scheme}://{base}")));
        }
        BrokerKind::Postgres => {
            // The server part and the connection parameters as written
            // (`postgres://[user:pass@]host:port/db?sslmode=…`): sqlx parses them, the
            // other query parameters set SqlConfig fields.
            let mut url = format!("{scheme}://{base}");
            if !connection_parameters.is_empty() {
                url.push('?');
                url.push_str(&connection_parameters.join("&"));
            }
            options.insert("url".to_owned(), Value::from(url));
        }
        BrokerKind::Aws => aws_url(&mut options, scheme, base, fifo_scheme)?,
    }
    Ok((kind, options))
}

/// The kind a URL scheme names, and whether it is `sqs+fifo` (AWS with `fifo = true`).
fn scheme_kind(scheme: &str) -> Option<(BrokerKind, bool)> {
    if scheme.eq_ignore_ascii_case("sqs+fifo") {
        return Some((BrokerKind::Aws, true));
    }
    BrokerKind::from_name(scheme).map(|kind| (kind, false))
}

/// AWS: the host of `sqs://REGION` (`base`, the part before the query) is the region, none
/// for `sqs://` and `sqs:///`; `sqs+fifo://` sets `fifo`. Credentials, ports and paths have
/// no place in it.
fn aws_url(
    options: &mut Options,
    scheme: &str,
    base: &str,
    fifo_scheme: bool,
) -> Result<(), ConfigError> {
    let kind = BrokerKind::Aws;
    // Without the query: an `endpoint=` URL in it may carry a userinfo `redact_url` would
    // not see.
    let shown = || redact_url(&format!("{scheme}://{base}")).into_owned();
    let missing = |message: String| ConfigError::Missing { kind, message };
    let region = base.trim_end_matches('/');
    if region.contains('@') {
        return Err(missing(format!(
            "sqs:// takes no user or password (got `{}`): the AWS SDK reads credentials from \
             the environment (AWS_ACCESS_KEY_ID, AWS_PROFILE, shared files, roles)",
            shown()
        )));
    }
    if !region
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(missing(format!(
            "sqs:// takes a region only (sqs://eu-west-1, or sqs:// for the environment's), \
             got `{}`: an emulator's address goes in `endpoint=http://host:port`",
            shown()
        )));
    }
    if !region.is_empty() {
        if options.contains_key("region") {
            return Err(missing(format!(
                "the region is given twice, as the host and as `region=` (got `{}`): keep one",
                shown()
            )));
        }
        options.insert("region".to_owned(), Value::from(region));
    }
    if fifo_scheme {
        match options.get("fifo") {
            None => {
                options.insert("fifo".to_owned(), text("true"));
            }
            Some(value) if strict::parse_bool(value) == Some(true) => {}
            Some(_) => {
                return Err(missing(format!(
                    "sqs+fifo:// means `fifo=true` (got `{}`): drop the `fifo` parameter or \
                     use sqs://",
                    shown()
                )))
            }
        }
    }
    Ok(())
}

/// The query parameters of a PostgreSQL URL that sqlx's `PgConnectOptions` reads (as of
/// sqlx 0.8), plus `options[<setting>]`: they stay in `SqlConfig::url`.
const POSTGRES_URL_PARAMETERS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// Whether `key` is a PostgreSQL connection parameter (see [`POSTGRES_URL_PARAMETERS`]).
fn is_postgres_parameter(key: &str) -> bool {
    POSTGRES_URL_PARAMETERS.contains(&key) || (key.starts_with("options[") && key.ends_with(']'))
}

/// What a value put into a URL query has to escape.
#[cfg(feature = "postgres")]
const QUERY_VALUE: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'&')
    .add(b'+')
    .add(b'=')
    .add(b'<')
    .add(b'>')
    .add(b'`');

/// PostgreSQL: connection parameters given as options (a file section's `sslmode =
/// "require"`, `TIDEMILL_BROKER__APPLICATION_NAME=orders`) join the query of the `url`
/// option (the adapter's default URL when there is none), after the ones it has: sqlx reads
/// them in order, so these win.
#[cfg(feature = "postgres")]
fn postgres_parameters_into_url(options: &mut Options) -> Result<(), ConfigError> {
    let mut keys: Vec<String> = options
        .keys()
        .filter(|k| is_postgres_parameter(k))
        .cloned()
        .collect();
    if keys.is_empty() {
        return Ok(());
    }
    keys.sort();
    let mut url = match options.remove("url") {
        None => tidemill_sql::SqlConfig::default().url,
        Some(value) => match &value.kind {
            ValueKind::String(s) => s.clone(),
            _ => {
                return Err(ConfigError::Invalid {
                    kind: BrokerKind::Postgres,
                    source: OptionError::invalid("url", "a postgres:// URL", &value),
                })
            }
        },
    };
    for key in keys {
        let Some(value) = options.remove(&key) else {
            continue;
        };
        let written = match &value.kind {
            ValueKind::String(s) => s.clone(),
            ValueKind::I64(n) => n.to_string(),
            ValueKind::U64(n) => n.to_string(),
            ValueKind::I128(n) => n.to_string(),
            ValueKind::U128(n) => n.to_string(),
            ValueKind::Boolean(b) => b.to_string(),
            _ => {
                return Err(ConfigError::Invalid {
                    kind: BrokerKind::Postgres,
                    source: OptionError::invalid(
                        &key,
                        "a string (a PostgreSQL connection parameter)",
                        &value,
                    ),
                })
            }
        };
        url.push(if url.contains('?') { '&' } else { '?' });
        url.extend(percent_encoding::utf8_percent_encode(&key, QUERY_VALUE));
        url.push('=');
        url.extend(percent_encoding::utf8_percent_encode(&written, QUERY_VALUE));
    }
    options.insert("url".to_owned(), Value::from(url));
    Ok(())
}

/// NATS: `jetstream = true|false` (URL, file or environment) picks the mode;
/// `jetstream.<option>` (a table) configures JetStream.
fn jetstream_switch(options: &mut Options) -> Result<(), ConfigError> {
    let is_switch = options
        .get("jetstream")
        .is_some_and(|v| !matches!(v.kind, ValueKind::Table(_)));
    if !is_switch {
        return Ok(());
    }
    let Some(js) = options.remove("jetstream") else {
        return Ok(());
    };
    let on = strict::parse_bool(&js).ok_or_else(|| ConfigError::Invalid {
        kind: BrokerKind::Nats,
        source: OptionError::invalid(
            "jetstream",
            "true or false (or JetStream options as jetstream.<option>=…)",
            &js,
        ),
    })?;
    let mode = if on { "jet_stream" } else { "core" };
    options.insert("mode".to_owned(), Value::from(mode));
    Ok(())
}

/// `a=1` sets `a`; `a.b=1` sets `b` inside table `a` (one level: `properties.linger.ms`).
fn set_option(options: &mut Options, key: &str, value: Value) {
    match key.split_once('.') {
        None => {
            options.insert(key.to_owned(), value);
        }
        Some((outer, inner)) => {
            let mut table = options
                .remove(outer)
                .and_then(|v| v.into_table().ok())
                .unwrap_or_default();
            table.insert(inner.to_owned(), value);
            options.insert(outer.to_owned(), Value::from(table));
        }
    }
}

/// Decodes `%XX` escapes and `+` (as in query strings).
fn percent_decode(s: &str) -> String {
    let spaced = s.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(config: BrokerConfig) -> MemoryConfig {
        match config {
            BrokerConfig::Memory(c) => c,
            #[allow(unreachable_patterns)]
            other => panic!("expected memory, got {other:?}"),
        }
    }

    fn err(url: &str) -> String {
        BrokerConfig::from_url(url).unwrap_err().to_string()
    }

    #[test]
    fn memory_urls_set_options() {
        let config = memory(BrokerConfig::from_url("memory://?capacity=64&retention=5").unwrap());
        assert_eq!(
            config,
            MemoryConfig {
                capacity: 64,
                retention: 5
            }
        );
        let config = memory(BrokerConfig::from_url("memory://").unwrap());
        assert_eq!(config, MemoryConfig::default());
    }

    #[test]
    fn mistakes_name_the_offending_part() {
        assert!(err("memory://?capacty=64").contains("capacty"));
        let bad_value = err("memory://?capacity=lots");
        assert!(
            bad_value.contains("capacity") || bad_value.contains("lots"),
            "{bad_value}"
        );
        assert_eq!(
            err("mqtt://localhost"),
            "unknown broker scheme `mqtt`: expected memory, kafka, amqp, amqps, nats, pubsub, redis, \
             rediss, postgres, postgresql, sqs or sqs+fifo"
        );
        assert!(err("localhost:9092").contains("has no scheme"));
        assert!(err("memory://?capacity").contains("`capacity` is malformed"));
        assert!(err("memory://somewhere").contains("takes no host"));
    }

    #[cfg(not(feature = "kafka"))]
    #[test]
    fn a_missing_feature_says_which_to_enable() {
        assert_eq!(
            err("kafka://127.0.0.1:9092"),
            "built without kafka: enable feature `kafka` of the tidemill crate"
        );
    }

    #[cfg(not(feature = "googlecloud"))]
    #[test]
    fn pubsub_without_its_feature() {
        assert!(err("pubsub://proj").contains("enable feature `googlecloud`"));
    }

    #[cfg(feature = "kafka")]
    #[test]
    fn kafka_urls() {
        let BrokerConfig::Kafka(c) = BrokerConfig::from_url(
            "kafka://h1:9092,h2:9092?start_from=earliest&partitions=3&properties.linger.ms=5&close_timeout=250ms",
        )
        .unwrap() else {
            panic!("expected kafka")
        };
        assert_eq!(c.brokers, "h1:9092,h2:9092");
        assert_eq!(c.partitions, 3);
        assert_eq!(c.properties.get("linger.ms").map(String::as_str), Some("5"));
        assert_eq!(c.close_timeout, std::time::Duration::from_millis(250));
        assert!(err("kafka://").contains("needs bootstrap brokers"));
        assert!(err("kafka://h:1?partitions=many").contains("kafka"));
        assert!(err("kafka://h:1?no_such_option=1").contains("no_such_option"));
    }

    #[cfg(feature = "amqp")]
    #[test]
    fn amqp_urls() {
        let BrokerConfig::Amqp(c) =
            BrokerConfig::from_url("amqp://guest:guest@127.0.0.1:5672/%2f?prefetch=7").unwrap()
        else {
            panic!("expected amqp")
        };
        assert_eq!(c.url, "amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(c.prefetch, 7);
    }

    #[cfg(feature = "nats")]
    #[test]
    fn nats_urls() {
        let BrokerConfig::Nats(c) =
            BrokerConfig::from_url("nats://127.0.0.1:4222?jetstream=false").unwrap()
        else {
            panic!("expected nats")
        };
        assert_eq!(c.url, "nats://127.0.0.1:4222");
        assert_eq!(c.mode, tidemill_nats::NatsMode::Core);
        let BrokerConfig::Nats(c) =
            BrokerConfig::from_url("nats://127.0.0.1:4222?jetstream.ack_wait=45s").unwrap()
        else {
            panic!("expected nats")
        };
        assert_eq!(c.mode, tidemill_nats::NatsMode::JetStream);
        assert_eq!(c.jetstream.ack_wait, std::time::Duration::from_secs(45));
        assert!(err("nats://h:1?jetstream=perhaps").contains("nats"));
        for list in [
            "nats://127.0.0.1:4231,127.0.0.1:4232,127.0.0.1:4233?jetstream.replicas=3",
            "nats://127.0.0.1:4231,nats://127.0.0.1:4232,nats://127.0.0.1:4233?jetstream.replicas=3",
        ] {
            let BrokerConfig::Nats(c) = BrokerConfig::from_url(list).unwrap() else {
                panic!("expected nats")
            };
            assert_eq!(
                c.url,
                "nats://127.0.0.1:4231,nats://127.0.0.1:4232,nats://127.0.0.1:4233",
                "{list}"
            );
            assert_eq!(c.jetstream.replicas, 3);
        }
    }

    #[cfg(feature = "googlecloud")]
    #[test]
    fn pubsub_urls() {
        let BrokerConfig::GoogleCloud(c) =
            BrokerConfig::from_url("pubsub://my-project?emulator=127.0.0.1:8085").unwrap()
        else {
            panic!("expected pubsub")
        };
        assert_eq!(c.project_id, "my-project");
        assert_eq!(c.emulator_host.as_deref(), Some("127.0.0.1:8085"));
        assert!(err("pubsub://").contains("needs a project"));
    }

    #[cfg(not(feature = "redis"))]
    #[test]
    fn redis_without_its_feature() {
        for url in ["redis://127.0.0.1:6379/0", "rediss://h:6380/1"] {
            assert_eq!(
                err(url),
                "built without redis: enable feature `redis` of the tidemill crate"
            );
        }
    }

    #[cfg(feature = "redis")]
    fn redis(config: BrokerConfig) -> tidemill_redis::RedisConfig {
        match config {
            BrokerConfig::Redis(c) => c,
            #[allow(unreachable_patterns)]
            other => panic!("expected redis, got {other:?}"),
        }
    }

    #[cfg(feature = "redis")]
    #[test]
    fn redis_urls() {
        use std::time::Duration;
        use tidemill_redis::{RedisConfig, StartFrom};

        let c = redis(
            BrokerConfig::from_url(
                "redis://h:6380/0?claim_idle=45s&max_len=1000&max_age=1h&start_from=beginning\
                 &order_per_key=false&stream_prefix=app:&prefetch=16&block=250ms",
            )
            .unwrap(),
        );
        assert_eq!(c.url, "redis://h:6380/0");
        assert_eq!(c.claim_idle, Duration::from_secs(45));
        assert_eq!(c.max_len, Some(1000));
        assert_eq!(c.max_age, Some(Duration::from_secs(3600)));
        assert_eq!(c.start_from, StartFrom::Beginning);
        assert!(!c.order_per_key);
        assert_eq!(c.stream_prefix, "app:");
        assert_eq!(c.prefetch, 16);
        assert_eq!(c.block, Duration::from_millis(250));
        // Whatever the query does not set keeps its default.
        let defaults = RedisConfig::default();
        assert_eq!(c.claim_interval, defaults.claim_interval);
        assert_eq!(c.payload_field, defaults.payload_field);
        assert_eq!(c.max_message_bytes, defaults.max_message_bytes);

        // Only the URL: every option at its default, the URL as written.
        let c = redis(BrokerConfig::from_url("redis://127.0.0.1:6380/0").unwrap());
        assert_eq!(c, RedisConfig::new("redis://127.0.0.1:6380/0"));
        // TLS, credentials and the database stay in the URL the client gets.
        let c =
            redis(BrokerConfig::from_url("rediss://app:s3cret@cache:6380/2?prefetch=8").unwrap());
        assert_eq!(c.url, "rediss://app:s3cret@cache:6380/2");
        assert_eq!(c.prefetch, 8);
        let kind = BrokerConfig::from_url("rediss://cache:6380/0")
            .unwrap()
            .kind();
        assert_eq!(kind, BrokerKind::Redis);
        assert_eq!(BrokerKind::from_name("rediss"), Some(BrokerKind::Redis));

        // Mistakes name the option.
        let e = err("redis://h:6380/0?claim_idel=45s");
        assert!(e.starts_with("invalid redis configuration"), "{e}");
        assert!(e.contains("claim_idel"), "{e}");
        let e = err("redis://h:6380/0?max_len=-1");
        assert!(e.contains("option `max_len`") && e.contains("`-1`"), "{e}");
        let e = err("redis://h:6380/0?claim_idle=soon");
        assert!(e.contains("claim_idle"), "{e}");
        let e = err("redis://h:6380/0?start_from=yesterday");
        assert!(e.contains("start_from"), "{e}");
        let e = err("redis://h:6380/0?order_per_key=2");
        assert!(
            e.contains("option `order_per_key`: expected true or false"),
            "{e}"
        );
        // Values without a meaning are refused when the URL is read, not at connect.
        let e = err("redis://u:hunter2@h:6380/0?prefetch=0");
        assert!(e.contains("prefetch") && !e.contains("hunter2"), "{e}");
    }

    #[cfg(feature = "redis")]
    #[test]
    fn redis_urls_from_files_and_the_environment() {
        let c = redis(
            from_file(
                "app.toml",
                "[broker]\ntype = \"redis\"\nurl = \"redis://h:6380/1\"\nclaim_idle = \"1m\"\nmax_len = 500\n",
                "broker",
            )
            .unwrap(),
        );
        assert_eq!(c.url, "redis://h:6380/1");
        assert_eq!(c.claim_idle, std::time::Duration::from_secs(60));
        assert_eq!(c.max_len, Some(500));
        // `type` alone: the adapter's default server.
        let c = redis(from_file("app.yaml", "b:\n  type: redis\n  prefetch: 4\n", "b").unwrap());
        assert_eq!(c.url, tidemill_redis::RedisConfig::default().url);
        assert_eq!(c.prefetch, 4);
    }

    #[cfg(feature = "redis")]
    #[test]
    fn redis_hides_the_password() {
        let c = BrokerConfig::from_url("redis://app:hunter2@cache:6380/0?claim_idle=45s").unwrap();
        for debug in [format!("{c:?}"), format!("{c:#?}")] {
            assert!(!debug.contains("hunter2"), "{debug}");
            assert!(debug.contains("cache:6380/0"), "{debug}");
            assert!(debug.starts_with("Redis("), "{debug}");
        }
        let secrets = c.secrets();
        assert!(secrets.iter().any(|s| s == "hunter2"), "{secrets:?}");
        assert!(!secrets.iter().any(|s| s.contains("cache")), "{secrets:?}");
        for url in [
            "redis://app:hunter2@cache:6380/0?no_such_option=1",
            "rediss://:hunter2@cache:6380/0?prefetch=many",
            "redis://app:hunter2@cache:6380/0?password=hunter2",
        ] {
            let e = BrokerConfig::from_url(url).unwrap_err();
            let text = assert_discreet(&e);
            assert!(text.contains("redis configuration"), "{text}");
        }
        let e = BrokerConfig::from_url("redis://app:hunter2@cache:6380/0?no_such_option=1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no_such_option"), "{e}");
    }

    #[cfg(not(feature = "aws"))]
    #[test]
    fn aws_without_its_feature() {
        for url in [
            "sqs://eu-west-1",
            "sqs:///?endpoint=http://127.0.0.1:4566",
            "sqs+fifo://eu-west-1",
            "aws://eu-west-1",
        ] {
            assert_eq!(
                err(url),
                "built without aws: enable feature `aws` of the tidemill crate"
            );
        }
        let e = from_file("app.toml", "[broker]\ntype = \"aws\"\n", "broker").unwrap_err();
        assert!(e.to_string().contains("enable feature `aws`"), "{e}");
        assert_eq!(BrokerKind::from_name("sqs"), Some(BrokerKind::Aws));
        assert!(!BrokerKind::Aws.is_available());
    }

    #[cfg(feature = "aws")]
    fn aws(config: BrokerConfig) -> tidemill_aws::AwsConfig {
        match config {
            BrokerConfig::Aws(c) => c,
            #[allow(unreachable_patterns)]
            other => panic!("expected aws, got {other:?}"),
        }
    }

    #[cfg(feature = "aws")]
    #[test]
    fn aws_urls() {
        use std::time::Duration;
        use tidemill_aws::{AwsConfig, Mode};

        let c = aws(BrokerConfig::from_url(
            "sqs://eu-west-1?endpoint=http://127.0.0.1:4567&fifo=true&wait_time=5s\
             &visibility_timeout=1m&message_retention=2h&mode=queues&name_prefix=app-\
             &prefetch=16&concurrent_receives=3&create_resources=false&profile=dev\
             &order_per_key=false&max_message_bytes=65536&unwrap_sns_envelopes=off\
             &connect_timeout=750ms&command_timeout=20s",
        )
        .unwrap());
        assert_eq!(c.region.as_deref(), Some("eu-west-1"));
        assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:4567"));
        assert!(c.fifo);
        assert_eq!(c.wait_time, Duration::from_secs(5));
        assert_eq!(c.visibility_timeout, Duration::from_secs(60));
        assert_eq!(c.message_retention, Some(Duration::from_secs(7200)));
        assert_eq!(c.mode, Mode::Queues);
        assert_eq!(c.name_prefix, "app-");
        assert_eq!(c.prefetch, 16);
        assert_eq!(c.concurrent_receives, 3);
        assert!(!c.create_resources);
        assert_eq!(c.profile.as_deref(), Some("dev"));
        assert!(!c.order_per_key);
        assert_eq!(c.max_message_bytes, 65536);
        assert!(!c.unwrap_sns_envelopes);
        assert_eq!(c.connect_timeout, Duration::from_millis(750));
        assert_eq!(c.command_timeout, Duration::from_secs(20));
        assert_eq!(BrokerConfig::Aws(c).kind(), BrokerKind::Aws);

        // Only the region: every option at its default.
        let c = aws(BrokerConfig::from_url("sqs://us-east-1").unwrap());
        assert_eq!(c, AwsConfig::new("us-east-1"));
        assert_eq!(aws(BrokerConfig::from_url("sqs://us-east-1/").unwrap()), c);
        // No host: the region comes from the environment (the SDK's chain).
        assert_eq!(
            aws(BrokerConfig::from_url("sqs://").unwrap()),
            AwsConfig::default()
        );
        let c = aws(BrokerConfig::from_url("sqs:///?endpoint=http://127.0.0.1:4566").unwrap());
        assert_eq!(c.region, None);
        assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:4566"));
        let c = aws(BrokerConfig::from_url("sqs://?region=ap-south-1").unwrap());
        assert_eq!(c.region.as_deref(), Some("ap-south-1"));
        // A percent-encoded endpoint is decoded.
        let c = aws(BrokerConfig::from_url(
            "sqs://eu-west-1?endpoint=http%3A%2F%2Flocalhost%3A4566",
        )
        .unwrap());
        assert_eq!(c.endpoint.as_deref(), Some("http://localhost:4566"));
        // `sqs+fifo://` is `fifo=true`; `aws` names the broker too.
        let c = aws(BrokerConfig::from_url("sqs+fifo://eu-west-1?prefetch=8").unwrap());
        assert!(c.fifo);
        assert_eq!(c.prefetch, 8);
        assert!(aws(BrokerConfig::from_url("SQS+FIFO://eu-west-1?fifo=yes").unwrap()).fifo);
        assert!(!aws(BrokerConfig::from_url("aws://eu-west-1").unwrap()).fifo);
        assert_eq!(BrokerKind::from_name("sqs"), Some(BrokerKind::Aws));
        assert_eq!(BrokerKind::from_name("aws"), Some(BrokerKind::Aws));
        assert_eq!(BrokerKind::Aws.to_string(), "aws");
        assert_eq!(BrokerKind::Aws.feature(), "aws");
        assert!(BrokerKind::Aws.is_available());
    }

    #[cfg(feature = "aws")]
    #[test]
    fn aws_url_mistakes_name_the_offending_part() {
        // Unknown options, bad values and their ranges name the option.
        let e = err("sqs://eu-west-1?visiblity_timeout=30s");
        assert!(e.starts_with("invalid aws configuration"), "{e}");
        assert!(e.contains("visiblity_timeout"), "{e}");
        let e = err("sqs://eu-west-1?wait_time=soon");
        assert!(e.contains("wait_time"), "{e}");
        let e = err("sqs://eu-west-1?fifo=2");
        assert!(
            e.contains("option `fifo`: expected true or false, got `2`"),
            "{e}"
        );
        let e = err("sqs://eu-west-1?mode=fanout");
        assert!(e.contains("mode") && e.contains("fanout"), "{e}");
        let e = err("sqs://eu-west-1?prefetch=-1");
        assert!(e.contains("option `prefetch`") && e.contains("`-1`"), "{e}");
        // Values the services would refuse are refused when the URL is read.
        for (url, option) in [
            ("sqs://eu-west-1?wait_time=30s", "wait_time"),
            (
                "sqs://eu-west-1?visibility_timeout=500ms",
                "visibility_timeout",
            ),
            ("sqs://eu-west-1?prefetch=0", "prefetch"),
            ("sqs://eu-west-1?message_retention=30s", "message_retention"),
            ("sqs://eu-west-1?endpoint=127.0.0.1:4566", "endpoint"),
        ] {
            let e = BrokerConfig::from_url(url).unwrap_err();
            assert!(matches!(e, ConfigError::Rejected { .. }), "{url}: {e:?}");
            let e = e.to_string();
            assert!(e.starts_with("invalid aws configuration: "), "{e}");
            assert!(e.contains(option), "{url}: {e}");
        }
        // The host is a region, nothing else.
        let e = BrokerConfig::from_url("sqs://AKIA:hunter2@eu-west-1").unwrap_err();
        let text = assert_discreet(&e);
        assert!(text.contains("takes no user or password"), "{text}");
        for url in [
            "sqs://127.0.0.1:4566",
            "sqs://eu-west-1/orders",
            "sqs://eu_west_1",
        ] {
            let e = err(url);
            assert!(e.contains("sqs:// takes a region only"), "{e}");
            assert!(e.contains("endpoint=http://host:port"), "{e}");
        }
        let e = err("sqs://eu-west-1?region=us-east-1");
        assert!(e.contains("region is given twice"), "{e}");
        let e = err("sqs+fifo://eu-west-1?fifo=false");
        assert!(e.contains("sqs+fifo:// means `fifo=true`"), "{e}");
        // An endpoint's userinfo never shows, in errors or Debug.
        let e = BrokerConfig::from_url(
            "sqs://eu-west-1?region=x&endpoint=http://u:hunter2@h:1&fifo=perhaps",
        )
        .unwrap_err();
        assert_discreet(&e);
    }

    #[cfg(feature = "aws")]
    #[test]
    fn aws_debug_shows_region_and_endpoint() {
        let c = BrokerConfig::from_url("sqs://eu-west-1?endpoint=http://127.0.0.1:4567&fifo=true")
            .unwrap();
        for debug in [format!("{c:?}"), format!("{c:#?}")] {
            assert!(debug.starts_with("Aws("), "{debug}");
            assert!(debug.contains("eu-west-1"), "{debug}");
            assert!(debug.contains("http://127.0.0.1:4567"), "{debug}");
        }
        assert!(c.secrets().is_empty(), "{:?}", c.secrets());
        let c =
            BrokerConfig::from_url("sqs://eu-west-1?endpoint=http://u:hunter2@proxy:8443").unwrap();
        for debug in [format!("{c:?}"), format!("{c:#?}")] {
            assert!(!debug.contains("hunter2"), "{debug}");
            assert!(debug.contains("proxy:8443"), "{debug}");
        }
        assert!(c.secrets().iter().any(|s| s == "hunter2"));
    }

    #[cfg(feature = "aws")]
    #[test]
    fn aws_from_files() {
        use std::time::Duration;
        let c = aws(from_file(
            "app.toml",
            "[broker]\ntype = \"aws\"\nregion = \"eu-west-1\"\nendpoint = \"http://127.0.0.1:4566\"\nwait_time = \"1s\"\nfifo = true\n",
            "broker",
        )
        .unwrap());
        assert_eq!(c.region.as_deref(), Some("eu-west-1"));
        assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:4566"));
        assert_eq!(c.wait_time, Duration::from_secs(1));
        assert!(c.fifo);
        let c = aws(from_file(
            "app.yaml",
            "b:\n  url: sqs+fifo://us-east-1\n  type: sqs\n  visibility_timeout: 2m\n",
            "b",
        )
        .unwrap());
        assert_eq!(c.region.as_deref(), Some("us-east-1"));
        assert!(c.fifo);
        assert_eq!(c.visibility_timeout, Duration::from_secs(120));
        let e = from_file(
            "app.toml",
            "[broker]\nurl = \"sqs://eu-west-1\"\ntype = \"redis\"\n",
            "broker",
        )
        .unwrap_err();
        assert!(e.to_string().contains("which disagree"), "{e}");
        let e = from_file(
            "app.toml",
            "[broker]\ntype = \"aws\"\nwait_tim = \"1s\"\n",
            "broker",
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown option `wait_tim`"), "{e}");
    }

    /// Through the facade to the test SQS/SNS (`TIDEMILL_AWS_URL`, moto; skipped when
    /// unset): a message and its key, through SNS to a private queue.
    #[cfg(feature = "aws")]
    #[tokio::test]
    async fn aws_round_trip() {
        use futures::StreamExt;
        let Ok(url) = std::env::var("TIDEMILL_AWS_URL") else {
            eprintln!("SKIP aws_round_trip: TIDEMILL_AWS_URL is not set");
            return;
        };
        let broker = connect(&url).await.unwrap();
        assert_eq!(broker.kind, BrokerKind::Aws);
        let topic = format!("facade-{}", std::process::id());
        let mut s = broker
            .subscriber
            .subscribe(&topic, tidemill_core::SubscribeOptions::new())
            .await
            .unwrap();
        broker
            .publisher
            .publish_one(&topic, tidemill_core::Message::new("x").with_key("k"))
            .await
            .unwrap();
        let d = tokio::time::timeout(std::time::Duration::from_secs(60), s.next())
            .await
            .expect("delivered within 60 s")
            .unwrap()
            .unwrap();
        assert_eq!(d.message().payload().as_ref(), b"x");
        assert_eq!(d.message().key_str(), Some("k"));
        d.ack().await.unwrap();
    }

    #[cfg(not(feature = "postgres"))]
    #[test]
    fn postgres_without_its_feature() {
        for url in [
            "postgres://app:hunter2@127.0.0.1:5432/app",
            "postgresql://h/db?sslmode=require",
        ] {
            assert_eq!(
                err(url),
                "built without postgres: enable feature `postgres` of the tidemill crate"
            );
        }
        let e = from_file("app.toml", "[broker]\ntype = \"postgres\"\n", "broker").unwrap_err();
        assert!(e.to_string().contains("enable feature `postgres`"), "{e}");
    }

    #[cfg(feature = "postgres")]
    fn postgres(config: BrokerConfig) -> tidemill_sql::SqlConfig {
        match config {
            BrokerConfig::Postgres(c) => c,
            #[allow(unreachable_patterns)]
            other => panic!("expected postgres, got {other:?}"),
        }
    }

    #[cfg(feature = "postgres")]
    #[test]
    fn postgres_urls() {
        use std::time::Duration;
        use tidemill_sql::{SqlConfig, StartFrom};

        // Tidemill's options set SqlConfig fields; PostgreSQL's stay in the URL, as written
        // and in their order.
        let c = postgres(
            BrokerConfig::from_url(
                "postgres://app:s3cret@db:5433/orders?sslmode=verify-full&table_prefix=app.events_\
                 &sslrootcert=/etc/ssl/ca.pem&prefetch=16&lease=45s&poll_interval=250ms\
                 &application_name=order%20service&start_from=beginning&order_per_key=false\
                 &create_schema=false&max_connections=4&connect_timeout=2s\
                 &options=-c%20search_path%3Dapp&options[statement_timeout]=5s\
                 &command_timeout=3s&max_message_bytes=1024&consumer_name=orders\
                 &private_group_expiry=10m",
            )
            .unwrap(),
        );
        assert_eq!(
            c.url,
            "postgres://app:s3cret@db:5433/orders?sslmode=verify-full&sslrootcert=/etc/ssl/ca.pem\
             &application_name=order%20service&options=-c%20search_path%3Dapp\
             &options[statement_timeout]=5s"
        );
        assert_eq!(c.table_prefix, "app.events_");
        assert_eq!(c.prefetch, 16);
        assert_eq!(c.lease, Duration::from_secs(45));
        assert_eq!(c.poll_interval, Duration::from_millis(250));
        assert_eq!(c.start_from, StartFrom::Beginning);
        assert!(!c.order_per_key);
        assert!(!c.create_schema);
        assert_eq!(c.max_connections, 4);
        assert_eq!(c.connect_timeout, Duration::from_secs(2));
        assert_eq!(c.command_timeout, Duration::from_secs(3));
        assert_eq!(c.max_message_bytes, 1024);
        assert_eq!(c.consumer_name, "orders");
        assert_eq!(c.private_group_expiry, Duration::from_secs(600));

        // Only the URL: every option at its default, the URL as written.
        let c = postgres(
            BrokerConfig::from_url("postgres://tidemill:tidemill@127.0.0.1:5433/tidemill").unwrap(),
        );
        assert_eq!(
            c,
            SqlConfig::new("postgres://tidemill:tidemill@127.0.0.1:5433/tidemill")
        );
        // Only connection parameters: all of them stay, every sqlx spelling.
        let all = "postgresql:///app?host=/run/postgresql&hostaddr=10.0.0.1&port=5434\
                   &dbname=app2&user=u&password=p%26w&ssl-mode=require&ssl-root-cert=a\
                   &ssl-ca=b&sslcert=c&ssl-cert=d&sslkey=e&ssl-key=f\
                   &statement-cache-capacity=50";
        let c = postgres(BrokerConfig::from_url(all).unwrap());
        assert_eq!(c.url, all);
        assert_eq!(c.prefetch, SqlConfig::default().prefetch);
        assert_eq!(
            BrokerConfig::from_url("postgresql://h/db").unwrap().kind(),
            BrokerKind::Postgres
        );
        for name in ["postgres", "postgresql"] {
            assert_eq!(BrokerKind::from_name(name), Some(BrokerKind::Postgres));
        }
        assert_eq!(BrokerKind::Postgres.to_string(), "postgres");
        assert_eq!(BrokerKind::Postgres.feature(), "postgres");
        assert!(BrokerKind::Postgres.is_available());

        // Mistakes name the option.
        let e = err("postgres://h/db?leas=30s");
        assert!(e.starts_with("invalid postgres configuration"), "{e}");
        assert!(e.contains("unknown option `leas`"), "{e}");
        // libpq parameters sqlx does not read are not silently dropped.
        let e = err("postgres://h/db?target_session_attrs=read-write");
        assert!(e.contains("unknown option `target_session_attrs`"), "{e}");
        let e = err("postgres://h/db?prefetch=-1");
        assert!(e.contains("option `prefetch`") && e.contains("`-1`"), "{e}");
        let e = err("postgres://h/db?lease=soon");
        assert!(e.contains("lease"), "{e}");
        let e = err("postgres://h/db?start_from=yesterday");
        assert!(
            e.contains("option `start_from`") && e.contains("`beginning`"),
            "{e}"
        );
        let e = err("postgres://h/db?order_per_key=2");
        assert!(
            e.contains("option `order_per_key`: expected true or false"),
            "{e}"
        );
        // Values without a meaning are refused when the URL is read, not at connect.
        let e = err("postgres://u:hunter2@h/db?prefetch=0");
        assert_eq!(
            e,
            "invalid postgres configuration: prefetch must be at least 1"
        );
        let e = err("postgres://u:hunter2@h/db?table_prefix=bad-prefix");
        assert!(e.contains("table_prefix `bad-prefix`"), "{e}");
        let e = err("postgres://h/db?lease=100ms");
        assert!(e.contains("lease must be at least"), "{e}");
        assert!(err("postgres://h/db?sslmode").contains("`sslmode` is malformed"));
    }

    #[cfg(feature = "postgres")]
    #[test]
    fn postgres_urls_from_files() {
        use std::time::Duration;

        let c = postgres(
            from_file(
                "app.toml",
                "[broker]\nurl = \"postgres://app:s3cret@db:5432/app?sslmode=require\"\n\
                 lease = \"1m\"\nprefetch = 8\napplication_name = \"orders & co\"\n",
                "broker",
            )
            .unwrap(),
        );
        assert_eq!(
            c.url,
            "postgres://app:s3cret@db:5432/app?sslmode=require&application_name=orders%20%26%20co"
        );
        assert_eq!(c.lease, Duration::from_secs(60));
        assert_eq!(c.prefetch, 8);
        // `type` alone: the adapter's default URL, with the section's connection parameters.
        let c = postgres(
            from_file(
                "app.yaml",
                "b:\n  type: postgresql\n  host: db.local\n  port: 5433\n  user: app\n  \
                 password: hunter2\n  dbname: orders\n  table_prefix: app_\n",
                "b",
            )
            .unwrap(),
        );
        assert_eq!(
            c.url,
            format!(
                "{}?dbname=orders&host=db.local&password=hunter2&port=5433&user=app",
                tidemill_sql::SqlConfig::default().url
            )
        );
        assert_eq!(c.table_prefix, "app_");
        for debug in [format!("{c:?}"), format!("{c:#?}")] {
            assert!(!debug.contains("hunter2"), "{debug}");
        }
        let e = from_file(
            "app.toml",
            "[broker]\ntype = \"postgres\"\nsslmode = [\"require\"]\n",
            "broker",
        )
        .unwrap_err();
        assert!(e.to_string().contains("option `sslmode`"), "{e}");
        let e = from_file(
            "app.toml",
            "[broker]\ntype = \"postgres\"\nleese = \"1m\"\n",
            "broker",
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown option `leese`"), "{e}");
    }

    #[cfg(feature = "postgres")]
    #[test]
    fn postgres_hides_the_password() {
        let c =
            BrokerConfig::from_url("postgres://app:hunter2@db:5432/app?lease=45s&sslmode=require")
                .unwrap();
        for debug in [format!("{c:?}"), format!("{c:#?}")] {
            assert!(!debug.contains("hunter2"), "{debug}");
            assert!(debug.contains("db:5432/app?sslmode=require"), "{debug}");
            assert!(debug.starts_with("Postgres("), "{debug}");
        }
        let secrets = c.secrets();
        assert!(secrets.iter().any(|s| s == "hunter2"), "{secrets:?}");
        assert!(!secrets.iter().any(|s| s.contains("db")), "{secrets:?}");
        // A password in the query is a credential too.
        let c = BrokerConfig::from_url("postgres://db/app?user=app&password=hunter2").unwrap();
        for debug in [format!("{c:?}"), format!("{c:#?}")] {
            assert!(!debug.contains("hunter2"), "{debug}");
        }
        assert!(c.secrets().iter().any(|s| s == "hunter2"));
        for url in [
            "postgres://app:hunter2@db:5432/app?no_such_option=1",
            "postgresql://:hunter2@db:5432/app?prefetch=many",
            "postgres://app:hunter2@db/app?prefetch=0",
            "postgres://db/app?password=hunter2&lease=never",
        ] {
            let e = BrokerConfig::from_url(url).unwrap_err();
            let text = assert_discreet(&e);
            assert!(text.contains("postgres configuration"), "{text}");
        }
    }

    /// A database that is not there: the error names the address, never the password.
    #[cfg(feature = "postgres")]
    #[tokio::test]
    async fn postgres_connect_errors_hide_the_password() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("postgres://app:hunter2@127.0.0.1:{port}/app?connect_timeout=2s");
        let e = BrokerConfig::from_url(&url)
            .unwrap()
            .connect()
            .await
            .unwrap_err();
        let text = assert_discreet(&e);
        assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
    }

    /// Through the facade to the test PostgreSQL (`TIDEMILL_POSTGRES_URL`; skipped when
    /// unset).
    #[cfg(feature = "postgres")]
    #[tokio::test]
    async fn postgres_round_trip() {
        use futures::StreamExt;
        let Ok(url) = std::env::var("TIDEMILL_POSTGRES_URL") else {
            eprintln!("SKIP postgres_round_trip: TIDEMILL_POSTGRES_URL is not set");
            return;
        };
        // Tables of its own: the adapter's tests share the database.
        let sep = if url.contains('?') { '&' } else { '?' };
        let url = format!("{url}{sep}table_prefix=tidemill_facade_");
        let broker = connect(&url).await.unwrap();
        assert_eq!(broker.kind, BrokerKind::Postgres);
        let topic = format!("facade-{}", std::process::id());
        let mut s = broker
            .subscriber
            .subscribe(&topic, tidemill_core::SubscribeOptions::new())
            .await
            .unwrap();
        broker
            .publisher
            .publish_one(&topic, tidemill_core::Message::new("x").with_key("k"))
            .await
            .unwrap();
        let d = tokio::time::timeout(std::time::Duration::from_secs(30), s.next())
            .await
            .expect("delivered within 30 s")
            .unwrap()
            .unwrap();
        assert_eq!(d.message().payload().as_ref(), b"x");
        assert_eq!(d.message().key_str(), Some("k"));
        d.ack().await.unwrap();
    }

    /// A server that is not there: the error names the address, never the password.
    #[cfg(feature = "redis")]
    #[tokio::test]
    async fn redis_connect_errors_hide_the_password() {
        // A port that was free a moment ago: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("redis://app:hunter2@127.0.0.1:{port}/0?connect_timeout=2s");
        let e = BrokerConfig::from_url(&url)
            .unwrap()
            .connect()
            .await
            .unwrap_err();
        let text = assert_discreet(&e);
        assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
    }

    /// Through the facade to the test Redis (`TIDEMILL_REDIS_URL`; skipped when unset).
    #[cfg(feature = "redis")]
    #[tokio::test]
    async fn redis_round_trip() {
        use futures::StreamExt;
        let Ok(url) = std::env::var("TIDEMILL_REDIS_URL") else {
            eprintln!("SKIP redis_round_trip: TIDEMILL_REDIS_URL is not set");
            return;
        };
        let broker = connect(&url).await.unwrap();
        assert_eq!(broker.kind, BrokerKind::Redis);
        let topic = format!("facade-{}", std::process::id());
        let mut s = broker
            .subscriber
            .subscribe(&topic, tidemill_core::SubscribeOptions::new())
            .await
            .unwrap();
        broker
            .publisher
            .publish_one(&topic, tidemill_core::Message::new("x").with_key("k"))
            .await
            .unwrap();
        let d = tokio::time::timeout(std::time::Duration::from_secs(30), s.next())
            .await
            .expect("delivered within 30 s")
            .unwrap()
            .unwrap();
        assert_eq!(d.message().payload().as_ref(), b"x");
        assert_eq!(d.message().key_str(), Some("k"));
        d.ack().await.unwrap();
    }

    #[test]
    fn files_in_toml_and_yaml() {
        let dir = std::env::temp_dir().join(format!("tidemill-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let toml = dir.join("app.toml");
        std::fs::write(
            &toml,
            "[broker]\nurl = \"memory://?retention=3\"\ncapacity = 9\n",
        )
        .unwrap();
        let c = memory(BrokerConfig::from_file(&toml, "broker").unwrap());
        assert_eq!(
            c,
            MemoryConfig {
                capacity: 9,
                retention: 3
            }
        );
        let yaml = dir.join("app.yaml");
        std::fs::write(&yaml, "messaging:\n  type: memory\n  capacity: 11\n").unwrap();
        let c = memory(BrokerConfig::from_file(&yaml, "messaging").unwrap());
        assert_eq!(c.capacity, 11);
        let e = BrokerConfig::from_file(&yaml, "nope")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`nope`"), "{e}");
        std::fs::write(&toml, "[broker]\ncapacity = 9\n").unwrap();
        let e = BrokerConfig::from_file(&toml, "broker")
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs `url"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn environment_variables() {
        // The only test touching these variables.
        let from_env = |url: &str, retention: &str| {
            std::env::set_var(BROKER_ENV, url);
            std::env::set_var("TIDEMILL_BROKER__RETENTION", retention);
            let config = BrokerConfig::from_env();
            std::env::remove_var(BROKER_ENV);
            std::env::remove_var("TIDEMILL_BROKER__RETENTION");
            config
        };
        let c = memory(from_env("memory://?capacity=5", "2").unwrap());
        assert_eq!(
            c,
            MemoryConfig {
                capacity: 5,
                retention: 2
            }
        );
        // Text from the environment is held to the same rules as the URL.
        let e = from_env("memory://", "-1").unwrap_err().to_string();
        assert!(
            e.contains(&format!(
                "option `retention`: expected an integer from 0 to {}, got `-1`",
                usize::MAX
            )),
            "{e}"
        );
        let e = from_env("memory://", "1.5").unwrap_err().to_string();
        assert!(e.contains("`retention`") && e.contains("got `1.5`"), "{e}");
        let e = from_env("memory://u:hunter2@h", "1").unwrap_err();
        assert_discreet(&e);
        // PostgreSQL: connection parameters from the environment join the URL's query.
        #[cfg(feature = "postgres")]
        {
            std::env::set_var(BROKER_ENV, "postgres://app:hunter2@db/app?sslmode=require");
            std::env::set_var("TIDEMILL_BROKER__APPLICATION_NAME", "orders");
            std::env::set_var("TIDEMILL_BROKER__LEASE", "1m");
            let config = BrokerConfig::from_env();
            std::env::remove_var(BROKER_ENV);
            std::env::remove_var("TIDEMILL_BROKER__APPLICATION_NAME");
            std::env::remove_var("TIDEMILL_BROKER__LEASE");
            let BrokerConfig::Postgres(c) = config.unwrap() else {
                panic!("expected postgres")
            };
            assert_eq!(
                c.url,
                "postgres://app:hunter2@db/app?sslmode=require&application_name=orders"
            );
            assert_eq!(c.lease, std::time::Duration::from_secs(60));
        }
        // AWS: the region from the URL, options (an endpoint among them) from variables.
        #[cfg(feature = "aws")]
        {
            std::env::set_var(BROKER_ENV, "sqs://eu-west-1");
            std::env::set_var("TIDEMILL_BROKER__ENDPOINT", "http://127.0.0.1:4567");
            std::env::set_var("TIDEMILL_BROKER__VISIBILITY_TIMEOUT", "45s");
            let config = BrokerConfig::from_env();
            std::env::remove_var(BROKER_ENV);
            std::env::remove_var("TIDEMILL_BROKER__ENDPOINT");
            std::env::remove_var("TIDEMILL_BROKER__VISIBILITY_TIMEOUT");
            let BrokerConfig::Aws(c) = config.unwrap() else {
                panic!("expected aws")
            };
            assert_eq!(c.region.as_deref(), Some("eu-west-1"));
            assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:4567"));
            assert_eq!(c.visibility_timeout, std::time::Duration::from_secs(45));
        }
    }

    /// The message, and every source's, without the password `hunter2`.
    fn assert_discreet(err: &dyn std::error::Error) -> String {
        let mut text = err.to_string();
        let mut source = err.source();
        while let Some(s) = source {
            text = format!("{text}: {s}");
            source = s.source();
        }
        let debug = format!("{err:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(!debug.contains("hunter2"), "{debug}");
        text
    }

    fn capacity_range() -> String {
        format!(
            "option `capacity`: expected an integer from 1 to {}",
            usize::MAX
        )
    }

    #[test]
    fn credentials_in_a_memory_url_are_not_echoed() {
        let e = BrokerConfig::from_url("memory://user:hunter2@somehost:1234/x").unwrap_err();
        let text = assert_discreet(&e);
        assert!(text.contains("takes no host"), "{text}");
        assert!(text.contains("memory://***@somehost:1234/x"), "{text}");
        assert!(!text.contains("user:"), "{text}");
    }

    #[test]
    fn scheme_less_urls_are_shown_without_credentials() {
        for url in [
            "user:hunter2@somehost:1234",
            "user:hunter2@somehost:1234/x?a=1",
            "user:hunter2@host/x://y",
            "nats:/user:hunter2@host",
        ] {
            let e = BrokerConfig::from_url(url).unwrap_err();
            let text = assert_discreet(&e);
            assert!(text.contains("has no scheme"), "{text}");
            assert!(text.contains("***@"), "{text}");
        }
    }

    #[test]
    fn other_url_mistakes_do_not_echo_credentials() {
        for url in [
            "sqs://user:hunter2@host",
            "memory://?password",
            "memory://?capacity=1&password=hunter2",
            "pubsub://user:hunter2@project",
            "memory://?password=hunter2&capacity=-1",
        ] {
            assert_discreet(&BrokerConfig::from_url(url).unwrap_err());
        }
        #[cfg(feature = "kafka")]
        {
            let e = BrokerConfig::from_url("kafka://user:hunter2@h:9092").unwrap_err();
            let text = assert_discreet(&e);
            assert!(text.contains("sasl"), "{text}");
        }
    }

    #[test]
    fn negative_capacity_names_the_range() {
        let e = BrokerConfig::from_url("memory://?capacity=-5").unwrap_err();
        assert!(matches!(&e, ConfigError::Invalid { source, .. } if source.option() == "capacity"));
        assert_eq!(
            e.to_string(),
            format!(
                "invalid memory configuration: {}, got `-5`",
                capacity_range()
            )
        );
    }

    #[test]
    fn scientific_notation_is_not_an_integer() {
        let e = err("memory://?capacity=1e3");
        assert_eq!(
            e,
            format!(
                "invalid memory configuration: {}, got `1e3`",
                capacity_range()
            )
        );
    }

    #[test]
    fn too_large_capacity_names_the_range() {
        let e = err("memory://?capacity=99999999999999999999999");
        assert_eq!(
            e,
            format!(
                "invalid memory configuration: {}, got `99999999999999999999999`",
                capacity_range()
            )
        );
        let e = err(&format!("memory://?capacity={}", "9".repeat(50)));
        assert!(e.contains(&capacity_range()), "{e}");
    }

    #[test]
    fn zero_capacity_is_refused() {
        let e = err("memory://?capacity=0");
        assert_eq!(
            e,
            format!(
                "invalid memory configuration: {}, got `0`",
                capacity_range()
            )
        );
        let e = MemoryConfig {
            capacity: 0,
            retention: 0,
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("capacity must be an integer from 1 to"), "{e}");
        // A retention of 0 means "none" and stays allowed.
        assert_eq!(
            memory(BrokerConfig::from_url("memory://?retention=0").unwrap()).retention,
            0
        );
    }

    /// Writes `contents` to a fresh file named `name` and reads section `section` of it.
    fn from_file(name: &str, contents: &str, section: &str) -> Result<BrokerConfig, ConfigError> {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("tidemill-strict-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        let result = BrokerConfig::from_file(&path, section);
        std::fs::remove_dir_all(&dir).ok();
        result
    }

    #[test]
    fn fractional_numbers_are_not_rounded() {
        let range = format!(
            "option `retention`: expected an integer from 0 to {}",
            usize::MAX
        );
        for (contents, got) in [
            ("[broker]\ntype = \"memory\"\nretention = 1.5\n", "1.5"),
            ("[broker]\ntype = \"memory\"\nretention = 2.0\n", "2.0"),
            ("[broker]\ntype = \"memory\"\nretention = 1e3\n", "1000.0"),
        ] {
            let e = from_file("app.toml", contents, "broker")
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("{range}, got {got}")), "{e}");
        }
        let e = err("memory://?retention=1.5");
        assert!(e.contains(&format!("{range}, got `1.5`")), "{e}");
    }

    #[test]
    fn yaml_yes_and_true_are_not_one() {
        let range = format!(
            "option `retention`: expected an integer from 0 to {}",
            usize::MAX
        );
        let e = from_file(
            "app.yaml",
            "broker:\n  type: memory\n  retention: yes\n",
            "broker",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains(&format!("{range}, got `yes`")), "{e}");
        let e = from_file(
            "app.yaml",
            "broker:\n  type: memory\n  retention: true\n",
            "broker",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains(&format!("{range}, got true (a boolean)")), "{e}");
        let e = err("memory://?retention=on");
        assert!(e.contains(&format!("{range}, got `on`")), "{e}");
    }

    #[test]
    fn negative_and_huge_numbers_in_files() {
        let e = from_file(
            "app.yaml",
            "broker:\n  type: memory\n  capacity: -5\n",
            "broker",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains(&format!("{}, got -5", capacity_range())), "{e}");
        let e = from_file(
            "app.toml",
            "[broker]\ntype = \"memory\"\ncapacity = 0\n",
            "broker",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains(&format!("{}, got 0", capacity_range())), "{e}");
        // YAML reads an integer beyond 64 bits as a float, TOML refuses it: both get the
        // option's range all the same.
        let e = from_file(
            "app.yaml",
            "broker:\n  type: memory\n  capacity: 99999999999999999999999\n",
            "broker",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(&format!("{}, got 1e23", capacity_range())),
            "{e}"
        );
        let e = from_file(
            "app.toml",
            "[broker]\ntype = \"memory\" # in memory\ncapacity = 99_999_999_999_999_999_999_999 # big\n",
            "broker",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(&format!(
                "{}, got `99999999999999999999999`",
                capacity_range()
            )),
            "{e}"
        );
    }

    #[test]
    fn conflicting_url_and_type_is_an_error() {
        let e = from_file(
            "app.toml",
            "[broker]\nurl = \"memory://?capacity=3\"\ntype = \"kafka\"\n",
            "broker",
        )
        .unwrap_err();
        let text = assert_discreet(&e);
        assert!(matches!(e, ConfigError::Section { .. }), "{e:?}");
        assert!(
            text.contains(
                "`url = \"memory://?capacity=3\"` (memory) and `type = \"kafka\"`, which disagree"
            ),
            "{text}"
        );
        // The URL is shown without its credentials.
        let e = from_file(
            "app.yaml",
            "broker:\n  url: amqp://app:hunter2@rabbit:5672/%2f\n  type: nats\n",
            "broker",
        )
        .unwrap_err();
        let text = assert_discreet(&e);
        assert!(text.contains("amqp://***@rabbit:5672/%2f"), "{text}");
        // Agreeing names (aliases included) are fine.
        let c = from_file(
            "app.toml",
            "[broker]\nurl = \"memory://?capacity=3\"\ntype = \"mem\"\n",
            "broker",
        )
        .unwrap();
        assert_eq!(memory(c).capacity, 3);
        let e = from_file("app.toml", "[broker]\nurl = 5\n", "broker").unwrap_err();
        assert!(e.to_string().contains("`url` that is not a string"), "{e}");
    }

    #[test]
    fn file_errors_do_not_quote_the_file() {
        let e = from_file(
            "app.toml",
            "[broker]\nurl = \"amqp://app:hunter2@rabbit/%2f\" oops\n",
            "broker",
        )
        .unwrap_err();
        let text = assert_discreet(&e);
        assert!(matches!(e, ConfigError::File { .. }), "{e:?}");
        assert!(text.contains("line 2"), "{text}");
    }

    #[test]
    fn strict_booleans() {
        #[cfg(feature = "nats")]
        {
            let c = from_file("app.yaml", "b:\n  type: nats\n  jetstream: off\n", "b").unwrap();
            let BrokerConfig::Nats(c) = c else {
                panic!("expected nats")
            };
            assert_eq!(c.mode, tidemill_nats::NatsMode::Core);
            let e = err("nats://h:1?jetstream=perhaps");
            assert!(
                e.contains("option `jetstream`: expected true or false") && e.contains("`perhaps`"),
                "{e}"
            );
            assert!(err("nats://h:1?jetstream=2").contains("expected true or false"));
        }
        #[cfg(feature = "kafka")]
        {
            let e = err("kafka://h:1?create_topics=2");
            assert!(
                e.contains("option `create_topics`: expected true or false, got `2`"),
                "{e}"
            );
        }
        #[cfg(feature = "amqp")]
        {
            let e = err("amqp://h:1/%2f?persistent=1.0");
            assert!(
                e.contains("option `persistent`: expected true or false"),
                "{e}"
            );
        }
    }

    #[cfg(feature = "amqp")]
    #[test]
    fn adapter_integer_ranges_are_named() {
        let range = "option `prefetch`: expected an integer from 0 to 65535";
        for (value, got) in [
            ("70000", "`70000`"),
            ("-1", "`-1`"),
            ("1.5", "`1.5`"),
            ("yes", "`yes`"),
        ] {
            let e = err(&format!("amqp://guest:hunter2@h:1/%2f?prefetch={value}"));
            assert!(e.contains(&format!("{range}, got {got}")), "{e}");
            assert!(!e.contains("hunter2"), "{e}");
        }
        let e = from_file(
            "app.toml",
            "[broker]\nurl = \"amqp://guest:hunter2@h:1/%2f\"\nprefetch = 1.5\n",
            "broker",
        )
        .unwrap_err();
        let text = assert_discreet(&e);
        assert!(text.contains(&format!("{range}, got 1.5")), "{text}");
    }

    #[test]
    fn memory_debug_is_plain() {
        let c = BrokerConfig::from_url("memory://?capacity=7").unwrap();
        assert_eq!(
            format!("{c:?}"),
            "Memory(MemoryConfig { capacity: 7, retention: 0 })"
        );
        assert!(format!("{c:#?}").contains("\n    MemoryConfig {\n        capacity: 7,"));
    }

    #[cfg(feature = "amqp")]
    #[test]
    fn amqp_debug_hides_the_password() {
        let c = BrokerConfig::from_url("amqp://app:hunter2@rabbit:5672/%2f?prefetch=7").unwrap();
        for debug in [format!("{c:?}"), format!("{c:#?}")] {
            assert!(!debug.contains("hunter2"), "{debug}");
            assert!(debug.contains("rabbit:5672"), "{debug}");
        }
    }

    #[cfg(feature = "nats")]
    #[test]
    fn nats_debug_hides_passwords_and_tokens() {
        let c = BrokerConfig::from_url(
            "nats://app:hunter2@h1:4222,tok-hunter2@h2:4222?password=hunter2&token=hunter2",
        )
        .unwrap();
        for debug in [format!("{c:?}"), format!("{c:#?}")] {
            assert!(!debug.contains("hunter2"), "{debug}");
            assert!(
                debug.contains("h1:4222") && debug.contains("h2:4222"),
                "{debug}"
            );
        }
    }

    #[cfg(feature = "kafka")]
    #[test]
    fn kafka_debug_hides_sasl_secrets() {
        let c = BrokerConfig::from_url(
            "kafka://h:9092?properties.sasl.password=hunter2&properties.sasl.username=app",
        )
        .unwrap();
        for debug in [format!("{c:?}"), format!("{c:#?}")] {
            assert!(!debug.contains("hunter2"), "{debug}");
            assert!(debug.contains("h:9092"), "{debug}");
        }
    }

    #[cfg(feature = "nats")]
    #[test]
    fn the_credentials_of_a_configuration_are_known() {
        let c = BrokerConfig::from_url("nats://app:hunter2@h1:4222?password=hunter3&token=hunter4")
            .unwrap();
        let secrets = c.secrets();
        for s in ["hunter2", "hunter3", "hunter4"] {
            assert!(secrets.iter().any(|x| x == s), "{s} not in {secrets:?}");
        }
        assert!(!secrets.iter().any(|x| x.contains("h1")), "{secrets:?}");
    }

    #[test]
    fn connection_errors_lose_the_credentials() {
        let source: tidemill_core::BoxError =
            "handshake with amqp://app:hunter2@rabbit/%2f failed: user app, password hunter2 refused"
                .into();
        let e = tidemill_core::Error::Connect {
            broker: "amqp",
            address: "amqp://app:hunter2@rabbit/%2f".to_owned(),
            source,
        };
        let e = discreet_error(e, &["hunter2".to_owned()]);
        let text = assert_discreet(&e);
        assert!(text.contains("amqp://***@rabbit/%2f"), "{text}");
        // Nothing to hide: the error (and its chain) is kept as it was.
        let e = tidemill_core::Error::config("amqp", "prefetch is too large");
        assert_eq!(
            discreet_error(e, &["hunter2".to_owned()]).to_string(),
            "amqp: invalid configuration: prefetch is too large"
        );
    }

    #[tokio::test]
    async fn connecting_to_memory_gives_a_working_pair() {
        use futures::StreamExt;
        let broker = connect("memory://").await.unwrap();
        assert_eq!(broker.kind, BrokerKind::Memory);
        let mut s = broker
            .subscriber
            .subscribe("t", tidemill_core::SubscribeOptions::new())
            .await
            .unwrap();
        broker
            .publisher
            .publish_one("t", tidemill_core::Message::new("x"))
            .await
            .unwrap();
        let d = s.next().await.unwrap().unwrap();
        assert_eq!(d.message().payload().as_ref(), b"x");
    }
}
