//! An in-memory span exporter behind a `tracing` subscriber for this thread (the tests run
//! on a current-thread runtime, so the router's tasks see it), and queries on its spans.
#![allow(dead_code)]

use opentelemetry::trace::{SpanId, SpanKind, TraceId, TracerProvider as _};
use opentelemetry::Value;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing_subscriber::layer::SubscriberExt;

pub struct Traces {
    pub exporter: InMemorySpanExporter,
    pub provider: SdkTracerProvider,
    _guard: tracing::subscriber::DefaultGuard,
}

impl Traces {
    /// Every span sampled, exported when it ends.
    pub fn install() -> Self {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry().with(
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("tidemill-test"))
                .with_error_fields_to_exceptions(false),
        );
        let guard = tracing::subscriber::set_default(subscriber);
        Traces {
            exporter,
            provider,
            _guard: guard,
        }
    }

    pub fn spans(&self) -> Vec<SpanData> {
        let _ = self.provider.force_flush();
        self.exporter
            .get_finished_spans()
            .unwrap_or_else(|e| panic!("exporter: {e}"))
    }
}

pub fn attr(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| match &kv.value {
            Value::String(s) => s.to_string(),
            other => other.to_string(),
        })
}

/// The one span named `name` whose `key` attribute is `value` (panics otherwise).
pub fn find<'a>(spans: &'a [SpanData], name: &str, key: &str, value: &str) -> &'a SpanData {
    let found: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.name == name && attr(s, key).as_deref() == Some(value))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one span `{name}` with {key}={value}; spans:\n{}",
        tidemill_otel::trace_tree(spans)
    );
    found[0]
}

pub fn trace_id(span: &SpanData) -> TraceId {
    span.span_context.trace_id()
}

pub fn span_id(span: &SpanData) -> SpanId {
    span.span_context.span_id()
}

/// Asserts `child`'s parent is `parent` (same trace, parent link).
pub fn assert_child(child: &SpanData, parent: &SpanData, spans: &[SpanData]) {
    assert_eq!(
        trace_id(child),
        trace_id(parent),
        "`{}` and `{}` in one trace:\n{}",
        child.name,
        parent.name,
        tidemill_otel::trace_tree(spans)
    );
    assert_eq!(
        child.parent_span_id,
        span_id(parent),
        "`{}` is a child of `{}`:\n{}",
        child.name,
        parent.name,
        tidemill_otel::trace_tree(spans)
    );
}

pub fn assert_kind(span: &SpanData, kind: SpanKind) {
    assert_eq!(span.span_kind, kind, "kind of `{}`", span.name);
}
