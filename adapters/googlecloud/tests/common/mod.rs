//! The Pub/Sub [`Backend`] of the conformance suite and the middleware checks, against the
//! emulator of brokers (`PUBSUB_EMULATOR_HOST`).

#![allow(dead_code)] // each test crate uses part of this module

use std::sync::Arc;

use async_trait::async_trait;
use tidemill_core::{Publisher, Result, Subscriber};
use tidemill_googlecloud::{GoogleCloudConfig, GoogleCloudPublisher, GoogleCloudSubscriber};
use tidemill_testkit::fault_proxy::FaultProxy;
use tidemill_testkit::{Backend, Features};

/// Publishers and subscribers on the emulator, straight to it or every connection through
/// one fault proxy.
pub struct PubSubBackend {
    /// The fault proxy in front of the emulator, if any; with one, `disrupt` cuts the
    /// connections.
    proxy: Option<FaultProxy>,
    config: GoogleCloudConfig,
}

impl PubSubBackend {
    /// Straight to the emulator (no fault proxy, no `reconnect`).
    pub fn new() -> Self {
        PubSubBackend {
            proxy: None,
            config: GoogleCloudConfig::emulator("tidemill-test", emulator_host()),
        }
    }

    /// Every connection through a fault proxy in front of the emulator, so that
    /// `reconnect` can cut them (the emulator loses its state on restart, so it is never
    /// restarted).
    pub async fn through_proxy() -> Self {
        let host = emulator_host();
        let proxy = FaultProxy::start(host.as_str())
            .await
            .unwrap_or_else(|e| panic!("cannot start a fault proxy in front of {host}: {e}"));
        let config = GoogleCloudConfig::emulator("tidemill-test", proxy.addr().to_string());
        PubSubBackend {
            proxy: Some(proxy),
            config,
        }
    }
}

fn emulator_host() -> String {
    std::env::var("PUBSUB_EMULATOR_HOST")
        .unwrap_or_else(|_| panic!("PUBSUB_EMULATOR_HOST is not set"))
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
            // Only through the fault proxy, which `disrupt` cuts.
            reconnect: self.proxy.is_some(),
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
        tidemill_testkit::disrupt_through(self.proxy.as_ref())
    }
}
