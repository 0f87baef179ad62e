//! The backend-generic middleware checks of tidemill-middleware (feature `testing`) against
//! the NATS server of brokers (`TIDEMILL_NATS_URL`), in JetStream mode: dead letter
//! after `max_deliveries` (broker-reported attempts and durable counting, with the
//! consumer replaced midway) and request-reply round trips (reply, error reply, streamed
//! reply, timeout).

mod common;

use common::{jetstream_features, NatsBackend};

mod jetstream {
    // Straight to the server (no fault proxy): these checks never disrupt the broker.
    tidemill_middleware::middleware_tests!(
        skip_unless_env = "TIDEMILL_NATS_URL",
        super::NatsBackend::restarting(super::jetstream_features(), |_| {})
    );
}
