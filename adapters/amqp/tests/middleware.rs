//! The backend-generic middleware checks of tidemill-middleware (feature `testing`) against
//! the RabbitMQ of brokers (`TIDEMILL_AMQP_URL`): dead letter after `max_deliveries`
//! (the subscriber's attempt count and durable counting, with the consumer replaced midway)
//! and request-reply round trips (reply, error reply, streamed reply, timeout).
//!
//! Two configurations: classic queues (attempts tracked by the subscriber) and quorum
//! queues (attempts from the broker's `x-delivery-count`).

mod common;

use common::AmqpBackend;
use tidemill_amqp::QueueType;

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
