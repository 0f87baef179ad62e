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

use common::AmqpBackend;
use tidemill_amqp::QueueType;

mod rabbitmq {
    tidemill_testkit::conformance_tests!(
        skip_unless_env = "TIDEMILL_AMQP_URL",
        super::AmqpBackend::through_proxy(|_| {}, false).await
    );
}

mod rabbitmq_ordered {
    tidemill_testkit::conformance_tests!(
        skip_unless_env = "TIDEMILL_AMQP_URL",
        super::AmqpBackend::through_proxy(|c| c.ordered = true, true).await
    );
}

mod rabbitmq_quorum {
    tidemill_testkit::conformance_tests!(
        skip_unless_env = "TIDEMILL_AMQP_URL",
        super::AmqpBackend::through_proxy(|c| c.queue_type = super::QueueType::Quorum, false).await
    );
}
