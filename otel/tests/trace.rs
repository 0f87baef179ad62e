//! Trace context through the router on the in-memory broker: one trace across hops, the
//! messaging attributes, failures, baggage, and foreign producers' context.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{assert_child, assert_kind, attr, find, trace_id, Traces};
use opentelemetry::baggage::BaggageExt;
use opentelemetry::trace::{SpanKind, Status};
use opentelemetry::KeyValue;
use tidemill_core::{
    Backoff, HandlerResult, MemoryBroker, Message, Publisher, Router, RouterConfig,
};
use tidemill_otel::{InstrumentedPublisher, OtelTracer};
use tokio::sync::mpsc;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

fn traced_router() -> Router {
    Router::with_config(
        RouterConfig {
            redelivery: Backoff::new(Duration::from_millis(1)),
            ..RouterConfig::default()
        }
        .with_tracer(OtelTracer::new()),
    )
}

async fn run(router: &Router) {
    let r = router.clone();
    tokio::spawn(async move { r.run().await });
    router.running().await;
}

/// publish → handler → publish → handler: one trace, each span the child of the one
/// before, producer and consumer kinds, messaging attributes.
#[tokio::test]
async fn one_trace_spans_publish_handler_publish_handler() {
    let traces = Traces::install();
    let broker = MemoryBroker::new();
    let publisher = InstrumentedPublisher::new(broker.publisher());
    let router = traced_router();
    router
        .add_handler("reserve")
        .subscribe(broker.subscriber(), "orders")
        .group("stock")
        .publish(publisher.clone(), "reserved")
        .handler(|m: Message| async move { Message::new(m.payload().clone()) })
        .await
        .unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    router
        .add_handler("notify")
        .subscribe(broker.subscriber(), "reserved")
        .handler(move |m: Message| {
            let _ = tx.send(m);
            async { HandlerResult::Ok(()) }
        })
        .await
        .unwrap();
    run(&router).await;

    let order = Message::new("tea");
    let order_id = order.uuid().to_owned();
    let checkout = tracing::info_span!("checkout");
    publisher
        .publish_one("orders", order)
        .instrument(checkout.clone())
        .await
        .unwrap();
    let delivered = rx.recv().await.unwrap();
    assert!(delivered.metadata().get("traceparent").is_some());
    router.close().await.unwrap();
    drop(checkout);

    let spans = traces.spans();
    let root = spans.iter().find(|s| s.name == "checkout").unwrap();
    let send_orders = find(
        &spans,
        "send orders",
        "messaging.destination.name",
        "orders",
    );
    let process_orders = find(&spans, "process orders", "tidemill.handler", "reserve");
    let send_reserved = find(
        &spans,
        "send reserved",
        "messaging.destination.name",
        "reserved",
    );
    let process_reserved = find(&spans, "process reserved", "tidemill.handler", "notify");
    assert_child(send_orders, root, &spans);
    assert_child(process_orders, send_orders, &spans);
    assert_child(send_reserved, process_orders, &spans);
    assert_child(process_reserved, send_reserved, &spans);
    assert_eq!(trace_id(process_reserved), trace_id(root));

    assert_kind(send_orders, SpanKind::Producer);
    assert_kind(process_orders, SpanKind::Consumer);
    assert_kind(send_reserved, SpanKind::Producer);
    assert_kind(process_reserved, SpanKind::Consumer);
    for (span, op) in [(send_orders, "send"), (process_orders, "process")] {
        assert_eq!(
            attr(span, "messaging.system").as_deref(),
            Some("tidemill_memory")
                .filter(|_| op == "process")
                .or(Some("tidemill"))
        );
        assert_eq!(attr(span, "messaging.operation.type").as_deref(), Some(op));
        assert_eq!(attr(span, "messaging.operation.name").as_deref(), Some(op));
        assert_eq!(
            attr(span, "messaging.message.id").as_deref(),
            Some(order_id.as_str())
        );
    }
    assert_eq!(
        attr(process_orders, "messaging.consumer.group.name").as_deref(),
        Some("stock")
    );
    assert_eq!(
        attr(process_reserved, "messaging.consumer.group.name"),
        None
    );
    assert_eq!(
        attr(process_orders, "tidemill.delivery_attempt").as_deref(),
        Some("1")
    );
    assert_eq!(
        attr(process_reserved, "messaging.message.id").as_deref(),
        Some(delivered.uuid())
    );
    assert!(spans.iter().all(|s| s.status != Status::error("")));
}

/// A `traceparent` that does not parse (a foreign producer) starts a new trace: the
/// message is handled and acked as usual, never an error.
#[tokio::test]
async fn malformed_traceparent_starts_a_new_trace() {
    let traces = Traces::install();
    let broker = MemoryBroker::new();
    let router = traced_router();
    let (tx, mut rx) = mpsc::unbounded_channel();
    router
        .add_handler("foreign")
        .subscribe(broker.subscriber(), "in")
        .handler(move |m: Message| {
            let _ = tx.send(m.uuid().to_owned());
            async { HandlerResult::Ok(()) }
        })
        .await
        .unwrap();
    run(&router).await;
    for value in ["garbage", "00-zz-00f067aa0ba902b7-01", ""] {
        // Published raw: nothing rewrites the header on the way.
        broker
            .publisher()
            .publish_one("in", Message::new("x").with_metadata("traceparent", value))
            .await
            .unwrap();
        rx.recv().await.unwrap();
    }
    let stats = router.handler_stats("foreign").unwrap();
    router.close().await.unwrap();
    assert_eq!((stats.failed, stats.nacked), (0, 0));
    let spans = traces.spans();
    let process: Vec<_> = spans.iter().filter(|s| s.name == "process in").collect();
    assert_eq!(process.len(), 3);
    for s in &process {
        assert_eq!(s.parent_span_id, opentelemetry::trace::SpanId::INVALID);
        assert!(s.span_context.is_valid());
    }
    assert_ne!(trace_id(process[0]), trace_id(process[1]));
}

/// A failing handler's span has status error and `error.type`; the redelivery is a
/// second `process` span under the same `send`.
#[tokio::test]
async fn failures_mark_the_span() {
    let traces = Traces::install();
    let broker = MemoryBroker::new();
    let publisher = InstrumentedPublisher::new(broker.publisher());
    let router = traced_router();
    let (tx, mut rx) = mpsc::unbounded_channel();
    router
        .add_handler("flaky")
        .subscribe(broker.subscriber(), "in")
        .handler(move |m: Message| {
            let first = m.context().and_then(|c| c.attempt()) == Some(1);
            let tx = tx.clone();
            async move {
                if first {
                    return Err("gateway timeout".into());
                }
                let _ = tx.send(());
                HandlerResult::Ok(())
            }
        })
        .await
        .unwrap();
    run(&router).await;
    publisher
        .publish_one("in", Message::new("x"))
        .await
        .unwrap();
    rx.recv().await.unwrap();
    router.close().await.unwrap();
    let spans = traces.spans();
    let send = spans.iter().find(|s| s.name == "send in").unwrap();
    let failed = find(&spans, "process in", "tidemill.delivery_attempt", "1");
    let retried = find(&spans, "process in", "tidemill.delivery_attempt", "2");
    assert_child(failed, send, &spans);
    assert_child(retried, send, &spans);
    assert!(
        matches!(&failed.status, Status::Error { description } if description.contains("gateway timeout")),
        "{:?}",
        failed.status
    );
    assert_eq!(attr(failed, "error.type").as_deref(), Some("handler"));
    assert!(!matches!(retried.status, Status::Error { .. }));
}

/// Baggage set by the first producer reaches the last handler, through a hop.
#[tokio::test]
async fn baggage_travels_with_the_trace() {
    let _traces = Traces::install();
    let broker = MemoryBroker::new();
    let publisher = InstrumentedPublisher::new(broker.publisher());
    let router = traced_router();
    router
        .add_handler("hop")
        .subscribe(broker.subscriber(), "a")
        .publish(publisher.clone(), "b")
        .handler(|m: Message| async move { Message::new(m.payload().clone()) })
        .await
        .unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    router
        .add_handler("last")
        .subscribe(broker.subscriber(), "b")
        .handler(move |m: Message| {
            let _ = tx.send(m);
            async { HandlerResult::Ok(()) }
        })
        .await
        .unwrap();
    run(&router).await;
    let root = tracing::info_span!("request");
    let cx = opentelemetry::Context::new().with_baggage([KeyValue::new("tenant", "t-42")]);
    let _ = root.set_parent(cx);
    publisher
        .publish_one("a", Message::new("x"))
        .instrument(root)
        .await
        .unwrap();
    let last = rx.recv().await.unwrap();
    router.close().await.unwrap();
    assert_eq!(last.metadata().get("baggage"), Some("tenant=t-42"));
    let cx = tidemill_otel::extract(&last);
    assert_eq!(
        cx.baggage().get("tenant").map(|v| v.to_string()).as_deref(),
        Some("t-42")
    );
}

/// Without an OpenTelemetry layer, instrumented publishers and the tracer leave messages
/// untouched and everything works as before.
#[tokio::test]
async fn without_a_tracing_layer_messages_are_untouched() {
    let broker = MemoryBroker::new();
    let publisher = Arc::new(InstrumentedPublisher::new(broker.publisher()));
    let router = traced_router();
    let (tx, mut rx) = mpsc::unbounded_channel();
    router
        .add_handler("plain")
        .subscribe(broker.subscriber(), "in")
        .handler(move |m: Message| {
            let _ = tx.send(m);
            async { HandlerResult::Ok(()) }
        })
        .await
        .unwrap();
    run(&router).await;
    publisher
        .publish_one("in", Message::new("x").with_metadata("k", "v"))
        .await
        .unwrap();
    let got = rx.recv().await.unwrap();
    router.close().await.unwrap();
    assert_eq!(got.metadata().iter().collect::<Vec<_>>(), vec![("k", "v")]);
}

/// A message of an unsampled trace is handled without a span; its output carries the
/// same trace context on (one unsampled trace), through an instrumented publisher too.
/// With `with_unsampled_spans(true)` the handler's spans exist (unrecorded) and the
/// output names the hop's own send span as its parent, in the same trace.
#[tokio::test]
async fn unsampled_traces_are_carried_on_without_spans() {
    const UNSAMPLED: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
    for spans in [false, true] {
        let traces = Traces::install();
        let broker = MemoryBroker::new();
        let publisher = InstrumentedPublisher::new(broker.publisher());
        let router = Router::with_config(
            RouterConfig::default().with_tracer(OtelTracer::new().with_unsampled_spans(spans)),
        );
        router
            .add_handler("hop")
            .subscribe(broker.subscriber(), "a")
            .publish(publisher.clone(), "b")
            .handler(|m: Message| async move { Message::new(m.payload().clone()) })
            .await
            .unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        router
            .add_handler("last")
            .subscribe(broker.subscriber(), "b")
            .handler(move |m: Message| {
                let _ = tx.send(m);
                async { HandlerResult::Ok(()) }
            })
            .await
            .unwrap();
        run(&router).await;
        broker
            .publisher()
            .publish_one(
                "a",
                Message::new("x")
                    .with_metadata("traceparent", UNSAMPLED)
                    .with_metadata("baggage", "tenant=t-1"),
            )
            .await
            .unwrap();
        let last = rx.recv().await.unwrap();
        router.close().await.unwrap();
        let traceparent = last.metadata().get("traceparent").unwrap();
        assert!(
            traceparent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{traceparent}"
        );
        assert!(traceparent.ends_with("-00"), "{traceparent}");
        assert_eq!(traceparent == UNSAMPLED, !spans, "{traceparent}");
        assert_eq!(last.metadata().get("baggage"), Some("tenant=t-1"));
        // Nothing of an unsampled trace is exported either way.
        assert!(traces.spans().is_empty());
    }
}
