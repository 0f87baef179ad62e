//! The Kafka [`Backend`] of the conformance suite and the middleware checks, against the
//! Kafka-protocol broker of tests/brokers (Tansu; `TIDEMILL_KAFKA_BROKERS`).

#![allow(dead_code)]

use std::sync::Arc;

use async_trait::async_trait;
use tidemill_core::{Publisher, Result, Subscriber};
use tidemill_kafka::{KafkaConfig, KafkaPublisher, KafkaSubscriber, StartFrom};
use tidemill_testkit::{Backend, Features};

/// A Kafka backend: one configuration, a fresh client per publisher and subscriber.
pub struct KafkaBackend {
    /// The configuration of every client.
    pub config: KafkaConfig,
}

impl KafkaBackend {
    /// `TIDEMILL_KAFKA_BROKERS` with a group prefix of its own, changed by `tweak`.
    pub fn new(tweak: impl FnOnce(&mut KafkaConfig)) -> Self {
        let brokers = std::env::var("TIDEMILL_KAFKA_BROKERS")
            .unwrap_or_else(|_| panic!("TIDEMILL_KAFKA_BROKERS is not set"));
        let mut config = test_config(&brokers);
        tweak(&mut config);
        KafkaBackend { config }
    }
}

/// A configuration for `brokers` with a group prefix of its own; sets up test logging.
pub fn test_config(brokers: &str) -> KafkaConfig {
    // RUST_LOG=tidemill_kafka=debug shows what the adapter does.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut config = KafkaConfig::new(brokers);
    // The suite's group names are fixed; a prefix per backend (per test) keeps tests
    // running at the same time, and members left behind by an earlier run that was
    // killed, out of each other's groups (a dead member holds up its group's
    // rebalances until its session times out).
    config.group_prefix = format!("{}.", tidemill_testkit::unique_topic("group"));
    config
}

#[async_trait]
impl Backend for KafkaBackend {
    fn features(&self) -> Features {
        Features {
            consumer_groups: true,
            order_per_key: true,
            persistent: true,
            replays_old_messages: self.config.start_from == StartFrom::Earliest,
            redelivers_on_nack: true,
            delivery_attempt: true,
            // Run with a broker restart in tests/restart.rs.
            reconnect: false,
        }
    }

    async fn publisher(&self) -> Result<Arc<dyn Publisher>> {
        Ok(Arc::new(
            KafkaPublisher::connect(self.config.clone()).await?,
        ))
    }

    async fn subscriber(&self) -> Result<Arc<dyn Subscriber>> {
        Ok(Arc::new(
            KafkaSubscriber::connect(self.config.clone()).await?,
        ))
    }
}
