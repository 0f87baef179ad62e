//! # Tidemill
//!
//! Broker-agnostic messaging for Rust, in the spirit of Go's Watermill: write handlers once
//! against one small API and run them on the embedded in-memory broker, Kafka, RabbitMQ,
//! NATS JetStream, Google Cloud Pub/Sub, Redis Streams, PostgreSQL or AWS SQS/SNS by
//! changing configuration.
//!
//! This facade is the one dependency users need. It re-exports [`tidemill_core`] (the
//! [`Message`] model, the [`Publisher`] and [`Subscriber`] traits, [`Delivery`]
//! acknowledgements, the [`Router`] with its handler [extractors](extract) such as
//! [`State`](extract::State) and [`Json`](extract::Json), the [marshalers](marshal) and the
//! embedded [`MemoryBroker`]) and, behind features, the rest:
//!
//! | feature | module | crate |
//! |---|---|---|
//! | `middleware` (default) | [`middleware`] | reliability layers and request-reply |
//! | `cqrs` (default) | [`cqrs`] | typed command and event buses |
//! | `kafka` | `kafka` | Kafka adapter |
//! | `amqp` | `amqp` | RabbitMQ adapter |
//! | `nats` | `nats` | NATS adapter (JetStream and core) |
//! | `googlecloud` | `googlecloud` | Google Cloud Pub/Sub adapter |
//! | `redis` | `redis` | Redis Streams adapter |
//! | `postgres` | `sql` | PostgreSQL adapter: pub/sub over tables, transactional outbox, inbox |
//! | `aws` | `aws` | AWS adapter: SNS topics fanning out to SQS queues, or plain SQS queues |
//! | `otel` | `otel` | OpenTelemetry trace context in message metadata, publisher metrics |
//!
//! Every feature, as `Cargo.toml` declares it:
#![doc = document_features::document_features!()]
//!
//! The router records metrics through the [`metrics`](https://docs.rs/metrics) facade
//! whenever the application installed a recorder, and reports
//! [`Router::health`](router::Router::health) for readiness and liveness probes.
//!
//! [`BrokerConfig`] picks the broker from a URL, a file or the environment:
//!
//! ```
//! use tidemill::{BrokerConfig, Message, Publisher, SubscribeOptions, Subscriber};
//! use futures::StreamExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // "kafka://127.0.0.1:9092", "nats://127.0.0.1:4222", … with the matching feature.
//! let broker = BrokerConfig::from_url("memory://")?.connect().await?;
//! let mut orders = broker.subscriber.subscribe("orders", SubscribeOptions::new()).await?;
//! broker.publisher.publish_one("orders", Message::new("tea x2")).await?;
//! let delivery = orders.next().await.expect("open")?;
//! println!("got {}", delivery.message());
//! delivery.ack().await?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]
#![forbid(unsafe_code)]
// docs.rs (and `RUSTDOCFLAGS="--cfg docsrs" cargo +nightly doc --all-features`) labels each
// feature-gated item with the feature it needs.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod broker;
mod redact;
mod strict;

pub use broker::{
    connect, Broker, BrokerConfig, BrokerKind, ConfigError, ConnectError, OptionError,
};
pub use tidemill_core::*;

/// Reliability middleware and request-reply ([`tidemill_middleware`]).
#[cfg(feature = "middleware")]
pub use tidemill_middleware as middleware;

/// Typed command and event buses ([`tidemill_cqrs`]).
#[cfg(feature = "cqrs")]
pub use tidemill_cqrs as cqrs;

/// The Kafka adapter ([`tidemill_kafka`]).
#[cfg(feature = "kafka")]
pub use tidemill_kafka as kafka;

/// The RabbitMQ adapter ([`tidemill_amqp`]).
#[cfg(feature = "amqp")]
pub use tidemill_amqp as amqp;

/// The NATS adapter ([`tidemill_nats`]).
#[cfg(feature = "nats")]
pub use tidemill_nats as nats;

/// The Google Cloud Pub/Sub adapter ([`tidemill_googlecloud`]).
#[cfg(feature = "googlecloud")]
pub use tidemill_googlecloud as googlecloud;

/// The Redis Streams adapter ([`tidemill_redis`]).
#[cfg(feature = "redis")]
pub use tidemill_redis as redis;

/// The PostgreSQL adapter ([`tidemill_sql`]): pub/sub over tables, the transactional
/// outbox with its forwarder, the inbox.
#[cfg(feature = "postgres")]
pub use tidemill_sql as sql;

/// The AWS SQS and SNS adapter ([`tidemill_aws`]).
#[cfg(feature = "aws")]
pub use tidemill_aws as aws;

/// OpenTelemetry trace context and publisher metrics ([`tidemill_otel`]).
#[cfg(feature = "otel")]
pub use tidemill_otel as otel;

#[cfg(feature = "otel")]
impl Broker {
    /// This broker with its publisher wrapped in
    /// [`InstrumentedPublisher`](tidemill_otel::InstrumentedPublisher) (its
    /// `messaging.system` named after the broker): every publish through it, by the router,
    /// buses, layers or the application, runs in a producer span whose trace context
    /// travels in the messages' metadata, and is counted in the publisher metrics.
    pub fn instrumented(self) -> Broker {
        let system = match self.kind {
            BrokerKind::Memory => "tidemill_memory",
            BrokerKind::Kafka => "kafka",
            BrokerKind::Amqp => "rabbitmq",
            BrokerKind::Nats => "nats",
            BrokerKind::GoogleCloud => "gcp_pubsub",
            BrokerKind::Redis => "redis",
            BrokerKind::Postgres => "postgres",
            // OpenTelemetry's name for SQS (publishes may go through SNS first).
            BrokerKind::Aws => "aws_sqs",
        };
        Broker {
            publisher: std::sync::Arc::new(
                tidemill_otel::InstrumentedPublisher::new(self.publisher).system(system),
            ),
            ..self
        }
    }
}

/// The README's Rust examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
