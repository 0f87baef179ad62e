//! The in-memory broker as a conformance backend.

use std::sync::Arc;

use async_trait::async_trait;
use tidemill_core::{MemoryBroker, MemoryConfig, Publisher, Result, Subscriber};

use crate::{Backend, Features};

/// Runs the suite against one [`MemoryBroker`]; every publisher and subscriber it hands out
/// shares that broker.
pub struct MemoryBackend {
    broker: MemoryBroker,
}

impl MemoryBackend {
    /// A backend over a fresh broker with `config`.
    pub fn new(config: MemoryConfig) -> Self {
        MemoryBackend {
            broker: MemoryBroker::with_config(config),
        }
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    fn features(&self) -> Features {
        Features {
            consumer_groups: true,
            order_per_key: true,
            persistent: true,
            replays_old_messages: self.broker.config().retention > 0,
            redelivers_on_nack: true,
            delivery_attempt: true,
            reconnect: false,
        }
    }

    async fn publisher(&self) -> Result<Arc<dyn Publisher>> {
        Ok(Arc::new(self.broker.publisher()))
    }

    async fn subscriber(&self) -> Result<Arc<dyn Subscriber>> {
        Ok(Arc::new(self.broker.subscriber()))
    }
}
