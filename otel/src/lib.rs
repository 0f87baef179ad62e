//! # tidemill-otel
//!
//! OpenTelemetry for Tidemill: W3C trace context (`traceparent`, `tracestate`) and baggage
//! travel in message metadata, so a trace crosses every broker (in-memory, Kafka,
//! RabbitMQ, NATS, Pub/Sub) without anything broker-specific, and the publisher's metrics.
//!
//! - [`InstrumentedPublisher`] wraps any [`Publisher`]: each publish runs in a `send`
//!   span (kind producer, OpenTelemetry messaging conventions) whose context it injects
//!   into every message's metadata, and records `tidemill_messages_published_total`,
//!   `tidemill_publish_duration_seconds` and `tidemill_publish_errors_total` (label `topic`)
//!   through the [`metrics`] facade when a recorder is installed. Wrap the broker's
//!   publisher once and hand the wrapper to the router, buses and layers: handler output,
//!   CQRS commands and events, requests and replies, dead letters all carry the trace.
//! - [`OtelTracer`] is the router's [`MessageTracer`]: the handler's `process` span (kind
//!   consumer) is parented on the context the message carries, so publish → handler →
//!   publish → handler is one trace. A missing or malformed `traceparent` (a foreign
//!   producer) starts a new trace; a malformed one is logged once, at debug level.
//!
//! The spans are `tracing` spans: the application installs `tracing-opentelemetry`'s layer
//! with the tracer provider and exporter of its choice (this crate re-exports the
//! [`opentelemetry`], [`opentelemetry_sdk`] and [`tracing_opentelemetry`] versions it was
//! built with). Without that layer, or with sampling off, spans cost little and nothing is
//! injected into messages when no span is recording context.
//!
//! ```
//! use opentelemetry::trace::TracerProvider as _;
//! use tidemill_core::{MemoryBroker, Message, Publisher, Router, RouterConfig};
//! use tidemill_otel::{InstrumentedPublisher, OtelTracer};
//! use tracing_subscriber::layer::SubscriberExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
//! let subscriber = tracing_subscriber::registry()
//!     .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("orders")));
//! let _guard = tracing::subscriber::set_default(subscriber);
//!
//! let broker = MemoryBroker::new();
//! let publisher = InstrumentedPublisher::new(broker.publisher());
//! let router = Router::with_config(RouterConfig::default().with_tracer(OtelTracer::new()));
//! router
//!     .add_handler("ship")
//!     .subscribe(broker.subscriber(), "orders")
//!     .publish(publisher.clone(), "shipments") // output carries the handler's trace
//!     .handler(|order: Message| async move { Message::new(order.payload().clone()) })
//!     .await?;
//! publisher.publish_one("orders", Message::new("tea")).await?; // starts the trace
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use async_trait::async_trait;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry::Context;
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use tidemill_core::router::{metric_names, metrics_enabled, MessageTracer, Settled};
use tidemill_core::{ConnectionState, HandlerInfo, Message, Metadata, Publisher, Result};
use tracing::field::Empty;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

#[cfg(feature = "testing")]
pub mod testing;
mod tree;

pub use tree::trace_tree;

pub use opentelemetry;
pub use opentelemetry_sdk;
pub use tracing_opentelemetry;

/// The metadata keys trace context travels in (W3C Trace Context and Baggage).
pub mod headers {
    /// W3C `traceparent`: version, trace id, parent span id, flags.
    pub const TRACEPARENT: &str = "traceparent";
    /// W3C `tracestate`: vendor-specific trace data.
    pub const TRACESTATE: &str = "tracestate";
    /// W3C `baggage`: application key-value pairs that follow the trace.
    pub const BAGGAGE: &str = "baggage";
}

/// Reads trace context from message metadata.
struct MetadataExtractor<'a>(&'a Metadata);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k).collect()
    }
}

/// Writes trace context into message metadata.
struct MetadataInjector<'a>(&'a mut Metadata);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // An empty `tracestate` says nothing: not written.
        if !value.is_empty() {
            self.0.set(key, value);
        }
    }
}

/// Trace context headers written once for a batch.
#[derive(Default)]
struct Headers(Vec<(&'static str, String)>);

impl Injector for Headers {
    fn set(&mut self, key: &str, value: String) {
        let key = match key {
            headers::TRACEPARENT => headers::TRACEPARENT,
            headers::TRACESTATE => headers::TRACESTATE,
            headers::BAGGAGE => headers::BAGGAGE,
            _ => return,
        };
        if !value.is_empty() {
            self.0.push((key, value));
        }
    }
}

/// The trace context (and baggage) `message` carries in its metadata; an empty context
/// when it carries none or a malformed one.
///
/// ```
/// use opentelemetry::trace::TraceContextExt;
/// use tidemill_core::Message;
///
/// let msg = Message::new("x").with_metadata(
///     "traceparent",
///     "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
/// );
/// let cx = tidemill_otel::extract(&msg);
/// assert_eq!(
///     cx.span().span_context().trace_id().to_string(),
///     "4bf92f3577b34da6a3ce929d0e0e4736"
/// );
/// let foreign = Message::new("x").with_metadata("traceparent", "garbage");
/// assert!(!tidemill_otel::extract(&foreign).span().span_context().is_valid());
/// ```
pub fn extract(message: &Message) -> Context {
    let md = MetadataExtractor(message.metadata());
    let cx = TraceContextPropagator::new().extract(&md);
    BaggagePropagator::new().extract_with_context(&cx, &md)
}

/// Writes the span context (and baggage) of `cx` into `message`'s metadata, replacing
/// what it carried; does nothing when `cx` holds no valid span context.
pub fn inject(cx: &Context, message: &mut Message) {
    if !cx.span().span_context().is_valid() {
        return;
    }
    let mut md = MetadataInjector(message.metadata_mut());
    TraceContextPropagator::new().inject_context(cx, &mut md);
    BaggagePropagator::new().inject_context(cx, &mut md);
}

/// [`inject`]s the context of the current `tracing` span (when it is an OpenTelemetry
/// span); for messages published without [`InstrumentedPublisher`].
pub fn inject_current(message: &mut Message) {
    let span = tracing::Span::current();
    if span.is_disabled() {
        return;
    }
    inject(&span.context(), message);
}

/// The `messaging.system` of a message received through `broker` (the adapter's name,
/// [`Native::broker`](tidemill_core::Native::broker)).
fn system_of(message: &Message) -> &'static str {
    match message.native().map(|n| n.broker()) {
        None => "tidemill_memory",
        Some("amqp") => "rabbitmq",
        Some("googlecloud") => "gcp_pubsub",
        Some(other) => other,
    }
}

/// The router's [`MessageTracer`] for OpenTelemetry: each message is handled in a
/// `process <topic>` span of kind consumer, parented on the trace context the message
/// carries, with the messaging attributes `messaging.system`, `messaging.operation.type`
/// (`process`), `messaging.operation.name`, `messaging.destination.name`,
/// `messaging.consumer.group.name`, `messaging.message.id`, and `tidemill.handler`,
/// `tidemill.delivery_attempt`. A failure sets the span's status to error with
/// `error.type` (`handler`, `panic` or `publish`) and the error text as description.
///
/// A message without trace context starts a new trace; one with a malformed
/// `traceparent` too (never an error: the message is handled as usual), which this tracer
/// logs once, at debug level.
///
/// **Unsampled traces** are followed like the SDK's default parent-based sampler does: a
/// message whose `traceparent` says its trace is not sampled is handled without a span
/// (under `tracing-opentelemetry` a span costs more than the rest of an in-memory
/// message's trip, and nothing of it would be recorded), and the handler's output carries
/// the input's trace context on unchanged, so the trace stays one (unsampled) trace. Log
/// lines of such a handler then have no message span; [`with_unsampled_spans`] keeps one
/// for every message.
///
/// [`with_unsampled_spans`]: OtelTracer::with_unsampled_spans
#[derive(Default)]
pub struct OtelTracer {
    malformed_logged: AtomicBool,
    unsampled_spans: bool,
}

impl OtelTracer {
    /// A tracer for [`RouterConfig::tracer`](tidemill_core::RouterConfig::tracer).
    pub fn new() -> Self {
        Self::default()
    }

    /// Opens a span for messages of unsampled traces too (default: no span for them, see
    /// the type's docs); builder style.
    pub fn with_unsampled_spans(mut self, spans: bool) -> Self {
        self.unsampled_spans = spans;
        self
    }
}

/// Whether `traceparent` (W3C version 00: `00-<trace id>-<parent id>-<flags>`) says its
/// trace is not sampled. Only a well-formed header answers yes; anything else goes through
/// the propagator.
fn unsampled(traceparent: &str) -> bool {
    let b = traceparent.as_bytes();
    b.len() == 55
        && b.starts_with(b"00-")
        && b[35] == b'-'
        && b[52] == b'-'
        && matches!(b[54], b'0' | b'2' | b'4' | b'6' | b'8' | b'a' | b'c' | b'e')
        && b[53].is_ascii_hexdigit()
        && b[36..52] != *b"0000000000000000"
        && b[3..35] != *b"00000000000000000000000000000000"
}

impl fmt::Debug for OtelTracer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OtelTracer").finish_non_exhaustive()
    }
}

impl MessageTracer for OtelTracer {
    fn span(
        &self,
        handler: &HandlerInfo,
        message: &Message,
        attempt: Option<u32>,
    ) -> tracing::Span {
        if !self.unsampled_spans
            && message
                .metadata()
                .get(headers::TRACEPARENT)
                .is_some_and(unsampled)
        {
            return tracing::Span::none();
        }
        let span = tracing::info_span!(
            target: "tidemill",
            "process",
            otel.name = %format_args!("process {}", handler.topic),
            otel.kind = "consumer",
            otel.status_code = Empty,
            otel.status_description = Empty,
            error.type = Empty,
            messaging.system = system_of(message),
            messaging.operation.type = "process",
            messaging.operation.name = "process",
            messaging.destination.name = %handler.topic,
            messaging.consumer.group.name = handler.group.as_deref(),
            messaging.message.id = message.uuid(),
            tidemill.handler = %handler.name,
            tidemill.delivery_attempt = attempt,
        );
        if span.is_disabled() {
            return span;
        }
        let md = message.metadata();
        if md.is_empty()
            || !(md.contains_key(headers::TRACEPARENT) || md.contains_key(headers::BAGGAGE))
        {
            return span;
        }
        let parent = extract(message);
        if md.contains_key(headers::TRACEPARENT)
            && !parent.span().span_context().is_valid()
            && !self.malformed_logged.swap(true, Ordering::Relaxed)
        {
            tracing::debug!(
                uuid = message.uuid(),
                traceparent = md.get(headers::TRACEPARENT),
                "malformed traceparent in a received message; starting a new trace (logged \
                 once)"
            );
        }
        let _ = span.set_parent(parent);
        span
    }

    /// An input of an unsampled trace (handled without a span) hands its trace context on
    /// to the outputs that carry none.
    fn outputs(&self, input: &Message, outputs: &mut [Message]) {
        if self.unsampled_spans {
            return;
        }
        let md = input.metadata();
        let Some(traceparent) = md.get(headers::TRACEPARENT).filter(|t| unsampled(t)) else {
            return;
        };
        for out in outputs {
            if out.metadata().contains_key(headers::TRACEPARENT) {
                continue;
            }
            let to = out.metadata_mut();
            to.set(headers::TRACEPARENT, traceparent);
            for key in [headers::TRACESTATE, headers::BAGGAGE] {
                if let Some(v) = md.get(key) {
                    to.set(key, v);
                }
            }
        }
    }

    fn settled(&self, span: &tracing::Span, outcome: Settled<'_>) {
        if let Settled::Failed { kind, error } = outcome {
            span.record("otel.status_code", "error");
            span.record("error.type", kind);
            span.record("otel.status_description", error);
        }
    }
}

/// A [`Publisher`] that traces and measures every publish (see the [crate docs](crate)):
/// a `send <topic>` span of kind producer whose context is injected into each message's
/// metadata, and the publish metrics. Cloning clones the inner publisher.
#[derive(Clone)]
pub struct InstrumentedPublisher<P> {
    inner: P,
    system: &'static str,
}

impl<P> InstrumentedPublisher<P> {
    /// Instruments `inner`; its `messaging.system` attribute is `tidemill` until set with
    /// [`system`](Self::system).
    pub fn new(inner: P) -> Self {
        InstrumentedPublisher {
            inner,
            system: "tidemill",
        }
    }

    /// The `messaging.system` of the publisher's spans: `kafka`, `rabbitmq`, `nats`,
    /// `gcp_pubsub`, ...
    pub fn system(mut self, system: &'static str) -> Self {
        self.system = system;
        self
    }

    /// The wrapped publisher.
    pub fn inner(&self) -> &P {
        &self.inner
    }
}

impl<P> fmt::Debug for InstrumentedPublisher<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InstrumentedPublisher")
            .field("system", &self.system)
            .finish_non_exhaustive()
    }
}

impl<P: Publisher> InstrumentedPublisher<P> {
    async fn send(&self, topic: &str, mut messages: Vec<Message>, mandatory: bool) -> Result<()> {
        // Outside any span, messages that already carry an unsampled trace (a handler's
        // output carried on by `OtelTracer`) keep it: no span would be recorded.
        let carried = tracing::Span::current().is_none()
            && !messages.is_empty()
            && messages.iter().all(|m| {
                m.metadata()
                    .get(headers::TRACEPARENT)
                    .is_some_and(unsampled)
            });
        if carried {
            return self.measured(topic, messages, mandatory).await;
        }
        let span = tracing::info_span!(
            target: "tidemill",
            "send",
            otel.name = %format_args!("send {topic}"),
            otel.kind = "producer",
            otel.status_code = Empty,
            otel.status_description = Empty,
            error.type = Empty,
            messaging.system = self.system,
            messaging.operation.type = "send",
            messaging.operation.name = "send",
            messaging.destination.name = topic,
            messaging.batch.message_count = (messages.len() != 1).then_some(messages.len()),
            messaging.message.id = (messages.len() == 1).then(|| messages[0].uuid()),
        );
        if !span.is_disabled() {
            // One context for the batch: its headers are written once and copied.
            let cx = span.context();
            if cx.span().span_context().is_valid() {
                let mut headers = Headers::default();
                TraceContextPropagator::new().inject_context(&cx, &mut headers);
                BaggagePropagator::new().inject_context(&cx, &mut headers);
                for m in &mut messages {
                    let md = m.metadata_mut();
                    for (k, v) in &headers.0 {
                        md.set(*k, v);
                    }
                }
            }
        }
        let result = self
            .measured(topic, messages, mandatory)
            .instrument(span.clone())
            .await;
        if let Err(e) = &result {
            span.record("otel.status_code", "error");
            span.record("error.type", "publish");
            span.record("otel.status_description", tracing::field::display(e));
        }
        result
    }

    /// Publishes and records the publish metrics (when a recorder is installed).
    async fn measured(&self, topic: &str, messages: Vec<Message>, mandatory: bool) -> Result<()> {
        let metered = metrics_enabled().then(|| (Instant::now(), messages.len()));
        let result = if mandatory {
            self.inner.publish_mandatory(topic, messages).await
        } else {
            self.inner.publish(topic, messages).await
        };
        if let Some((started, n)) = metered {
            let topic = topic.to_owned();
            metrics::histogram!(metric_names::PUBLISH_DURATION, "topic" => topic.clone())
                .record(started.elapsed().as_secs_f64());
            match &result {
                Ok(()) => {
                    metrics::counter!(metric_names::PUBLISHED, "topic" => topic).increment(n as u64)
                }
                Err(_) => {
                    metrics::counter!(metric_names::PUBLISH_ERRORS, "topic" => topic).increment(1)
                }
            }
        }
        result
    }
}

#[async_trait]
impl<P: Publisher> Publisher for InstrumentedPublisher<P> {
    async fn publish(&self, topic: &str, messages: Vec<Message>) -> Result<()> {
        self.send(topic, messages, false).await
    }

    async fn publish_mandatory(&self, topic: &str, messages: Vec<Message>) -> Result<()> {
        self.send(topic, messages, true).await
    }

    async fn retain_for(&self, topic: &str, group: &str) -> Result<()> {
        self.inner.retain_for(topic, group).await
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }

    fn connection_state(&self) -> ConnectionState {
        self.inner.connection_state()
    }
}
