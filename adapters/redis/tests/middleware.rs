//! The backend-generic middleware checks of tidemill-middleware (feature `testing`) against
//! the Redis server of brokers (`TIDEMILL_REDIS_URL`): dead letter after `max_deliveries`
//! (the server's delivery count, and durable counting with the consumer replaced midway),
//! request-reply, backoff of failing messages, failure destinations keeping messages.

mod common;

use common::{features, RedisBackend};

mod streams {
    // Straight to the server (no fault proxy): these checks never disrupt the broker.
    tidemill_middleware::middleware_tests!(
        skip_unless_env = "TIDEMILL_REDIS_URL",
        super::RedisBackend::restarting(super::features(), |_| {})
    );
}
