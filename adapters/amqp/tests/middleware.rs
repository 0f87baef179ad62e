//! The backend-generic middleware checks of tidemill-middleware (feature `testing`) against
//! the RabbitMQ of tests/brokers (`TIDEMILL_AMQP_URL`): dead letter after `max_deliveries`
//! (the subscriber's attempt count and durable counting, with the consumer replaced midway)
//! and request-reply round trips (reply, error reply, streamed reply, timeout).
//!
//! Two configurations: classic queues (attempts tracked by the subscriber) and quorum
//! queues (attempts from the broker's `x-delivery-count`).

mod common;

use std::sync::Arc;

use async_trait::async_trait;
use tidemill_amqp::{AmqpConfig, AmqpPublisher, AmqpSubscriber, QueueType};
use tidemill_core::{Publisher, Result, Subscriber};
use tidemill_testkit::{Backend, Features};

/// Publishers and subscribers on the test broker, each with its own connection.
struct AmqpBackend {
    config: AmqpConfig,
}

impl AmqpBackend {
    fn new(customize: fn(&mut AmqpConfig)) -> Self {
        let url = std::env::var(common::URL_ENV)
            .unwrap_or_else(|_| panic!("{} is not set", common::URL_ENV));
        let mut config = common::config(&url);
        customize(&mut config);
        AmqpBackend { config }
    }
}

#[async_trait]
impl Backend for AmqpBackend {
    fn features(&self) -> Features {
        Features {
            consumer_groups: true,
            order_per_key: false,
            persistent: true,
            replays_old_messages: false,
            redelivers_on_nack: true,
            delivery_attempt: true,
            // Not exercised by these checks (no disrupt).
            reconnect: false,
        }
    }

    async fn publisher(&self) -> Result<Arc<dyn Publisher>> {
        Ok(Arc::new(AmqpPublisher::connect(self.config.clone()).await?))
    }

    async fn subscriber(&self) -> Result<Arc<dyn Subscriber>> {
        Ok(Arc::new(
            AmqpSubscriber::connect(self.config.clone()).await?,
        ))
    }
}

mod rabbitmq {
    tidemill_middleware::middleware_tests!(
        skip_unless_env = "TIDEMILL_AMQP_URL",
        super::AmqpBackend::new(|_| {})
    );
}

mod rabbitmq_quorum {
    tidemill_middleware::middleware_tests!(
        skip_unless_env = "TIDEMILL_AMQP_URL",
        super::AmqpBackend::new(|c| c.queue_type = super::QueueType::Quorum)
    );
}
