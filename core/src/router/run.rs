//! The per-handler loops: take deliveries, call the service, publish its output, settle.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::{poll_fn, Future};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::Service;
use tracing::Instrument;

use super::outcome::{redelivery_delay, Settlement};
use super::HandlerRun;
use crate::{BoxError, Delivery, HandlerInfo, Message, MessageContext, Publisher};

/// What every message of one handler shares.
pub(crate) struct HandlerCtx {
    pub(crate) info: Arc<HandlerInfo>,
    pub(crate) output: Option<Arc<dyn Publisher>>,
    pub(crate) concurrency: usize,
}

pub(crate) async fn run_handler<S>(service: S, run: HandlerRun)
where
    S: Service<Message, Response = Vec<Message>> + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    let name = run.ctx.info.name.clone();
    if run.ctx.concurrency <= 1 {
        sequential(service, run).await;
    } else {
        concurrent(service, run).await;
    }
    tracing::debug!(handler = %name, "handler stopped");
}

/// One message at a time, inline: the fast path and the default.
async fn sequential<S>(mut service: S, run: HandlerRun)
where
    S: Service<Message, Response = Vec<Message>> + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    let HandlerRun {
        mut stream,
        ctx,
        stop,
        force,
        ..
    } = run;
    loop {
        if stop.is_cancelled() {
            break;
        }
        // The stream is polled first so a busy stream costs no extra wake-up registration;
        // the loop head catches a stop between messages.
        let item = tokio::select! {
            biased;
            item = stream.next() => item,
            _ = stop.cancelled() => break,
        };
        let delivery = match next_delivery(&ctx, item) {
            Next::Delivery(d) => d,
            Next::Skip => continue,
            Next::Ended => break,
        };
        // Yield now and then even when every step completes at once (e.g. a message nacked
        // and redelivered in a loop), so the handler cannot starve its runtime thread.
        tokio::task::consume_budget().await;
        let keep_going = tokio::select! {
            biased;
            going = process(&mut service, &ctx, delivery, &force) => going,
            // Past the close timeout: dropping the work nacks the message.
            _ = force.cancelled() => false,
        };
        if !keep_going {
            break;
        }
    }
}

/// Runs one delivery through the service and settles it; `false` means the handler must stop.
async fn process<S>(
    service: &mut S,
    ctx: &HandlerCtx,
    delivery: Delivery,
    force: &CancellationToken,
) -> bool
where
    S: Service<Message, Response = Vec<Message>>,
    S::Error: Into<BoxError>,
{
    let Some((span, settlement, fut)) = start(service, ctx, delivery, force).await else {
        return false;
    };
    settle(ctx, settlement, fut).instrument(span).await;
    true
}

/// Up to `concurrency` messages in flight; messages with the same key one after another.
async fn concurrent<S>(mut service: S, run: HandlerRun)
where
    S: Service<Message, Response = Vec<Message>> + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    let HandlerRun {
        mut stream,
        ctx,
        stop,
        force,
        ..
    } = run;
    let limit = ctx.concurrency;
    let mut tasks: JoinSet<Option<Bytes>> = JoinSet::new();
    // Keys with a message in flight, and the messages waiting for them.
    let mut busy: HashSet<Bytes> = HashSet::new();
    let mut waiting: HashMap<Bytes, VecDeque<Delivery>> = HashMap::new();
    let mut waiting_count = 0usize;
    loop {
        if stop.is_cancelled() {
            break;
        }
        tokio::select! {
            biased;
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                let Ok(Some(key)) = done else { continue };
                match waiting.get_mut(&key).and_then(VecDeque::pop_front) {
                    Some(next) => {
                        waiting_count -= 1;
                        if !spawn_one(&mut service, &ctx, next, &force, &mut tasks).await {
                            break;
                        }
                    }
                    None => {
                        busy.remove(&key);
                        waiting.remove(&key);
                    }
                }
            }
            _ = stop.cancelled() => break,
            item = stream.next(), if tasks.len() < limit && waiting_count < limit => {
                let delivery = match next_delivery(&ctx, item) {
                    Next::Delivery(d) => d,
                    Next::Skip => continue,
                    Next::Ended => break,
                };
                if let Some(key) = delivery.message().key() {
                    if busy.contains(key) {
                        waiting.entry(key.clone()).or_default().push_back(delivery);
                        waiting_count += 1;
                        continue;
                    }
                    busy.insert(key.clone());
                }
                if !spawn_one(&mut service, &ctx, delivery, &force, &mut tasks).await {
                    break;
                }
            }
        }
    }
    // Stop intake; messages received but not started go back to the broker.
    drop(stream);
    drop(waiting);
    loop {
        tokio::select! {
            biased;
            done = tasks.join_next() => if done.is_none() { break },
            _ = force.cancelled() => {
                // Aborted tasks drop their ack handles, which nacks their messages.
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
                break;
            }
        }
    }
}

/// What the subscription stream yielded.
enum Next {
    Delivery(Delivery),
    /// An error item, logged; the stream goes on.
    Skip,
    /// The stream ended (subscriber closed or subscription cancelled).
    Ended,
}

fn next_delivery(ctx: &HandlerCtx, item: Option<crate::Result<Delivery>>) -> Next {
    match item {
        Some(Ok(d)) => Next::Delivery(d),
        Some(Err(e)) => {
            tracing::warn!(handler = %ctx.info.name, topic = %ctx.info.topic, error = %e,
                "subscription reported an error");
            Next::Skip
        }
        None => {
            tracing::info!(handler = %ctx.info.name, topic = %ctx.info.topic,
                "subscription ended; stopping handler");
            Next::Ended
        }
    }
}

async fn spawn_one<S>(
    service: &mut S,
    ctx: &Arc<HandlerCtx>,
    delivery: Delivery,
    force: &CancellationToken,
    tasks: &mut JoinSet<Option<Bytes>>,
) -> bool
where
    S: Service<Message, Response = Vec<Message>> + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    let key = delivery.message().key().cloned();
    let Some((span, settlement, fut)) = start(service, ctx, delivery, force).await else {
        return false;
    };
    let ctx = ctx.clone();
    tasks.spawn(
        async move {
            settle(&ctx, settlement, fut).await;
            key
        }
        .instrument(span),
    );
    true
}

/// Waits for the service to be ready and calls it. `None` means the handler must stop
/// (the service failed or the close timeout passed); the delivery has been nacked.
async fn start<S>(
    service: &mut S,
    ctx: &HandlerCtx,
    delivery: Delivery,
    force: &CancellationToken,
) -> Option<(tracing::Span, Settlement, CallFuture<S::Future>)>
where
    S: Service<Message, Response = Vec<Message>>,
    S::Error: Into<BoxError>,
{
    let (mut msg, handle) = delivery.into_parts();
    let span = tracing::info_span!(
        "message",
        handler = %ctx.info.name,
        topic = %ctx.info.topic,
        uuid = %msg.uuid(),
        attempt = handle.attempt(),
    );
    let attempt = handle.attempt();
    let settlement = Settlement::new(handle);
    msg.set_context(Some(
        MessageContext::new(ctx.info.clone(), attempt).with_settlement(settlement.clone()),
    ));
    let ready = tokio::select! {
        biased;
        r = poll_fn(|cx| service.poll_ready(cx)) => r,
        _ = force.cancelled() => return None,
    };
    if let Err(e) = ready {
        let e: BoxError = e.into();
        span.in_scope(|| tracing::error!(error = %e, "handler service failed; stopping handler"));
        return None;
    }
    let called = std::panic::catch_unwind(AssertUnwindSafe(|| span.in_scope(|| service.call(msg))));
    let fut = match called {
        Ok(fut) => CallFuture::Called(fut),
        Err(panic) => CallFuture::Panicked(panic_message(&*panic)),
    };
    Some((span, settlement, fut))
}

/// A handler call, or the panic its synchronous part raised.
enum CallFuture<F> {
    Called(F),
    Panicked(String),
}

/// Applies the outcome rules: output published (confirmed) then input acked; handler error,
/// publish error or panic nack the input (after the delay a [`redeliver_after`] error asks
/// for). An input settled early through its context is no longer settled here.
///
/// [`redeliver_after`]: super::redeliver_after
async fn settle<F, E>(ctx: &HandlerCtx, settlement: Settlement, call: CallFuture<F>)
where
    F: Future<Output = Result<Vec<Message>, E>>,
    E: Into<BoxError>,
{
    // If this future is dropped (close timeout), the handle is dropped too, which nacks,
    // even while clones of the input (and so of the settlement) live on elsewhere.
    let settlement = DropNacks(settlement);
    let outcome: Result<Result<Vec<Message>, BoxError>, String> = match call {
        CallFuture::Called(fut) => match AssertUnwindSafe(fut).catch_unwind().await {
            Ok(result) => Ok(result.map_err(Into::into)),
            Err(panic) => Err(panic_message(&*panic)),
        },
        CallFuture::Panicked(msg) => Err(msg),
    };
    match outcome {
        Ok(Ok(out)) => {
            if !out.is_empty() {
                match &ctx.output {
                    Some(publisher) => {
                        let topic = ctx.info.publish_topic.as_deref().unwrap_or_default();
                        // Through the trait object itself: calling on the Arc would box the future twice.
                        if let Err(e) = (**publisher).publish(topic, out).await {
                            tracing::error!(error = %e, "publishing the handler's output failed; nacking");
                            return nack(&settlement.0, None).await;
                        }
                    }
                    None => {
                        tracing::error!(
                            count = out.len(),
                            "consumer-only handler returned messages it cannot publish; nacking \
                             (add an output with .publish(publisher, topic) or return nothing)"
                        );
                        return nack(&settlement.0, None).await;
                    }
                }
            }
            match settlement.0.take() {
                Some(handle) => {
                    if let Err(e) = handle.ack().await {
                        tracing::warn!(error = %e, "ack failed; the broker will redeliver");
                    }
                }
                None => tracing::debug!("input was settled early; nothing left to ack"),
            }
        }
        Ok(Err(e)) => {
            let delay = redelivery_delay(&*e);
            match delay {
                Some(delay) => {
                    tracing::warn!(error = %ErrorChain(&*e), ?delay, "handler failed; nacking with delay")
                }
                None => tracing::warn!(error = %ErrorChain(&*e), "handler failed; nacking"),
            }
            nack(&settlement.0, delay).await;
        }
        Err(panic) => {
            tracing::error!(panic = %panic, "handler panicked; nacking");
            nack(&settlement.0, None).await;
        }
    }
}

/// Takes (and so drops, which nacks) a handle nobody settled when the settling future is
/// dropped midway.
struct DropNacks(Settlement);

impl Drop for DropNacks {
    fn drop(&mut self) {
        drop(self.0.take());
    }
}

async fn nack(settlement: &Settlement, delay: Option<std::time::Duration>) {
    let Some(handle) = settlement.take() else {
        tracing::warn!(
            "the input was settled early (e.g. instant ack), so this failure does not lead to \
             a redelivery"
        );
        return;
    };
    let result = match delay {
        Some(delay) => handle.nack_with_delay(delay).await,
        None => handle.nack().await,
    };
    if let Err(e) = result {
        tracing::warn!(error = %e, "nack failed; the broker will redeliver after its timeout");
    }
}

/// The text of a panic payload.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// Displays an error with its sources: `outer: inner: root`.
pub(crate) struct ErrorChain<'a>(pub(crate) &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}
