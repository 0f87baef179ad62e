//! Observability on Kafka (`TIDEMILL_KAFKA_BROKERS`): one trace across two hops (trace
//! context in record headers), the consumer lag gauge from librdkafka's statistics, and
//! (`#[ignore]`d: it stops the shared broker) the router's health following the broker.

mod common;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tidemill_core::router::{metric_names, RouterHealth};
use tidemill_core::{
    ConnectionState, HandlerResult, Message, Publisher, Router, RouterConfig, SubscribeOptions,
    Subscriber,
};
use tidemill_kafka::{KafkaPublisher, KafkaSubscriber};
use tokio::sync::mpsc;

/// The longest any single wait of these tests takes.
const WAIT: Duration = Duration::from_secs(90);

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

/// The lag gauge `{topic, group}` as a Prometheus scrape shows it, if recorded.
fn lag(prometheus: &PrometheusHandle, topic: &str, group: &str) -> Option<f64> {
    let prefix = format!("{}{{", metric_names::CONSUMER_LAG);
    let (topic, group) = (format!("topic=\"{topic}\""), format!("group=\"{group}\""));
    prometheus.render().lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        (series.starts_with(&prefix) && series.contains(&topic) && series.contains(&group))
            .then(|| value.parse().expect("a number"))
    })
}

/// Waits (bounded) until the lag gauge reads `want`.
async fn until_lag(prometheus: &PrometheusHandle, topic: &str, group: &str, want: f64, what: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let now = lag(prometheus, topic, group);
        if now == Some(want) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: the lag gauge reads {now:?}, not {want} within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Messages published to a group's topic and not handled count as lag, summed over the
/// subscription's partitions: the high watermark minus the acked (committed) offset.
/// Handled and acked, they no longer count; when the subscription ends, its share is
/// taken back.
#[tokio::test]
async fn consumer_lag_is_the_high_watermark_minus_the_acked_offset() {
    let Ok(brokers) = std::env::var("TIDEMILL_KAFKA_BROKERS") else {
        eprintln!("SKIP consumer_lag: TIDEMILL_KAFKA_BROKERS is not set");
        return;
    };
    let recorder = PrometheusBuilder::new().build_recorder();
    let prometheus = recorder.handle();
    let _local = metrics::set_default_local_recorder(&recorder);
    let mut config = common::test_config(&brokers);
    config.partitions = 3;
    config.statistics_interval = Duration::from_millis(200);
    let topic = tidemill_testkit::unique_topic("lag");
    let p = KafkaPublisher::connect(config.clone()).await.unwrap();
    let s = KafkaSubscriber::connect(config).await.unwrap();
    let opts = SubscribeOptions::group("lag");
    s.initialize(&topic, &opts).await.unwrap();
    let batch = |prefix: &str, n: usize| -> Vec<Message> {
        (0..n)
            .map(|i| Message::new(format!("{prefix}{i}")).with_key(format!("key-{prefix}{i}")))
            .collect()
    };
    p.publish(&topic, batch("a", 5)).await.unwrap();
    let mut stream = s.subscribe(&topic, opts).await.unwrap();
    until_lag(&prometheus, &topic, "lag", 5.0, "5 published, none handled").await;

    for _ in 0..5 {
        let d = tokio::time::timeout(WAIT, stream.next())
            .await
            .expect("a delivery")
            .expect("the stream goes on")
            .expect("no stream error");
        d.ack().await.unwrap();
    }
    until_lag(&prometheus, &topic, "lag", 0.0, "all 5 acked").await;

    p.publish(&topic, batch("b", 3)).await.unwrap();
    until_lag(&prometheus, &topic, "lag", 3.0, "3 more published").await;

    s.close().await.unwrap();
    drop(stream);
    until_lag(&prometheus, &topic, "lag", 0.0, "subscription closed").await;
    p.close().await.unwrap();
}

/// Waits (bounded) until `check` holds for the router's health.
async fn until_health(router: &Router, what: &str, check: impl Fn(&RouterHealth) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let health = router.health();
        if check(&health) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not {what} within {WAIT:?}:\n{health}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A router consuming and publishing through Kafka is ready; with the broker stopped it
/// becomes not ready (still live), its subscriber and publisher disconnected; once the
/// broker is back it is ready again and messages flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "restarts the shared broker: stops kafka until the router is not ready; run one at a time"]
async fn health_follows_the_broker() {
    let Some(brokers) = common::managed_broker() else {
        return;
    };
    let mut config = common::test_config(&brokers);
    config.statistics_interval = Duration::from_millis(500);
    let publisher = Arc::new(KafkaPublisher::connect(config.clone()).await.unwrap());
    let subscriber = Arc::new(KafkaSubscriber::connect(config).await.unwrap());
    let input = tidemill_testkit::unique_topic("health-in");
    let output = tidemill_testkit::unique_topic("health-out");
    let router = Router::with_config(RouterConfig {
        close_clients: false,
        ..RouterConfig::default()
    });
    let (tx, mut rx) = mpsc::unbounded_channel();
    router
        .add_handler("forward")
        .subscribe(subscriber.clone(), input.clone())
        .group("health")
        .publish(publisher.clone(), output.clone())
        .handler(|m: Message| async move { Message::new(m.payload().clone()) })
        .await
        .unwrap();
    router
        .add_handler("sink")
        .subscribe(subscriber.clone(), output)
        .group("health")
        .handler(move |m: Message| {
            let _ = tx.send(m);
            async { HandlerResult::Ok(()) }
        })
        .await
        .unwrap();
    let r = router.clone();
    tokio::spawn(async move { r.run().await });
    tokio::time::timeout(WAIT, router.running())
        .await
        .expect("router running");
    publisher
        .publish_one(&input, Message::new("before"))
        .await
        .unwrap();
    let m = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("the message before the stop")
        .unwrap();
    assert_eq!(m.payload().as_ref(), b"before");
    let health = router.health();
    assert!(health.is_ready(), "{health}");

    let mut broker = tokio::task::block_in_place(common::StoppedBroker::stop);
    let stopped = std::time::Instant::now();
    until_health(&router, "not ready with the broker stopped", |h| {
        !h.is_ready()
    })
    .await;
    eprintln!("not ready {:?} after the stop", stopped.elapsed());
    until_health(&router, "subscriber and publisher disconnected", |h| {
        h.handlers.iter().all(|h| {
            h.subscriber == Some(ConnectionState::Disconnected)
                && h.publisher
                    .is_none_or(|p| p == ConnectionState::Disconnected)
        })
    })
    .await;
    assert_eq!(publisher.connection_state(), ConnectionState::Disconnected);
    let health = router.health();
    assert!(
        health.is_live(),
        "a stopped broker leaves the router live: {health}"
    );

    tokio::task::block_in_place(|| broker.start());
    let started = std::time::Instant::now();
    until_health(
        &router,
        "ready with the broker back",
        RouterHealth::is_ready,
    )
    .await;
    eprintln!("ready again {:?} after the start", started.elapsed());
    assert_eq!(publisher.connection_state(), ConnectionState::Connected);
    assert_eq!(subscriber.connection_state(), ConnectionState::Connected);
    let deadline = tokio::time::Instant::now() + WAIT;
    while let Err(e) = publisher.publish_one(&input, Message::new("after")).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "publishing after the restart still fails: {e}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    loop {
        let m = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("the message after the restart")
            .unwrap();
        if m.payload().as_ref() == b"after" {
            break;
        }
    }
    router.close().await.unwrap();
    subscriber.close().await.unwrap();
    publisher.close().await.unwrap();
    assert_eq!(subscriber.connection_state(), ConnectionState::Closed);
    assert_eq!(publisher.connection_state(), ConnectionState::Closed);
}
