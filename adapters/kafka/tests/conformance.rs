//! The universal conformance suite against the Kafka-protocol broker of tests/brokers
//! (Tansu; `TIDEMILL_KAFKA_BROKERS`). Every test uses topics of its own, so the modules run
//! in parallel with each other and with the rest of the workspace.
//!
//! `reconnect` needs the broker restarted, which would break every other test using it:
//! it runs in `tests/restart.rs`, `#[ignore]`d, which `make test` runs one at a time after
//! everything else.

use std::sync::Arc;

use async_trait::async_trait;
use tidemill_core::{Publisher, Result, Subscriber};
use tidemill_kafka::{KafkaConfig, KafkaPublisher, KafkaSubscriber, StartFrom};
use tidemill_testkit::{Backend, Features};

struct KafkaBackend {
    config: KafkaConfig,
}

impl KafkaBackend {
    fn new(tweak: impl FnOnce(&mut KafkaConfig)) -> Self {
        // RUST_LOG=tidemill_kafka=debug shows what the adapter does.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let brokers = std::env::var("TIDEMILL_KAFKA_BROKERS")
            .unwrap_or_else(|_| panic!("TIDEMILL_KAFKA_BROKERS is not set"));
        let mut config = KafkaConfig::new(brokers);
        // The suite's group names are fixed; a prefix per backend (per test) keeps tests
        // running at the same time, and members left behind by an earlier run that was
        // killed, out of each other's groups (a dead member holds up its group's
        // rebalances until its session times out).
        config.group_prefix = format!("{}.", tidemill_testkit::unique_topic("group"));
        tweak(&mut config);
        KafkaBackend { config }
    }
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

/// The default configuration: one partition per topic, subscriptions without a group
/// start at the end of the topic.
mod default_config {
    tidemill_testkit::conformance_tests!(
        skip_unless_env = "TIDEMILL_KAFKA_BROKERS",
        super::KafkaBackend::new(|_| {})
    );
}

/// New subscriptions (and new groups) start at the oldest message: they replay the topic.
mod from_earliest {
    tidemill_testkit::conformance_tests!(
        skip_unless_env = "TIDEMILL_KAFKA_BROKERS",
        super::KafkaBackend::new(|c| c.start_from = tidemill_kafka::StartFrom::Earliest)
    );
}
