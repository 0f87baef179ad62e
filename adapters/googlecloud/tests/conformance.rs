//! The universal conformance suite against the Pub/Sub emulator (`PUBSUB_EMULATOR_HOST`),
//! through a fault proxy so that `reconnect` can cut the connections (the emulator loses
//! its state on restart, so it is never restarted).

mod common;

use common::PubSubBackend;

mod pubsub_emulator {
    tidemill_testkit::conformance_tests!(
        skip_unless_env = "PUBSUB_EMULATOR_HOST",
        super::PubSubBackend::through_proxy().await
    );
}
