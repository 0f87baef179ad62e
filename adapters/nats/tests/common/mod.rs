//! Test backends on the NATS server of brokers (`TIDEMILL_NATS_URL`).
#![allow(dead_code)] // each test crate uses part of this module

pub mod raw;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use tidemill_core::{
    DeliveryStream, Error, Message, Publisher, Result, SubscribeOptions, Subscriber,
};
use tidemill_nats::{NatsConfig, NatsPublisher, NatsSubscriber};
use tidemill_testkit::fault_proxy::FaultProxy;
use tidemill_testkit::{Backend, Features};

/// The server's address; panics when unset (tests check `TIDEMILL_NATS_URL` first).
pub fn nats_url() -> String {
    std::env::var("TIDEMILL_NATS_URL").unwrap_or_else(|_| panic!("TIDEMILL_NATS_URL is not set"))
}

/// `host:port` of a NATS URL.
pub fn host_port(url: &str) -> String {
    let first = url.split(',').next().unwrap_or(url).trim();
    let without_scheme = first.split("://").last().unwrap_or(first);
    without_scheme
        .rsplit('@')
        .next()
        .unwrap_or(without_scheme)
        .to_owned()
}

/// Settings every test uses on top of the defaults: streams expire their messages after an
/// hour so test data does not pile up on the shared server.
pub fn test_config(url: &str) -> NatsConfig {
    let mut config = NatsConfig::new(url);
    config.jetstream.max_age = Some(Duration::from_secs(3600));
    config
}

/// What JetStream mode with the default configuration has: groups, order per key,
/// persistence, redelivery with attempt counts, reconnect.
pub fn jetstream_features() -> Features {
    Features {
        consumer_groups: true,
        order_per_key: true,
        persistent: true,
        replays_old_messages: false,
        redelivers_on_nack: true,
        delivery_attempt: true,
        reconnect: true,
    }
}

/// How a backend breaks connections.
pub enum Disruption {
    /// Cut every connection through a fault proxy in front of the server.
    Proxy(FaultProxy),
    /// Restart the server with `brokers/brokers.sh restart nats` (what
    /// `make brokers-restart NAME=nats` runs).
    Restart,
}

/// Publishers and subscribers on one NATS server, with the features the configuration
/// really has.
pub struct NatsBackend {
    pub config: NatsConfig,
    pub features: Features,
    pub disruption: Disruption,
    subscribers: Mutex<Vec<NatsSubscriber>>,
    /// Topics used through this backend: their streams are deleted when it is dropped.
    topics: Arc<Mutex<HashSet<String>>>,
}

impl NatsBackend {
    /// Every connection through a fresh fault proxy in front of the server; the client
    /// ignores servers the server announces, so it reconnects through the proxy.
    pub async fn through_proxy(
        features: Features,
        configure: impl FnOnce(&mut NatsConfig),
    ) -> Self {
        let upstream = host_port(&nats_url());
        let proxy = FaultProxy::start(upstream.as_str())
            .await
            .unwrap_or_else(|e| panic!("cannot start a fault proxy in front of {upstream}: {e}"));
        let mut config = test_config(&format!("nats://{}", proxy.addr()));
        config.ignore_discovered_servers = true;
        configure(&mut config);
        NatsBackend {
            config,
            features,
            disruption: Disruption::Proxy(proxy),
            subscribers: Mutex::new(Vec::new()),
            topics: Arc::default(),
        }
    }

    /// Straight to the server; `disrupt` restarts it.
    pub fn restarting(features: Features, configure: impl FnOnce(&mut NatsConfig)) -> Self {
        let mut config = test_config(&nats_url());
        configure(&mut config);
        NatsBackend {
            config,
            features,
            disruption: Disruption::Restart,
            subscribers: Mutex::new(Vec::new()),
            topics: Arc::default(),
        }
    }
}

/// Restarts the shared server; `false` when it is external (the script refuses, status 3).
pub async fn restart_nats() -> bool {
    tidemill_testkit::restart_broker("nats").await
}

/// Waits until `client` reconnected after a disruption (its connect count grew past
/// `before`) and the server processed everything it sent since, re-subscriptions included.
pub async fn wait_reconnected(client: &async_nats::Client, before: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while client.statistics().connects.load(Ordering::Relaxed) <= before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the client did not reconnect within 60s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A request nobody answers comes back ("no responders") only after the server handled
    // what the client sent before it.
    let probe = format!("{}.probe", client.new_inbox());
    loop {
        match client.request(probe.clone(), "".into()).await {
            Ok(_) => break,
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => break,
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the server did not answer within 60s: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Waits until the delivery connection of `subscriber` reconnected after a disruption (its
/// connect count grew past `before`) and the server processed its re-subscriptions.
pub async fn wait_deliveries_reconnected(subscriber: &NatsSubscriber, before: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if subscriber.delivery_connects() > before && subscriber.flush().await.is_ok() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the delivery connection did not reconnect within 60s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[async_trait]
impl Backend for NatsBackend {
    fn features(&self) -> Features {
        self.features.clone()
    }

    async fn publisher(&self) -> Result<Arc<dyn Publisher>> {
        Ok(Arc::new(Recording {
            inner: NatsPublisher::connect(self.config.clone()).await?,
            topics: self.topics.clone(),
        }))
    }

    async fn subscriber(&self) -> Result<Arc<dyn Subscriber>> {
        let s = NatsSubscriber::connect(self.config.clone()).await?;
        self.subscribers.lock().push(s.clone());
        Ok(Arc::new(Recording {
            inner: s,
            topics: self.topics.clone(),
        }))
    }

    async fn disrupt(&self) -> Result<()> {
        let subscribers: Vec<NatsSubscriber> = self.subscribers.lock().clone();
        let before: Vec<u64> = subscribers.iter().map(|s| s.delivery_connects()).collect();
        match &self.disruption {
            Disruption::Proxy(proxy) => proxy.cut(),
            Disruption::Restart => {
                if !restart_nats().await {
                    return Ok(());
                }
            }
        }
        if self.config.mode == tidemill_nats::NatsMode::Core {
            // Core NATS keeps nothing for a subscription that is not registered: messages
            // published before the subscribers are back are lost by design (at most
            // once). "The broker is back" therefore includes their re-subscriptions.
            for (s, before) in subscribers.iter().zip(before) {
                wait_deliveries_reconnected(s, before).await;
            }
        }
        Ok(())
    }
}

/// Fails with the error's text, for `?`-free tests.
pub fn ok<T>(r: std::result::Result<T, Error>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// A publisher or subscriber that notes the topics it was used with (also used by
/// benches/request_reply.rs, to delete the streams it created).
pub struct Recording<T> {
    /// The publisher or subscriber doing the work.
    pub inner: T,
    /// Where the topics are noted.
    pub topics: Arc<Mutex<HashSet<String>>>,
}

#[async_trait]
impl Publisher for Recording<NatsPublisher> {
    async fn publish(&self, topic: &str, messages: Vec<Message>) -> Result<()> {
        self.topics.lock().insert(topic.to_owned());
        self.inner.publish(topic, messages).await
    }
    async fn retain_for(&self, topic: &str, group: &str) -> Result<()> {
        self.topics.lock().insert(topic.to_owned());
        self.inner.retain_for(topic, group).await
    }
    async fn publish_mandatory(&self, topic: &str, messages: Vec<Message>) -> Result<()> {
        self.topics.lock().insert(topic.to_owned());
        self.inner.publish_mandatory(topic, messages).await
    }
    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

#[async_trait]
impl Subscriber for Recording<NatsSubscriber> {
    async fn subscribe(&self, topic: &str, options: SubscribeOptions) -> Result<DeliveryStream> {
        self.topics.lock().insert(topic.to_owned());
        self.inner.subscribe(topic, options).await
    }
    async fn initialize(&self, topic: &str, options: &SubscribeOptions) -> Result<()> {
        self.topics.lock().insert(topic.to_owned());
        self.inner.initialize(topic, options).await
    }
    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

impl Drop for NatsBackend {
    fn drop(&mut self) {
        let topics: Vec<String> = self.topics.lock().drain().collect();
        if topics.is_empty() || self.config.mode == tidemill_nats::NatsMode::Core {
            return;
        }
        // On a thread of its own: the backend is dropped inside the test's runtime.
        let url = nats_url();
        let cleanup = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                let _ =
                    tokio::time::timeout(Duration::from_secs(10), delete_streams(&url, &topics))
                        .await;
            });
        });
        let _ = cleanup.join();
    }
}

/// Deletes the streams the adapter created for `topics` (named after the topic).
pub async fn delete_streams(url: &str, topics: &[String]) {
    let Ok(client) = async_nats::connect(url).await else {
        return;
    };
    let js = async_nats::jetstream::new(client);
    for topic in topics {
        let _ = js.delete_stream(topic).await;
    }
}
