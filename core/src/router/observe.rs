//! What the router tells an operator: metrics through the [`metrics`] facade, and the hook
//! through which a tracer (tidemill-otel) opens the span of each message.
//!
//! Both cost nothing per message unless the application opted in: handles are taken once per
//! handler when it starts, and only if a metrics recorder is installed by then; without a
//! [`MessageTracer`] the router opens its own plain span.

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use metrics::{Counter, Gauge, Histogram, Unit};

use crate::{HandlerInfo, Message};

/// The names of the metrics Tidemill records, for dashboards and alerts (the README's
/// "Metrics" table describes each).
pub mod names {
    /// Counter `{handler, topic}`: messages a handler received (every delivery).
    pub const RECEIVED: &str = "tidemill_messages_received_total";
    /// Counter `{handler, topic}`: messages acked after handling.
    pub const ACKED: &str = "tidemill_messages_acked_total";
    /// Counter `{handler, topic}`: messages nacked for redelivery.
    pub const NACKED: &str = "tidemill_messages_nacked_total";
    /// Counter `{handler, topic, kind}`: failures by kind (`error`, `panic`, `publish`).
    pub const FAILURES: &str = "tidemill_handler_failures_total";
    /// Histogram `{handler, topic}`: seconds from calling the handler to its result.
    pub const DURATION: &str = "tidemill_handler_duration_seconds";
    /// Gauge `{handler, topic}`: messages being handled right now.
    pub const IN_FLIGHT: &str = "tidemill_messages_in_flight";
    /// Histogram `{handler, topic}`: messages per batch a batch handler was called with.
    pub const BATCH_SIZE: &str = "tidemill_batch_messages";
    /// Counter `{handler, topic}`: in-process retries (tidemill-middleware's `Retry`).
    pub const RETRIED: &str = "tidemill_messages_retried_total";
    /// Counter `{handler, topic}`: messages moved to a dead-letter topic.
    pub const DEAD_LETTERED: &str = "tidemill_messages_dead_lettered_total";
    /// Counter `{handler, topic}`: messages moved to a poison topic.
    pub const POISONED: &str = "tidemill_messages_poisoned_total";
    /// Counter `{topic}`: messages a publisher had accepted by the broker.
    pub const PUBLISHED: &str = "tidemill_messages_published_total";
    /// Histogram `{topic}`: seconds a publish call took (until the broker confirmed).
    pub const PUBLISH_DURATION: &str = "tidemill_publish_duration_seconds";
    /// Counter `{topic}`: publish calls that failed.
    pub const PUBLISH_ERRORS: &str = "tidemill_publish_errors_total";
    /// Gauge `{topic, group}`: messages the broker holds for a subscription that it has
    /// not delivered yet, where the broker tells (JetStream `num_pending`, Kafka high
    /// watermark minus committed offset).
    pub const CONSUMER_LAG: &str = "tidemill_consumer_lag_messages";
}

/// Whether the application installed a metrics recorder (global, or local to this
/// thread). The `metrics` facade's stand-in when none is installed is a zero-sized no-op
/// recorder; every real recorder keeps state. A zero-sized recorder of the application's
/// own is taken for none: the router then records nothing.
pub fn metrics_enabled() -> bool {
    metrics::with_recorder(|r| std::mem::size_of_val(r) != 0)
}

/// One handler's metric handles, taken when it starts.
pub(crate) struct HandlerMetrics {
    received: Counter,
    acked: Counter,
    nacked: Counter,
    duration: Histogram,
    in_flight: Gauge,
}

impl HandlerMetrics {
    /// The handles for `info`, or `None` when no recorder is installed (nothing is
    /// recorded then, not even the time).
    pub(crate) fn register(info: &HandlerInfo) -> Option<Arc<Self>> {
        if !metrics_enabled() {
            return None;
        }
        describe();
        let labels = [
            ("handler", info.name.clone()),
            ("topic", info.topic.clone()),
        ];
        Some(Arc::new(HandlerMetrics {
            received: metrics::counter!(names::RECEIVED, &labels),
            acked: metrics::counter!(names::ACKED, &labels),
            nacked: metrics::counter!(names::NACKED, &labels),
            duration: metrics::histogram!(names::DURATION, &labels),
            in_flight: metrics::gauge!(names::IN_FLIGHT, &labels),
        }))
    }
}

/// Help texts for every Tidemill metric (recorders keep them once).
fn describe() {
    use names::*;
    metrics::describe_counter!(RECEIVED, Unit::Count, "Messages a handler received");
    metrics::describe_counter!(ACKED, Unit::Count, "Messages acked after handling");
    metrics::describe_counter!(NACKED, Unit::Count, "Messages nacked for redelivery");
    metrics::describe_counter!(FAILURES, Unit::Count, "Handler failures by kind");
    metrics::describe_histogram!(DURATION, Unit::Seconds, "Time a handler took per message");
    metrics::describe_gauge!(IN_FLIGHT, Unit::Count, "Messages being handled");
    metrics::describe_counter!(RETRIED, Unit::Count, "In-process retries");
    metrics::describe_counter!(DEAD_LETTERED, Unit::Count, "Messages dead-lettered");
    metrics::describe_counter!(POISONED, Unit::Count, "Messages poisoned");
    metrics::describe_counter!(PUBLISHED, Unit::Count, "Messages published");
    metrics::describe_histogram!(PUBLISH_DURATION, Unit::Seconds, "Time a publish took");
    metrics::describe_counter!(PUBLISH_ERRORS, Unit::Count, "Failed publish calls");
    metrics::describe_gauge!(CONSUMER_LAG, Unit::Count, "Messages not yet delivered");
}

/// One message's share of its handler's metrics: counted as received and in flight when
/// made, out of flight when dropped (also when the work is abandoned).
/// With a tracer, it also keeps the input (one reference count) for
/// [`MessageTracer::outputs`].
pub(crate) struct Tracked {
    metrics: Option<(Arc<HandlerMetrics>, Instant)>,
    input: Option<Message>,
}

impl Tracked {
    #[inline]
    pub(crate) fn start(
        metrics: &Option<Arc<HandlerMetrics>>,
        tracer: &Option<Arc<dyn MessageTracer>>,
        input: &Message,
    ) -> Self {
        Tracked {
            metrics: metrics.as_ref().map(|m| {
                m.received.increment(1);
                m.in_flight.increment(1.0);
                (m.clone(), Instant::now())
            }),
            input: tracer.as_ref().map(|_| input.clone()),
        }
    }

    /// The input, kept when a tracer is set.
    #[inline]
    pub(crate) fn input(&self) -> Option<&Message> {
        self.input.as_ref()
    }

    /// The handler has its result.
    #[inline]
    pub(crate) fn handled(&self) {
        if let Some((m, started)) = &self.metrics {
            m.duration.record(started.elapsed().as_secs_f64());
        }
    }

    #[inline]
    pub(crate) fn acked(&self) {
        if let Some((m, _)) = &self.metrics {
            m.acked.increment(1);
        }
    }

    #[inline]
    pub(crate) fn nacked(&self) {
        if let Some((m, _)) = &self.metrics {
            m.nacked.increment(1);
        }
    }
}

impl Drop for Tracked {
    #[inline]
    fn drop(&mut self) {
        if let Some((m, _)) = &self.metrics {
            m.in_flight.decrement(1.0);
        }
    }
}

/// How the router settled a message, as told to [`MessageTracer::settled`].
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub enum Settled<'a> {
    /// Handled (its output published) and acked, or settled early by a layer.
    Acked,
    /// Failed and nacked for redelivery (or, if a layer took the acknowledgement early,
    /// only counted).
    Failed {
        /// What failed: `handler`, `panic` or `publish`.
        kind: &'static str,
        /// The error with its sources.
        error: &'a str,
    },
}

/// Opens the span the router handles each message in (the handler call, publishing its
/// output and settling all run inside it) and hears how the message was settled. Set it
/// with [`RouterConfig::tracer`](super::RouterConfig::tracer); tidemill-otel's tracer
/// parents the span on the trace context the message carries in its metadata. Without
/// one, the router opens a plain `message` span (handler, topic, uuid, attempt).
pub trait MessageTracer: fmt::Debug + Send + Sync + 'static {
    /// The span for `message`, received by `handler` on its `attempt`-th delivery (if
    /// known).
    fn span(&self, handler: &HandlerInfo, message: &Message, attempt: Option<u32>)
        -> tracing::Span;

    /// Called inside the message's span with the handler's output before the router
    /// publishes it (to the handler's output topic), with the input it came from. The
    /// default does nothing; a tracer that opened no span for the input (an unsampled
    /// trace) carries the input's trace context on here.
    fn outputs(&self, input: &Message, outputs: &mut [Message]) {
        let _ = (input, outputs);
    }

    /// Called inside `span` once the message is settled. The default does nothing.
    fn settled(&self, span: &tracing::Span, outcome: Settled<'_>) {
        let _ = (span, outcome);
    }
}
