//! The backend-generic middleware checks of tidemill-middleware (feature `testing`) against
//! the Pub/Sub emulator of tests/brokers (`PUBSUB_EMULATOR_HOST`): dead letter after
//! `max_deliveries` and request-reply round trips (reply, error reply, streamed reply,
//! timeout).
//!
//! The emulator reports no delivery attempts (it has no dead-letter policies), so the
//! dead-letter layer counts durably: it republishes a failed message with its failure count
//! and acks the original once the copy is confirmed; the count survives replacing the
//! consumer midway. The checks create each group's subscription before publishing (a
//! Pub/Sub subscription only receives what is published after it exists).

use std::sync::Arc;

use async_trait::async_trait;
use tidemill_core::{Publisher, Result, Subscriber};
use tidemill_googlecloud::{GoogleCloudConfig, GoogleCloudPublisher, GoogleCloudSubscriber};
use tidemill_testkit::{Backend, Features};

/// Publishers and subscribers on the emulator.
struct PubSubBackend {
    config: GoogleCloudConfig,
}

impl PubSubBackend {
    fn new() -> Self {
        let host = std::env::var("PUBSUB_EMULATOR_HOST")
            .unwrap_or_else(|_| panic!("PUBSUB_EMULATOR_HOST is not set"));
        PubSubBackend {
            config: GoogleCloudConfig::emulator("tidemill-test", host),
        }
    }
}

#[async_trait]
impl Backend for PubSubBackend {
    fn features(&self) -> Features {
        Features {
            consumer_groups: true,
            order_per_key: false,
            // Group subscriptions keep messages while no subscriber runs.
            persistent: true,
            replays_old_messages: false,
            redelivers_on_nack: true,
            // No dead-letter policies on the emulator, hence no delivery attempts.
            delivery_attempt: false,
            // Not exercised by these checks (no disrupt).
            reconnect: false,
        }
    }

    async fn publisher(&self) -> Result<Arc<dyn Publisher>> {
        Ok(Arc::new(
            GoogleCloudPublisher::connect(self.config.clone()).await?,
        ))
    }

    async fn subscriber(&self) -> Result<Arc<dyn Subscriber>> {
        Ok(Arc::new(
            GoogleCloudSubscriber::connect(self.config.clone()).await?,
        ))
    }
}

mod pubsub_emulator {
    tidemill_middleware::middleware_tests!(
        skip_unless_env = "PUBSUB_EMULATOR_HOST",
        super::PubSubBackend::new()
    );
}
