//! Test backends on the PostgreSQL server of brokers (`TIDEMILL_POSTGRES_URL`).
#![allow(dead_code)] // each test crate uses part of this module

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use tidemill_core::{
    DeliveryStream, Error, Message, Publisher, Result, SubscribeOptions, Subscriber,
};
use tidemill_sql::{SqlConfig, SqlPublisher, SqlSubscriber};
use tidemill_testkit::fault_proxy::FaultProxy;
use tidemill_testkit::{Backend, Features};

/// The server's URL; panics when unset (tests check `TIDEMILL_POSTGRES_URL` first).
pub fn postgres_url() -> String {
    std::env::var("TIDEMILL_POSTGRES_URL")
        .unwrap_or_else(|_| panic!("TIDEMILL_POSTGRES_URL is not set"))
}

/// Whether the server is there; prints SKIP when not.
pub fn have_server(test: &str) -> bool {
    if std::env::var_os("TIDEMILL_POSTGRES_URL").is_none() {
        eprintln!("SKIP {test}: TIDEMILL_POSTGRES_URL is not set (no database to test against)");
        return false;
    }
    true
}

/// `host:port` of a PostgreSQL URL.
pub fn host_port(url: &str) -> String {
    let rest = url.split("://").last().unwrap_or(url);
    let rest = rest.rsplit('@').next().unwrap_or(rest);
    rest.split(['/', '?']).next().unwrap_or(rest).to_owned()
}

/// `url` with its `host:port` replaced by `addr`.
pub fn via(url: &str, addr: &str) -> String {
    url.replacen(&host_port(url), addr, 1)
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

/// The test settings: the defaults with a shorter lease and poll interval. Also sets up
/// logging (`RUST_LOG=tidemill_sql=debug` shows what the adapter does).
pub fn test_config(url: &str) -> SqlConfig {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut config = SqlConfig::new(url);
    config.lease = Duration::from_secs(5);
    config.poll_interval = Duration::from_millis(250);
    config.max_connections = 4;
    config
}

/// How a backend breaks connections.
pub enum Disruption {
    /// Cut every connection through a fault proxy in front of the server.
    Proxy(FaultProxy),
    /// Restart the server with `brokers/brokers.sh restart postgres`.
    Restart,
}

/// Publishers and subscribers on one PostgreSQL server.
pub struct SqlBackend {
    pub config: SqlConfig,
    pub features: Features,
    pub disruption: Disruption,
    /// Topics used through this backend: their rows are deleted when it is dropped.
    topics: Arc<Mutex<HashSet<String>>>,
}

impl SqlBackend {
    /// Every connection through a fresh fault proxy in front of the server.
    pub async fn through_proxy(features: Features, configure: impl FnOnce(&mut SqlConfig)) -> Self {
        let url = postgres_url();
        let upstream = host_port(&url);
        let proxy = FaultProxy::start(upstream.as_str())
            .await
            .unwrap_or_else(|e| panic!("cannot start a fault proxy in front of {upstream}: {e}"));
        let mut config = test_config(&via(&url, &proxy.addr().to_string()));
        configure(&mut config);
        SqlBackend {
            config,
            features,
            disruption: Disruption::Proxy(proxy),
            topics: Arc::default(),
        }
    }

    /// Straight to the server; `disrupt` restarts it.
    pub fn restarting(features: Features, configure: impl FnOnce(&mut SqlConfig)) -> Self {
        let mut config = test_config(&postgres_url());
        configure(&mut config);
        SqlBackend {
            config,
            features,
            disruption: Disruption::Restart,
            topics: Arc::default(),
        }
    }
}

/// Restarts the shared server; `false` when it is external (the script refuses, status 3).
pub async fn restart_postgres() -> bool {
    tidemill_testkit::restart_broker("postgres").await
}

#[async_trait]
impl Backend for SqlBackend {
    fn features(&self) -> Features {
        self.features.clone()
    }

    async fn publisher(&self) -> Result<Arc<dyn Publisher>> {
        Ok(Arc::new(Recording {
            inner: SqlPublisher::connect(self.config.clone()).await?,
            topics: self.topics.clone(),
        }))
    }

    async fn subscriber(&self) -> Result<Arc<dyn Subscriber>> {
        Ok(Arc::new(Recording {
            inner: SqlSubscriber::connect(self.config.clone()).await?,
            topics: self.topics.clone(),
        }))
    }

    async fn disrupt(&self) -> Result<()> {
        match &self.disruption {
            Disruption::Proxy(proxy) => proxy.cut(),
            Disruption::Restart => {
                restart_postgres().await;
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
impl Publisher for Recording<SqlPublisher> {
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
impl Subscriber for Recording<SqlSubscriber> {
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

impl Drop for SqlBackend {
    fn drop(&mut self) {
        let topics: Vec<String> = self.topics.lock().drain().collect();
        if topics.is_empty() {
            return;
        }
        let prefix = self.config.table_prefix.clone();
        // On a thread of its own: the backend is dropped inside the test's runtime.
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let Ok(pool) = raw().await else { return };
                for table in ["pending", "groups", "messages"] {
                    let _ = sqlx::query(&format!(
                        "DELETE FROM {prefix}{table} WHERE topic = ANY($1)"
                    ))
                    .bind(&topics)
                    .execute(&pool)
                    .await;
                }
                pool.close().await;
            });
        });
        let _ = cleanup.join();
    }
}

/// A plain client pool on the server (what another program would use).
pub async fn raw() -> std::result::Result<sqlx::PgPool, sqlx::Error> {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&postgres_url())
        .await
}
