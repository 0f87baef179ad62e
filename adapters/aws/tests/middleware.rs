//! The backend-generic middleware checks of tidemill-middleware (feature `testing`) against
//! the local AWS API of brokers (`TIDEMILL_AWS_URL`, moto): dead letter after
//! `max_deliveries` (SQS's receive count, and durable counting with the consumer replaced
//! midway), request-reply, backoff of failing messages, failure destinations keeping
//! messages, and the batch handler; on standard and on FIFO topics and queues (on FIFO,
//! durable counting republishes the failed message with the same uuid: its deduplication
//! id covers the content too, so the changed copy is not dropped as a duplicate).

mod common;

use common::{features, AwsBackend};

mod standard {
    // Through a fault proxy like the conformance suite; these checks never disrupt it.
    tidemill_middleware::middleware_tests!(
        skip_unless_env = "TIDEMILL_AWS_URL",
        super::AwsBackend::through_proxy(super::features(), |_| {}).await
    );
}

mod fifo {
    tidemill_middleware::middleware_tests!(
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
