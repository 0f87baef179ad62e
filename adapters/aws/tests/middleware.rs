//! The backend-generic middleware checks of tidemill-middleware (feature `testing`) against
//! the local AWS API of brokers (`TIDEMILL_AWS_URL`, moto): dead letter after
//! `max_deliveries` (SQS's receive count, and durable counting with the consumer replaced
//! midway), request-reply, backoff of failing messages, failure destinations keeping
//! messages, and the batch handler; on standard and on FIFO topics and queues (FIFO's
//! durable counting is ignored until the adapter's deduplication id changes, see below).

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
    use super::{features, AwsBackend};
    use tidemill_testkit::Features;

    fn fifo_features() -> Features {
        Features {
            order_per_key: true,
            ..features()
        }
    }

    // Every check but durable counting, which needs a fix in the adapter (below).
    tidemill_middleware::middleware_tests!(@each "TIDEMILL_AWS_URL",
        AwsBackend::through_proxy(fifo_features(), |c| c.fifo = true).await;
        dead_letter_after_max_deliveries,
        request_reply_round_trip,
        failing_message_backs_off,
        permanent_error_backs_off,
        failure_destinations_keep_messages,
        dead_letter_watcher_does_not_loop,
        batch_sizes_are_honoured,
        batch_settles_each_message,
        batch_panic_redelivers_the_batch,
        batch_shutdown_hands_over_a_partial_batch,
        batch_keeps_order_per_key,
    );

    /// DeadLetter with `Counting::Republish` publishes the failed message again (same uuid,
    /// a failure count added) and acks the original: on FIFO the copy's deduplication id is
    /// the uuid, so SNS/SQS drop it as a duplicate and the message is lost (no dead letter
    /// ever arrives). See `fifo_a_received_message_republished_with_changes_is_delivered_again`
    /// in tests/aws.rs.
    #[test]
    #[ignore = "adapter bug: FIFO deduplication by uuid alone drops the republished copy"]
    fn dead_letter_durable_counting() {
        if std::env::var_os("TIDEMILL_AWS_URL").is_none() {
            eprintln!("SKIP dead_letter_durable_counting: TIDEMILL_AWS_URL is not set");
            return;
        }
        tidemill_testkit::run(
            "dead_letter_durable_counting",
            || async { AwsBackend::through_proxy(fifo_features(), |c| c.fifo = true).await },
            |b| {
                Box::pin(tidemill_middleware::testing::dead_letter_durable_counting(
                    b,
                ))
            },
        );
    }
}
