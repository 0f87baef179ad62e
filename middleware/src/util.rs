//! Building blocks shared by the layers.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use parking_lot::Mutex;
use pin_project_lite::pin_project;
use tidemill_core::{BoxError, Message};
use tower::Service;

/// The result of a handler service.
pub(crate) type HandlerOutput = Result<Vec<Message>, BoxError>;

/// A service shared by every future of a layer that calls it more than once per message
/// (retry, duplicator). Readiness and the call happen together under the lock, so no
/// caller can consume readiness another one asked for; the lock is never held across an
/// await.
pub(crate) struct Shared<S>(Arc<Mutex<S>>);

impl<S> Clone for Shared<S> {
    fn clone(&self) -> Self {
        Shared(self.0.clone())
    }
}

impl<S> Shared<S>
where
    S: Service<Message>,
{
    pub(crate) fn new(service: S) -> Self {
        Shared(Arc::new(Mutex::new(service)))
    }

    /// Polls the service's readiness and, once ready, calls it with a clone of `msg`.
    pub(crate) fn poll_call(
        &self,
        cx: &mut Context<'_>,
        msg: &Message,
    ) -> Poll<Result<S::Future, S::Error>> {
        let mut service = self.0.lock();
        match service.poll_ready(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(service.call(msg.clone()))),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// What a layer does with a handler error (publish to a poison topic, ask for a delayed
/// redelivery, ...): the state a layer keeps per message for its error path, so that a
/// success costs nothing but a move.
pub trait OnFailure: Send + 'static {
    /// Deals with `error`; the result is the layer's result for the message.
    fn fail(self, error: BoxError) -> BoxFuture<'static, Result<Vec<Message>, BoxError>>;
}

pin_project! {
    /// Passes the inner future's success through untouched (no allocation on the happy
    /// path) and hands an error to the layer's error path.
    #[project = OnErrorProj]
    pub(crate) enum OnError<F, P> {
        Running { #[pin] fut: F, on_error: Option<P> },
        Handling { fut: BoxFuture<'static, HandlerOutput> },
        /// Completed at once (the layer decided without calling the handler).
        Done { result: Option<HandlerOutput> },
    }
}

impl<F, P> OnError<F, P> {
    pub(crate) fn new(fut: F, on_error: P) -> Self {
        OnError::Running {
            fut,
            on_error: Some(on_error),
        }
    }

    pub(crate) fn done(result: HandlerOutput) -> Self {
        OnError::Done {
            result: Some(result),
        }
    }
}

impl<F, E, P> Future for OnError<F, P>
where
    F: Future<Output = Result<Vec<Message>, E>>,
    E: Into<BoxError>,
    P: OnFailure,
{
    type Output = HandlerOutput;

    #[inline]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<HandlerOutput> {
        loop {
            let next = match self.as_mut().project() {
                OnErrorProj::Running { fut, on_error } => match fut.poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(out)) => return Poll::Ready(Ok(out)),
                    Poll::Ready(Err(e)) => match on_error.take() {
                        Some(path) => fail(path, e.into()),
                        None => return Poll::Ready(Err(e.into())),
                    },
                },
                OnErrorProj::Handling { fut } => return fut.as_mut().poll(cx),
                OnErrorProj::Done { result } => {
                    return Poll::Ready(result.take().unwrap_or_else(|| Ok(Vec::new())))
                }
            };
            self.set(OnError::Handling { fut: next });
        }
    }
}

/// Starts a layer's error path, out of line: the success path stays small.
#[cold]
#[inline(never)]
fn fail<P: OnFailure>(path: P, error: BoxError) -> BoxFuture<'static, HandlerOutput> {
    path.fail(error)
}

/// An error and its sources on one line: `outer: inner: root`.
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        // Wrappers that display their source (permanent, redeliver_after) would repeat it.
        if !text.ends_with(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// Cuts `text` to at most `max` bytes on a character boundary, marking the cut.
pub(crate) fn truncate(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut end = max.saturating_sub(3);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str("...");
    text
}

/// RFC 3339 UTC time with milliseconds, as written into metadata.
pub(crate) fn timestamp(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

/// Milliseconds since the Unix epoch.
pub(crate) fn epoch_millis(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The time `millis` after the Unix epoch.
pub(crate) fn from_epoch_millis(millis: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(millis)
}

/// The handler name and topic of a message received by the router (empty outside one).
/// Counts one more `name` (a Tidemill counter, see
/// [`metric_names`](tidemill_core::router::metric_names)) for the handler that received
/// `msg`, labelled `handler` and `topic`, when a metrics recorder is installed.
pub(crate) fn count(name: &'static str, msg: &Message) {
    if !tidemill_core::router::metrics_enabled() {
        return;
    }
    let (handler, topic) = match msg.context() {
        Some(ctx) => (ctx.handler().name.clone(), ctx.handler().topic.clone()),
        None => (String::new(), String::new()),
    };
    metrics::counter!(name, "handler" => handler, "topic" => topic).increment(1);
}

pub(crate) fn handler_and_topic(msg: &Message) -> (String, String, Option<String>) {
    match msg.context() {
        Some(ctx) => {
            let info = ctx.handler();
            (info.name.clone(), info.topic.clone(), info.group.clone())
        }
        None => (String::new(), String::new(), None),
    }
}

pin_project! {
    /// The future of the layers that only act on a handler error (poison queue, dead
    /// letter, delayed redelivery, ignore errors): a success passes through without
    /// allocating; `P` is the layer's error path.
    pub struct LayerFuture<F, P> {
        #[pin]
        inner: OnError<F, P>,
    }
}

impl<F, P> From<OnError<F, P>> for LayerFuture<F, P> {
    fn from(inner: OnError<F, P>) -> Self {
        LayerFuture { inner }
    }
}

impl<F, E, P> Future for LayerFuture<F, P>
where
    F: Future<Output = Result<Vec<Message>, E>>,
    E: Into<BoxError>,
    P: OnFailure,
{
    type Output = HandlerOutput;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<HandlerOutput> {
        self.project().inner.poll(cx)
    }
}
