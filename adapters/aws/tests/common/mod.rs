//! Test backends on the local AWS API of brokers (moto, `TIDEMILL_AWS_URL`).
#![allow(dead_code)] // each test crate uses part of this module

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tidemill_aws::{AwsConfig, SqsPublisher, SqsSubscriber};
use tidemill_core::{Error, Publisher, Result, Subscriber};
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
