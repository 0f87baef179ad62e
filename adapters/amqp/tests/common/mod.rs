//! Helpers shared by the integration tests: the test broker's address, configurations that
//! clean up after themselves, URLs through a fault proxy, and the [`Backend`] of the
//! conformance suite and the middleware checks.
#![allow(dead_code)]

use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;
use lapin::uri::AMQPUri;
use tidemill_amqp::{AmqpConfig, AmqpPublisher, AmqpSubscriber};
use tidemill_core::{Publisher, Result, Subscriber};
use tidemill_testkit::fault_proxy::FaultProxy;
use tidemill_testkit::{Backend, Features};

/// The variable naming the test broker (`make test` sets it).
pub const URL_ENV: &str = "TIDEMILL_AMQP_URL";

/// The broker URL, or `None` (after printing SKIP for `test`) when the variable is unset.
pub fn broker_url(test: &str) -> Option<String> {
    match std::env::var(URL_ENV) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!("SKIP {test}: {URL_ENV} is not set (no broker to test against)");
            None
        }
    }
}

/// A configuration for the test broker at `url`. Group queues expire after ten unused
/// minutes so the shared broker does not collect the queues of every test run.
pub fn config(url: &str) -> AmqpConfig {
    let mut config = AmqpConfig::new(url);
    config
        .queue_arguments
        .insert("x-expires".to_owned(), serde_json::json!(600_000));
    config
}

/// `host:port` of `url`.
pub fn host_port(url: &str) -> String {
    let uri = AMQPUri::from_str(url).unwrap_or_else(|e| panic!("{URL_ENV} `{url}`: {e}"));
    format!("{}:{}", uri.authority.host, uri.authority.port)
}

/// `url` with its host and port replaced by `addr` (a fault proxy in front of the broker).
pub fn via(url: &str, addr: std::net::SocketAddr) -> String {
    let uri = AMQPUri::from_str(url).unwrap_or_else(|e| panic!("{URL_ENV} `{url}`: {e}"));
    let user = &uri.authority.userinfo;
    let vhost = uri.vhost.replace('%', "%25").replace('/', "%2f");
    format!("amqp://{}:{}@{addr}/{vhost}", user.username, user.password)
}

/// A topic name unique to this run.
pub fn topic(test: &str) -> String {
    tidemill_testkit::unique_topic(test)
}

/// Publishers and subscribers on the test broker, each with its own connection: straight to
/// the broker, or every connection through one fault proxy.
pub struct AmqpBackend {
    /// The fault proxy in front of the broker, if any; with one, `disrupt` cuts the
    /// connections.
    proxy: Option<FaultProxy>,
    config: AmqpConfig,
    order_per_key: bool,
}

impl AmqpBackend {
    /// Straight to the broker (no fault proxy, no `reconnect`, no order per key).
    pub fn new(customize: fn(&mut AmqpConfig)) -> Self {
        let mut config = config(&url());
        customize(&mut config);
        AmqpBackend {
            proxy: None,
            config,
            order_per_key: false,
        }
    }

    /// Every connection through a fault proxy in front of the broker, so that `reconnect`
    /// can cut them while other tests share the broker.
    pub async fn through_proxy(customize: fn(&mut AmqpConfig), order_per_key: bool) -> Self {
        let url = url();
        let upstream = host_port(&url);
        let proxy = FaultProxy::start(upstream.as_str())
            .await
            .unwrap_or_else(|e| panic!("cannot start a fault proxy in front of {upstream}: {e}"));
        let mut config = config(&via(&url, proxy.addr()));
        customize(&mut config);
        AmqpBackend {
            proxy: Some(proxy),
            config,
            order_per_key,
        }
    }
}

/// The test broker's URL; panics when unset (the suites check `URL_ENV` first).
fn url() -> String {
    std::env::var(URL_ENV).unwrap_or_else(|_| panic!("{URL_ENV} is not set"))
}

#[async_trait]
impl Backend for AmqpBackend {
    fn features(&self) -> Features {
        Features {
            consumer_groups: true,
            order_per_key: self.order_per_key,
            // Group queues are durable and keep messages while no member consumes.
            persistent: true,
            // A queue only receives what is published after it is bound.
            replays_old_messages: false,
            redelivers_on_nack: true,
            // x-delivery-count on quorum queues; counted by the subscriber on classic ones.
            delivery_attempt: true,
            // Only through the fault proxy, which `disrupt` cuts.
            reconnect: self.proxy.is_some(),
        }
    }

    async fn publisher(&self) -> Result<Arc<dyn Publisher>> {
        Ok(Arc::new(AmqpPublisher::connect(self.config.clone()).await?))
    }

    async fn subscriber(&self) -> Result<Arc<dyn Subscriber>> {
        Ok(Arc::new(
            AmqpSubscriber::connect(self.config.clone()).await?,
        ))
    }

    async fn disrupt(&self) -> Result<()> {
        // Every connection breaks (both sides see it closed); new ones get through.
        tidemill_testkit::disrupt_through(self.proxy.as_ref())
    }
}
