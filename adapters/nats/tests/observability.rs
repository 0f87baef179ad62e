//! Observability on NATS JetStream (`TIDEMILL_NATS_URL`): one trace across two hops, the
//! router's health following the connections (cut and refused by a fault proxy), and the
//! consumer lag JetStream reports with each delivery.

mod common;

use std::sync::Arc;

use futures::StreamExt;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tidemill_core::{Message, Publisher, SubscribeOptions, Subscriber};
use tidemill_nats::{NatsPublisher, NatsSubscriber};
use tidemill_testkit::fault_proxy::FaultProxy;

fn url(test: &str) -> Option<String> {
    match std::env::var("TIDEMILL_NATS_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!("SKIP {test}: TIDEMILL_NATS_URL is not set");
            None
        }
    }
}

#[tokio::test]
async fn one_trace_across_two_hops() {
    let Some(url) = url("one_trace_across_two_hops") else {
        return;
    };
    let config = common::test_config(&url);
    let p = NatsPublisher::connect(config.clone()).await.unwrap();
    let s = NatsSubscriber::connect(config).await.unwrap();
    tidemill_otel::testing::one_trace_across_two_hops(Arc::new(p), Arc::new(s), "nats").await;
}

#[tokio::test]
async fn health_follows_the_connection() {
    let Some(url) = url("health_follows_the_connection") else {
        return;
    };
    let upstream = common::host_port(&url);
    let proxy = FaultProxy::start(upstream.as_str()).await.unwrap();
    let mut config = common::test_config(&format!("nats://{}", proxy.addr()));
    config.ignore_discovered_servers = true;
    let p = NatsPublisher::connect(config.clone()).await.unwrap();
    let s = NatsSubscriber::connect(config).await.unwrap();
    tidemill_otel::testing::health_follows_the_connection(&proxy, Arc::new(p), Arc::new(s)).await;
}

/// Five messages wait in the stream; the first delivery reports the other four pending.
#[tokio::test]
async fn consumer_lag_is_the_pending_count() {
    let Some(url) = url("consumer_lag_is_the_pending_count") else {
        return;
    };
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);
    let topic = tidemill_testkit::unique_topic("lag");
    let config = common::test_config(&url);
    let p = NatsPublisher::connect(config.clone()).await.unwrap();
    let s = NatsSubscriber::connect(config).await.unwrap();
    let opts = SubscribeOptions::group("lag");
    s.initialize(&topic, &opts).await.unwrap();
    let batch: Vec<Message> = (0..5).map(|i| Message::new(format!("m{i}"))).collect();
    p.publish(&topic, batch).await.unwrap();
    let mut stream = s.subscribe(&topic, opts).await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    let lag = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .find(|(k, ..)| k.key().name() == tidemill_core::router::metric_names::CONSUMER_LAG)
        .map(|(k, _, _, v)| {
            (
                k.key()
                    .labels()
                    .map(|l| l.value().to_owned())
                    .collect::<Vec<_>>(),
                v,
            )
        });
    first.ack().await.unwrap();
    let (labels, value) = lag.expect("the lag gauge is recorded");
    assert!(
        labels.contains(&topic) && labels.contains(&"lag".to_owned()),
        "{labels:?}"
    );
    assert_eq!(value, DebugValue::Gauge(4.0.into()));
    s.close().await.unwrap();
    p.close().await.unwrap();
}
