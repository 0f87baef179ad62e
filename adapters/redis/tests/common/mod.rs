//! Test backends on the Redis server of brokers (`TIDEMILL_REDIS_URL`).
#![allow(dead_code)] // each test crate uses part of this module

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use tidemill_core::{
    DeliveryStream, Error, Message, Publisher, Result, SubscribeOptions, Subscriber,
};
use tidemill_redis::{RedisConfig, RedisPublisher, RedisSubscriber};
use tidemill_testkit::fault_proxy::FaultProxy;
use tidemill_testkit::{Backend, Features};

/// The server's URL; panics when unset (tests check `TIDEMILL_REDIS_URL` first).
pub fn redis_url() -> String {
    std::env::var("TIDEMILL_REDIS_URL").unwrap_or_else(|_| panic!("TIDEMILL_REDIS_URL is not set"))
}

/// Whether the server is there; prints SKIP when not.
pub fn have_server(test: &str) -> bool {
    if std::env::var_os("TIDEMILL_REDIS_URL").is_none() {
        eprintln!("SKIP {test}: TIDEMILL_REDIS_URL is not set (no broker to test against)");
        return false;
    }
    true
}

/// `host:port` of a Redis URL.
pub fn host_port(url: &str) -> String {
    let rest = url.split("://").last().unwrap_or(url);
    let rest = rest.rsplit('@').next().unwrap_or(rest);
    rest.split('/').next().unwrap_or(rest).to_owned()
}

/// What the adapter has with the default configuration.
pub fn features() -> Features {
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

/// The test settings: the defaults, with shorter blocking reads. Also sets up logging
/// (`RUST_LOG=tidemill_redis=debug` shows what the adapter does).
pub fn test_config(url: &str) -> RedisConfig {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut config = RedisConfig::new(url);
    config.block = Duration::from_millis(500);
    config
}

/// How a backend breaks connections.
pub enum Disruption {
    /// Cut every connection through a fault proxy in front of the server.
    Proxy(FaultProxy),
    /// Restart the server with `brokers/brokers.sh restart redis`.
    Restart,
}

/// Publishers and subscribers on one Redis server.
pub struct RedisBackend {
    pub config: RedisConfig,
    pub features: Features,
    pub disruption: Disruption,
    /// Topics used through this backend: their streams are deleted when it is dropped.
    topics: Arc<Mutex<HashSet<String>>>,
}

impl RedisBackend {
    /// Every connection through a fresh fault proxy in front of the server.
    pub async fn through_proxy(
        features: Features,
        configure: impl FnOnce(&mut RedisConfig),
    ) -> Self {
        let upstream = host_port(&redis_url());
        let proxy = FaultProxy::start(upstream.as_str())
            .await
            .unwrap_or_else(|e| panic!("cannot start a fault proxy in front of {upstream}: {e}"));
        let mut config = test_config(&format!("redis://{}/0", proxy.addr()));
        configure(&mut config);
        RedisBackend {
            config,
            features,
            disruption: Disruption::Proxy(proxy),
            topics: Arc::default(),
        }
    }

    /// Straight to the server; `disrupt` restarts it.
    pub fn restarting(features: Features, configure: impl FnOnce(&mut RedisConfig)) -> Self {
        let mut config = test_config(&redis_url());
        configure(&mut config);
        RedisBackend {
            config,
            features,
            disruption: Disruption::Restart,
            topics: Arc::default(),
        }
    }
}

/// Restarts the shared server; `false` when it is external (the script refuses, status 3).
pub async fn restart_redis() -> bool {
    tidemill_testkit::restart_broker("redis").await
}

#[async_trait]
impl Backend for RedisBackend {
    fn features(&self) -> Features {
        self.features.clone()
    }

    async fn publisher(&self) -> Result<Arc<dyn Publisher>> {
        Ok(Arc::new(Recording {
            inner: RedisPublisher::connect(self.config.clone()).await?,
            topics: self.topics.clone(),
        }))
    }

    async fn subscriber(&self) -> Result<Arc<dyn Subscriber>> {
        Ok(Arc::new(Recording {
            inner: RedisSubscriber::connect(self.config.clone()).await?,
            topics: self.topics.clone(),
        }))
    }

    async fn disrupt(&self) -> Result<()> {
        match &self.disruption {
            Disruption::Proxy(proxy) => proxy.cut(),
            Disruption::Restart => {
                restart_redis().await;
            }
        }
        Ok(())
    }
}

/// Fails with the error's text, for `?`-free tests.
pub fn ok<T>(r: std::result::Result<T, Error>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// A publisher or subscriber that notes the topics it was used with.
pub struct Recording<T> {
    pub inner: T,
    pub topics: Arc<Mutex<HashSet<String>>>,
}

#[async_trait]
impl Publisher for Recording<RedisPublisher> {
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
impl Subscriber for Recording<RedisSubscriber> {
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

impl Drop for RedisBackend {
    fn drop(&mut self) {
        let topics: Vec<String> = self.topics.lock().drain().collect();
        if topics.is_empty() {
            return;
        }
        let streams: Vec<String> = topics.iter().map(|t| self.config.stream(t)).collect();
        let url = redis_url();
        // On a thread of its own: the backend is dropped inside the test's runtime.
        let cleanup = std::thread::spawn(move || {
            let Ok(client) = redis::Client::open(url.as_str()) else {
                return;
            };
            let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_secs(5)) else {
                return;
            };
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&streams).query(&mut conn);
        });
        let _ = cleanup.join();
    }
}

/// A plain client connection to the server (what another program would use).
pub async fn raw() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url().as_str())
        .unwrap_or_else(|e| panic!("redis url: {e}"))
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("raw connection: {e}"))
}
