//! The universal conformance suite against the Kafka-protocol broker of brokers
//! (Tansu; `TIDEMILL_KAFKA_BROKERS`). Every test uses topics of its own, so the modules run
//! in parallel with each other and with the rest of the workspace.
//!
//! `reconnect` needs the broker restarted, which would break every other test using it:
//! it runs in `tests/restart.rs`, `#[ignore]`d, which `make test` runs one at a time after
//! everything else.

mod common;

use common::KafkaBackend;

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
