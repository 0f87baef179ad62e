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
//!
//! Query parameters set any field of the adapter's config type (`KafkaConfig`,
//! `AmqpConfig`, `NatsConfig`, `GoogleCloudConfig`, [`MemoryConfig`]), named as in its
//! docs; one level of nesting goes with a dot (`jetstream.ack_wait=30s`,
//! `properties.linger.ms=5`). Durations are humantime strings (`250ms`, `30s`). Unknown
//! schemes, brokers this build lacks, unknown options and bad values are errors naming the
//! offending part.
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
    #[error("broker URL `{0}` has no scheme: expected memory://, kafka://, amqp://, nats:// or pubsub://")]
    NoScheme(String),
    /// The scheme names no broker Tidemill knows.
    #[error("unknown broker scheme `{0}`: expected memory, kafka, amqp, amqps, nats or pubsub")]
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
        let file = config::Config::builder()
            .add_source(config::File::from(path))
            .build()
            .map_err(|e| ConfigError::File {
                path: shown.clone(),
                message: discreet_message(&e.to_string()),
            })?;
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
                let (kind, options) = url_options(&url)?;
                if let Some(named) = named.filter(|named| *named != kind) {
                    return Err(section_err(format!(
                        "has `url = \"{}\"` ({kind}) and `type = \"{named}\"`, which disagree: \
                         keep one of them",
                        redact_url(&url)
                    )));
                }
                (kind, options)
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

    /// The credentials in this configuration (to keep them out of error messages).
    fn secrets(&self) -> Vec<String> {
        let raw: String = match self {
            BrokerConfig::Memory(c) => format!("{c:?}"),
            #[cfg(feature = "kafka")]
            BrokerConfig::Kafka(c) => format!("{c:?}"),
            #[cfg(feature = "amqp")]
            BrokerConfig::Amqp(c) => format!("{c:?} {}", c.url),
            #[cfg(feature = "nats")]
            BrokerConfig::Nats(c) => format!("{c:?}"),
            #[cfg(feature = "googlecloud")]
            BrokerConfig::GoogleCloud(c) => format!("{c:?}"),
        };
        crate::redact::secrets_in_debug(&raw)
    }

    async fn connect_inner(&self) -> tidemill_core::Result<Broker> {
        let kind = self.kind();
        let (publisher, subscriber): (Arc<dyn Publisher>, Arc<dyn Subscriber>) = match self {
            BrokerConfig::Memory(config) => {
                let broker = MemoryBroker::with_config(config.clone());
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
        };
        Ok(Broker {
            kind,
            publisher,
            subscriber,
        })
    }

    fn build(kind: BrokerKind, options: Options) -> Result<Self, ConfigError> {
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
    let is_scheme = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !is_scheme {
        // `user:pass@host/x://…`: whatever this is, it starts with no scheme.
        return Err(no_scheme());
    }
    let kind = BrokerKind::from_name(scheme)
        .ok_or_else(|| ConfigError::UnknownScheme(scheme.to_owned()))?;
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
            let url = servers
                .split(',')
                .map(|s| format!("nats://{s}"))
                .collect::<Vec<_>>()
                .join(",");
            options.insert("url".to_owned(), Value::from(url));
            // `jetstream=true|false` picks the mode; `jetstream.<option>=…` configures it.
            let is_switch = options
                .get("jetstream")
                .is_some_and(|v| !matches!(v.kind, ValueKind::Table(_)));
            let switch = if is_switch {
                options.remove("jetstream")
            } else {
                None
            };
            if let Some(js) = switch {
                let on = strict::parse_bool(&js).ok_or_else(|| ConfigError::Invalid {
                    kind,
                    source: OptionError::invalid(
                        "jetstream",
                        "true or false (or JetStream options as jetstream.<option>=…)",
                        &js,
                    ),
                })?;
                let mode = if on { "jet_stream" } else { "core" };
                options.insert("mode".to_owned(), Value::from(mode));
            }
        }
        BrokerKind::GoogleCloud => {
            let project = base.trim_end_matches('/');
            if project.is_empty() {
                return Err(ConfigError::Missing {
                    kind,
                    message: "pubsub:// needs a project: pubsub://my-project".to_owned(),
                });
            }
            if project.contains(['@', ':', '/']) {
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
    }
    Ok((kind, options))
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
            err("redis://localhost"),
            "unknown broker scheme `redis`: expected memory, kafka, amqp, amqps, nats or pubsub"
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
        std::env::set_var(BROKER_ENV, "memory://?capacity=5");
        std::env::set_var("TIDEMILL_BROKER__RETENTION", "2");
        let config = BrokerConfig::from_env();
        std::env::remove_var(BROKER_ENV);
        std::env::remove_var("TIDEMILL_BROKER__RETENTION");
        let c = memory(config.unwrap());
        assert_eq!(
            c,
            MemoryConfig {
                capacity: 5,
                retention: 2
            }
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
