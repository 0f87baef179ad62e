//! Raw `async-nats` vs Tidemill on the NATS server of brokers, same settings, same run,
//! for JetStream and for core NATS.
//!
//! `make bench-nats` (or `cargo bench -p tidemill-nats --bench throughput` with
//! `TIDEMILL_NATS_URL` set). N messages of 100 bytes, published in batches of 1,000. Both
//! sides send the same bytes: the payload plus a `Nats-Msg-Id` header holding a uuid and 16
//! hex digits (how Tidemill carries a message's uuid, with a hash of the content; JetStream
//! deduplicates on it). The raw side's ids are made before the clock starts; Tidemill hashes
//! each message while publishing.
//!
//! JetStream, each side on a fresh file-storage stream:
//! - publish: every batch is pipelined and its PubAcks awaited together (raw:
//!   `Context::send_publish` + `join_all`; Tidemill: `Publisher::publish(topic, batch)`), from
//!   the first publish to the last PubAck;
//! - consume: a durable pull consumer (explicit acks, `max_ack_pending` 1000, pull batches of
//!   500 with 30 s expiry and 5 s heartbeat), from opening the stream until the N-th message
//!   is received and acked (raw: `Consumer::stream().messages()` + `Message::ack`; Tidemill:
//!   `Subscriber::subscribe(topic, group)` + `Delivery::ack`).
//!
//! Core NATS (nothing is stored):
//! - publish: with no subscriber, each batch published, then confirmed by a round trip to
//!   the server (raw: a request nobody answers; Tidemill does the same inside `publish`);
//! - consume: the subscriber listens while the *raw* publisher (the same for both sides)
//!   publishes the N messages; from the first publish until the subscriber received the
//!   N-th (raw: `Subscriber::next`; Tidemill: `DeliveryStream::next` + `Delivery::ack`, a
//!   no-op in core NATS). Messages the client dropped as a slow consumer would be reported.
//!
//! Sides alternate which goes first; each round is printed, then the median msg/s of the
//! rounds and the median of the per-round ratios Tidemill / raw (the load of a shared machine
//! drifts between rounds; within a round both sides see about the same), with each side's
//! peak RSS: the process's `VmHWM`, reset right before each timed section and read right
//! after it, the largest over the rounds (process-wide, so it includes what the bench itself
//! holds, e.g. the raw publisher feeding a core-NATS consume).
//!
//! Environment: `TIDEMILL_BENCH_MESSAGES` (N, default 50,000), `TIDEMILL_BENCH_ROUNDS`
//! (default 5), `TIDEMILL_BENCH_MODES` (`jetstream`, `core` or both, the default).
//!
//! **Batch section** (JetStream, after the above; `TIDEMILL_BENCH_BATCH=off` skips it,
//! `only` runs it alone; `TIDEMILL_BENCH_BATCH_MESSAGES`, default 50,000,
//! `TIDEMILL_BENCH_BATCH_ROUNDS`, default 5): N messages of 100 bytes are published (by
//! `NatsPublisher`, untimed) to a fresh stream whose group consumer exists (Tidemill's
//! durable consumer: explicit acks, `max_ack_pending` 1,000), then consumed by one of three
//! variants, in rotating order within each round:
//!
//! - `raw batch`: async-nats `PullConsumer::batch()` requests of 500 messages (on that
//!   consumer), each batch received whole, then each message acked with `Message::ack`
//!   (a buffered publish, no flush awaited);
//! - `tidemill single`: a `Router` handler of one message (default: sequential);
//! - `tidemill batch`: the same router with `.batch(500, 50 ms)`.
//!
//! Timed from the first pull request (raw) or starting the router (which subscribes) until
//! the N-th message was acked (raw) or handed to the handler (router: its ack, a buffered
//! publish too, follows at once). Reported per variant: the median msg/s, the median CPU
//! time of the whole process per message (`/proc/self/task/*/schedstat`, which includes the
//! bench's own NATS connections but not the server), the largest peak RSS, and the medians
//! of the per-round ratios batch / raw batch and batch / single.
//!
//! `TIDEMILL_BENCH_CALL_US` (default 0) makes each handler call wait that long, like a
//! database round trip: once per message for `tidemill single`, once per batch for
//! `tidemill batch` and once per chunk for `raw batch` (before its acks).

use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::pull::Config as PullConfig;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy};
use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, stream, ContextBuilder};
use async_nats::{Client, HeaderMap, RequestErrorKind, Subject};
use bytes::Bytes;
use futures::StreamExt;
use tidemill_core::{HandlerResult, Message, Publisher, Router, SubscribeOptions, Subscriber};
use tidemill_nats::{NatsConfig, NatsMode, NatsPublisher, NatsSubscriber};
use tidemill_testkit::bench::{
    handler_call, median, mib, process_cpu, record, Clock, Consumed, HandledCounter, PeakRss, Row,
};

const PAYLOAD: usize = 100;
const BATCH: usize = 1_000;
/// Tidemill's default `publish_window`: PubAcks awaited together.
const WINDOW: usize = 1_000;
const PULL_BATCH: usize = 500;
const LIMIT: Duration = Duration::from_secs(300);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default)
}

/// A raw message id shaped like Tidemill's: `{uuid}.{16 hex digits}`.
fn message_id(i: usize) -> String {
    format!("{}.{:016x}", tidemill_core::new_uuid(), i)
}

fn main() -> Result<(), BoxError> {
    let Some(url) = std::env::var("TIDEMILL_NATS_URL")
        .ok()
        .filter(|u| !u.is_empty())
    else {
        eprintln!("SKIP: TIDEMILL_NATS_URL is not set (run `make bench-nats`)");
        return Ok(());
    };
    let n = env_usize("TIDEMILL_BENCH_MESSAGES", 50_000);
    let rounds = env_usize("TIDEMILL_BENCH_ROUNDS", 5);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let batch = std::env::var("TIDEMILL_BENCH_BATCH").unwrap_or_default();
    let batch_n = env_usize("TIDEMILL_BENCH_BATCH_MESSAGES", 50_000);
    let batch_rounds = env_usize("TIDEMILL_BENCH_BATCH_ROUNDS", 5);
    runtime.block_on(async {
        if batch != "only" {
            run(url.clone(), n, rounds).await?;
        }
        if batch != "off" {
            run_batch(url, batch_n, batch_rounds).await?;
        }
        Ok(())
    })
}

#[derive(Default, Clone, Copy)]
struct Figures {
    publish: f64,
    consume: f64,
    /// Peak RSS (bytes) during the timed publish, where known.
    publish_rss: Option<u64>,
    /// Peak RSS (bytes) during the timed consume, where known.
    consume_rss: Option<u64>,
    /// CPU time of the process (every thread) per message during the timed publish (µs).
    publish_cpu: Option<f64>,
    /// The same during the timed consume (core NATS: the raw publisher feeding it included).
    consume_cpu: Option<f64>,
}

/// CPU µs per message of the process since `since` (a [`process_cpu`] reading).
fn cpu_per_msg(n: usize, since: Option<Duration>) -> Option<f64> {
    Some(process_cpu()?.saturating_sub(since?).as_secs_f64() * 1e6 / n as f64)
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

fn payload(i: usize) -> Bytes {
    let mut p = format!("{i:010}").into_bytes();
    p.resize(PAYLOAD, b'x');
    Bytes::from(p)
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

async fn run(url: String, n: usize, rounds: usize) -> Result<(), BoxError> {
    println!(
        "NATS at {url}: {n} messages of {PAYLOAD} bytes, batches of {BATCH}, {rounds} rounds (median reported)"
    );
    let mut summary = Vec::new();
    let modes = std::env::var("TIDEMILL_BENCH_MODES").unwrap_or_default();
    for mode in [NatsMode::JetStream, NatsMode::Core] {
        let name = if mode == NatsMode::Core {
            "core"
        } else {
            "jetstream"
        };
        if !modes.is_empty() && !modes.contains(name) {
            continue;
        }
        let label = match mode {
            NatsMode::JetStream => "JetStream",
            NatsMode::Core => "core NATS",
        };
        println!("\n{label}");
        let raw = Raw::connect(&url).await?;
        let config = NatsConfig {
            mode,
            ..NatsConfig::new(url.as_str())
        };
        let tm = Tidemill {
            publisher: NatsPublisher::connect(config.clone()).await?,
            subscriber: NatsSubscriber::connect(config).await?,
        };
        let (mut raws, mut tms) = (Vec::new(), Vec::new());
        for round in 1..=rounds {
            let (r, t) = if round % 2 == 1 {
                let r = raw.round(mode, n).await?;
                (r, tm.round(mode, n, &raw).await?)
            } else {
                let t = tm.round(mode, n, &raw).await?;
                (raw.round(mode, n).await?, t)
            };
            println!(
                "  round {round}: publish raw {:>9.0}  tidemill {:>9.0} msg/s | consume raw {:>9.0}  tidemill {:>9.0} msg/s",
                r.publish, t.publish, r.consume, t.consume
            );
            raws.push(r);
            tms.push(t);
        }
        let pick =
            |v: &[Figures], f: fn(&Figures) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
        // The largest peak RSS of a side over the rounds.
        let peak = |v: &[Figures], g: fn(&Figures) -> Option<u64>| v.iter().filter_map(g).max();
        type Opt<T> = fn(&Figures) -> Option<T>;
        let cpu = |v: &[Figures], c: Opt<f64>| {
            let us: Vec<f64> = v.iter().filter_map(c).collect();
            (!us.is_empty()).then(|| median(&us))
        };
        for (what, f, g, c) in [
            (
                "publish",
                (|x: &Figures| x.publish) as fn(&Figures) -> f64,
                (|x: &Figures| x.publish_rss) as Opt<u64>,
                (|x: &Figures| x.publish_cpu) as Opt<f64>,
            ),
            (
                "consume",
                |x: &Figures| x.consume,
                |x: &Figures| x.consume_rss,
                |x: &Figures| x.consume_cpu,
            ),
        ] {
            let (r, t) = (pick(&raws, f), pick(&tms, f));
            // Rounds alternate which side goes first; the load of this shared machine drifts
            // between rounds, so the ratio is taken within each round.
            let ratio = median(
                &raws
                    .iter()
                    .zip(&tms)
                    .map(|(r, t)| f(t) / f(r))
                    .collect::<Vec<_>>(),
            );
            let (r_rss, t_rss) = (peak(&raws, g), peak(&tms, g));
            summary.push(Summary {
                label,
                what,
                rates: (r, t),
                ratio,
                rss: (r_rss, t_rss),
                cpu: (cpu(&raws, c), cpu(&tms, c)),
            });
        }
        tm.publisher.close().await?;
        tm.subscriber.close().await?;
    }
    println!();
    println!(
        "median of {rounds} rounds, {n} x {PAYLOAD} B   raw msg/s   tidemill msg/s   ratio (median of per-round ratios)   CPU µs/msg raw / tidemill   peak RSS MiB raw / tidemill (max of rounds)"
    );
    let us = |c: Option<f64>| c.map_or_else(|| "n/a".to_owned(), |c| format!("{c:.2}"));
    for s in summary {
        let (label, what, (r, t), ratio) = (s.label, s.what, s.rates, s.ratio);
        println!(
            "{label:<10} {what:<8}                {r:>11.0}   {t:>14.0}   {ratio:<34.2}   {} / {}   {} / {}",
            us(s.cpu.0),
            us(s.cpu.1),
            mib(s.rss.0),
            mib(s.rss.1)
        );
        // For `make bench` (BENCHMARKS.md); nothing when run by hand.
        let group = format!("nats {label} {what}");
        record(
            &Row::new(group.as_str(), "raw async-nats", r)
                .with_peak_rss(s.rss.0)
                .with_note(format!("CPU {} µs/msg", us(s.cpu.0))),
        );
        record(
            &Row::new(group.as_str(), "tidemill-nats", t)
                .with_peak_rss(s.rss.1)
                .with_note(format!(
                    "CPU {} µs/msg; median of {rounds} rounds; median per-round ratio {ratio:.2}",
                    us(s.cpu.1)
                )),
        );
    }
    Ok(())
}

/// One line of the summary: a mode's publish or consume, raw and Tidemill.
struct Summary {
    label: &'static str,
    what: &'static str,
    /// msg/s, raw and Tidemill (medians).
    rates: (f64, f64),
    /// Median of the per-round ratios Tidemill / raw.
    ratio: f64,
    /// Peak RSS, raw and Tidemill (max of the rounds).
    rss: (Option<u64>, Option<u64>),
    /// CPU µs per message, raw and Tidemill (medians).
    cpu: (Option<f64>, Option<f64>),
}

/// The raw client, set up like the adapter: one connection to publish, one to consume.
struct Raw {
    publisher: Client,
    subscriber: Client,
    js_pub: jetstream::Context,
    js_sub: jetstream::Context,
}

fn context(client: &Client) -> jetstream::Context {
    // Tidemill's settings: 10 s timeout, 5,000 PubAcks in flight, no back-pressure wait.
    ContextBuilder::new()
        .timeout(Duration::from_secs(10))
        .max_ack_inflight(5_000)
        .backpressure_on_inflight(false)
        .build(client.clone())
}

/// A round trip: the server answers "no responders" after processing everything before.
async fn confirm(client: &Client, probe: &Subject) -> Result<(), BoxError> {
    match client.request(probe.clone(), Bytes::new()).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == RequestErrorKind::NoResponders => Ok(()),
        Err(e) => Err(e.into()),
    }
}

impl Raw {
    async fn connect(url: &str) -> Result<Raw, BoxError> {
        let publisher = async_nats::connect(url).await?;
        let subscriber = async_nats::connect(url).await?;
        Ok(Raw {
            js_pub: context(&publisher),
            js_sub: context(&subscriber),
            publisher,
            subscriber,
        })
    }

    async fn round(&self, mode: NatsMode, n: usize) -> Result<Figures, BoxError> {
        // Built outside the timed sections, as for Tidemill.
        let batches: Vec<Vec<(String, Bytes)>> = (0..n)
            .collect::<Vec<_>>()
            .chunks(BATCH)
            .map(|c| c.iter().map(|i| (message_id(*i), payload(*i))).collect())
            .collect();
        match mode {
            NatsMode::JetStream => self.jetstream(n, batches).await,
            NatsMode::Core => self.core(n, batches).await,
        }
    }

    async fn jetstream(
        &self,
        n: usize,
        batches: Vec<Vec<(String, Bytes)>>,
    ) -> Result<Figures, BoxError> {
        let topic = unique("bench-raw");
        let subject: Subject = topic.clone().into();
        self.js_pub
            .create_stream(stream::Config {
                name: topic.clone(),
                subjects: vec![topic.clone()],
                max_age: Duration::from_secs(3600),
                ..Default::default()
            })
            .await?;
        PeakRss::reset();
        let cpu0 = process_cpu();
        let started = Instant::now();
        for batch in batches {
            for window in batch.chunks(WINDOW) {
                let mut acks: Vec<PublishAckFuture> = Vec::with_capacity(window.len());
                for (id, payload) in window {
                    let publish = PublishMessage::build()
                        .payload(payload.clone())
                        .message_id(id);
                    acks.push(self.js_pub.send_publish(subject.clone(), publish).await?);
                }
                for r in futures::future::join_all(
                    acks.into_iter().map(std::future::IntoFuture::into_future),
                )
                .await
                {
                    r?;
                }
            }
        }
        let publish = rate(n, started.elapsed());
        let publish_cpu = cpu_per_msg(n, cpu0);
        let publish_rss = PeakRss::read();

        let consumer = self
            .js_sub
            .create_consumer_on_stream(
                PullConfig {
                    durable_name: Some("bench".into()),
                    name: Some("bench".into()),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(30),
                    max_deliver: -1,
                    max_ack_pending: 1_000,
                    deliver_policy: DeliverPolicy::All,
                    filter_subject: topic.clone(),
                    ..Default::default()
                },
                topic.as_str(),
            )
            .await?;
        PeakRss::reset();
        let cpu0 = process_cpu();
        let started = Instant::now();
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(PULL_BATCH)
            .expires(Duration::from_secs(30))
            .heartbeat(Duration::from_secs(5))
            .messages()
            .await?;
        let mut received = 0;
        while received < n {
            let item = tokio::time::timeout(LIMIT, messages.next())
                .await
                .map_err(|_| format!("raw: stalled after {received} of {n}"))?;
            let msg = item.ok_or("raw: stream ended")??;
            msg.ack().await?;
            received += 1;
        }
        let consume = rate(n, started.elapsed());
        let consume_cpu = cpu_per_msg(n, cpu0);
        let consume_rss = PeakRss::read();
        drop(messages);
        self.js_pub.delete_stream(&topic).await?;
        Ok(Figures {
            publish,
            consume,
            publish_rss,
            consume_rss,
            publish_cpu,
            consume_cpu,
        })
    }

    async fn core(
        &self,
        n: usize,
        batches: Vec<Vec<(String, Bytes)>>,
    ) -> Result<Figures, BoxError> {
        let subject: Subject = unique("bench-raw-core").into();
        PeakRss::reset();
        let cpu0 = process_cpu();
        let started = Instant::now();
        self.core_publish(&subject, &batches).await?;
        let publish = rate(n, started.elapsed());
        let publish_cpu = cpu_per_msg(n, cpu0);
        let publish_rss = PeakRss::read();

        let subject: Subject = unique("bench-raw-core").into();
        let sub_probe: Subject = format!("{}.probe", self.subscriber.new_inbox()).into();
        let mut sub = self.subscriber.subscribe(subject.clone()).await?;
        confirm(&self.subscriber, &sub_probe).await?;
        let counter = tokio::spawn(async move {
            let mut received = 0;
            let mut last = Instant::now();
            while received < n {
                match tokio::time::timeout(Duration::from_secs(5), sub.next()).await {
                    Ok(Some(_msg)) => {
                        received += 1;
                        last = Instant::now();
                    }
                    _ => break,
                }
            }
            (received, last)
        });
        PeakRss::reset();
        let cpu0 = process_cpu();
        let started = Instant::now();
        self.core_publish(&subject, &batches).await?;
        let (received, last) = counter.await?;
        let consume_rss = PeakRss::read();
        if received < n {
            println!(
                "  raw core: {} of {n} messages dropped (slow consumer)",
                n - received
            );
        }
        let consume = rate(received, last - started);
        let consume_cpu = cpu_per_msg(received.max(1), cpu0);
        Ok(Figures {
            publish,
            consume,
            publish_rss,
            consume_rss,
            publish_cpu,
            consume_cpu,
        })
    }

    /// Publishes the batches to `subject`, each confirmed by a round trip.
    async fn core_publish(
        &self,
        subject: &Subject,
        batches: &[Vec<(String, Bytes)>],
    ) -> Result<(), BoxError> {
        let probe: Subject = format!("{}.probe", self.publisher.new_inbox()).into();
        for batch in batches {
            for (id, payload) in batch {
                let mut headers = HeaderMap::new();
                headers.insert("Nats-Msg-Id", id.as_str());
                self.publisher
                    .publish_with_headers(subject.clone(), headers, payload.clone())
                    .await?;
            }
            confirm(&self.publisher, &probe).await?;
        }
        Ok(())
    }
}

struct Tidemill {
    publisher: NatsPublisher,
    subscriber: NatsSubscriber,
}

impl Tidemill {
    async fn round(&self, mode: NatsMode, n: usize, raw: &Raw) -> Result<Figures, BoxError> {
        let batches: Vec<Vec<Message>> = (0..n)
            .collect::<Vec<_>>()
            .chunks(BATCH)
            .map(|c| c.iter().map(|i| Message::new(payload(*i))).collect())
            .collect();
        match mode {
            NatsMode::JetStream => self.jetstream(n, batches, raw).await,
            NatsMode::Core => self.core(n, batches, raw).await,
        }
    }

    async fn jetstream(
        &self,
        n: usize,
        batches: Vec<Vec<Message>>,
        raw: &Raw,
    ) -> Result<Figures, BoxError> {
        let topic = unique("bench-tm");
        let group = SubscribeOptions::group("bench");
        // Creates the stream (and the group's consumer) outside the timed section, like
        // the raw side's `create_stream`.
        self.subscriber.initialize(&topic, &group).await?;
        PeakRss::reset();
        let cpu0 = process_cpu();
        let started = Instant::now();
        for batch in batches {
            self.publisher.publish(&topic, batch).await?;
        }
        let publish = rate(n, started.elapsed());
        let publish_cpu = cpu_per_msg(n, cpu0);
        let publish_rss = PeakRss::read();

        PeakRss::reset();
        let cpu0 = process_cpu();
        let started = Instant::now();
        let mut stream = self.subscriber.subscribe(&topic, group).await?;
        let mut received = 0;
        while received < n {
            let item = tokio::time::timeout(LIMIT, stream.next())
                .await
                .map_err(|_| format!("tidemill: stalled after {received} of {n}"))?;
            let d = item.ok_or("tidemill: stream ended")??;
            d.ack().await?;
            received += 1;
        }
        let consume = rate(n, started.elapsed());
        let consume_cpu = cpu_per_msg(n, cpu0);
        let consume_rss = PeakRss::read();
        drop(stream);
        raw.js_pub.delete_stream(&topic).await?;
        Ok(Figures {
            publish,
            consume,
            publish_rss,
            consume_rss,
            publish_cpu,
            consume_cpu,
        })
    }

    async fn core(
        &self,
        n: usize,
        batches: Vec<Vec<Message>>,
        raw: &Raw,
    ) -> Result<Figures, BoxError> {
        let topic = unique("bench-tm-core");
        PeakRss::reset();
        let cpu0 = process_cpu();
        let started = Instant::now();
        for batch in batches {
            self.publisher.publish(&topic, batch).await?;
        }
        let publish = rate(n, started.elapsed());
        let publish_cpu = cpu_per_msg(n, cpu0);
        let publish_rss = PeakRss::read();

        // The raw publisher feeds both sides' subscribers.
        let raw_batches: Vec<Vec<(String, Bytes)>> = (0..n)
            .collect::<Vec<_>>()
            .chunks(BATCH)
            .map(|c| c.iter().map(|i| (message_id(*i), payload(*i))).collect())
            .collect();
        let topic = unique("bench-tm-core");
        let mut stream = self
            .subscriber
            .subscribe(&topic, SubscribeOptions::new())
            .await?;
        let counter = tokio::spawn(async move {
            let mut received = 0;
            let mut last = Instant::now();
            while received < n {
                match tokio::time::timeout(Duration::from_secs(5), stream.next()).await {
                    Ok(Some(Ok(d))) => {
                        let _ = d.ack().await;
                        received += 1;
                        last = Instant::now();
                    }
                    _ => break,
                }
            }
            (received, last)
        });
        PeakRss::reset();
        let cpu0 = process_cpu();
        let started = Instant::now();
        raw.core_publish(&topic.clone().into(), &raw_batches)
            .await?;
        let (received, last) = counter.await?;
        let consume_rss = PeakRss::read();
        if received < n {
            println!(
                "  tidemill core: {} of {n} messages dropped (slow consumer)",
                n - received
            );
        }
        let consume = rate(received, last - started);
        let consume_cpu = cpu_per_msg(received.max(1), cpu0);
        Ok(Figures {
            publish,
            consume,
            publish_rss,
            consume_rss,
            publish_cpu,
            consume_cpu,
        })
    }
}

/// Largest batch of the batch section (raw pull requests, router batches).
const BATCH_MAX: usize = 500;
/// The router batch's `max_wait`.
const BATCH_WAIT: Duration = Duration::from_millis(50);
/// `max_ack_pending` of the batch section's consumers.
const MAX_ACK_PENDING: i64 = 1_000;

const VARIANTS: [&str; 3] = [
    "raw async-nats, batch() of 500, ack each",
    "tidemill router, single-message handler",
    "tidemill router, .batch(500, 50ms)",
];

async fn run_batch(url: String, n: usize, rounds: usize) -> Result<(), BoxError> {
    println!();
    println!(
        "JetStream batch section: {n} pre-published messages of {PAYLOAD} bytes, max_ack_pending {MAX_ACK_PENDING}, {rounds} rounds"
    );
    let mut config = NatsConfig::new(url.as_str());
    config.jetstream.max_ack_pending = MAX_ACK_PENDING;
    let bench = BatchBench {
        raw: Raw::connect(&url).await?,
        publisher: NatsPublisher::connect(config.clone()).await?,
        admin: NatsSubscriber::connect(config.clone()).await?,
        config,
    };
    let mut rows: Vec<[Consumed; 3]> = Vec::new();
    for round in 0..rounds {
        let mut figures = [Consumed::default(); 3];
        for k in 0..3 {
            let variant = (round + k) % 3;
            figures[variant] = bench.round(variant, n).await?;
        }
        println!(
            "  round {}: consume {:>7.0} / {:>7.0} / {:>7.0} msg/s   (raw batch / tidemill single / tidemill batch)",
            round + 1,
            figures[0].rate,
            figures[1].rate,
            figures[2].rate,
        );
        rows.push(figures);
    }
    let rate_of = |v: usize| median(&rows.iter().map(|r| r[v].rate).collect::<Vec<_>>());
    let cpu_of = |v: usize| {
        let cpu: Vec<f64> = rows.iter().filter_map(|r| r[v].cpu_us).collect();
        (!cpu.is_empty()).then(|| median(&cpu))
    };
    let rss_of = |v: usize| rows.iter().filter_map(|r| r[v].rss).max();
    let ratio = |a: usize, b: usize| {
        median(
            &rows
                .iter()
                .map(|r| r[a].rate / r[b].rate)
                .collect::<Vec<_>>(),
        )
    };
    let fmt_cpu = |c: Option<f64>| c.map_or("n/a".to_owned(), |c| format!("{c:.1}"));
    println!();
    println!("| JetStream batch consume, {n} x {PAYLOAD} B | msg/s | CPU µs/msg | peak RSS MiB |");
    println!("|---|---|---|---|");
    for (v, name) in VARIANTS.iter().enumerate() {
        println!(
            "| {name} | {:.0} | {} | {} |",
            rate_of(v),
            fmt_cpu(cpu_of(v)),
            mib(rss_of(v))
        );
    }
    let (vs_raw, vs_single) = (ratio(2, 0), ratio(2, 1));
    println!(
        "batch / raw batch {vs_raw:.2}x, batch / single {vs_single:.2}x (medians of the per-round ratios; \
         msg/s and CPU: medians of {rounds} rounds; peak RSS: the largest)"
    );
    let call_us = std::env::var("TIDEMILL_BENCH_CALL_US").unwrap_or_else(|_| "0".into());
    let group =
        format!("nats JetStream batch consume ({n} × {PAYLOAD} B, {call_us} µs per handler call)");
    for (v, name) in VARIANTS.iter().enumerate() {
        let mut note = cpu_of(v).map_or(String::new(), |c| format!("{c:.1} µs CPU/msg; "));
        note.push_str(&format!("median of {rounds} rounds"));
        if v == 2 {
            note.push_str(&format!(
                "; per round batch/raw batch {vs_raw:.2}x, batch/single {vs_single:.2}x"
            ));
        }
        record(
            &Row::new(group.as_str(), *name, rate_of(v))
                .with_peak_rss(rss_of(v))
                .with_note(note),
        );
    }
    bench.publisher.close().await?;
    bench.admin.close().await?;
    Ok(())
}

struct BatchBench {
    config: NatsConfig,
    publisher: NatsPublisher,
    /// Creates streams and consumers (the routers get subscribers of their own: closing a
    /// router closes its subscribers).
    admin: NatsSubscriber,
    raw: Raw,
}

impl BatchBench {
    /// A fresh stream with the `bench` group's consumer, holding `n` messages.
    async fn prepare(&self, n: usize) -> Result<String, BoxError> {
        let topic = unique("bench-batch");
        self.admin
            .initialize(&topic, &SubscribeOptions::group("bench"))
            .await?;
        let messages: Vec<Message> = (0..n).map(|i| Message::new(payload(i))).collect();
        for chunk in messages.chunks(BATCH) {
            self.publisher.publish(&topic, chunk.to_vec()).await?;
        }
        Ok(topic)
    }

    async fn round(&self, variant: usize, n: usize) -> Result<Consumed, BoxError> {
        let topic = self.prepare(n).await?;
        let figures = match variant {
            0 => self.raw_batch(&topic, n).await?,
            v => self.router(&topic, n, v == 2).await?,
        };
        self.raw.js_pub.delete_stream(&topic).await?;
        Ok(figures)
    }

    async fn raw_batch(&self, topic: &str, n: usize) -> Result<Consumed, BoxError> {
        let name = self.admin.consumer_name(topic, "bench").await?;
        let consumer: async_nats::jetstream::consumer::PullConsumer = self
            .raw
            .js_sub
            .get_consumer_from_stream(name.as_str(), topic)
            .await?;
        let clock = Clock::start();
        let mut received = 0;
        while received < n {
            let want = BATCH_MAX.min(n - received);
            let mut batch = consumer
                .batch()
                .max_messages(want)
                .expires(Duration::from_secs(30))
                .messages()
                .await?;
            let mut messages = Vec::with_capacity(want);
            while let Some(m) = tokio::time::timeout(LIMIT, batch.next())
                .await
                .map_err(|_| format!("raw batch: stalled after {received} of {n}"))?
            {
                messages.push(m?);
            }
            if messages.is_empty() {
                return Err(format!("raw batch: empty batch after {received} of {n}").into());
            }
            handler_call().await;
            received += messages.len();
            for m in &messages {
                m.ack().await?;
            }
        }
        Ok(clock.stop(n))
    }

    async fn router(&self, topic: &str, n: usize, batch: bool) -> Result<Consumed, BoxError> {
        let subscriber = NatsSubscriber::connect(self.config.clone()).await?;
        let router = Router::new();
        let counter = HandledCounter::new(n);
        let handler = router
            .add_handler("bench")
            .subscribe(subscriber, topic)
            .group("bench");
        let c = counter.clone();
        if batch {
            handler
                .batch(BATCH_MAX, BATCH_WAIT)
                .handler(move |messages: Vec<Message>| {
                    let (c, k) = (c.clone(), messages.len());
                    async move {
                        handler_call().await;
                        c.add(k);
                    }
                })
                .await?;
        } else {
            handler
                .handler(move |_m: Message| {
                    let c = c.clone();
                    async move {
                        handler_call().await;
                        c.add(1);
                        HandlerResult::Ok(())
                    }
                })
                .await?;
        }
        let clock = Clock::start();
        let running = router.clone();
        let task = tokio::spawn(async move { running.run().await });
        tokio::time::timeout(LIMIT, counter.done.notified())
            .await
            .map_err(|_| {
                format!(
                    "tidemill (batch: {batch}): stalled after {} of {n}",
                    counter.seen()
                )
            })?;
        let figures = clock.stop(n);
        router.close().await?;
        task.await??;
        Ok(figures)
    }
}
