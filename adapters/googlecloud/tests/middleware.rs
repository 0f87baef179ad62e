//! The backend-generic middleware checks of tidemill-middleware (feature `testing`) against
//! the Pub/Sub emulator of brokers (`PUBSUB_EMULATOR_HOST`): dead letter after
//! `max_deliveries` and request-reply round trips (reply, error reply, streamed reply,
//! timeout).
//!
//! The emulator reports no delivery attempts (it has no dead-letter policies), so the
//! dead-letter layer counts durably: it republishes a failed message with its failure count
//! and acks the original once the copy is confirmed; the count survives replacing the
//! consumer midway. The checks create each group's subscription before publishing (a
//! Pub/Sub subscription only receives what is published after it exists).

mod common;

use common::PubSubBackend;

mod pubsub_emulator {
    tidemill_middleware::middleware_tests!(
        skip_unless_env = "PUBSUB_EMULATOR_HOST",
        super::PubSubBackend::new()
    );
}
