//! The backend-generic middleware checks of tidemill-middleware (feature `testing`) against
//! the PostgreSQL server of brokers (`TIDEMILL_POSTGRES_URL`): dead letter after
//! `max_deliveries` (the database's attempt count), request-reply, backoff of failing
//! messages, failure destinations keeping messages, batch handlers.

mod common;

use common::{features, SqlBackend};

mod tables {
    // Straight to the server (no fault proxy): these checks never disrupt the broker.
    tidemill_middleware::middleware_tests!(
        skip_unless_env = "TIDEMILL_POSTGRES_URL",
        super::SqlBackend::restarting(super::features(), |_| {})
    );
}
