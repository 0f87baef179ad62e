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

use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::pull::Config as PullConfig;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy};
use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, stream, ContextBuilder};
use async_nats::{Client, HeaderMap, RequestErrorKind, Subject};
use bytes::Bytes;
use futures::StreamExt;
use tidemill_core::{Message, Publisher, SubscribeOptions, Subscriber};
use tidemill_nats::{NatsConfig, NatsMode, NatsPublisher, NatsSubscriber};
use tidemill_testkit::bench::{median, mib, record, PeakRss, Row};

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
    runtime.block_on(run(url, n, rounds))
}

#[derive(Default, Clone, Copy)]
struct Figures {
    publish: f64,
    consume: f64,
    /// Peak RSS (bytes) during the timed publish, where known.
    publish_rss: Option<u64>,
    /// Peak RSS (bytes) during the timed consume, where known.
    consume_rss: Option<u64>,
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
        type Rss = fn(&Figures) -> Option<u64>;
        for (what, f, g) in [
            (
                "publish",
                (|x: &Figures| x.publish) as fn(&Figures) -> f64,
                (|x: &Figures| x.publish_rss) as Rss,
            ),
            (
                "consume",
                |x: &Figures| x.consume,
                |x: &Figures| x.consume_rss,
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
            summary.push((label, what, r, t, ratio, r_rss, t_rss));
        }
        tm.publisher.close().await?;
        tm.subscriber.close().await?;
    }
    println!();
    println!(
        "median of {rounds} rounds, {n} x {PAYLOAD} B   raw msg/s   tidemill msg/s   ratio (median of per-round ratios)   peak RSS MiB raw / tidemill (max of rounds)"
    );
    for (label, what, r, t, ratio, r_rss, t_rss) in summary {
        println!(
            "{label:<10} {what:<8}                {r:>11.0}   {t:>14.0}   {ratio:<34.2}   {} / {}",
            mib(r_rss),
            mib(t_rss)
        );
        // For `make bench` (BENCHMARKS.md); nothing when run by hand.
        let group = format!("nats {label} {what}");
        record(&Row::new(group.as_str(), "raw async-nats", r).with_peak_rss(r_rss));
        record(
            &Row::new(group.as_str(), "tidemill-nats", t)
                .with_peak_rss(t_rss)
                .with_note(format!(
                    "median of {rounds} rounds; median per-round ratio {ratio:.2}"
                )),
        );
    }
    Ok(())
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
        let consume_rss = PeakRss::read();
        drop(messages);
        self.js_pub.delete_stream(&topic).await?;
        Ok(Figures {
            publish,
            consume,
            publish_rss,
            consume_rss,
        })
    }

    async fn core(
        &self,
        n: usize,
        batches: Vec<Vec<(String, Bytes)>>,
    ) -> Result<Figures, BoxError> {
        let subject: Subject = unique("bench-raw-core").into();
        PeakRss::reset();
        let started = Instant::now();
        self.core_publish(&subject, &batches).await?;
        let publish = rate(n, started.elapsed());
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
        Ok(Figures {
            publish,
            consume,
            publish_rss,
            consume_rss,
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
        let started = Instant::now();
        for batch in batches {
            self.publisher.publish(&topic, batch).await?;
        }
        let publish = rate(n, started.elapsed());
        let publish_rss = PeakRss::read();

        PeakRss::reset();
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
        let consume_rss = PeakRss::read();
        drop(stream);
        raw.js_pub.delete_stream(&topic).await?;
        Ok(Figures {
            publish,
            consume,
            publish_rss,
            consume_rss,
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
        let started = Instant::now();
        for batch in batches {
            self.publisher.publish(&topic, batch).await?;
        }
        let publish = rate(n, started.elapsed());
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
        Ok(Figures {
            publish,
            consume,
            publish_rss,
            consume_rss,
        })
    }
}
