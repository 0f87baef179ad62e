//! Consuming through the router vs raw `lapin`, each in a process of its own: CPU per
//! message and the process's peak memory.
//!
//! `make bench-amqp` (or `cargo bench -p tidemill-amqp --bench consume` with
//! `TIDEMILL_AMQP_URL` set). The workload: N messages of 100 bytes, persistent, published
//! once (Tidemill publisher, confirmed) to a fresh exchange with one durable group queue per
//! side, so both read like-filled queues; then each side drains its queue with prefetch 128
//! in a child process of this bench:
//!
//! - raw: `basic_consume` + `Consumer::next` + `Acker::ack(..).await` per delivery (lapin's
//!   documented loop);
//! - router: `Router` + `AmqpSubscriber` (group), a sequential single-message handler that
//!   reads the payload and returns `Ok` (the router acks each message).
//!
//! Measured inside the child from its first delivery to the N-th handled: msg/s and the
//! CPU time of the whole process (every thread) per message; the peak RSS (`VmHWM`) is the
//! child's whole life. The sides alternate which goes first; reported are the medians over
//! the rounds, the per-round ratios, and the largest peak RSS.
//!
//! Environment: `TIDEMILL_BENCH_MESSAGES` (N, default 50,000), `TIDEMILL_BENCH_ROUNDS`
//! (default 5).

use std::hint::black_box;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicAckOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use tidemill_amqp::{AmqpConfig, AmqpPublisher, AmqpSubscriber};
use tidemill_core::{HandlerResult, Message, Publisher, Router, Subscriber};
use tidemill_testkit::bench::{
    broker_address, env_count, median, mib, record, Clock, Consumed, PeakRss, Row,
};

const PAYLOAD: usize = 100;
const PREFETCH: u16 = 128;
const SIDES: [&str; 2] = ["raw", "router"];
/// A child that has not finished after this long has stalled: the bench fails.
const LIMIT: Duration = Duration::from_secs(600);

/// Environment of a child: the side it runs, the queue it drains.
const CHILD_SIDE: &str = "TIDEMILL_BENCH_CHILD_SIDE";
const CHILD_TOPIC: &str = "TIDEMILL_BENCH_CHILD_TOPIC";

mod common;
use common::BoxError;

fn main() -> Result<(), BoxError> {
    let Some(url) = broker_address("TIDEMILL_AMQP_URL", "bench-amqp") else {
        return Ok(());
    };
    let n = env_count("TIDEMILL_BENCH_MESSAGES", 50_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if let (Ok(side), Ok(topic)) = (std::env::var(CHILD_SIDE), std::env::var(CHILD_TOPIC)) {
        let run = runtime.block_on(child(&url, &side, &topic, n))?;
        // The peak of the whole process, not of the timed section only.
        let rss = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            })
            .map(|kib| kib * 1024);
        println!(
            "RESULT {} {} {}",
            run.rate,
            run.cpu_us.unwrap_or(f64::NAN),
            rss.unwrap_or(0)
        );
        return Ok(());
    }
    let rounds = env_count("TIDEMILL_BENCH_ROUNDS", 5);
    runtime.block_on(parent(url, n, rounds))
}

/// One side's drain of `topic`'s queue, in this (child) process.
async fn child(url: &str, side: &str, topic: &str, n: usize) -> Result<Consumed, BoxError> {
    let run = match side {
        "raw" => raw(url, topic, n).await?,
        _ => router(url, topic, n).await?,
    };
    Ok(run)
}

async fn raw(url: &str, topic: &str, n: usize) -> Result<Consumed, BoxError> {
    let (conn, mut consumer) = common::raw_consumer(url, &format!("{topic}.raw"), PREFETCH).await?;
    let mut clock = None;
    for _ in 0..n {
        let delivery = tokio::time::timeout(LIMIT, consumer.next())
            .await?
            .ok_or("consumer ended")??;
        clock.get_or_insert_with(Clock::start);
        black_box(&delivery.data);
        delivery.ack(BasicAckOptions::default()).await?;
    }
    let run = clock.ok_or("raw: not started")?.stop(n);
    drop(consumer);
    conn.close(200, "OK".into()).await?;
    Ok(run)
}

async fn router(url: &str, topic: &str, n: usize) -> Result<Consumed, BoxError> {
    let config = AmqpConfig {
        prefetch: PREFETCH,
        ..AmqpConfig::new(url)
    };
    let subscriber = AmqpSubscriber::connect(config).await?;
    let counter = tidemill_testkit::bench::HandledCounter::new(n);
    let clock = Arc::new(std::sync::OnceLock::new());
    let router = Router::new();
    let (c, k) = (counter.clone(), clock.clone());
    router
        .add_handler("bench")
        .subscribe(subscriber.clone(), topic)
        .group("router")
        .handler(move |m: Message| {
            k.get_or_init(Clock::start);
            black_box(m.payload());
            c.add(1);
            async { HandlerResult::Ok(()) }
        })
        .await?;
    let done = counter.done.notified();
    let run = {
        let r = router.clone();
        tokio::spawn(async move { r.run().await })
    };
    if counter.seen() < n {
        tokio::time::timeout(LIMIT, done).await?;
    }
    let consumed = clock.get().map(|c: &Clock| c.stop(n));
    router.close().await?;
    run.await??;
    subscriber.close().await?;
    consumed.ok_or_else(|| "router: not started".into())
}

/// How many messages `queue` holds ready (a passive declare).
async fn left_in(url: &str, queue: &str) -> Result<u32, BoxError> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    conn.close(200, "OK".into()).await?;
    Ok(declared.message_count())
}

/// Fills a fresh exchange's two group queues with `n` messages, runs the two sides as
/// child processes, `rounds` times.
async fn parent(url: String, n: usize, rounds: usize) -> Result<(), BoxError> {
    println!(
        "RabbitMQ consume, one process per side: {n} messages of {PAYLOAD} bytes \
         (persistent), prefetch {PREFETCH}, each acked; {rounds} rounds, median"
    );
    let config = AmqpConfig {
        persistent: true,
        ..AmqpConfig::new(url.clone())
    };
    let publisher = AmqpPublisher::connect(config.clone()).await?;
    let setup = AmqpSubscriber::connect(config).await?;
    let exe = std::env::current_exe()?;
    let mut runs: [Vec<(f64, f64, u64)>; 2] = [Vec::new(), Vec::new()];
    PeakRss::reset();
    for round in 0..rounds {
        let topic =
            common::filled_topic(&publisher, &setup, "bench-consume", &SIDES, n, PAYLOAD).await?;
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let output = Command::new(&exe)
                .env(CHILD_SIDE, SIDES[i])
                .env(CHILD_TOPIC, &topic)
                .env("TIDEMILL_BENCH_MESSAGES", n.to_string())
                .output()?;
            let stdout = String::from_utf8_lossy(&output.stdout);
            let line = stdout
                .lines()
                .find_map(|l| l.strip_prefix("RESULT "))
                .ok_or_else(|| {
                    format!(
                        "{} child failed: {}",
                        SIDES[i],
                        String::from_utf8_lossy(&output.stderr)
                    )
                })?;
            let f: Vec<&str> = line.split_whitespace().collect();
            runs[i].push((f[0].parse()?, f[1].parse()?, f[2].parse()?));
            // Every message was acked: nothing went back to the queue when the child's
            // connection closed.
            let left = left_in(&url, &format!("{topic}.{}", SIDES[i])).await?;
            if left != 0 {
                return Err(format!("{}: {left} messages left in the queue", SIDES[i]).into());
            }
        }
        println!(
            "  round {}: raw {:>6.0} msg/s {:>5.1} µs/msg {} MiB; router {:>6.0} msg/s {:>5.1} µs/msg {} MiB",
            round + 1,
            runs[0][round].0,
            runs[0][round].1,
            mib(Some(runs[0][round].2)),
            runs[1][round].0,
            runs[1][round].1,
            mib(Some(runs[1][round].2)),
        );
        common::delete_topic(&url, &topic, &SIDES).await?;
    }
    publisher.close().await?;
    setup.close().await?;
    let rate = |i: usize| median(&runs[i].iter().map(|r| r.0).collect::<Vec<_>>());
    let cpu = |i: usize| median(&runs[i].iter().map(|r| r.1).collect::<Vec<_>>());
    let rss = |i: usize| runs[i].iter().map(|r| r.2).max();
    let ratios: Vec<f64> = runs[1]
        .iter()
        .zip(&runs[0])
        .map(|(t, r)| t.0 / r.0)
        .collect();
    let cpu_ratios: Vec<f64> = runs[1]
        .iter()
        .zip(&runs[0])
        .map(|(t, r)| t.1 / r.1)
        .collect();
    println!();
    println!("| side | msg/s | CPU µs/msg | peak RSS MiB |");
    println!("|---|---|---|---|");
    for (i, name) in ["raw lapin", "router (tidemill-amqp)"].iter().enumerate() {
        println!(
            "| {name} | {:.0} | {:.1} | {} |",
            rate(i),
            cpu(i),
            mib(rss(i))
        );
    }
    println!(
        "router / raw: msg/s {:.2} (per round {:?}), CPU {:.2} (per round {:?})",
        median(&ratios),
        ratios
            .iter()
            .map(|r| (r * 100.0).round() / 100.0)
            .collect::<Vec<_>>(),
        median(&cpu_ratios),
        cpu_ratios
            .iter()
            .map(|r| (r * 100.0).round() / 100.0)
            .collect::<Vec<_>>(),
    );
    let group =
        format!("rabbitmq consume, process per side ({n} × {PAYLOAD} B, prefetch {PREFETCH})");
    record(
        &Row::new(&group, "raw lapin", rate(0))
            .with_peak_rss(rss(0))
            .with_note(format!("CPU {:.1} µs/msg", cpu(0))),
    );
    record(
        &Row::new(&group, "router, sequential handler", rate(1))
            .with_peak_rss(rss(1))
            .with_note(format!(
                "CPU {:.1} µs/msg; median of {rounds} rounds; per-round ratio {:.2}, CPU ratio {:.2}",
                cpu(1),
                median(&ratios),
                median(&cpu_ratios)
            )),
    );
    Ok(())
}
