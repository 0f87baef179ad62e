//! The universal conformance suite against the PostgreSQL server of brokers
//! (`TIDEMILL_POSTGRES_URL`), every connection through a fault proxy so that `reconnect`
//! cuts them (the restart variant is in tests/restart.rs, run alone).
//!
//! Three configurations, each declaring what it really has:
//! - `tables`: the defaults: groups, persistence, redelivery with the database's attempt
//!   count, reconnect, order per key;
//! - `replay`: groups start at the topic's first row, so a new subscriber sees old
//!   messages;
//! - `unordered`: `order_per_key` off.

mod common;

use common::{features, SqlBackend};
use tidemill_sql::StartFrom;

mod tables {
    tidemill_testkit::conformance_tests!(
        skip_unless_env = "TIDEMILL_POSTGRES_URL",
        super::SqlBackend::through_proxy(super::features(), |_| {}).await
    );
}

mod replay {
    tidemill_testkit::conformance_tests!(
        skip_unless_env = "TIDEMILL_POSTGRES_URL",
        super::SqlBackend::through_proxy(
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
        skip_unless_env = "TIDEMILL_POSTGRES_URL",
        super::SqlBackend::through_proxy(
            tidemill_testkit::Features {
                order_per_key: false,
                ..super::features()
            },
            |c| c.order_per_key = false,
        )
        .await
    );
}
