//! Finished spans as an indented tree, one trace after another: for examples and tests.

use std::collections::HashMap;
use std::fmt::Write;

use opentelemetry::trace::{SpanId, Status, TraceId};
use opentelemetry_sdk::trace::SpanData;

/// Draws `spans` (as an exporter received them, e.g. `opentelemetry_sdk`'s in-memory
/// exporter) as one tree per trace: each span under its parent, in start order, with its
/// kind, handler, message id, duration and error status. Spans whose parent is not among
/// `spans` (a remote parent) start a tree of their own.
///
/// ```text
/// trace 4bf92f3577b34da6a3ce929d0e0e4736
/// └─ send orders [Producer] 0.1 ms
///    └─ process orders [Consumer] handler=ship 0.3 ms
///       └─ send shipments [Producer] 0.1 ms
/// ```
pub fn trace_tree(spans: &[SpanData]) -> String {
    let ids: std::collections::HashSet<SpanId> =
        spans.iter().map(|s| s.span_context.span_id()).collect();
    let mut children: HashMap<SpanId, Vec<&SpanData>> = HashMap::new();
    let mut roots: Vec<&SpanData> = Vec::new();
    for s in spans {
        if s.parent_span_id != SpanId::INVALID && ids.contains(&s.parent_span_id) {
            children.entry(s.parent_span_id).or_default().push(s);
        } else {
            roots.push(s);
        }
    }
    for list in children.values_mut() {
        list.sort_by_key(|s| s.start_time);
    }
    roots.sort_by_key(|s| s.start_time);
    // Traces in the order they started; a trace's roots in start order.
    let mut traces: Vec<(TraceId, Vec<&SpanData>)> = Vec::new();
    for root in roots {
        let trace = root.span_context.trace_id();
        match traces.iter_mut().find(|(t, _)| *t == trace) {
            Some((_, list)) => list.push(root),
            None => traces.push((trace, vec![root])),
        }
    }
    let mut out = String::new();
    for (trace, list) in traces {
        let _ = writeln!(out, "trace {trace}");
        for (i, root) in list.iter().enumerate() {
            draw(&mut out, root, &children, "", i + 1 == list.len());
        }
    }
    out
}

fn draw(
    out: &mut String,
    span: &SpanData,
    children: &HashMap<SpanId, Vec<&SpanData>>,
    prefix: &str,
    last: bool,
) {
    let attr = |key: &str| {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.to_string())
    };
    let elapsed = span
        .end_time
        .duration_since(span.start_time)
        .unwrap_or_default();
    let _ = write!(
        out,
        "{prefix}{}{} [{:?}]",
        if last { "└─ " } else { "├─ " },
        span.name,
        span.span_kind
    );
    if let Some(h) = attr("tidemill.handler") {
        let _ = write!(out, " handler={h}");
    }
    if let Some(a) = attr("tidemill.delivery_attempt") {
        let _ = write!(out, " attempt={a}");
    }
    let _ = write!(out, " {:.1} ms", elapsed.as_secs_f64() * 1e3);
    if let Status::Error { description } = &span.status {
        let _ = write!(out, " ERROR {description}");
    }
    out.push('\n');
    let next = format!("{prefix}{}", if last { "   " } else { "│  " });
    if let Some(list) = children.get(&span.span_context.span_id()) {
        for (i, child) in list.iter().enumerate() {
            draw(out, child, children, &next, i + 1 == list.len());
        }
    }
}
