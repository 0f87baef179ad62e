//! The universal conformance suite against the local AWS API of brokers
//! (`TIDEMILL_AWS_URL`, moto), every connection through a fault proxy so that `reconnect`
//! cuts them.
//!
//! Two configurations, each declaring what it really has:
//! - `standard`: standard SNS topics and SQS queues: groups, persistence, redelivery with
//!   SQS's receive count, reconnect; no order;
//! - `fifo`: FIFO topics and queues: order per key as well (message group = key).

mod common;

use common::{features, AwsBackend};

mod standard {
    tidemill_testkit::conformance_tests!(
        skip_unless_env = "TIDEMILL_AWS_URL",
        super::AwsBackend::through_proxy(super::features(), |_| {}).await
    );
}

mod fifo {
    tidemill_testkit::conformance_tests!(
        skip_unless_env = "TIDEMILL_AWS_URL",
        super::AwsBackend::through_proxy(
            tidemill_testkit::Features {
                order_per_key: true,
                ..super::features()
            },
            |c| c.fifo = true,
        )
        .await
    );
}
