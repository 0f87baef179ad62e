//! What the order flow shows an operator: every span of the run, kept in memory, so one
//! order's trace can be drawn across its hops; the Prometheus text of Tidemill's counters.
//! A real service exports spans (OTLP, Jaeger, ...) and serves `/metrics` instead (see
//! `examples/observability.rs`).

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use tidemill::otel::trace_tree;
use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The target of the example's own spans.
pub const TARGET: &str = "order_flow";

pub struct Observability {
    exporter: InMemorySpanExporter,
    provider: SdkTracerProvider,
    metrics: Option<PrometheusHandle>,
}

impl Observability {
    /// Logs to standard error as `RUST_LOG` says (errors only by default); Tidemill's
    /// spans (and the example's) to an in-memory exporter, every one sampled; metrics to a
    /// Prometheus recorder. Installed before the router starts: its handlers take their
    /// metric handles when they start.
    pub fn install() -> Self {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let logs = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr) // stdout keeps the story and the summary
            .with_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "error".into()));
        let traces = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("order_flow"))
            .with_filter(
                Targets::new()
                    .with_target("tidemill", Level::INFO)
                    .with_target(TARGET, Level::INFO),
            );
        tracing_subscriber::registry()
            .with(logs)
            .with(traces)
            .init();
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let metrics = metrics::set_global_recorder(recorder).ok().map(|()| handle);
        Observability {
            exporter,
            provider,
            metrics,
        }
    }

    /// The trace whose root span is the example's `place order` span for `order_id`.
    pub fn print_trace(&self, order_id: &str) {
        let _ = self.provider.force_flush();
        let Ok(spans) = self.exporter.get_finished_spans() else {
            return;
        };
        let root = spans.iter().find(|s| {
            s.name == "place order"
                && s.attributes
                    .iter()
                    .any(|kv| kv.key.as_str() == "order" && kv.value.as_str() == order_id)
        });
        let Some(root) = root else {
            println!("\n(no trace recorded for {order_id})");
            return;
        };
        let trace = root.span_context.trace_id();
        let ours: Vec<_> = spans
            .into_iter()
            .filter(|s| s.span_context.trace_id() == trace)
            .collect();
        println!(
            "\nTrace of {order_id} ({} spans; trace context travels in message metadata):",
            ours.len()
        );
        for line in trace_tree(&ours).lines() {
            println!("  {line}");
        }
    }

    /// Tidemill's counters and gauges, as Prometheus scrapes them (histograms left out).
    pub fn print_counters(&self) {
        let Some(handle) = &self.metrics else {
            return;
        };
        println!("\nCounters (Prometheus text, as /metrics serves it):");
        for line in handle.render().lines() {
            let wanted = line.starts_with("tidemill_")
                && !line.contains("duration_seconds")
                && !line.ends_with(" 0");
            if wanted {
                println!("  {line}");
            }
        }
    }
}
