//! Request-reply round trips over NATS JetStream (the server of brokers,
//! `TIDEMILL_NATS_URL`): requests/s and p50/p99 latency with 1 request at a time and with 64
//! concurrent requesters sharing one `Requester` (one reply subscription), against an echo
//! handler behind tidemill-middleware's `Replier` layer (concurrency 64 in the second
//! scenario). Every request and every reply is a JetStream publish awaiting its PubAck, and
//! a pull-consumer delivery acked after handling: the figures are those of the whole
//! at-least-once path, not of core NATS request-reply.
//!
//! Run: `eval "$(bash brokers/brokers.sh env)"; cargo bench -p tidemill-nats --bench request_reply`
//!
//! `BENCH_REQUESTS` sets the number of requests per scenario (default 3,000; a tenth more is
//! sent first as warm-up). The measurement is `tidemill_middleware::testing::request_reply_load`,
//! the same as the in-memory figures of `cargo bench -p tidemill-middleware --bench request_reply`.
//! The streams the bench creates (request topics and reply topics) are deleted at the end.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::Recording;
use parking_lot::Mutex;
use tidemill_core::{Publisher, Subscriber};
use tidemill_middleware::testing::request_reply_load;
use tidemill_nats::{NatsConfig, NatsPublisher, NatsSubscriber};
use tidemill_testkit::bench::{record, Row};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> std::result::Result<(), BoxError> {
    let Some(url) = std::env::var("TIDEMILL_NATS_URL")
        .ok()
        .filter(|u| !u.is_empty())
    else {
        eprintln!("SKIP: TIDEMILL_NATS_URL is not set (see brokers/brokers.sh env)");
        return Ok(());
    };
    let n: usize = std::env::var("BENCH_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(3_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run(url, n))
}

async fn run(url: String, n: usize) -> std::result::Result<(), BoxError> {
    println!(
        "request-reply on NATS JetStream ({url}): {n} requests per scenario, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<14} {:>12} {:>12} {:>12}",
        "concurrency", "requests/s", "p50", "p99"
    );
    let mut config = NatsConfig::new(url.as_str());
    // Bench data expires on its own should the clean-up below not run.
    config.jetstream.max_age = Some(Duration::from_secs(3600));
    let topics: Topics = Arc::default();
    for concurrency in [1, 64] {
        let publisher = NatsPublisher::connect(config.clone()).await?;
        let subscriber = NatsSubscriber::connect(config.clone()).await?;
        let p: Arc<dyn Publisher> = Arc::new(Recording {
            inner: publisher.clone(),
            topics: topics.clone(),
        });
        let s: Arc<dyn Subscriber> = Arc::new(Recording {
            inner: subscriber.clone(),
            topics: topics.clone(),
        });
        // Warm-up, then the measured run.
        request_reply_load(p.clone(), s.clone(), (n / 10).max(1), concurrency).await;
        let r = request_reply_load(p, s, n, concurrency).await;
        println!(
            "{concurrency:<14} {:>12.0} {:>12?} {:>12?}",
            r.per_second, r.p50, r.p99
        );
        // For `make bench` (BENCHMARKS.md); nothing when run by hand.
        record(
            &Row::new(
                format!("nats jetstream request-reply, {concurrency} concurrent"),
                "tidemill-middleware",
                r.per_second,
            )
            .with_note(format!("p50 {:?}, p99 {:?}", r.p50, r.p99)),
        );
        subscriber.close().await?;
        publisher.close().await?;
    }
    let used: Vec<String> = topics.lock().drain().collect();
    delete_streams(&url, &used).await;
    Ok(())
}

type Topics = Arc<Mutex<HashSet<String>>>;

/// Deletes the streams that capture `topics` (the ones the adapter created for them).
async fn delete_streams(url: &str, topics: &[String]) {
    let Ok(client) = async_nats::connect(url).await else {
        eprintln!("could not connect to {url} to delete the bench's streams");
        return;
    };
    let js = async_nats::jetstream::new(client);
    let mut streams = HashSet::new();
    for topic in topics {
        if let Ok(name) = js.stream_by_subject(topic.as_str()).await {
            streams.insert(name);
        }
    }
    for stream in streams {
        let _ = js.delete_stream(stream.as_str()).await;
    }
}
