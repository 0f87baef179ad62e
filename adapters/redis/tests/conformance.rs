//! The universal conformance suite against the Redis server of brokers
//! (`TIDEMILL_REDIS_URL`), every connection through a fault proxy so that `reconnect` cuts
//! them (the restart variant is in tests/restart.rs, run alone).
//!
//! Three configurations, each declaring what it really has:
//! - `streams`: the defaults: groups, persistence, redelivery with the server's delivery
//!   count, reconnect, order per key (one subscriber per group, as the suite checks it);
//! - `replay`: groups start at the stream's beginning, so a new subscriber sees old
//!   messages;
//! - `unordered`: `order_per_key` off.

mod common;

use common::{features, RedisBackend};
use tidemill_redis::StartFrom;

mod streams {
    tidemill_testkit::conformance_tests!(
        skip_unless_env = "TIDEMILL_REDIS_URL",
        super::RedisBackend::through_proxy(super::features(), |_| {}).await
    );
}

mod replay {
    tidemill_testkit::conformance_tests!(
        skip_unless_env = "TIDEMILL_REDIS_URL",
        super::RedisBackend::through_proxy(
            tidemill_testkit::Features {
                replays_old_messages: true,
                ..super::features()
            },
            |c| c.start_from = super::StartFrom::Beginning,
        )
        .await
    );
}

mod unordered {
    tidemill_testkit::conformance_tests!(
        skip_unless_env = "TIDEMILL_REDIS_URL",
        super::RedisBackend::through_proxy(
            tidemill_testkit::Features {
                order_per_key: false,
                ..super::features()
            },
            |c| c.order_per_key = false,
        )
        .await
    );
}
