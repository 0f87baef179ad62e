//! Observability on RabbitMQ (`TIDEMILL_AMQP_URL`): one trace across two hops, and the
//! router's health following the connections (cut and refused by a fault proxy).

mod common;

use std::sync::Arc;
use std::time::Duration;

use tidemill_amqp::{AmqpPublisher, AmqpSubscriber};
use tidemill_testkit::fault_proxy::FaultProxy;

#[tokio::test]
async fn one_trace_across_two_hops() {
    let Some(url) = common::broker_url("one_trace_across_two_hops") else {
        return;
    };
    let config = common::config(&url);
    let p = AmqpPublisher::connect(config.clone()).await.unwrap();
    let s = AmqpSubscriber::connect(config).await.unwrap();
    tidemill_otel::testing::one_trace_across_two_hops(Arc::new(p), Arc::new(s), "rabbitmq").await;
}

#[tokio::test]
async fn health_follows_the_connection() {
    let Some(url) = common::broker_url("health_follows_the_connection") else {
        return;
    };
    let proxy = FaultProxy::start(common::host_port(&url).as_str())
        .await
        .unwrap();
    let mut config = common::config(&common::via(&url, proxy.addr()));
    config.reconnect_backoff_max = Duration::from_millis(200);
    let p = AmqpPublisher::connect(config.clone()).await.unwrap();
    let s = AmqpSubscriber::connect(config).await.unwrap();
    tidemill_otel::testing::health_follows_the_connection(&proxy, Arc::new(p), Arc::new(s)).await;
}
