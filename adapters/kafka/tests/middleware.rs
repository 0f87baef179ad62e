//! The backend-generic middleware checks of tidemill-middleware (feature `testing`) against
//! the Kafka-protocol broker of brokers (Tansu; `TIDEMILL_KAFKA_BROKERS`): dead letter
//! after `max_deliveries` (with the broker-side attempt count and with durable counting,
//! the consumer replaced midway: the group resumes from its committed offsets and the
//! count carries on in the message) and request-reply round trips (reply, error reply,
//! streamed reply, timeout).

mod common;

use common::KafkaBackend;

/// The default configuration (start at the end, per-key ordering).
mod default_config {
    tidemill_middleware::middleware_tests!(
        skip_unless_env = "TIDEMILL_KAFKA_BROKERS",
        super::KafkaBackend::new(|_| {})
    );
}
