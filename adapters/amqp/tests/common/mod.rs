//! Helpers shared by the integration tests: the test broker's address, configurations that
//! clean up after themselves, URLs through a fault proxy.
#![allow(dead_code)]

use std::str::FromStr;

use lapin::uri::AMQPUri;
use tidemill_amqp::AmqpConfig;

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
