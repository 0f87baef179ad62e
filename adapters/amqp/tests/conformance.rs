//! The universal conformance suite against RabbitMQ (`TIDEMILL_AMQP_URL`), every connection
//! through a fault proxy so that `reconnect` can cut them while other tests share the broker.
//!
//! Three configurations:
//! - `rabbitmq`: the defaults (classic queues, prefetch 128). RabbitMQ hands a consumer
//!   many messages ahead, so order per key is not declared.
//! - `rabbitmq_ordered`: prefetch 1, the configuration in which RabbitMQ keeps order per
//!   queue with one consumer: the next message is not sent while one is unacked, and a
//!   nacked message returns to the head of the queue.
//! - `rabbitmq_quorum`: quorum queues for groups; attempts come from `x-delivery-count`.

mod common;

use std::sync::Arc;

use async_trait::async_trait;
use tidemill_amqp::{AmqpConfig, AmqpPublisher, AmqpSubscriber, QueueType};
use tidemill_core::{Publisher, Result, Subscriber};
use tidemill_testkit::fault_proxy::FaultProxy;
use tidemill_testkit::{Backend, Features};

struct AmqpBackend {
    proxy: FaultProxy,
    config: AmqpConfig,
    order_per_key: bool,
}

impl AmqpBackend {
    async fn start(customize: fn(&mut AmqpConfig), order_per_key: bool) -> Self {
        let url = std::env::var(common::URL_ENV)
            .unwrap_or_else(|_| panic!("{} is not set", common::URL_ENV));
        let upstream = common::host_port(&url);
        let proxy = FaultProxy::start(upstream.as_str())
            .await
            .unwrap_or_else(|e| panic!("cannot start a fault proxy in front of {upstream}: {e}"));
        let mut config = common::config(&common::via(&url, proxy.addr()));
        customize(&mut config);
        AmqpBackend {
            proxy,
            config,
            order_per_key,
        }
    }
}

#[async_trait]
impl Backend for AmqpBackend {
    fn features(&self) -> Features {
        Features {
            consumer_groups: true,
            order_per_key: self.order_per_key,
            // Group queues are durable and keep messages while no member consumes.
            persistent: true,
            // A queue only receives what is published after it is bound.
            replays_old_messages: false,
            redelivers_on_nack: true,
            // x-delivery-count on quorum queues; counted by the subscriber on classic ones.
            delivery_attempt: true,
            reconnect: true,
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

    async fn disrupt(&self) -> Result<()> {
        // Every connection breaks (both sides see it closed); new ones get through.
        self.proxy.cut();
        Ok(())
    }
}

mod rabbitmq {
    tidemill_testkit::conformance_tests!(
        skip_unless_env = "TIDEMILL_AMQP_URL",
        super::AmqpBackend::start(|_| {}, false).await
    );
}

mod rabbitmq_ordered {
    tidemill_testkit::conformance_tests!(
        skip_unless_env = "TIDEMILL_AMQP_URL",
        super::AmqpBackend::start(|c| c.ordered = true, true).await
    );
}

mod rabbitmq_quorum {
    tidemill_testkit::conformance_tests!(
        skip_unless_env = "TIDEMILL_AMQP_URL",
        super::AmqpBackend::start(|c| c.queue_type = super::QueueType::Quorum, false).await
    );
}
