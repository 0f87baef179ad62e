//! Batch handlers: one call with many messages, each message settled on its own.
//!
//! [`HandlerBuilder::batch`](super::HandlerBuilder::batch) makes a handler whose function
//! takes a `Vec<Message>`. Without layers, the handler's loop ([`run_direct`]) takes its
//! batches straight from the subscription. With layers, every message takes the
//! single-message path: the router hands it to the layers (retry, poison queue, dead letter,
//! recoverer, correlation id work per message, unchanged), and the innermost service, a
//! [`BatchService`], gathers the messages that reach it into batches for the function.
//! Either way the function's [`BatchResult`] settles each message by the usual outcome
//! rules.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::{mpsc, oneshot};
use tower::Service;
use tracing::Instrument;

mod direct;

pub(crate) use direct::run_direct;

use super::handler::IntoMessages;
use super::run::panic_message;
use crate::{BoxError, Message, Publisher};

/// How a batch handler gathers its batches (set by
/// [`HandlerBuilder::batch`](super::HandlerBuilder::batch) and
/// [`BatchHandler::max_bytes`](super::BatchHandler::max_bytes)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BatchConfig {
    /// The most messages in one batch (at least 1).
    pub(crate) max_messages: usize,
    /// How long a batch waits, from its first message, for more before it is handled
    /// partly full. Zero: it takes what has arrived and goes.
    pub(crate) max_wait: Duration,
    /// The most payload bytes in one batch (a message that would cross it starts the
    /// next batch; a single larger message makes a batch of its own). `None`: no limit.
    pub(crate) max_bytes: Option<usize>,
}

impl BatchConfig {
    /// Up to `max_messages` per batch, waiting at most `max_wait` for a batch to fill.
    pub(crate) fn new(max_messages: usize, max_wait: Duration) -> Self {
        BatchConfig {
            max_messages,
            max_wait,
            max_bytes: None,
        }
    }
}

/// What a batch handler decided for its batch: by default every message succeeded and
/// nothing is published. Indices are positions in the `Vec<Message>` the handler got.
///
/// - [`fail`](BatchResult::fail) one message: it takes the failure path on its own (nacked
///   with the router's growing delay; a [`permanent`](crate::permanent) error goes to a
///   poison queue if the handler has that layer; [`redeliver_after`](super::redeliver_after)
///   picks the delay). The other messages are acked.
/// - [`publish`](BatchResult::publish) messages for the batch as a whole: published to
///   the handler's output and confirmed before any message of the batch is acked; if that
///   fails, every message not failed otherwise fails with the publish error.
/// - [`publish_for`](BatchResult::publish_for) one message: its outputs take the
///   single-message path (through the handler's layers, e.g. correlation id, then
///   published and confirmed before that message is acked).
///
/// A handler returning `Err` fails every message of the batch with that error; a panic
/// fails every message as a panic (the [`Recoverer`] layer sees it per message). A result
/// that names a message index outside the batch (a bug in the handler) fails every
/// message of the batch too, and nothing of it is published: nothing is acked on a result
/// that does not match its messages.
///
/// [`Recoverer`]: https://docs.rs/tidemill-middleware/latest/tidemill_middleware/struct.Recoverer.html
#[derive(Debug, Default)]
pub struct BatchResult {
    failed: Vec<(usize, BoxError)>,
    outputs: Vec<Message>,
    outputs_for: Vec<(usize, Vec<Message>)>,
}

impl BatchResult {
    /// Every message succeeded; nothing to publish.
    pub fn ok() -> Self {
        BatchResult::default()
    }

    /// Marks message `index` of the batch as failed with `error`.
    pub fn fail(&mut self, index: usize, error: impl Into<BoxError>) -> &mut Self {
        self.failed.push((index, error.into()));
        self
    }

    /// Marks each message of `indices` as failed with the one `error` (each sees it as its
    /// own: a permanent error stays permanent, a requested delay applies to each).
    pub fn fail_each(
        &mut self,
        indices: impl IntoIterator<Item = usize>,
        error: impl Into<BoxError>,
    ) -> &mut Self {
        let shared = SharedError(Arc::new(error.into()));
        for index in indices {
            self.failed.push((index, Box::new(shared.clone())));
        }
        self
    }

    /// Takes in the result of a part of the batch (e.g. the messages one store handled):
    /// index `i` of `part` is message `positions[i]` of this batch. An index of `part`
    /// without a position counts as outside the batch: the whole batch fails when it
    /// settles.
    pub fn extend_from_part(&mut self, part: BatchResult, positions: &[usize]) -> &mut Self {
        let at = |i: usize| positions.get(i).copied().unwrap_or(usize::MAX);
        self.failed
            .extend(part.failed.into_iter().map(|(i, e)| (at(i), e)));
        self.outputs.extend(part.outputs);
        self.outputs_for
            .extend(part.outputs_for.into_iter().map(|(i, m)| (at(i), m)));
        self
    }

    /// Adds messages to publish for the batch as a whole.
    pub fn publish(&mut self, messages: impl IntoMessages) -> &mut Self {
        self.outputs.extend(messages.into_messages());
        self
    }

    /// Adds messages to publish for message `index` alone (published before it is acked).
    pub fn publish_for(&mut self, index: usize, messages: impl IntoMessages) -> &mut Self {
        self.outputs_for.push((index, messages.into_messages()));
        self
    }

    /// Whether nothing failed.
    pub fn all_ok(&self) -> bool {
        self.failed.is_empty()
    }
}

/// What a batch handler's future may resolve to: a [`BatchResult`], `()` (every message
/// succeeded), `Vec<Message>` (every message succeeded; publish these for the batch), or a
/// `Result<T, E>` of one of them, whose `Err` fails the whole batch.
#[diagnostic::on_unimplemented(
    message = "a batch handler cannot return `{Self}`",
    label = "the batch handler's future resolves to `{Self}`",
    note = "a batch handler returns `BatchResult`, `()` or `Vec<Message>`, or a `Result` of \
            one of them with an error that is `Into<BoxError>`"
)]
pub trait IntoBatchResult {
    /// The batch's result, or the error that fails the whole batch.
    fn into_batch_result(self) -> Result<BatchResult, BoxError>;
}

impl IntoBatchResult for BatchResult {
    fn into_batch_result(self) -> Result<BatchResult, BoxError> {
        Ok(self)
    }
}

impl IntoBatchResult for () {
    fn into_batch_result(self) -> Result<BatchResult, BoxError> {
        Ok(BatchResult::ok())
    }
}

impl IntoBatchResult for Vec<Message> {
    fn into_batch_result(self) -> Result<BatchResult, BoxError> {
        let mut result = BatchResult::ok();
        result.publish(self);
        Ok(result)
    }
}

impl<T: IntoBatchResult, E: Into<BoxError>> IntoBatchResult for Result<T, E> {
    fn into_batch_result(self) -> Result<BatchResult, BoxError> {
        self.map_err(Into::into)?.into_batch_result()
    }
}

/// The output side of a batch handler: where batch-level outputs go.
pub(crate) struct BatchOutput {
    pub(crate) handler: String,
    pub(crate) topic: String,
    pub(crate) publisher: Option<(Arc<dyn Publisher>, String)>,
}

/// The `tidemill_batch_messages` histogram of one batch handler, taken with its first batch
/// if a metrics recorder is installed by then.
#[derive(Default)]
pub(crate) struct BatchSizes(Option<Option<metrics::Histogram>>);

impl BatchSizes {
    /// Records a batch of `n` messages.
    pub(crate) fn record(&mut self, output: &BatchOutput, n: usize) {
        let histogram = self.0.get_or_insert_with(|| {
            super::observe::metrics_enabled().then(|| {
                metrics::histogram!(
                    super::observe::names::BATCH_SIZE,
                    "handler" => output.handler.clone(),
                    "topic" => output.topic.clone(),
                )
            })
        });
        if let Some(h) = histogram {
            h.record(n as f64);
        }
    }
}

/// The innermost service of a batch handler: each call queues its message for the next
/// batch and resolves with that message's outcome once the batch was handled. Clones
/// share the batches. A task of its own gathers and handles the batches, one at a time;
/// it ends, handling what it holds at once, when every clone is gone.
#[derive(Clone)]
pub struct BatchService {
    tx: mpsc::UnboundedSender<Queued>,
}

impl std::fmt::Debug for BatchService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchService").finish_non_exhaustive()
    }
}

struct Queued {
    msg: Message,
    reply: oneshot::Sender<Reply>,
}

enum Reply {
    Done(Result<Vec<Message>, BoxError>),
    Panicked(String),
}

impl BatchService {
    /// Starts the batching task (on the current Tokio runtime) for `f`.
    pub(crate) fn start<F, Fut>(f: F, config: BatchConfig, output: BatchOutput) -> Self
    where
        F: Fn(Vec<Message>) -> Fut + Send + Sync + 'static,
        Fut: Future + Send + 'static,
        Fut::Output: IntoBatchResult,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(gather(rx, f, config, output));
        BatchService { tx }
    }
}

impl Service<Message> for BatchService {
    type Response = Vec<Message>;
    type Error = BoxError;
    type Future = BatchFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, msg: Message) -> BatchFuture {
        let (reply, rx) = oneshot::channel();
        // If the task is gone the reply sender is dropped with the message: the future
        // reports it.
        let _ = self.tx.send(Queued { msg, reply });
        BatchFuture { rx }
    }
}

/// The future of one message in a batch: resolves with the message's outcome once its
/// batch was handled, or resumes the batch handler's panic.
pub struct BatchFuture {
    rx: oneshot::Receiver<Reply>,
}

impl std::fmt::Debug for BatchFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchFuture").finish_non_exhaustive()
    }
}

impl Future for BatchFuture {
    type Output = Result<Vec<Message>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.rx.poll_unpin(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Reply::Done(result))) => Poll::Ready(result),
            // Each message of a panicked batch panics with the same message (without the
            // panic hook again), so the router and a `Recoverer` see a panic.
            Poll::Ready(Ok(Reply::Panicked(message))) => {
                std::panic::resume_unwind(Box::new(message))
            }
            Poll::Ready(Err(_)) => Poll::Ready(Err(
                "the batch handler's task ended before handling the message (the runtime is \
                 shutting down)"
                    .into(),
            )),
        }
    }
}

/// An error shared by every message of a batch (the handler's error for the whole batch,
/// or the publish error of its outputs). It reads as the original, and the original is its
/// source, so `is_permanent` and `redelivery_delay` see through it.
#[derive(Clone, Debug)]
struct SharedError(Arc<BoxError>);

impl std::fmt::Display for SharedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&**self.0, f)
    }
}

impl std::error::Error for SharedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&**self.0)
    }
}

/// The batching task: gathers a batch (full, at `max_bytes`, or `max_wait` after its first
/// message), handles it, replies to each message, and again; ends once every sender is gone
/// and nothing is queued (a partial batch is handled at once then).
async fn gather<F, Fut>(
    mut rx: mpsc::UnboundedReceiver<Queued>,
    f: F,
    config: BatchConfig,
    output: BatchOutput,
) where
    F: Fn(Vec<Message>) -> Fut,
    Fut: Future,
    Fut::Output: IntoBatchResult,
{
    let max = config.max_messages.max(1);
    let max_bytes = config.max_bytes.unwrap_or(usize::MAX);
    let mut carry: Option<Queued> = None;
    let mut sizes = BatchSizes::default();
    loop {
        let first = match carry.take() {
            Some(q) => q,
            None => match rx.recv().await {
                Some(q) => q,
                None => break,
            },
        };
        let deadline = tokio::time::Instant::now() + config.max_wait;
        let mut bytes = first.msg.payload().len();
        let mut batch = Vec::with_capacity(max.min(1024));
        batch.push(first);
        while batch.len() < max {
            let next = match rx.try_recv() {
                Ok(q) => Some(q),
                Err(mpsc::error::TryRecvError::Disconnected) => None,
                Err(mpsc::error::TryRecvError::Empty) => tokio::select! {
                    biased;
                    q = rx.recv() => q,
                    _ = tokio::time::sleep_until(deadline) => break,
                },
            };
            // Every sender gone: handle what is here at once.
            let Some(q) = next else { break };
            let len = q.msg.payload().len();
            if bytes.saturating_add(len) > max_bytes {
                carry = Some(q);
                break;
            }
            bytes += len;
            batch.push(q);
        }
        sizes.record(&output, batch.len());
        handle(&f, batch, &output, bytes).await;
    }
}

/// Calls the handler with one batch and replies to each of its messages.
async fn handle<F, Fut>(f: &F, batch: Vec<Queued>, output: &BatchOutput, bytes: usize)
where
    F: Fn(Vec<Message>) -> Fut,
    Fut: Future,
    Fut::Output: IntoBatchResult,
{
    // A message whose future is gone (its handling was abandoned, e.g. by a timeout layer
    // or a forced shutdown, so its delivery was nacked) is not handled.
    let (msgs, replies): (Vec<Message>, Vec<oneshot::Sender<Reply>>) = batch
        .into_iter()
        .filter(|q| !q.reply.is_closed())
        .map(|q| (q.msg, q.reply))
        .unzip();
    if msgs.is_empty() {
        return;
    }
    let n = msgs.len();
    let span = tracing::info_span!("batch", handler = %output.handler, size = n, bytes);
    let called = std::panic::catch_unwind(AssertUnwindSafe(|| span.in_scope(|| f(msgs))));
    let result = match called {
        Ok(fut) => AssertUnwindSafe(fut.instrument(span.clone()))
            .catch_unwind()
            .await
            .map(IntoBatchResult::into_batch_result),
        Err(panic) => Err(panic),
    };
    let outcomes: Vec<Reply> = match result {
        Err(panic) => {
            let message = panic_message(&*panic);
            span.in_scope(|| tracing::error!(panic = %message, "batch handler panicked"));
            (0..n).map(|_| Reply::Panicked(message.clone())).collect()
        }
        Ok(Err(e)) => {
            let shared = SharedError(Arc::new(e));
            (0..n)
                .map(|_| Reply::Done(Err(Box::new(shared.clone()))))
                .collect()
        }
        Ok(Ok(result)) => settle(result, n, output)
            .instrument(span)
            .await
            .into_iter()
            .map(Reply::Done)
            .collect(),
    };
    for (reply, outcome) in replies.into_iter().zip(outcomes) {
        let _ = reply.send(outcome);
    }
}

/// Turns a batch's result into one outcome per message, publishing its batch-level outputs
/// first.
async fn settle(
    result: BatchResult,
    n: usize,
    output: &BatchOutput,
) -> Vec<Result<Vec<Message>, BoxError>> {
    // A result naming a message the batch does not have was computed for other messages
    // than these: acking any of them on it could ack one the handler meant to fail, and
    // outputs for a message that is not there have nowhere to go.
    let outside = (result.failed.iter().map(|(i, _)| *i))
        .chain(result.outputs_for.iter().map(|(i, _)| *i))
        .find(|&i| i >= n);
    if let Some(index) = outside {
        tracing::error!(
            index,
            size = n,
            "batch handler's result names a message outside its batch; every message of \
             the batch fails and nothing of the result is published"
        );
        let named = if index == usize::MAX {
            // What `extend_from_part` makes of a part's index without a position.
            "a message of a part that `extend_from_part` had no position for".to_owned()
        } else {
            format!("message {index}")
        };
        let shared = SharedError(Arc::new(
            format!(
                "batch handler's result names {named}, outside its batch of {n}: the batch \
                 fails as a whole and nothing of the result is published"
            )
            .into(),
        ));
        return (0..n)
            .map(|_| Err(Box::new(shared.clone()) as BoxError))
            .collect();
    }
    let mut outcomes: Vec<Result<Vec<Message>, BoxError>> =
        (0..n).map(|_| Ok(Vec::new())).collect();
    for (index, error) in result.failed {
        outcomes[index] = Err(error);
    }
    for (index, messages) in result.outputs_for {
        if let Ok(out) = &mut outcomes[index] {
            out.extend(messages); // a failed message's outputs are not published
        }
    }
    if result.outputs.is_empty() || outcomes.iter().all(Result::is_err) {
        return outcomes;
    }
    let count = result.outputs.len();
    let failure: BoxError = match &output.publisher {
        Some((publisher, topic)) => match (**publisher).publish(topic, result.outputs).await {
            Ok(()) => return outcomes,
            Err(e) => e.into(),
        },
        None => format!(
            "consumer-only batch handler returned {count} message(s) it cannot publish (add an \
             output with .publish(publisher, topic) or return nothing)"
        )
        .into(),
    };
    tracing::warn!(error = %failure, "publishing a batch's outputs failed; its messages will be redelivered");
    let shared = SharedError(Arc::new(failure));
    for outcome in &mut outcomes {
        if outcome.is_ok() {
            *outcome = Err(Box::new(shared.clone()));
        }
    }
    outcomes
}

#[cfg(test)]
mod tests;
