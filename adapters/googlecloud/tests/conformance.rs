//! The universal conformance suite against the Pub/Sub emulator (`PUBSUB_EMULATOR_HOST`),
//! through a fault proxy so that `reconnect` can cut the connections (the emulator loses
//! its state on restart, so it is never restarted).

use std::sync::Arc;

use async_trait::async_trait;
use tidemill_core::{Publisher, Result, Subscriber};
use tidemill_googlecloud::{GoogleCloudConfig, GoogleCloudPublisher, GoogleCloudSubscriber};
use tidemill_testkit::fault_proxy::FaultProxy;
use tidemill_testkit::{Backend, Features};

/// Publishers and subscribers on the emulator, every connection through one fault proxy.
struct PubSubBackend {
    proxy: FaultProxy,
    config: GoogleCloudConfig,
}

impl PubSubBackend {
    async fn start() -> Self {
        let host = std::env::var("PUBSUB_EMULATOR_HOST")
            .unwrap_or_else(|_| panic!("PUBSUB_EMULATOR_HOST is not set"));
        let proxy = FaultProxy::start(host.as_str())
            .await
            .unwrap_or_else(|e| panic!("cannot start a fault proxy in front of {host}: {e}"));
        let config = GoogleCloudConfig::emulator("tidemill-test", proxy.addr().to_string());
        PubSubBackend { proxy, config }
    }
}

#[async_trait]
impl Backend for PubSubBackend {
    fn features(&self) -> Features {
        Features {
            consumer_groups: true,
            // The emulator ignores ordering keys (the mapping is unit-tested).
            order_per_key: false,
            // Group subscriptions keep messages while no subscriber runs (within the
            // emulator's life).
            persistent: true,
            replays_old_messages: false,
            redelivers_on_nack: true,
            // The emulator has no dead-letter policies, hence no delivery attempts.
            delivery_attempt: false,
            reconnect: true,
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

    async fn disrupt(&self) -> Result<()> {
        // Every gRPC stream and REST connection breaks; new connections get through.
        self.proxy.cut();
        Ok(())
    }
}

mod pubsub_emulator {
    tidemill_testkit::conformance_tests!(
        skip_unless_env = "PUBSUB_EMULATOR_HOST",
        super::PubSubBackend::start().await
    );
}
