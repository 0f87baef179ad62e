//! Raw AWS SDK (`aws-sdk-sns`, `aws-sdk-sqs`) vs Tidemill on the local AWS API of brokers
//! (moto's server mode), same settings, same run.
//!
//! `make bench-aws` (or `cargo bench -p tidemill-aws --bench throughput` with
//! `TIDEMILL_AWS_URL` and the test credentials set: `eval "$(bash brokers/brokers.sh env
//! aws)"`). N messages of 100 bytes of text, on standard (not FIFO) topics and queues. Every
//! message carries what Tidemill writes for a message with one metadata entry: the
//! `tidemill-uuid` attribute (a uuid made before the clock starts) and one `String`
//! attribute (`bench-trace`), the payload as the body. Both sides use the adapter's default
//! settings (`AwsConfig::default()`: long polls of 20 s, visibility timeout 30 s, 2
//! concurrent receives, prefetch 40) and SDK clients loaded the same way.
//!
//! **The emulator bounds every rate here.** moto answers a few hundred to a few thousand
//! messages per second in one Python process on the same 2 cores; the figures compare the
//! two clients under the same emulator, they say nothing of AWS's own throughput or
//! latency. The CPU per message is this process's alone (every thread,
//! `/proc/self/task/*/schedstat`), not moto's, so it is the figure that measures the client.
//!
//! # Publish
//!
//! Each variant publishes to a fresh SNS topic with one SQS queue subscribed to it (raw
//! message delivery; created beforehand), sequentially, from the first request to the last
//! answer:
//!
//! - `raw`: `sns.publish_batch()` of 10 entries at a time, each built inside the clock from
//!   the prepared uuid and payload (body, `tidemill-uuid` and `bench-trace` attributes),
//!   one batch after the other, checking each answer's `Failed` list;
//! - `tidemill, 10 per publish`: `SqsPublisher::publish(topic, 10 messages)` (one
//!   `PublishBatch` per call);
//! - `tidemill, 100 per publish`: `SqsPublisher::publish(topic, 100 messages)` (the
//!   adapter sends them as 10 sequential `PublishBatch` calls).
//!
//! # Consume
//!
//! A fresh topic with one consumer-group queue per variant subscribed to it, filled
//! beforehand with N messages published through Tidemill (untimed; SNS fans them out to
//! every queue, so each variant reads the same N messages from a queue of its own). Timed
//! from the start of the consumer until the N-th message is deleted:
//!
//! - `raw`: 2 tasks (the adapter's `concurrent_receives`), each looping `receive_message`
//!   (up to 10 messages, wait 20 s, visibility 30 s, all message and system attributes, as
//!   the adapter asks) then one `delete_message_batch` of what it received, awaited before
//!   its next receive;
//! - `tidemill stream, acks in flight`: `SqsSubscriber::subscribe` + the stream, each
//!   delivery acked without waiting for the previous acks (up to the prefetch of 40 in
//!   flight; the adapter gathers them into `DeleteMessageBatch` calls of up to 10), done
//!   when the N-th ack returned;
//! - `tidemill router, sequential handler`: a `Router` with a plain handler (default
//!   concurrency 1: each message's ack is awaited before the next message is handled),
//!   done when the handler saw the N-th message and the queue then shows nothing in flight
//!   (`GetQueueAttributes`, polled every 2 ms);
//! - `tidemill router, concurrency 10`: the same with `.concurrency(10)`.
//!
//! Variants rotate which goes first each round; each round is printed, then, per variant,
//! the medians of: msg/s, the per-round ratio to raw, CPU µs per message, the per-round CPU
//! ratio to raw, the SDK calls per 100 messages by kind (counted from the SDK's own
//! operation spans, `SNS.PublishBatch`, `SQS.ReceiveMessage`, …, by a tracing layer that
//! enables nothing else), the context switches of the process's threads per message
//! (`/proc/self/task/*/status`: hand-offs that wake a parked thread); and the largest peak
//! RSS (`VmHWM`, reset before each timed run; process-wide, so it includes what the bench
//! holds, e.g. the prepared messages). Each SDK call costs this process a few hundred µs of
//! CPU (signing, HTTP, XML/JSON), so calls per message largely decide CPU per message.
//!
//! Environment: `TIDEMILL_BENCH_MESSAGES` (N, default 1,000: a full run takes about two
//! minutes on moto), `TIDEMILL_BENCH_ROUNDS` (default 5), `TIDEMILL_BENCH_SECTION`
//! (`publish` or `consume`; default both).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_sdk_sns::types::{MessageAttributeValue, PublishBatchRequestEntry};
use aws_sdk_sqs::types::QueueAttributeName;
use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, MessageSystemAttributeName};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tidemill_aws::{AwsConfig, SqsPublisher, SqsSubscriber};
use tidemill_core::{HandlerResult, Message, Publisher, Router, SubscribeOptions, Subscriber};
use tidemill_testkit::bench::{median, mib, record, Clock, Consumed, HandledCounter, Row};
use tracing_subscriber::layer::SubscriberExt;

const PAYLOAD: usize = 100;
/// Entries of one `PublishBatch` (SNS's maximum).
const ENTRIES: usize = 10;
/// The metadata entry every message carries.
const META_KEY: &str = "bench-trace";
const META_VALUE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const LIMIT: Duration = Duration::from_secs(600);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The kinds of SDK calls counted: publish, receive, delete, change visibility.
const KINDS: [&str; 4] = ["publish", "receive", "delete", "visibility"];

/// SDK calls made so far, by kind ([`KINDS`]), counted from the operation spans the SDK
/// opens for every call (`SNS.PublishBatch`, `SQS.ReceiveMessage`, …) by [`CallCounter`].
static CALLS: [AtomicUsize; 4] = [
    AtomicUsize::new(0),
    AtomicUsize::new(0),
    AtomicUsize::new(0),
    AtomicUsize::new(0),
];

/// The [`KINDS`] index of the SDK operation span `name`.
fn kind(name: &str) -> Option<usize> {
    match name {
        "SNS.PublishBatch" | "SNS.Publish" | "SQS.SendMessageBatch" | "SQS.SendMessage" => Some(0),
        "SQS.ReceiveMessage" => Some(1),
        "SQS.DeleteMessageBatch" | "SQS.DeleteMessage" => Some(2),
        "SQS.ChangeMessageVisibilityBatch" | "SQS.ChangeMessageVisibility" => Some(3),
        _ => None,
    }
}

fn calls_now() -> [usize; 4] {
    std::array::from_fn(|k| CALLS[k].load(Ordering::Relaxed))
}

/// Counts the SDK's operation spans; every other span and event stays disabled (so
/// Tidemill's and the SDK's logging cost nothing more than without a subscriber).
struct CallCounter;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for CallCounter {
    fn register_callsite(
        &self,
        metadata: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        if metadata.is_span() && kind(metadata.name()).is_some() {
            tracing::subscriber::Interest::always()
        } else {
            tracing::subscriber::Interest::never()
        }
    }

    fn enabled(
        &self,
        metadata: &tracing::Metadata<'_>,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        metadata.is_span() && kind(metadata.name()).is_some()
    }

    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        _: &tracing::span::Id,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if let Some(k) = kind(attrs.metadata().name()) {
            CALLS[k].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Context switches of every thread of this process so far (voluntary: a thread waited,
/// e.g. parked for want of work and was woken for the next hand-off; involuntary:
/// preempted), from `/proc/self/task/*/status`; 0 where unavailable.
fn context_switches() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    let mut total = 0;
    for task in tasks.flatten() {
        // A thread may have ended since the directory was read.
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        total += status
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum::<u64>();
    }
    total
}

/// One timed run: its figures, the SDK calls it made (by kind) and the context switches of
/// the process's threads.
#[derive(Default, Clone, Copy)]
struct Run {
    figures: Consumed,
    calls: [usize; 4],
    switches: u64,
}

/// A [`Clock`] that also counts SDK calls and context switches.
struct Meter {
    clock: Clock,
    calls: [usize; 4],
    switches: u64,
}

impl Meter {
    fn start() -> Meter {
        Meter {
            calls: calls_now(),
            switches: context_switches(),
            clock: Clock::start(),
        }
    }

    fn stop(self, n: usize) -> Run {
        let figures = self.clock.stop(n);
        let now = calls_now();
        Run {
            figures,
            calls: std::array::from_fn(|k| now[k] - self.calls[k]),
            switches: context_switches().saturating_sub(self.switches),
        }
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default)
}

fn main() -> Result<(), BoxError> {
    let Some(url) = std::env::var("TIDEMILL_AWS_URL")
        .ok()
        .filter(|u| !u.is_empty())
    else {
        eprintln!("SKIP: TIDEMILL_AWS_URL is not set (run `make bench-aws`)");
        return Ok(());
    };
    let n = env_usize("TIDEMILL_BENCH_MESSAGES", 1_000);
    let rounds = env_usize("TIDEMILL_BENCH_ROUNDS", 5);
    let section = std::env::var("TIDEMILL_BENCH_SECTION").unwrap_or_default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(CallCounter))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let bench = Bench::connect(&url, n).await?;
        println!(
            "AWS SNS/SQS on moto at {}: {n} messages of {PAYLOAD} bytes (+ tidemill-uuid and one \
             metadata attribute), standard topics and queues, {rounds} rounds (median reported); \
             the emulator bounds every rate",
            bench.endpoint
        );
        if section.is_empty() || section == "publish" {
            bench.publish(rounds).await?;
        }
        if section.is_empty() || section == "consume" {
            bench.consume(rounds).await?;
        }
        bench.cleanup().await
    })
}

/// `region` and `endpoint` of `sqs://REGION?endpoint=URL`.
fn region_endpoint(url: &str) -> Result<(String, String), BoxError> {
    let rest = url.strip_prefix("sqs://").unwrap_or(url);
    let (region, query) = rest.split_once('?').unwrap_or((rest, ""));
    let endpoint = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("endpoint="))
        .ok_or_else(|| format!("TIDEMILL_AWS_URL `{url}` names no endpoint"))?;
    Ok((region.trim_end_matches('/').to_owned(), endpoint.to_owned()))
}

fn payload(i: usize) -> String {
    let mut p = format!("{i:010}");
    while p.len() < PAYLOAD {
        p.push('x');
    }
    p
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// N Tidemill messages, made before a clock starts.
fn messages(n: usize) -> Vec<Message> {
    (0..n)
        .map(|i| Message::new(payload(i)).with_metadata(META_KEY, META_VALUE))
        .collect()
}

/// Runs `f` under a [`Meter`] (and [`LIMIT`]).
async fn timed<Fut>(n: usize, f: Fut) -> Result<Run, BoxError>
where
    Fut: std::future::Future<Output = Result<(), BoxError>>,
{
    let meter = Meter::start();
    tokio::time::timeout(LIMIT, f)
        .await
        .map_err(|_| format!("no end within {LIMIT:?}"))??;
    Ok(meter.stop(n))
}

fn cpu(r: &Run) -> f64 {
    r.figures.cpu_us.unwrap_or(f64::NAN)
}

/// Prints the medians of `runs` (one row per round, one column per variant, the first the
/// baseline) and records them as rows of `group`.
fn report(group: &str, names: &[&str], runs: &[Vec<Run>], n: usize) {
    let rounds = runs.len();
    println!();
    println!(
        "| {group} | msg/s | ÷ raw | CPU µs/msg | CPU ÷ raw | SDK calls per 100 msgs | context switches per msg | peak RSS MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (at, name) in names.iter().enumerate() {
        let column = |f: &dyn Fn(&Vec<Run>) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
        let rate = column(&|r| r[at].figures.rate);
        let ratio = column(&|r| r[at].figures.rate / r[0].figures.rate);
        let cpu_us = column(&|r| cpu(&r[at]));
        let cpu_ratio = column(&|r| cpu(&r[at]) / cpu(&r[0]));
        let calls = KINDS
            .iter()
            .enumerate()
            .filter_map(|(k, what)| {
                let per_100 = column(&|r| r[at].calls[k] as f64 * 100.0 / n as f64);
                if per_100 == 0.0 {
                    None
                } else if per_100 < 10.0 {
                    Some(format!("{per_100:.1} {what}"))
                } else {
                    Some(format!("{per_100:.0} {what}"))
                }
            })
            .collect::<Vec<_>>()
            .join(" + ");
        let switches = column(&|r| r[at].switches as f64 / n as f64);
        let rss = runs.iter().filter_map(|r| r[at].figures.rss).max();
        println!(
            "| {name} | {rate:.0} | {ratio:.2}x | {cpu_us:.1} | {cpu_ratio:.2}x | {calls} | {switches:.2} | {} |",
            mib(rss)
        );
        let mut note = format!(
            "{cpu_us:.1} µs CPU/msg; SDK calls per 100 messages: {calls}; {switches:.2} context \
             switches per message; median of {rounds} \
             rounds on moto (the emulator bounds the rate)"
        );
        if at > 0 {
            note.push_str(&format!(
                "; median per-round ratio to {}: rate {ratio:.2}, CPU {cpu_ratio:.2}",
                names[0]
            ));
        }
        record(
            &Row::new(group, *name, rate)
                .with_peak_rss(rss)
                .with_note(note),
        );
    }
    println!(
        "(msg/s, CPU, calls and ratios: medians over {rounds} rounds of each round's own figures; \
         peak RSS: the largest)"
    );
}

struct Bench {
    n: usize,
    endpoint: String,
    config: AwsConfig,
    sns: aws_sdk_sns::Client,
    sqs: aws_sdk_sqs::Client,
    publisher: SqsPublisher,
    /// Creates the consume section's queues (the routers get subscribers of their own:
    /// closing a router closes its subscribers).
    subscriber: SqsSubscriber,
    /// Topics and queues (their names) to delete at the end.
    created: parking_lot::Mutex<(Vec<String>, Vec<String>)>,
}

impl Bench {
    async fn connect(url: &str, n: usize) -> Result<Bench, BoxError> {
        let (region, endpoint) = region_endpoint(url)?;
        let mut config = AwsConfig::new(region.clone());
        config.endpoint = Some(endpoint.clone());
        let sdk = aws_config::defaults(BehaviorVersion::latest())
            .region(aws_config::Region::new(region))
            .endpoint_url(&endpoint)
            .load()
            .await;
        let (sns, sqs) = (
            aws_sdk_sns::Client::new(&sdk),
            aws_sdk_sqs::Client::new(&sdk),
        );
        // Warm up the raw clients (credentials, connections) as `connect` does Tidemill's.
        sqs.list_queues().max_results(1).send().await?;
        sns.list_topics().send().await?;
        Ok(Bench {
            n,
            sns,
            sqs,
            publisher: SqsPublisher::connect(config.clone()).await?,
            subscriber: SqsSubscriber::connect(config.clone()).await?,
            endpoint,
            config,
            created: parking_lot::Mutex::default(),
        })
    }

    /// Creates `topic` with the queue of consumer group `group` subscribed to it (raw
    /// delivery), as Tidemill names and sets them up, through the publisher or the
    /// subscriber (which then know them); returns the topic's ARN.
    async fn topic_with_queue(
        &self,
        topic: &str,
        group: &str,
        via_subscriber: bool,
    ) -> Result<String, BoxError> {
        if via_subscriber {
            self.subscriber
                .initialize(topic, &SubscribeOptions::group(group))
                .await?;
        } else {
            self.publisher.retain_for(topic, group).await?;
        }
        let name = self.config.topic_name(topic);
        let arn = self
            .sns
            .create_topic()
            .name(&name)
            .send()
            .await?
            .topic_arn()
            .ok_or("CreateTopic returned no ARN")?
            .to_owned();
        let mut created = self.created.lock();
        created.0.push(arn.clone());
        created.1.push(self.config.queue_name(topic, group));
        Ok(arn)
    }

    async fn queue_url(&self, topic: &str, group: &str) -> Result<String, BoxError> {
        let name = self.config.queue_name(topic, group);
        Ok(self
            .sqs
            .get_queue_url()
            .queue_name(&name)
            .send()
            .await?
            .queue_url()
            .ok_or("GetQueueUrl returned no URL")?
            .to_owned())
    }

    /// Messages in the queue: (visible, in flight).
    async fn queue_counts(&self, url: &str) -> Result<(u64, u64), BoxError> {
        let out = self
            .sqs
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await?;
        let get = |name: QueueAttributeName| {
            out.attributes()
                .and_then(|a| a.get(&name))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        Ok((
            get(QueueAttributeName::ApproximateNumberOfMessages),
            get(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
        ))
    }

    /// Deletes the topics and queues the run created (their subscriptions go with them).
    async fn cleanup(&self) -> Result<(), BoxError> {
        self.publisher.close().await?;
        self.subscriber.close().await?;
        let (topics, queues) = std::mem::take(&mut *self.created.lock());
        for arn in topics {
            self.sns.delete_topic().topic_arn(arn).send().await?;
        }
        for name in queues {
            if let Ok(out) = self.sqs.get_queue_url().queue_name(&name).send().await {
                if let Some(url) = out.queue_url() {
                    self.sqs.delete_queue().queue_url(url).send().await?;
                }
            }
        }
        Ok(())
    }

    // ---- Publish ----

    async fn publish(&self, rounds: usize) -> Result<(), BoxError> {
        const NAMES: [&str; 3] = [
            "raw aws-sdk-sns: PublishBatch of 10, sequential",
            "tidemill-aws: publish 10 per call",
            "tidemill-aws: publish 100 per call",
        ];
        let n = self.n;
        println!();
        println!("publish: {n} messages per variant, each to a fresh SNS topic with one subscribed SQS queue");
        let mut runs = Vec::new();
        for round in 0..rounds {
            let mut figures = vec![Run::default(); 3];
            for k in 0..3 {
                let variant = (round + k) % 3;
                let topic = unique(&format!("pub{variant}"));
                let arn = self.topic_with_queue(&topic, "sink", false).await?;
                figures[variant] = match variant {
                    0 => self.raw_publish(&arn).await?,
                    1 => self.tidemill_publish(&topic, ENTRIES).await?,
                    _ => self.tidemill_publish(&topic, 100).await?,
                };
                // The queue holds what was published: drop it now rather than keep it in
                // the emulator's memory for the rest of the run.
                let url = self.queue_url(&topic, "sink").await?;
                self.sqs.purge_queue().queue_url(url).send().await?;
            }
            println!(
                "  round {}: {:>6.0} / {:>6.0} / {:>6.0} msg/s | CPU µs/msg {:.0} / {:.0} / {:.0}   (raw / tidemill 10 / tidemill 100)",
                round + 1,
                figures[0].figures.rate,
                figures[1].figures.rate,
                figures[2].figures.rate,
                cpu(&figures[0]),
                cpu(&figures[1]),
                cpu(&figures[2]),
            );
            runs.push(figures);
        }
        report(
            &format!("aws (moto) publish ({n} × {PAYLOAD} B)"),
            &NAMES,
            &runs,
            n,
        );
        Ok(())
    }

    async fn raw_publish(&self, arn: &str) -> Result<Run, BoxError> {
        let n = self.n;
        // What Tidemill's messages hold when the clock starts: uuids and payloads.
        let uuids: Vec<Arc<str>> = (0..n).map(|_| tidemill_core::new_uuid()).collect();
        let payloads: Vec<String> = (0..n).map(payload).collect();
        timed(n, async {
            for start in (0..n).step_by(ENTRIES) {
                let entries = (start..(start + ENTRIES).min(n))
                    .map(|i| {
                        let text = |v: &str| {
                            MessageAttributeValue::builder()
                                .data_type("String")
                                .string_value(v)
                                .build()
                        };
                        PublishBatchRequestEntry::builder()
                            .id((i - start).to_string())
                            .message(&payloads[i])
                            .message_attributes("tidemill-uuid", text(&uuids[i])?)
                            .message_attributes(META_KEY, text(META_VALUE)?)
                            .build()
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let out = self
                    .sns
                    .publish_batch()
                    .topic_arn(arn)
                    .set_publish_batch_request_entries(Some(entries))
                    .send()
                    .await?;
                if let Some(f) = out.failed().first() {
                    return Err(
                        format!("raw publish: entry {} failed: {}", f.id(), f.code()).into(),
                    );
                }
            }
            Ok::<(), BoxError>(())
        })
        .await
    }

    async fn tidemill_publish(&self, topic: &str, per_call: usize) -> Result<Run, BoxError> {
        let n = self.n;
        let mut all = messages(n);
        timed(n, async {
            while !all.is_empty() {
                let rest = all.split_off(per_call.min(all.len()));
                self.publisher
                    .publish(topic, std::mem::replace(&mut all, rest))
                    .await?;
            }
            Ok(())
        })
        .await
    }

    // ---- Consume ----

    async fn consume(&self, rounds: usize) -> Result<(), BoxError> {
        const NAMES: [&str; 4] = [
            "raw aws-sdk-sqs: 2 receivers, ReceiveMessage 10 + DeleteMessageBatch",
            "tidemill-aws stream, acks in flight",
            "tidemill-aws router, sequential handler",
            "tidemill-aws router, concurrency 10",
        ];
        const GROUPS: [&str; 4] = ["raw", "stream", "router", "router10"];
        let n = self.n;
        println!();
        println!(
            "consume: {n} messages per variant, from a consumer-group queue of its own filled beforehand"
        );
        let mut runs = Vec::new();
        for round in 0..rounds {
            let topic = unique("con");
            for group in GROUPS {
                self.topic_with_queue(&topic, group, true).await?;
            }
            let fill = timed(n, async {
                let mut all = messages(n);
                while !all.is_empty() {
                    let rest = all.split_off(100.min(all.len()));
                    self.publisher
                        .publish(&topic, std::mem::replace(&mut all, rest))
                        .await?;
                }
                Ok(())
            })
            .await?;
            let mut urls = Vec::new();
            for group in GROUPS {
                let url = self.queue_url(&topic, group).await?;
                let (visible, _) = self.queue_counts(&url).await?;
                if visible != n as u64 {
                    return Err(format!(
                        "queue of group {group} holds {visible} messages, not {n}"
                    )
                    .into());
                }
                urls.push(url);
            }
            let mut figures = vec![Run::default(); 4];
            for k in 0..4 {
                let variant = (round + k) % 4;
                figures[variant] = match variant {
                    0 => self.raw_consume(&urls[0]).await?,
                    1 => self.tidemill_stream(&topic, GROUPS[1]).await?,
                    v => {
                        self.router(&topic, GROUPS[v], &urls[v], if v == 2 { 1 } else { 10 })
                            .await?
                    }
                };
            }
            println!(
                "  round {}: {:>6.0} / {:>6.0} / {:>6.0} / {:>6.0} msg/s | CPU µs/msg {:.0} / {:.0} / {:.0} / {:.0}   (raw / stream / router / router c10; fill {:.0} msg/s to 4 queues)",
                round + 1,
                figures[0].figures.rate,
                figures[1].figures.rate,
                figures[2].figures.rate,
                figures[3].figures.rate,
                cpu(&figures[0]),
                cpu(&figures[1]),
                cpu(&figures[2]),
                cpu(&figures[3]),
                fill.figures.rate,
            );
            runs.push(figures);
        }
        report(
            &format!("aws (moto) consume ({n} × {PAYLOAD} B)"),
            &NAMES,
            &runs,
            n,
        );
        Ok(())
    }

    async fn raw_consume(&self, url: &str) -> Result<Run, BoxError> {
        let n = self.n;
        let counter = HandledCounter::new(n);
        let wait = self.config.wait_time.as_secs() as i32;
        let visibility = self.config.visibility_timeout.as_secs() as i32;
        let meter = Meter::start();
        let mut receivers = tokio::task::JoinSet::new();
        for _ in 0..self.config.concurrent_receives {
            let (sqs, url, counter) = (self.sqs.clone(), url.to_owned(), counter.clone());
            receivers.spawn(async move {
                while counter.seen() < n {
                    let out = sqs
                        .receive_message()
                        .queue_url(&url)
                        .max_number_of_messages(10)
                        .wait_time_seconds(wait)
                        .visibility_timeout(visibility)
                        .message_attribute_names("All")
                        .message_system_attribute_names(MessageSystemAttributeName::All)
                        .send()
                        .await?;
                    let received = out.messages();
                    if received.is_empty() {
                        continue;
                    }
                    let entries = received
                        .iter()
                        .enumerate()
                        .map(|(i, m)| {
                            std::hint::black_box(m.body());
                            DeleteMessageBatchRequestEntry::builder()
                                .id(i.to_string())
                                .set_receipt_handle(m.receipt_handle().map(str::to_owned))
                                .build()
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    let deleted = sqs
                        .delete_message_batch()
                        .queue_url(&url)
                        .set_entries(Some(entries))
                        .send()
                        .await?;
                    if let Some(f) = deleted.failed().first() {
                        return Err(
                            format!("raw delete: entry {} failed: {}", f.id(), f.code()).into()
                        );
                    }
                    counter.add(received.len());
                }
                Ok::<(), BoxError>(())
            });
        }
        let finished = tokio::time::timeout(LIMIT, async {
            loop {
                tokio::select! {
                    _ = counter.done.notified() => return Ok(()),
                    joined = receivers.join_next() => match joined {
                        Some(Ok(Ok(()))) if counter.seen() >= n => return Ok(()),
                        Some(Ok(Ok(()))) => {}
                        Some(Ok(Err(e))) => return Err(e),
                        Some(Err(e)) => return Err(e.into()),
                        None => return Err::<(), BoxError>("raw receivers ended early".into()),
                    },
                }
            }
        })
        .await;
        let figures = meter.stop(n);
        finished.map_err(|_| format!("raw consume: stalled after {} of {n}", counter.seen()))??;
        receivers.abort_all();
        Ok(figures)
    }

    async fn tidemill_stream(&self, topic: &str, group: &str) -> Result<Run, BoxError> {
        let n = self.n;
        timed(n, async {
            let mut stream = self
                .subscriber
                .subscribe(topic, SubscribeOptions::group(group))
                .await?;
            let mut acks = FuturesUnordered::new();
            let mut acked = 0;
            while acked < n {
                tokio::select! {
                    Some(done) = acks.next(), if !acks.is_empty() => {
                        done?;
                        acked += 1;
                    }
                    next = stream.next() => {
                        let d = next.ok_or("stream ended")??;
                        std::hint::black_box(d.message().payload());
                        acks.push(d.ack());
                    }
                }
            }
            Ok(())
        })
        .await
    }

    async fn router(
        &self,
        topic: &str,
        group: &str,
        url: &str,
        concurrency: usize,
    ) -> Result<Run, BoxError> {
        let n = self.n;
        let subscriber = SqsSubscriber::connect(self.config.clone()).await?;
        // Its own subscriber learns the queue before the clock starts, as the others know it.
        subscriber
            .initialize(topic, &SubscribeOptions::group(group))
            .await?;
        let router = Router::new();
        let counter = HandledCounter::new(n);
        let c = counter.clone();
        router
            .add_handler("bench")
            .subscribe(subscriber, topic)
            .group(group)
            .concurrency(concurrency)
            .handler(move |m: Message| {
                let c = c.clone();
                async move {
                    std::hint::black_box(m.payload());
                    c.add(1);
                    HandlerResult::Ok(())
                }
            })
            .await?;
        let meter = Meter::start();
        let running = router.clone();
        let task = tokio::spawn(async move { running.run().await });
        tokio::time::timeout(LIMIT, counter.done.notified())
            .await
            .map_err(|_| format!("router: stalled after {} of {n}", counter.seen()))?;
        // Handled is not acked yet: wait until the queue has nothing left in flight.
        loop {
            if self.queue_counts(url).await? == (0, 0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let figures = meter.stop(n);
        router.close().await?;
        task.await??;
        Ok(figures)
    }
}
