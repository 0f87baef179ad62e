//! # tidemill-testkit
//!
//! The universal pub/sub conformance suite every Tidemill backend runs, plus test helpers
//! (a TCP [`fault_proxy`] for reconnection tests).
//!
//! A backend describes what it promises in [`Features`] and how to get publishers and
//! subscribers through [`Backend`]; [`conformance_tests!`] expands to one ordinary `#[test]`
//! per conformance test, so `cargo test` and `cargo nextest` list each by name. Tests for a
//! feature the backend does not declare pass after printing `SKIP`.
//!
//! ```no_run
//! // tests/conformance.rs of an adapter crate:
//! mod memory {
//!     tidemill_testkit::conformance_tests!(tidemill_testkit::MemoryBackend::new(
//!         tidemill_core::MemoryConfig::default()
//!     ));
//! }
//! # fn main() {}
//! ```
//!
//! Environment:
//! - `TIDEMILL_STRESS=N` runs every test N times, each with a fresh backend.
//! - `TIDEMILL_CONFORMANCE_MESSAGES=N` sets the message count of the bulk tests (default 100).
#![warn(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod bench;
pub mod fault_proxy;
mod memory;
pub mod suite;
mod util;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use tidemill_core::{Publisher, Result, Subscriber};

pub use memory::MemoryBackend;
pub use util::{restart_broker, unique_topic, Received};

/// What a backend promises; the suite tests exactly these.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Features {
    /// Consumer groups: subscribers of one group compete, every group sees every message.
    pub consumer_groups: bool,
    /// Messages with the same key are delivered in publish order, and the next one is not
    /// delivered while the previous one is unsettled (a nacked one comes back first).
    pub order_per_key: bool,
    /// A consumer group keeps receiving across subscriber closes and new subscriber
    /// instances: nothing published to it is lost while no member is connected.
    pub persistent: bool,
    /// A new subscription receives messages published before it existed (log brokers,
    /// retention).
    pub replays_old_messages: bool,
    /// Nacked messages are redelivered (false only for at-most-once backends).
    pub redelivers_on_nack: bool,
    /// [`Delivery::attempt`](tidemill_core::Delivery::attempt) reports the delivery count.
    pub delivery_attempt: bool,
    /// [`Backend::disrupt`] cuts the connection or restarts the broker.
    pub reconnect: bool,
}

/// A backend under test: a way to get fresh publishers and subscribers on one broker.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// What the backend promises.
    fn features(&self) -> Features;

    /// A new publisher (its own connection where the broker has connections).
    async fn publisher(&self) -> Result<Arc<dyn Publisher>>;

    /// A new subscriber (its own connection where the broker has connections).
    async fn subscriber(&self) -> Result<Arc<dyn Subscriber>>;

    /// Breaks every connection of the publishers and subscribers made so far (through a
    /// fault proxy, or by restarting the broker) and returns once the broker accepts
    /// connections again. Only called when [`Features::reconnect`] is set.
    async fn disrupt(&self) -> Result<()> {
        Err(no_reconnect_support())
    }

    /// The longest any single wait in the suite may take. Default 60 s.
    fn timeout(&self) -> Duration {
        Duration::from_secs(60)
    }
}

/// What [`Backend::disrupt`] returns for a backend that cannot break its connections.
pub fn no_reconnect_support() -> tidemill_core::Error {
    tidemill_core::Error::config("testkit", "this backend declares no reconnect support")
}

/// [`Backend::disrupt`] for a backend whose connections go through `proxy` when it has
/// one: cuts them all (new connections get through), or reports no reconnect support.
pub fn disrupt_through(proxy: Option<&fault_proxy::FaultProxy>) -> Result<()> {
    match proxy {
        Some(proxy) => {
            proxy.cut();
            Ok(())
        }
        None => Err(no_reconnect_support()),
    }
}

/// Runs conformance test `name` against a fresh backend from `make`, as many times as
/// `TIDEMILL_STRESS` says. Used by [`conformance_tests!`].
pub fn run<B, M, F>(name: &str, make: M, test: fn(Arc<dyn Backend>) -> BoxFuture<'static, ()>)
where
    B: Backend,
    M: Fn() -> F,
    F: Future<Output = B>,
{
    let runs = stress_runs();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("cannot build a tokio runtime: {e}"));
    runtime.block_on(async {
        for run in 1..=runs {
            if runs > 1 {
                eprintln!("{name}: run {run}/{runs}");
            }
            let backend: Arc<dyn Backend> = Arc::new(make().await);
            test(backend).await;
        }
    });
}

fn stress_runs() -> usize {
    std::env::var("TIDEMILL_STRESS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(1)
}

/// Expands to one `#[test]` per conformance test, each running against a fresh backend
/// built by the given expression (which may `.await`). See the [crate docs](crate).
///
/// With `skip_unless_env = "VAR",` first, each test passes after printing `SKIP` when the
/// environment variable `VAR` (a broker address) is unset, so `cargo test` without brokers
/// still passes; `make test` sets it.
#[macro_export]
macro_rules! conformance_tests {
    (skip_unless_env = $var:literal, $backend:expr $(,)?) => {
        $crate::conformance_tests!(@list $var, $backend);
    };
    ($backend:expr $(,)?) => {
        $crate::conformance_tests!(@list "", $backend);
    };
    (@list $var:literal, $backend:expr) => {
        $crate::conformance_tests!(@each $var, $backend;
            publish_subscribe,
            concurrent_subscribe,
            many_topics,
            resend_on_nack,
            settles_without_awaiting,
            nack_with_delay,
            no_ack_blocks_next,
            continue_after_subscriber_close,
            close_releases_unpolled_deliveries,
            concurrent_close,
            continue_after_errors,
            order_per_key,
            publisher_close_loses_nothing,
            topic_isolation,
            subscription_cancellation,
            consumer_groups,
            new_subscriber_receives_old_messages,
            reconnect,
        );
    };
    (@each $var:literal, $backend:expr; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                if !$var.is_empty() && ::std::env::var_os($var).is_none() {
                    eprintln!(
                        "SKIP {}: {} is not set (no broker to test against)",
                        stringify!($name),
                        $var
                    );
                    return;
                }
                $crate::run(
                    stringify!($name),
                    || async { $backend },
                    |backend| ::std::boxed::Box::pin($crate::suite::$name(backend)),
                );
            }
        )*
    };
}
