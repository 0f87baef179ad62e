//! Request-reply round trips on the in-memory broker: requests/s and p50/p99 latency, with
//! 1 request at a time and with 64 concurrent requesters sharing one `Requester` (one reply
//! subscription), against an echo handler behind the `Replier` layer (concurrency 64).
//! `BENCH_REQUESTS` sets the number of requests per scenario (default 100,000).
//!
//! Run: `cargo bench -p tidemill-middleware --bench request_reply`
//!
//! The measurement itself is `tidemill_middleware::testing::request_reply_load`, which
//! takes any publisher/subscriber: broker adapters call it for their own figures.

use std::sync::Arc;
use tidemill_testkit::bench::{record, Row};

use tidemill_core::{MemoryBroker, Publisher, Subscriber};
use tidemill_middleware::testing::request_reply_load;

fn main() {
    let n: usize = std::env::var("BENCH_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("cannot build the runtime: {e}"));
    println!(
        "request-reply on the in-memory broker: {n} requests per scenario, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<14} {:>12} {:>12} {:>12}",
        "concurrency", "requests/s", "p50", "p99"
    );
    for concurrency in [1, 64] {
        let broker = MemoryBroker::new();
        let publisher: Arc<dyn Publisher> = Arc::new(broker.publisher());
        let subscriber: Arc<dyn Subscriber> = Arc::new(broker.subscriber());
        // Warm-up, then the measured run.
        runtime.block_on(request_reply_load(
            publisher.clone(),
            subscriber.clone(),
            n / 10,
            concurrency,
        ));
        let r = runtime.block_on(request_reply_load(publisher, subscriber, n, concurrency));
        println!(
            "{concurrency:<14} {:>12.0} {:>12?} {:>12?}",
            r.per_second, r.p50, r.p99
        );
        record(
            &Row::new(
                format!("in-memory request-reply, {concurrency} concurrent"),
                "tidemill-middleware",
                r.per_second,
            )
            .with_note(format!("requests/s; p50 {:?}, p99 {:?}", r.p50, r.p99)),
        );
    }
}
