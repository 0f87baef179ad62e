//! The Kafka [`Backend`] of the conformance suite and the middleware checks, against the
//! Kafka-protocol broker of brokers (Tansu; `TIDEMILL_KAFKA_BROKERS`).

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

/// The broker address, if the tests may stop and start that broker (brokers runs
/// it); `None` (with a note) when `TIDEMILL_KAFKA_BROKERS` is unset or points elsewhere.
pub fn managed_broker() -> Option<String> {
    let Ok(brokers) = std::env::var("TIDEMILL_KAFKA_BROKERS") else {
        eprintln!("SKIP: TIDEMILL_KAFKA_BROKERS is not set (no broker to test against)");
        return None;
    };
    let out = std::process::Command::new("bash")
        .arg(brokers_script())
        .arg("running")
        .output()
        .unwrap_or_else(|e| panic!("cannot run brokers.sh running: {e}"));
    let running = String::from_utf8_lossy(&out.stdout);
    if !running.split_whitespace().any(|n| n == "kafka") {
        eprintln!("SKIP: the Kafka broker at {brokers} is not managed by brokers");
        return None;
    }
    Some(brokers)
}

fn brokers_script() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../brokers/brokers.sh")
}

/// Runs `brokers.sh <command> kafka` (`down`, `up`, `restart`) and panics unless it
/// succeeded.
pub fn kafka_broker(command: &str) {
    let out = std::process::Command::new("bash")
        .arg(brokers_script())
        .arg(command)
        .arg("kafka")
        .output()
        .unwrap_or_else(|e| panic!("cannot run brokers.sh {command}: {e}"));
    eprint!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "brokers.sh {command} kafka failed: {}",
        out.status
    );
}

/// Stops the managed broker; starts it again when dropped unless [`StoppedBroker::start`]
/// did already (so a failing test does not leave it down).
pub struct StoppedBroker {
    up: bool,
}

impl StoppedBroker {
    /// Stops the broker (blocking).
    pub fn stop() -> Self {
        kafka_broker("down");
        StoppedBroker { up: false }
    }

    /// Starts it again and waits until it is ready (blocking).
    pub fn start(&mut self) {
        kafka_broker("up");
        self.up = true;
    }
}

impl Drop for StoppedBroker {
    fn drop(&mut self) {
        if !self.up {
            kafka_broker("up");
        }
    }
}
