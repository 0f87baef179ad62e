//! Observability on Kafka (`TIDEMILL_KAFKA_BROKERS`): one trace across two hops (trace
//! context in record headers).

mod common;

use std::sync::Arc;

use tidemill_kafka::{KafkaPublisher, KafkaSubscriber};

#[tokio::test]
async fn one_trace_across_two_hops() {
    let Ok(brokers) = std::env::var("TIDEMILL_KAFKA_BROKERS") else {
        eprintln!("SKIP one_trace_across_two_hops: TIDEMILL_KAFKA_BROKERS is not set");
        return;
    };
    let config = common::test_config(&brokers);
    let p = KafkaPublisher::connect(config.clone()).await.unwrap();
    let s = KafkaSubscriber::connect(config).await.unwrap();
    tidemill_otel::testing::one_trace_across_two_hops(Arc::new(p), Arc::new(s), "kafka").await;
}
