//! Test backends on the local AWS API of brokers (moto, `TIDEMILL_AWS_URL`).
#![allow(dead_code)] // each test crate uses part of this module

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use tidemill_aws::{AwsConfig, SqsPublisher, SqsSubscriber};
use tidemill_core::{Delivery, DeliveryStream, Error, Publisher, Result, Subscriber};
use tidemill_testkit::fault_proxy::FaultProxy;
use tidemill_testkit::{Backend, Features};

/// The emulator's URL (`sqs://REGION?endpoint=http://HOST:PORT`); panics when unset.
pub fn aws_url() -> String {
    std::env::var("TIDEMILL_AWS_URL").unwrap_or_else(|_| panic!("TIDEMILL_AWS_URL is not set"))
}

/// Whether the emulator is there; prints SKIP when not.
pub fn have_server(test: &str) -> bool {
    if std::env::var_os("TIDEMILL_AWS_URL").is_none() {
        eprintln!("SKIP {test}: TIDEMILL_AWS_URL is not set (no broker to test against)");
        return false;
    }
    true
}

/// Region and endpoint of `sqs://REGION?endpoint=URL`.
pub fn region_endpoint(url: &str) -> (String, String) {
    let rest = url.strip_prefix("sqs://").unwrap_or(url);
    let (region, query) = rest.split_once('?').unwrap_or((rest, ""));
    let endpoint = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("endpoint="))
        .unwrap_or_else(|| panic!("TIDEMILL_AWS_URL `{url}` names no endpoint"));
    (region.trim_end_matches('/').to_owned(), endpoint.to_owned())
}

/// `host:port` of an `http://host:port` endpoint.
pub fn host_port(endpoint: &str) -> String {
    let rest = endpoint.split("://").last().unwrap_or(endpoint);
    rest.split('/').next().unwrap_or(rest).to_owned()
}

/// What the adapter has with standard (not FIFO) topics and queues.
pub fn features() -> Features {
    Features {
        consumer_groups: true,
        order_per_key: false,
        persistent: true,
        replays_old_messages: false,
        redelivers_on_nack: true,
        delivery_attempt: true,
        reconnect: true,
    }
}

/// The test settings: the defaults with shorter long polls and visibility timeouts, so
/// closes and cut connections settle quickly. Also sets up logging
/// (`RUST_LOG=tidemill_aws=debug` shows what the adapter does).
pub fn test_config(endpoint: &str) -> AwsConfig {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let (region, _) = region_endpoint(&aws_url());
    let mut config = AwsConfig::new(region);
    config.endpoint = Some(endpoint.to_owned());
    config.wait_time = Duration::from_secs(2);
    config.visibility_timeout = Duration::from_secs(10);
    config
}

/// Publishers and subscribers on the emulator, every connection through a fault proxy.
pub struct AwsBackend {
    pub config: AwsConfig,
    pub features: Features,
    pub proxy: FaultProxy,
}

impl AwsBackend {
    /// Every connection through a fresh fault proxy in front of the emulator.
    pub async fn through_proxy(features: Features, configure: impl FnOnce(&mut AwsConfig)) -> Self {
        let (_, endpoint) = region_endpoint(&aws_url());
        let upstream = host_port(&endpoint);
        let proxy = FaultProxy::start(upstream.as_str())
            .await
            .unwrap_or_else(|e| panic!("cannot start a fault proxy in front of {upstream}: {e}"));
        let mut config = test_config(&format!("http://{}", proxy.addr()));
        configure(&mut config);
        AwsBackend {
            config,
            features,
            proxy,
        }
    }
}

#[async_trait]
impl Backend for AwsBackend {
    fn features(&self) -> Features {
        self.features.clone()
    }

    async fn publisher(&self) -> Result<Arc<dyn Publisher>> {
        Ok(Arc::new(SqsPublisher::connect(self.config.clone()).await?))
    }

    async fn subscriber(&self) -> Result<Arc<dyn Subscriber>> {
        Ok(Arc::new(SqsSubscriber::connect(self.config.clone()).await?))
    }

    async fn disrupt(&self) -> Result<()> {
        self.proxy.cut();
        Ok(())
    }
}

/// Fails with the error's text, for `?`-free tests.
pub fn ok<T>(r: std::result::Result<T, Error>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// The settings of a test that talks to the emulator directly (no fault proxy).
pub fn direct_config() -> AwsConfig {
    let (_, endpoint) = region_endpoint(&aws_url());
    test_config(&endpoint)
}

/// A multi-threaded runtime for one test.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// How long a test waits for anything the emulator should do (generous: the emulator is
/// shared with other tests and may be busy).
pub const LIMIT: Duration = Duration::from_secs(60);

/// The next delivery of `stream`, failing the test after [`LIMIT`].
pub async fn next(stream: &mut DeliveryStream, what: &str) -> Delivery {
    tokio::time::timeout(LIMIT, stream.next())
        .await
        .unwrap_or_else(|_| panic!("no {what} within {LIMIT:?}"))
        .unwrap_or_else(|| panic!("the stream ended before the {what}"))
        .unwrap_or_else(|e| panic!("stream error before the {what}: {e}"))
}

/// Waits until `check` returns true, polling every 200 ms, failing the test after [`LIMIT`].
pub async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = tokio::time::Instant::now() + LIMIT;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "{what}: not within {LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Plain SDK clients on the emulator (what another program would use), with the credentials
/// of the standard chain (`brokers.sh env aws` exports test ones).
pub async fn sdk() -> (aws_sdk_sqs::Client, aws_sdk_sns::Client) {
    let (region, endpoint) = region_endpoint(&aws_url());
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(region))
        .endpoint_url(endpoint)
        .load()
        .await;
    (
        aws_sdk_sqs::Client::new(&config),
        aws_sdk_sns::Client::new(&config),
    )
}

/// The URL of queue `name`, or `None` when it does not exist.
pub async fn queue_url(sqs: &aws_sdk_sqs::Client, name: &str) -> Option<String> {
    match sqs.get_queue_url().queue_name(name).send().await {
        Ok(out) => Some(out.queue_url().expect("a queue url").to_owned()),
        Err(e) => {
            let code = aws_sdk_sqs::error::ProvideErrorMetadata::code(&e).map(str::to_owned);
            assert!(
                matches!(
                    code.as_deref(),
                    Some("AWS.SimpleQueueService.NonExistentQueue" | "QueueDoesNotExist")
                ),
                "GetQueueUrl {name}: {}",
                aws_sdk_sqs::error::DisplayErrorContext(e)
            );
            None
        }
    }
}

/// The messages in a queue: visible, in flight and delayed.
pub async fn queue_depth(sqs: &aws_sdk_sqs::Client, url: &str) -> u64 {
    use aws_sdk_sqs::types::QueueAttributeName as A;
    let out = sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(A::ApproximateNumberOfMessages)
        .attribute_names(A::ApproximateNumberOfMessagesNotVisible)
        .attribute_names(A::ApproximateNumberOfMessagesDelayed)
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "GetQueueAttributes {url}: {}",
                aws_sdk_sqs::error::DisplayErrorContext(e)
            )
        });
    let attrs = out.attributes().expect("queue attributes");
    [
        A::ApproximateNumberOfMessages,
        A::ApproximateNumberOfMessagesNotVisible,
        A::ApproximateNumberOfMessagesDelayed,
    ]
    .iter()
    .map(|a| {
        attrs
            .get(a)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    })
    .sum()
}

/// The ARN of SNS topic `name` (created when missing: `CreateTopic` is idempotent).
pub async fn topic_arn(sns: &aws_sdk_sns::Client, name: &str, fifo: bool) -> String {
    let mut req = sns.create_topic().name(name);
    if fifo {
        req = req.attributes("FifoTopic", "true");
    }
    req.send()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "CreateTopic {name}: {}",
                aws_sdk_sns::error::DisplayErrorContext(e)
            )
        })
        .topic_arn()
        .expect("a topic arn")
        .to_owned()
}

/// Restarts the shared emulator (it loses every queue, topic and message); `false` when it
/// is external (the script refuses, status 3).
pub async fn restart_aws() -> bool {
    tidemill_testkit::restart_broker("aws").await
}

/// A subscriber and a publisher that keep working after the emulator lost every topic, queue
/// and subscription (`lose` makes that happen, given the config, the topic and the queues in
/// use; it returns false to skip the test): the subscriber, still subscribed with a group
/// and without one (a private queue), makes its topic, queues and subscriptions again, and
/// every message published once that is done is delivered to both, intact and once.
pub async fn keeps_working_after_losing_state<F, Fut>(label: &str, lose: F)
where
    F: FnOnce(AwsConfig, String, Vec<String>) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    use tidemill_aws::SqsRecord;
    use tidemill_core::{Message, SubscribeOptions};
    let topic = tidemill_testkit::unique_topic(label);
    let config = direct_config();
    let opts = SubscribeOptions::group("survivor");
    let p = ok(SqsPublisher::connect(config.clone()).await, "connect");
    let s = ok(SqsSubscriber::connect(config.clone()).await, "connect");
    ok(s.initialize(&topic, &opts).await, "initialize");
    let mut group = ok(s.subscribe(&topic, opts).await, "subscribe");
    let mut private = ok(
        s.subscribe(&topic, SubscribeOptions::new()).await,
        "subscribe",
    );
    let before = Message::new("before");
    ok(p.publish(&topic, vec![before.clone()]).await, "publish");
    let mut queues = Vec::new();
    for stream in [&mut group, &mut private] {
        let d = next(stream, "message from before").await;
        assert_eq!(d.message().uuid(), before.uuid());
        queues.push(
            SqsRecord::of(d.message())
                .expect("a record")
                .queue()
                .to_owned(),
        );
        ok(d.ack().await, "ack");
    }

    if !lose(config.clone(), topic.clone(), queues.clone()).await {
        return;
    }

    // Until the subscriber has made its queues and subscriptions again, a message published
    // to the topic reaches no queue (as on AWS); publish_mandatory says when one does, the
    // topic's subscriptions when both do.
    let until = tokio::time::Instant::now() + LIMIT;
    let mut refused = 0;
    let probe = loop {
        let probe = Message::new("probe");
        match p.publish_mandatory(&topic, vec![probe.clone()]).await {
            Ok(()) => break probe,
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < until,
                    "no queue subscribed to {topic} again within {LIMIT:?}; last error: {e}"
                );
                if refused == 0 {
                    eprintln!("publish_mandatory before the subscription is back: {e}");
                }
                refused += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    eprintln!("publish_mandatory refused {refused} times before the subscription was back");
    let (sqs, sns) = sdk().await;
    let arn = topic_arn(&sns, &config.topic_name(&topic), false).await;
    wait_until("both queues subscribed again", || async {
        let subs = sns
            .list_subscriptions_by_topic()
            .topic_arn(&arn)
            .send()
            .await
            .expect("ListSubscriptionsByTopic");
        subs.subscriptions().len() >= 2
    })
    .await;
    let after: Vec<Message> = (0..5)
        .map(|i| Message::new(format!("after {i}")).with_metadata("i", i))
        .collect();
    ok(p.publish(&topic, after.clone()).await, "publish after");
    // The probe reached the queues subscribed again when it was published: at least one
    // (publish_mandatory said so), not always the group's (the private subscription may
    // have come back first). The messages published after reach both.
    let mut probes = 0;
    for (stream, name) in [(&mut group, &queues[0]), (&mut private, &queues[1])] {
        let mut want: std::collections::HashMap<String, Message> = after
            .iter()
            .map(|m| (m.uuid().to_owned(), m.clone()))
            .collect();
        while !want.is_empty() {
            let d = next(stream, "message published after").await;
            let got = d.message().clone();
            assert_ne!(got.uuid(), before.uuid(), "the acked message came back");
            ok(d.ack().await, "ack");
            if got.uuid() == probe.uuid() {
                probes += 1;
                continue;
            }
            let sent = want
                .remove(got.uuid())
                .unwrap_or_else(|| panic!("unexpected or repeated message {got:?}"));
            assert_eq!(got.payload(), sent.payload());
            assert_eq!(got.metadata(), sent.metadata());
        }
        // Acks went to the queue as it is now: it empties, unless the probe is still on its
        // way to this stream (then it is the one message left).
        let url = queue_url(&sqs, name)
            .await
            .unwrap_or_else(|| panic!("queue {name} exists again"));
        let emptied = wait_until("every message deleted", || async {
            queue_depth(&sqs, &url).await == 0
        });
        tokio::pin!(emptied);
        loop {
            tokio::select! {
                () = &mut emptied => break,
                d = next(stream, "probe") => {
                    let got = d.message().clone();
                    assert_eq!(got.uuid(), probe.uuid(), "unexpected or repeated message {got:?}");
                    ok(d.ack().await, "ack");
                    probes += 1;
                }
            }
        }
    }
    assert!(
        (1..=2).contains(&probes),
        "the probe publish_mandatory accepted reached {probes} of the two queues"
    );
    ok(s.close().await, "close");
    ok(p.close().await, "close");
}

/// Point to point: a publisher and a subscriber in queue mode keep working after the
/// emulator lost the queue (`lose`, given the config and the queue's name): the publisher
/// makes the queue again, so every message published after the loss is delivered, once.
pub async fn queue_mode_keeps_working_after_losing_state<F, Fut>(label: &str, lose: F)
where
    F: FnOnce(AwsConfig, String) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    use tidemill_core::{Message, SubscribeOptions};
    let topic = tidemill_testkit::unique_topic(label);
    let mut config = direct_config();
    config.mode = tidemill_aws::Mode::Queues;
    let p = ok(SqsPublisher::connect(config.clone()).await, "connect");
    let s = ok(SqsSubscriber::connect(config.clone()).await, "connect");
    let mut stream = ok(
        s.subscribe(&topic, SubscribeOptions::new()).await,
        "subscribe",
    );
    let before = Message::new("before");
    ok(p.publish(&topic, vec![before.clone()]).await, "publish");
    let d = next(&mut stream, "message from before").await;
    assert_eq!(d.message().uuid(), before.uuid());
    ok(d.ack().await, "ack");

    if !lose(config.clone(), config.topic_name(&topic)).await {
        return;
    }

    let after: Vec<Message> = (0..5)
        .map(|i| Message::new(format!("after {i}")).with_metadata("i", i))
        .collect();
    // The first publish may meet the emulator still starting: retried until it is taken.
    let until = tokio::time::Instant::now() + LIMIT;
    for m in &after {
        loop {
            match p.publish(&topic, vec![m.clone()]).await {
                Ok(()) => break,
                Err(e) => {
                    assert!(
                        tokio::time::Instant::now() < until,
                        "no publish within {LIMIT:?}: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
    let mut want: std::collections::HashMap<String, Message> = after
        .iter()
        .map(|m| (m.uuid().to_owned(), m.clone()))
        .collect();
    while !want.is_empty() {
        let d = next(&mut stream, "message published after").await;
        let got = d.message().clone();
        assert_ne!(got.uuid(), before.uuid(), "the acked message came back");
        let sent = want
            .remove(got.uuid())
            .unwrap_or_else(|| panic!("unexpected or repeated message {got:?}"));
        assert_eq!(got.payload(), sent.payload());
        assert_eq!(got.metadata(), sent.metadata());
        ok(d.ack().await, "ack");
    }
    let (sqs, _) = sdk().await;
    let url = queue_url(&sqs, &config.topic_name(&topic))
        .await
        .expect("the queue exists again");
    // An ack returns once its delete is queued: it reaches the queue with the
    // subscription's next DeleteMessageBatch.
    wait_until("every message deleted", || async {
        queue_depth(&sqs, &url).await == 0
    })
    .await;
    ok(s.close().await, "close");
    ok(p.close().await, "close");
}
