//! Observability checks adapter crates run against their real broker (feature `testing`):
//! [`one_trace_across_two_hops`] and [`health_follows_the_connection`]. This crate runs
//! the first on the in-memory broker.
//!
//! ```no_run
//! // tests/observability.rs of an adapter crate (dev-dependency:
//! // tidemill-otel = { workspace = true, features = ["testing"] }):
//! # async fn publisher() -> std::sync::Arc<dyn tidemill_core::Publisher> { unimplemented!() }
//! # async fn subscriber() -> std::sync::Arc<dyn tidemill_core::Subscriber> { unimplemented!() }
//! #[tokio::test] // a current-thread runtime: the router's tasks see the test's spans
//! async fn one_trace() {
//!     tidemill_otel::testing::one_trace_across_two_hops(
//!         publisher().await,
//!         subscriber().await,
//!         "rabbitmq",
//!     )
//!     .await;
//! }
//! # fn main() {}
//! ```

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::trace::{SpanKind, TraceId, TracerProvider as _};
use opentelemetry::Value;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tidemill_core::router::RouterHealth;
use tidemill_core::{
    new_uuid, HandlerResult, Message, Publisher, Router, RouterConfig, Subscriber,
};
use tidemill_testkit::fault_proxy::FaultProxy;
use tokio::sync::mpsc;
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

use crate::{InstrumentedPublisher, OtelTracer};

/// The longest any single wait of these checks takes.
const WAIT: Duration = Duration::from_secs(60);

fn attr(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| match &kv.value {
            Value::String(s) => s.to_string(),
            other => other.to_string(),
        })
}

async fn recv<T>(rx: &mut mpsc::UnboundedReceiver<T>, what: &str) -> T {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("no {what} within {WAIT:?}"))
        .unwrap_or_else(|| panic!("channel closed before the {what}"))
}

/// publish → handler → publish → handler over the broker: every span in one trace, each
/// the child of the one before, producer and consumer kinds, and the messaging attributes
/// (`messaging.system` of the consumer spans = `system`, destination, group, message id).
/// Also: a message with a malformed `traceparent` from a plain client is handled (a new
/// trace), never an error.
///
/// Installs an in-memory span exporter as this thread's default subscriber, so run it on a
/// current-thread runtime.
pub async fn one_trace_across_two_hops(
    publisher: Arc<dyn Publisher>,
    subscriber: Arc<dyn Subscriber>,
    system: &str,
) {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let _guard = tracing::subscriber::set_default(
        tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("tidemill-test"))),
    );
    let id = new_uuid();
    let (first, second) = (format!("trace-a-{id}"), format!("trace-b-{id}"));
    let instrumented = InstrumentedPublisher::new(publisher.clone());
    let router = Router::with_config(RouterConfig {
        close_clients: false,
        ..RouterConfig::default().with_tracer(OtelTracer::new())
    });
    router
        .add_handler("reserve")
        .subscribe(subscriber.clone(), first.clone())
        .group("trace-reserve")
        .publish(instrumented.clone(), second.clone())
        .handler(|m: Message| async move { Message::new(m.payload().clone()) })
        .await
        .unwrap_or_else(|e| panic!("adding the first handler failed: {e}"));
    let (tx, mut rx) = mpsc::unbounded_channel();
    router
        .add_handler("notify")
        .subscribe(subscriber.clone(), second.clone())
        .group("trace-notify")
        .handler(move |m: Message| {
            let _ = tx.send(m);
            async { HandlerResult::Ok(()) }
        })
        .await
        .unwrap_or_else(|e| panic!("adding the second handler failed: {e}"));
    let r = router.clone();
    tokio::spawn(async move { r.run().await });
    tokio::time::timeout(WAIT, router.running())
        .await
        .unwrap_or_else(|_| panic!("router not running within {WAIT:?}"));

    let root = tracing::info_span!("checkout");
    instrumented
        .publish_one(&first, Message::new("tea"))
        .instrument(root.clone())
        .await
        .unwrap_or_else(|e| panic!("publish failed: {e}"));
    let delivered = recv(&mut rx, "message at the second handler").await;
    assert!(delivered.metadata().get("traceparent").is_some());
    // A plain client's garbled header: handled like any message.
    publisher
        .publish_one(
            &first,
            Message::new("foreign").with_metadata("traceparent", "not-a-trace"),
        )
        .await
        .unwrap_or_else(|e| panic!("raw publish failed: {e}"));
    let foreign = recv(&mut rx, "the foreign message at the second handler").await;
    assert_eq!(foreign.payload().as_ref(), b"foreign");
    router
        .close()
        .await
        .unwrap_or_else(|e| panic!("close failed: {e}"));
    drop(root);
    let _ = provider.force_flush();
    let spans = exporter
        .get_finished_spans()
        .unwrap_or_else(|e| panic!("exporter: {e}"));
    let tree = crate::trace_tree(&spans);
    let root = spans
        .iter()
        .find(|s| s.name == "checkout")
        .unwrap_or_else(|| panic!("no root span:\n{tree}"));
    let trace = root.span_context.trace_id();
    let in_trace = |name: String| -> &SpanData {
        let found: Vec<&SpanData> = spans
            .iter()
            .filter(|s| s.name == name && s.span_context.trace_id() == trace)
            .collect();
        assert_eq!(found.len(), 1, "one `{name}` in the trace:\n{tree}");
        found[0]
    };
    let chain = [
        in_trace(format!("send {first}")),
        in_trace(format!("process {first}")),
        in_trace(format!("send {second}")),
        in_trace(format!("process {second}")),
    ];
    let mut parent = root;
    for span in chain {
        assert_eq!(
            span.parent_span_id,
            parent.span_context.span_id(),
            "`{}` is a child of `{}`:\n{tree}",
            span.name,
            parent.name
        );
        parent = span;
    }
    for (i, span) in chain.iter().enumerate() {
        let consumer = i % 2 == 1;
        let kind = if consumer {
            SpanKind::Consumer
        } else {
            SpanKind::Producer
        };
        assert_eq!(span.span_kind, kind, "kind of `{}`", span.name);
        let topic = if i < 2 { &first } else { &second };
        assert_eq!(
            attr(span, "messaging.destination.name").as_deref(),
            Some(topic.as_str())
        );
        if consumer {
            assert_eq!(attr(span, "messaging.system").as_deref(), Some(system));
            assert_eq!(
                attr(span, "messaging.operation.type").as_deref(),
                Some("process")
            );
            assert!(attr(span, "messaging.message.id").is_some());
            assert!(attr(span, "messaging.consumer.group.name").is_some());
        }
    }
    assert_eq!(
        attr(chain[3], "messaging.message.id").as_deref(),
        Some(delivered.uuid())
    );
    // The foreign message: its own trace, rooted at its `process` span.
    let foreign_spans: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.name == format!("process {first}") && s.span_context.trace_id() != trace)
        .collect();
    assert_eq!(foreign_spans.len(), 1, "{tree}");
    assert_ne!(foreign_spans[0].span_context.trace_id(), TraceId::INVALID);
}

/// Waits (bounded) until `check` holds for the router's health.
async fn until(router: &Router, what: &str, check: impl Fn(&RouterHealth) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let health = router.health();
        if check(&health) {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("not {what} within {WAIT:?}:\n{health}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A router whose handler consumes through `subscriber` and publishes through
/// `publisher`, both connected through `proxy`, is ready; once the proxy cuts every
/// connection and refuses new ones it becomes not ready (still live), and ready again
/// when connections get through; then messages flow again.
pub async fn health_follows_the_connection(
    proxy: &FaultProxy,
    publisher: Arc<dyn Publisher>,
    subscriber: Arc<dyn Subscriber>,
) {
    let id = new_uuid();
    let (input, output) = (format!("health-in-{id}"), format!("health-out-{id}"));
    let router = Router::with_config(RouterConfig {
        close_clients: false,
        ..RouterConfig::default()
    });
    let (tx, mut rx) = mpsc::unbounded_channel();
    router
        .add_handler("forward")
        .subscribe(subscriber.clone(), input.clone())
        .group("health")
        .publish(publisher.clone(), output.clone())
        .handler(|m: Message| async move { Message::new(m.payload().clone()) })
        .await
        .unwrap_or_else(|e| panic!("adding the handler failed: {e}"));
    router
        .add_handler("sink")
        .subscribe(subscriber.clone(), output)
        .group("health")
        .handler(move |m: Message| {
            let _ = tx.send(m);
            async { HandlerResult::Ok(()) }
        })
        .await
        .unwrap_or_else(|e| panic!("adding the sink failed: {e}"));
    let r = router.clone();
    tokio::spawn(async move { r.run().await });
    tokio::time::timeout(WAIT, router.running())
        .await
        .unwrap_or_else(|_| panic!("router not running within {WAIT:?}"));
    publisher
        .publish_one(&input, Message::new("before"))
        .await
        .unwrap_or_else(|e| panic!("publish failed: {e}"));
    recv(&mut rx, "message before the cut").await;
    let health = router.health();
    assert!(health.is_ready(), "{health}");

    proxy.refuse_new(true);
    proxy.cut();
    until(&router, "not ready after the cut", |h| !h.is_ready()).await;
    let health = router.health();
    assert!(
        health.is_live(),
        "a lost connection leaves the router live: {health}"
    );
    assert!(
        health
            .handlers
            .iter()
            .any(|h| h.subscriber == Some(tidemill_core::ConnectionState::Disconnected)),
        "{health}"
    );

    proxy.refuse_new(false);
    until(
        &router,
        "ready once connections get through",
        RouterHealth::is_ready,
    )
    .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    // Publishing may need a retry or two while the publisher reconnects.
    while let Err(e) = publisher.publish_one(&input, Message::new("after")).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "publishing after the reconnect still fails: {e}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    loop {
        let m = recv(&mut rx, "message after the reconnect").await;
        if m.payload().as_ref() == b"after" {
            break;
        }
    }
    router
        .close()
        .await
        .unwrap_or_else(|e| panic!("close failed: {e}"));
}
