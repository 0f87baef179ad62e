//! The universal conformance suite against the NATS server of brokers
//! (`TIDEMILL_NATS_URL`), every connection through a fault proxy so that `reconnect` cuts
//! them (the restart variant is in tests/restart.rs, run alone).
//!
//! Four configurations, each declaring what it really has:
//! - `jetstream`: the defaults: groups, persistence, redelivery with attempt counts,
//!   reconnect, and order per key (`order_per_key`: each subscription hands out one message
//!   per key at a time and redelivers a nacked one before its successors; the suite checks
//!   order with one subscriber per group, the only setting where JetStream can keep it);
//! - `jetstream_replay`: subscriptions without group start at the beginning of the stream
//!   (`subscription_deliver = all`), so a new subscriber sees old messages;
//! - `jetstream_unordered`: `order_per_key` off: every nack goes back to the server, which
//!   redelivers after whatever else is in flight, so no order promise;
//! - `core_nats`: at most once: queue groups, reconnect; no persistence, no redelivery.

mod common;

use common::{jetstream_features, NatsBackend};
use tidemill_nats::{DeliverFrom, NatsMode};

mod jetstream {
    tidemill_testkit::conformance_tests!(
        skip_unless_env = "TIDEMILL_NATS_URL",
        super::NatsBackend::through_proxy(super::jetstream_features(), |_| {}).await
    );
}

mod jetstream_replay {
    tidemill_testkit::conformance_tests!(
        skip_unless_env = "TIDEMILL_NATS_URL",
        super::NatsBackend::through_proxy(
            tidemill_testkit::Features {
                replays_old_messages: true,
                ..super::jetstream_features()
            },
            |c| c.jetstream.subscription_deliver = super::DeliverFrom::All,
        )
        .await
    );
}

mod jetstream_unordered {
    tidemill_testkit::conformance_tests!(
        skip_unless_env = "TIDEMILL_NATS_URL",
        super::NatsBackend::through_proxy(
            tidemill_testkit::Features {
                order_per_key: false,
                ..super::jetstream_features()
            },
            |c| c.jetstream.order_per_key = false,
        )
        .await
    );
}

mod core_nats {
    tidemill_testkit::conformance_tests!(
        skip_unless_env = "TIDEMILL_NATS_URL",
        super::NatsBackend::through_proxy(
            tidemill_testkit::Features {
                consumer_groups: true,
                order_per_key: false,
                persistent: false,
                replays_old_messages: false,
                redelivers_on_nack: false,
                delivery_attempt: false,
                reconnect: true,
            },
            |c| c.mode = super::NatsMode::Core,
        )
        .await
    );
}
