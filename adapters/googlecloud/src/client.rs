//! Connecting: endpoint and credentials, the admin clients, resource creation, error mapping.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use google_cloud_auth::credentials::{anonymous, Credentials};
use google_cloud_gax::error::rpc::Code;
use google_cloud_pubsub::client::{SubscriptionAdmin, TopicAdmin};
use google_cloud_pubsub::model::{
    DeadLetterPolicy, ExpirationPolicy, RetryPolicy, Subscription, Topic,
};
use tidemill_core::{BoxError, ConnectionState, Error, Result};
use tokio_util::sync::CancellationToken;

use crate::config::{redact_url, GoogleCloudConfig, EMULATOR_HOST_ENV};
use crate::names::{topic_name, TopicName};
use crate::BROKER;

/// Where and how to connect.
#[derive(Clone, Debug)]
pub(crate) struct Endpoint {
    /// The URL given to the clients; `None` for Google's default.
    pub url: Option<String>,
    /// How errors name the service: `host:port` of an emulator, or the URL.
    pub address: String,
    /// Anonymous credentials (emulator) or `None` for application-default credentials.
    pub credentials: Option<Credentials>,
}

impl Endpoint {
    /// Resolves the endpoint from `config` and, failing that, `PUBSUB_EMULATOR_HOST`.
    pub fn resolve(config: &GoogleCloudConfig) -> Result<Endpoint> {
        let env_host = || {
            std::env::var(EMULATOR_HOST_ENV)
                .ok()
                .filter(|h| !h.is_empty())
        };
        let emulator = config
            .emulator_host
            .clone()
            .or_else(|| config.endpoint.is_none().then(env_host).flatten());
        if let Some(host) = &emulator {
            if host.contains('@') || host.contains('/') {
                return Err(Error::config(
                    BROKER,
                    format!(
                        "the emulator host (`emulator_host` or {EMULATOR_HOST_ENV}) must be \
                         `host:port`, without credentials or scheme"
                    ),
                ));
            }
        }
        Ok(match (emulator, &config.endpoint) {
            (Some(host), _) => Endpoint {
                url: Some(format!("http://{host}")),
                address: host,
                credentials: Some(anonymous::Builder::new().build()),
            },
            (None, Some(url)) => Endpoint {
                url: Some(url.clone()),
                address: redact_url(url),
                credentials: None,
            },
            (None, None) => Endpoint {
                url: None,
                address: "https://pubsub.googleapis.com".into(),
                credentials: None,
            },
        })
    }

    fn builder_error(&self, what: &str, err: impl Into<BoxError>) -> Error {
        Error::Connect {
            broker: BROKER,
            address: self.address.clone(),
            source: format!("cannot build the {what} client: {}", err.into()).into(),
        }
    }

    pub async fn topic_admin(&self) -> Result<TopicAdmin> {
        let mut b = TopicAdmin::builder();
        if let Some(url) = &self.url {
            b = b.with_endpoint(url);
        }
        if let Some(c) = &self.credentials {
            b = b.with_credentials(c.clone());
        }
        b.build()
            .await
            .map_err(|e| self.builder_error("topic admin", e))
    }

    pub async fn subscription_admin(&self) -> Result<SubscriptionAdmin> {
        let mut b = SubscriptionAdmin::builder();
        if let Some(url) = &self.url {
            b = b.with_endpoint(url);
        }
        if let Some(c) = &self.credentials {
            b = b.with_credentials(c.clone());
        }
        b.build()
            .await
            .map_err(|e| self.builder_error("subscription admin", e))
    }

    pub async fn subscriber(&self) -> Result<google_cloud_pubsub::client::Subscriber> {
        let mut b = google_cloud_pubsub::client::Subscriber::builder();
        if let Some(url) = &self.url {
            b = b.with_endpoint(url);
        }
        if let Some(c) = &self.credentials {
            b = b.with_credentials(c.clone());
        }
        b.build()
            .await
            .map_err(|e| self.builder_error("subscriber", e))
    }

    pub async fn base_publisher(
        &self,
        publish_timeout: Duration,
    ) -> Result<google_cloud_pubsub::client::BasePublisher> {
        use google_cloud_gax::retry_policy::RetryPolicyExt;
        let mut b = google_cloud_pubsub::client::BasePublisher::builder().with_retry_policy(
            google_cloud_pubsub::retry_policy::RetryableErrors.with_time_limit(publish_timeout),
        );
        if let Some(url) = &self.url {
            b = b.with_endpoint(url);
        }
        if let Some(c) = &self.credentials {
            b = b.with_credentials(c.clone());
        }
        b.build()
            .await
            .map_err(|e| self.builder_error("publisher", e))
    }

    /// Checks that the service answers within `timeout`: any answer, even "not found" or
    /// "permission denied", proves it is reachable.
    pub async fn probe(&self, admin: &TopicAdmin, project: &str, timeout: Duration) -> Result<()> {
        let probe = admin
            .get_topic()
            .set_topic(format!(
                "projects/{project}/topics/tidemill-connection-probe"
            ))
            .send();
        match tokio::time::timeout(timeout, probe).await {
            Err(_) => Err(Error::Connect {
                broker: BROKER,
                address: self.address.clone(),
                source: format!("no answer within {timeout:?} (connect_timeout)").into(),
            }),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if e.status().is_some() && !e.is_authentication() => Ok(()),
            Ok(Err(e)) => Err(Error::Connect {
                broker: BROKER,
                address: self.address.clone(),
                source: Box::new(e),
            }),
        }
    }
}

/// Whether the service answers, for `connection_state`: the gRPC client exposes no channel
/// state (it retries connection failures inside its calls without telling), so once
/// something asks (the first `connection_state` call, e.g. `Router::health`) a background
/// task sends a cheap request every `health_check_interval` — a `GetTopic` of a topic that
/// need not exist — and the state is the outcome of the last one: any answer (even "not
/// found" or "permission denied") is up; no answer within `connect_timeout`, a connection
/// failure or `UNAVAILABLE` is down. The task ends with `close` or when the client is
/// dropped.
pub(crate) struct Liveness {
    admin: TopicAdmin,
    probe_topic: String,
    address: String,
    interval: Duration,
    timeout: Duration,
    down: AtomicBool,
    started: AtomicBool,
    stop: CancellationToken,
    /// The runtime `connect` ran on, for starting the task from a thread without one.
    runtime: tokio::runtime::Handle,
}

impl Liveness {
    /// Must run inside a Tokio runtime (`connect` does).
    pub fn new(admin: TopicAdmin, config: &GoogleCloudConfig, endpoint: &Endpoint) -> Arc<Self> {
        Arc::new(Liveness {
            admin,
            probe_topic: format!(
                "projects/{}/topics/tidemill-connection-probe",
                config.project_id
            ),
            address: endpoint.address.clone(),
            interval: config.health_check_interval,
            timeout: config.connect_timeout,
            down: AtomicBool::new(false),
            started: AtomicBool::new(false),
            stop: CancellationToken::new(),
            runtime: tokio::runtime::Handle::current(),
        })
    }

    /// The state the last probe found (connected before the first one ends: `connect`
    /// just reached the service); starts probing on the first call. Always connected
    /// when `health_check_interval` is zero.
    pub fn state(self: &Arc<Self>) -> ConnectionState {
        if self.interval.is_zero() {
            return ConnectionState::Connected;
        }
        if !self.started.swap(true, Ordering::AcqRel) {
            let task = Self::run(Arc::downgrade(self), self.stop.clone(), self.interval);
            match tokio::runtime::Handle::try_current() {
                Ok(here) => here.spawn(task),
                Err(_) => self.runtime.spawn(task),
            };
        }
        if self.down.load(Ordering::Acquire) {
            ConnectionState::Disconnected
        } else {
            ConnectionState::Connected
        }
    }

    /// Stops probing (the client is closing).
    pub fn stop(&self) {
        self.stop.cancel();
    }

    async fn run(this: Weak<Self>, stop: CancellationToken, interval: Duration) {
        loop {
            let Some(liveness) = this.upgrade() else {
                return;
            };
            let answered = tokio::select! {
                _ = stop.cancelled() => return,
                answered = liveness.probe() => answered,
            };
            let was_down = liveness.down.swap(answered.is_err(), Ordering::AcqRel);
            match (&answered, was_down) {
                (Err(why), false) => tracing::warn!(
                    address = %liveness.address,
                    "the Pub/Sub service does not answer ({why}): reporting disconnected"
                ),
                (Ok(()), true) => tracing::info!(
                    address = %liveness.address,
                    "the Pub/Sub service answers again: reporting connected"
                ),
                _ => {}
            }
            drop(liveness);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }

    /// One probe: `Ok` if the service answered, else why not.
    async fn probe(&self) -> std::result::Result<(), String> {
        use google_cloud_gax::options::RequestOptionsBuilder;
        // One attempt: the client's default policy would retry a refused connection,
        // hiding the outage for as long as it retries.
        let call = self
            .admin
            .get_topic()
            .set_topic(self.probe_topic.clone())
            .with_retry_policy(google_cloud_gax::retry_policy::NeverRetry)
            .with_attempt_timeout(self.timeout)
            .send();
        match tokio::time::timeout(self.timeout, call).await {
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e))
                if e.status().is_some_and(|s| s.code != Code::Unavailable)
                    && !e.is_authentication() =>
            {
                Ok(())
            }
            Ok(Err(e)) => Err(e.to_string()),
        }
    }
}

/// Whether retrying after `err` may succeed.
pub(crate) fn is_transient(err: &google_cloud_gax::error::Error) -> bool {
    if err.is_timeout() || err.is_io() || err.is_connect() || err.is_transport() {
        return true;
    }
    match err.status().map(|s| s.code) {
        Some(
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::Internal
            | Code::Unknown,
        ) => true,
        Some(_) => false,
        None => err.is_transient_and_before_rpc(),
    }
}

/// The gRPC/HTTP status code of `err`, if the service answered.
pub(crate) fn code(err: &google_cloud_gax::error::Error) -> Option<Code> {
    err.status().map(|s| s.code)
}

/// A broker error for `context` on `topic`.
pub(crate) fn broker_error(
    topic: &str,
    context: impl Into<String>,
    err: google_cloud_gax::error::Error,
) -> Error {
    if is_transient(&err) {
        Error::transient(BROKER, topic, context, err)
    } else {
        Error::permanent(BROKER, topic, context, err)
    }
}

/// Runs an administrative call with the configured time limit.
pub(crate) async fn admin_call<T>(
    timeout: Duration,
    topic: &str,
    context: &str,
    call: impl Future<Output = google_cloud_pubsub::Result<T>>,
) -> std::result::Result<T, AdminError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(AdminError::Service(e)),
        Err(_) => Err(AdminError::Timeout(Error::transient(
            BROKER,
            topic,
            context,
            format!("no answer within {timeout:?} (operation_timeout)"),
        ))),
    }
}

/// The failure of an administrative call: the service's answer, or a timeout.
pub(crate) enum AdminError {
    Service(google_cloud_gax::error::Error),
    Timeout(Error),
}

impl AdminError {
    pub fn code(&self) -> Option<Code> {
        match self {
            AdminError::Service(e) => code(e),
            AdminError::Timeout(_) => None,
        }
    }

    pub fn into_error(self, topic: &str, context: impl Into<String>) -> Error {
        match self {
            AdminError::Service(e) => broker_error(topic, context, e),
            AdminError::Timeout(e) => e,
        }
    }
}

/// The administrative side shared by publishers and subscribers: makes sure topics and
/// subscriptions exist.
#[derive(Clone)]
pub(crate) struct Admin {
    pub topics: TopicAdmin,
    pub subscriptions: Option<SubscriptionAdmin>,
    pub timeout: Duration,
}

impl Admin {
    /// Makes sure `topic` exists: creates it when `create` is set, otherwise looks it up.
    pub async fn ensure_topic(&self, topic: &TopicName, create: bool) -> Result<()> {
        if create {
            let call = self
                .topics
                .create_topic()
                .with_request(Topic::new().set_name(&topic.path))
                .send();
            match admin_call(self.timeout, &topic.path, "create topic", call).await {
                Ok(_) => {
                    tracing::debug!(topic = %topic.path, "created topic");
                    Ok(())
                }
                Err(e) if e.code() == Some(Code::AlreadyExists) => Ok(()),
                Err(e) => Err(e.into_error(&topic.path, "create topic")),
            }
        } else {
            let call = self.topics.get_topic().set_topic(&topic.path).send();
            match admin_call(self.timeout, &topic.path, "look up topic", call).await {
                Ok(_) => Ok(()),
                Err(e) if e.code() == Some(Code::NotFound) => Err(Error::permanent(
                    BROKER,
                    &topic.path,
                    "look up topic",
                    "the topic does not exist and `create_topics` is off",
                )),
                Err(e) => Err(e.into_error(&topic.path, "look up topic")),
            }
        }
    }

    /// Makes sure `subscription` on `topic` exists, creating it with the configured
    /// settings when allowed. An existing subscription on another topic is an error.
    pub async fn ensure_subscription(
        &self,
        config: &GoogleCloudConfig,
        topic: &TopicName,
        subscription: &str,
        unique: bool,
    ) -> Result<()> {
        let Some(admin) = &self.subscriptions else {
            return Err(Error::config(BROKER, "no subscription admin client"));
        };
        if config.create_subscriptions {
            self.ensure_topic(topic, config.create_topics).await?;
            if let Some(dl) = &config.dead_letter {
                let dlq = topic_name(&config.project_id, &dl.topic)?;
                self.ensure_topic(&dlq, config.create_topics).await?;
            }
            let spec = subscription_spec(config, topic, subscription, unique)?;
            let call = admin.create_subscription().with_request(spec).send();
            match admin_call(self.timeout, &topic.path, "create subscription", call).await {
                Ok(_) => {
                    tracing::debug!(topic = %topic.path, %subscription, "created subscription");
                    return Ok(());
                }
                Err(e) if e.code() == Some(Code::AlreadyExists) => {}
                Err(e) => {
                    return Err(
                        e.into_error(&topic.path, format!("create subscription `{subscription}`"))
                    )
                }
            }
        }
        let call = admin
            .get_subscription()
            .set_subscription(subscription)
            .send();
        let existing =
            match admin_call(self.timeout, &topic.path, "look up subscription", call).await {
                Ok(s) => s,
                Err(e) if e.code() == Some(Code::NotFound) => {
                    return Err(Error::permanent(
                        BROKER,
                        &topic.path,
                        format!("look up subscription `{subscription}`"),
                        "the subscription does not exist and `create_subscriptions` is off",
                    ))
                }
                Err(e) => {
                    return Err(e.into_error(
                        &topic.path,
                        format!("look up subscription `{subscription}`"),
                    ))
                }
            };
        if existing.topic != topic.path {
            return Err(Error::permanent(
                BROKER,
                &topic.path,
                format!("subscribe with subscription `{subscription}`"),
                format!(
                    "the subscription exists but is attached to topic `{}`",
                    existing.topic
                ),
            ));
        }
        Ok(())
    }

    /// Deletes `subscription` (not found counts as deleted).
    pub async fn delete_subscription(&self, topic: &str, subscription: &str) -> Result<()> {
        let Some(admin) = &self.subscriptions else {
            return Ok(());
        };
        let call = admin
            .delete_subscription()
            .set_subscription(subscription)
            .send();
        match admin_call(self.timeout, topic, "delete subscription", call).await {
            Ok(_) => {
                tracing::debug!(%topic, %subscription, "deleted subscription");
                Ok(())
            }
            Err(e) if e.code() == Some(Code::NotFound) => Ok(()),
            Err(e) => Err(e.into_error(topic, format!("delete subscription `{subscription}`"))),
        }
    }
}

/// The subscription the adapter creates.
pub(crate) fn subscription_spec(
    config: &GoogleCloudConfig,
    topic: &TopicName,
    name: &str,
    unique: bool,
) -> Result<Subscription> {
    let mut spec = Subscription::new()
        .set_name(name)
        .set_topic(&topic.path)
        // Validated: whole seconds, 10 to 600.
        .set_ack_deadline_seconds(config.ack_deadline.as_secs().clamp(10, 600) as i32)
        .set_enable_message_ordering(config.message_ordering)
        .set_enable_exactly_once_delivery(config.exactly_once_delivery);
    if unique {
        spec = spec.set_expiration_policy(
            ExpirationPolicy::new().set_ttl(wkt_duration(config.unique_subscription_ttl)?),
        );
    }
    if let Some(dl) = &config.dead_letter {
        let dlq = topic_name(&config.project_id, &dl.topic)?;
        if dlq.path == topic.path {
            // The dead-letter topic's own subscription: a policy would feed the topic its
            // own failures.
            return Ok(spec);
        }
        spec = spec.set_dead_letter_policy(
            DeadLetterPolicy::new()
                .set_dead_letter_topic(dlq.path)
                // Validated: 5 to 100.
                .set_max_delivery_attempts(dl.max_delivery_attempts as i32),
        );
    }
    if let Some(rb) = &config.retry_backoff {
        spec = spec.set_retry_policy(
            RetryPolicy::new()
                .set_minimum_backoff(wkt_duration(rb.minimum)?)
                .set_maximum_backoff(wkt_duration(rb.maximum)?),
        );
    }
    Ok(spec)
}

fn wkt_duration(d: Duration) -> Result<google_cloud_wkt::Duration> {
    google_cloud_wkt::Duration::try_from(d)
        .map_err(|e| Error::config(BROKER, format!("duration {d:?} out of range: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DeadLetterConfig, RetryBackoff};

    #[test]
    fn explicit_emulator_host_wins_and_uses_anonymous_credentials() {
        let config = GoogleCloudConfig::emulator("p-123456", "127.0.0.1:9");
        let ep = Endpoint::resolve(&config).unwrap();
        assert_eq!(ep.url.as_deref(), Some("http://127.0.0.1:9"));
        assert_eq!(ep.address, "127.0.0.1:9");
        assert!(ep.credentials.is_some());

        let config = GoogleCloudConfig {
            endpoint: Some("https://europe-west1-pubsub.googleapis.com".into()),
            ..GoogleCloudConfig::new("p-123456")
        };
        let ep = Endpoint::resolve(&config).unwrap();
        assert_eq!(
            ep.url.as_deref(),
            Some("https://europe-west1-pubsub.googleapis.com")
        );
        assert!(ep.credentials.is_none(), "application-default credentials");
    }

    #[test]
    fn created_subscriptions_carry_the_configured_policies() {
        let config = GoogleCloudConfig {
            ack_deadline: Duration::from_secs(20),
            message_ordering: true,
            exactly_once_delivery: true,
            dead_letter: Some(DeadLetterConfig {
                topic: "orders.dead".into(),
                max_delivery_attempts: 7,
            }),
            retry_backoff: Some(RetryBackoff {
                minimum: Duration::from_secs(1),
                maximum: Duration::from_secs(30),
            }),
            ..GoogleCloudConfig::new("p-123456")
        };
        let topic = topic_name("p-123456", "orders").unwrap();
        let spec =
            subscription_spec(&config, &topic, "projects/p-123456/subscriptions/s", true).unwrap();
        assert_eq!(spec.topic, "projects/p-123456/topics/orders");
        assert_eq!(spec.ack_deadline_seconds, 20);
        assert!(spec.enable_message_ordering);
        assert!(spec.enable_exactly_once_delivery);
        let dl = spec.dead_letter_policy.expect("dead-letter policy");
        assert_eq!(dl.dead_letter_topic, "projects/p-123456/topics/orders.dead");
        assert_eq!(dl.max_delivery_attempts, 7);
        assert!(spec.retry_policy.is_some());
        assert!(spec.expiration_policy.is_some());

        let plain = subscription_spec(
            &GoogleCloudConfig::new("p-123456"),
            &topic,
            "projects/p-123456/subscriptions/s",
            false,
        )
        .unwrap();
        assert!(plain.dead_letter_policy.is_none());
        assert!(plain.expiration_policy.is_none());
        assert!(!plain.enable_message_ordering);
    }
}
