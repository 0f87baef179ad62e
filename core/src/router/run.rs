//! The per-handler loops: take deliveries, call the service, publish its output, settle.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::{poll_fn, Future};
use std::panic::AssertUnwindSafe;
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;

use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::Service;
use tracing::Instrument;

use super::failure::{Failures, Kind};
use super::observe::{HandlerMetrics, MessageTracer, Settled, Tracked};
use super::outcome::redelivery_delay;
use super::HandlerRun;
use crate::context::Settlement;
use crate::message::Uuid;
use crate::stop::StopWatch;
use crate::{BoxError, Delivery, DeliveryStream, HandlerInfo, Message, MessageContext, Publisher};

/// What every message of one handler shares.
pub(crate) struct HandlerCtx {
    pub(crate) info: Arc<HandlerInfo>,
    pub(crate) output: Option<Arc<dyn Publisher>>,
    pub(crate) concurrency: usize,
    /// Messages in flight are polled by the handler's task instead of one task each.
    pub(crate) inline: bool,
    pub(crate) failures: Arc<Failures>,
    /// Metric handles, when a recorder was installed as the handler started.
    pub(crate) metrics: Option<Arc<HandlerMetrics>>,
    pub(crate) tracer: Option<Arc<dyn MessageTracer>>,
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
///
/// Per message the service's future is created once, in place, and polled where it lies:
/// layered handlers make large futures, and moving one through helper futures costs more
/// than the layers' own work. The stop and close-timeout signals are each one future for
/// the whole loop (a fresh waiter per message would cost as much as the rest of an
/// in-memory message's trip).
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
    let mut stopped = StopWatch::new(stop);
    let mut forced = pin!(force.cancelled());
    loop {
        let delivery = match next_unless_stopped(&ctx, &mut stream, &mut stopped).await {
            Next::Delivery(d) => d,
            Next::Skip => continue,
            Next::Ended => break,
        };
        // Yield now and then even when every step completes at once (e.g. a message nacked
        // and redelivered in a loop), so the handler cannot starve its runtime thread.
        tokio::task::consume_budget().await;
        // Past the close timeout, dropping the delivery (or later the work) nacks it.
        let ready = poll_fn(|cx| match service.poll_ready(cx) {
            Poll::Ready(r) => Poll::Ready(Some(r.map_err(Into::<BoxError>::into))),
            Poll::Pending if forced.as_mut().poll(cx).is_ready() => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        })
        .await;
        let Some(ready) = ready else { break };
        let (span, settlement, msg, uuid) = prepare(&ctx, delivery);
        // If the work is abandoned (close timeout), the handle is dropped, which nacks,
        // even while clones of the input (and so of the settlement) live on elsewhere.
        let settlement = DropNacks(settlement);
        if let Err(e) = ready {
            span.in_scope(
                || tracing::error!(error = %e, "handler service failed; stopping handler"),
            );
            break;
        }
        let tracked = Tracked::start(&ctx.metrics, &ctx.tracer, &msg);
        // The future is made straight into its pinned slot (layered futures are a few
        // hundred bytes; returning one through the panic guard would copy it twice).
        let mut fut = pin!(None::<S::Future>);
        let called = std::panic::catch_unwind(AssertUnwindSafe(|| {
            span.in_scope(|| fut.set(Some(service.call(msg))))
        }));
        let outcome = match called {
            Ok(()) => {
                let polled = poll_fn(|cx| {
                    let _entered = span.enter();
                    let Some(fut) = fut.as_mut().as_pin_mut() else {
                        return Poll::Ready(Some(Err("handler future missing".to_owned())));
                    };
                    match std::panic::catch_unwind(AssertUnwindSafe(|| fut.poll(cx))) {
                        Ok(Poll::Ready(result)) => {
                            Poll::Ready(Some(Ok(result.map_err(Into::into))))
                        }
                        Err(panic) => Poll::Ready(Some(Err(panic_message(&*panic)))),
                        Ok(Poll::Pending) if forced.as_mut().poll(cx).is_ready() => {
                            Poll::Ready(None)
                        }
                        Ok(Poll::Pending) => Poll::Pending,
                    }
                })
                .await;
                match polled {
                    Some(outcome) => outcome,
                    None => break,
                }
            }
            Err(panic) => Err(panic_message(&*panic)),
        };
        // The work is done: its future (and what it holds) goes before the settling.
        fut.set(None);
        tracked.handled();
        let mut settling =
            pin!(settle(&ctx, &settlement.0, outcome, &uuid, &tracked).instrument(span));
        let settled = poll_fn(|cx| match settling.as_mut().poll(cx) {
            Poll::Ready(_) => Poll::Ready(true),
            Poll::Pending if forced.as_mut().poll(cx).is_ready() => Poll::Ready(false),
            Poll::Pending => Poll::Pending,
        })
        .await;
        if !settled {
            break;
        }
    }
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
    let mut stopped = StopWatch::new(stop);
    let limit = ctx.concurrency;
    let mut tasks = Pool::new(ctx.inline);
    // Keys with a message in flight, and the messages waiting for them.
    let mut busy: HashSet<Bytes> = HashSet::new();
    let mut waiting: HashMap<Bytes, VecDeque<Delivery>> = HashMap::new();
    let mut waiting_count = 0usize;
    loop {
        if stopped.is_stopped() {
            break;
        }
        tokio::select! {
            biased;
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                let Some(key) = done else { continue };
                match waiting.get_mut(&key).and_then(VecDeque::pop_front) {
                    Some(next) => {
                        waiting_count -= 1;
                        // Dropping the delivery (forced stop) nacks it.
                        let Some(ready) = tasks.ready(&mut service, &force).await else { break };
                        match start_one(&mut service, &ctx, next, ready) {
                            Some(work) => tasks.push(work),
                            None => break,
                        }
                    }
                    None => {
                        busy.remove(&key);
                        waiting.remove(&key);
                    }
                }
            }
            _ = &mut stopped => break,
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
                // Dropping the delivery (forced stop) nacks it.
                let Some(ready) = tasks.ready(&mut service, &force).await else { break };
                match start_one(&mut service, &ctx, delivery, ready) {
                    Some(work) => tasks.push(work),
                    None => break,
                }
            }
        }
    }
    // Stop intake; messages received but not started go back to the broker. The service
    // goes too: a batch handler's gathering task sees it and handles its partial batch now.
    drop(stream);
    drop(waiting);
    drop(service);
    loop {
        tokio::select! {
            biased;
            done = tasks.join_next() => if done.is_none() { break },
            _ = force.cancelled() => {
                // Abandoned work drops its ack handles, which nacks its messages.
                tasks.abandon().await;
                break;
            }
        }
    }
}

/// What the subscription stream yielded.
pub(super) enum Next {
    Delivery(Delivery),
    /// An error item, logged; the stream goes on.
    Skip,
    /// The stream ended (subscriber closed or subscription cancelled).
    Ended,
}

/// The subscription's next delivery; [`Next::Ended`] also once the handler is stopped. The
/// stop is checked first, so it is seen between messages even when the stream is always
/// ready (one atomic load per message, see `StopWatch`).
pub(super) async fn next_unless_stopped(
    ctx: &HandlerCtx,
    stream: &mut DeliveryStream,
    stopped: &mut StopWatch,
) -> Next {
    let item = poll_fn(|cx| {
        if stopped.poll_stopped(cx).is_ready() {
            return Poll::Ready(None);
        }
        stream.poll_next_unpin(cx).map(Some)
    })
    .await;
    match item {
        Some(item) => next_delivery(ctx, item),
        None => Next::Ended,
    }
}

pub(super) fn next_delivery(ctx: &HandlerCtx, item: Option<crate::Result<Delivery>>) -> Next {
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

/// Calls the service (`ready`: what its readiness came to) with one delivery and returns
/// the work that awaits its outcome and settles it (resolving to the message's key); `None`
/// when the service failed and the handler must stop.
fn start_one<S>(
    service: &mut S,
    ctx: &Arc<HandlerCtx>,
    delivery: Delivery,
    ready: Result<(), BoxError>,
) -> Option<impl Future<Output = Option<Bytes>> + Send + 'static>
where
    S: Service<Message, Response = Vec<Message>> + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    let key = delivery.message().key().cloned();
    let (span, settlement, msg, uuid) = prepare(ctx, delivery);
    let settlement = DropNacks(settlement);
    if let Err(e) = ready {
        span.in_scope(|| tracing::error!(error = %e, "handler service failed; stopping handler"));
        return None;
    }
    let tracked = Tracked::start(&ctx.metrics, &ctx.tracer, &msg);
    let called = std::panic::catch_unwind(AssertUnwindSafe(|| span.in_scope(|| service.call(msg))))
        .map_err(|panic| panic_message(&*panic));
    let ctx = ctx.clone();
    Some(
        async move {
            let outcome = match called {
                Ok(fut) => match AssertUnwindSafe(fut).catch_unwind().await {
                    Ok(result) => Ok(result.map_err(Into::into)),
                    Err(panic) => Err(panic_message(&*panic)),
                },
                Err(panic) => Err(panic),
            };
            tracked.handled();
            let _nacked = settle(&ctx, &settlement.0, outcome, &uuid, &tracked).await;
            key
        }
        .instrument(span),
    )
}

/// The messages in flight of a concurrent handler: a task each (handlers run in parallel
/// on the runtime's threads), or, for batch handlers, futures the handler's own task polls
/// (their messages wait for a batch; a task each would cost more than their work).
enum Pool<F> {
    Spawned(JoinSet<Option<Bytes>>),
    Inline {
        set: FuturesUnordered<F>,
        /// Keys of work that finished while the loop waited for the service's readiness.
        finished: VecDeque<Option<Bytes>>,
    },
}

impl<F: Future<Output = Option<Bytes>> + Send + 'static> Pool<F> {
    fn new(inline: bool) -> Self {
        if inline {
            Pool::Inline {
                set: FuturesUnordered::new(),
                finished: VecDeque::new(),
            }
        } else {
            Pool::Spawned(JoinSet::new())
        }
    }

    fn push(&mut self, work: F) {
        match self {
            Pool::Spawned(set) => {
                set.spawn(work);
            }
            Pool::Inline { set, .. } => set.push(work),
        }
    }

    /// How many are in flight.
    fn len(&self) -> usize {
        match self {
            Pool::Spawned(set) => set.len(),
            Pool::Inline { set, .. } => set.len(),
        }
    }

    /// Whether nothing is in flight or finished unseen.
    fn is_empty(&self) -> bool {
        match self {
            Pool::Spawned(set) => set.is_empty(),
            Pool::Inline { set, finished } => set.is_empty() && finished.is_empty(),
        }
    }

    /// Waits until `service` is ready (`None`: forced to stop first). Inline work keeps
    /// being polled meanwhile: a layer that waits for capacity (a concurrency limit) gets
    /// it back only when work in flight finishes.
    async fn ready<S>(
        &mut self,
        service: &mut S,
        force: &CancellationToken,
    ) -> Option<Result<(), BoxError>>
    where
        S: Service<Message>,
        S::Error: Into<BoxError>,
    {
        let mut forced = pin!(force.cancelled());
        poll_fn(|cx| {
            if let Poll::Ready(r) = service.poll_ready(cx) {
                return Poll::Ready(Some(r.map_err(Into::into)));
            }
            if forced.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
            if let Pool::Inline { set, finished } = self {
                while let Poll::Ready(Some(key)) = set.poll_next_unpin(cx) {
                    finished.push_back(key);
                }
            }
            Poll::Pending
        })
        .await
    }

    /// The next finished work's key (`Some(None)`: no key, or its task failed); `None`
    /// when nothing is in flight.
    async fn join_next(&mut self) -> Option<Option<Bytes>> {
        match self {
            Pool::Spawned(set) => set.join_next().await.map(Result::ok).map(Option::flatten),
            Pool::Inline { set, finished } => match finished.pop_front() {
                Some(key) => Some(key),
                None => set.next().await,
            },
        }
    }

    /// Drops every work in flight (their ack handles nack their messages).
    async fn abandon(&mut self) {
        match self {
            Pool::Spawned(set) => {
                set.abort_all();
                while set.join_next().await.is_some() {}
            }
            Pool::Inline { set, .. } => set.clear(),
        }
    }
}

/// Splits a delivery into the message handed to the service (with its context) and the
/// settlement the router keeps, opens the message's span and keeps the uuid (for the
/// failure path).
pub(super) fn prepare(
    ctx: &HandlerCtx,
    delivery: Delivery,
) -> (tracing::Span, Settlement, Message, Uuid) {
    let (mut msg, handle) = delivery.into_parts();
    let attempt = handle.attempt();
    let span = match &ctx.tracer {
        None => tracing::info_span!(
            "message",
            handler = %ctx.info.name,
            topic = %ctx.info.topic,
            uuid = %msg.uuid(),
            attempt = attempt,
        ),
        Some(tracer) => tracer.span(&ctx.info, &msg, attempt),
    };
    let uuid = msg.uuid_copy();
    let (context, settlement) = MessageContext::received(ctx.info.clone(), handle);
    msg.set_context(Some(context));
    (span, settlement, msg, uuid)
}

/// What a handler call came to: its result, or the message of its panic.
pub(super) type Outcome = Result<Result<Vec<Message>, BoxError>, String>;

/// Applies the outcome rules: output published (confirmed) then input acked; handler error,
/// publish error or panic nack the input after a delay: the one a [`redeliver_after`] error
/// asks for, else the router's backoff for the delivery attempt (never at once, so a
/// message that always fails cannot spin). An input settled early through its context is
/// no longer settled here. Returns the delay of the nack, if the input was nacked.
///
/// [`redeliver_after`]: super::redeliver_after
pub(super) async fn settle(
    ctx: &HandlerCtx,
    settlement: &Settlement,
    outcome: Outcome,
    uuid: &Uuid,
    tracked: &Tracked,
) -> Option<std::time::Duration> {
    let (kind, asked, error) = match outcome {
        Ok(Ok(mut out)) => {
            if !out.is_empty() {
                if let (Some(tracer), Some(input)) = (&ctx.tracer, tracked.input()) {
                    tracer.outputs(input, &mut out);
                }
                match &ctx.output {
                    Some(publisher) => {
                        let topic = ctx.info.publish_topic.as_deref().unwrap_or_default();
                        // Through the trait object itself: calling on the Arc would box the future twice.
                        if let Err(e) = (**publisher).publish(topic, out).await {
                            let asked = redelivery_delay(&e);
                            return fail(
                                ctx,
                                settlement,
                                uuid,
                                tracked,
                                Kind::Publish,
                                asked,
                                e.to_string(),
                            )
                            .await;
                        }
                    }
                    None => {
                        let e = format!(
                            "consumer-only handler returned {} message(s) it cannot publish \
                             (add an output with .publish(publisher, topic) or return nothing)",
                            out.len()
                        );
                        return fail(ctx, settlement, uuid, tracked, Kind::Publish, None, e).await;
                    }
                }
            }
            match settlement.take() {
                Some(handle) => {
                    if let Err(e) = handle.ack().await {
                        tracing::warn!(error = %e, "ack failed; the broker will redeliver");
                    }
                    tracked.acked();
                }
                None => tracing::debug!("input was settled early; nothing left to ack"),
            }
            if let Some(tracer) = &ctx.tracer {
                tracer.settled(&tracing::Span::current(), Settled::Acked);
            }
            return None;
        }
        Ok(Err(e)) => (
            Kind::Handler,
            redelivery_delay(&*e),
            ErrorChain(&*e).to_string(),
        ),
        Err(panic) => (Kind::Panic, None, panic),
    };
    fail(ctx, settlement, uuid, tracked, kind, asked, error).await
}

/// Counts and logs a failure, then nacks the input with its redelivery delay (returned).
#[allow(clippy::too_many_arguments)]
async fn fail(
    ctx: &HandlerCtx,
    settlement: &Settlement,
    uuid: &Uuid,
    tracked: &Tracked,
    kind: Kind,
    asked: Option<std::time::Duration>,
    error: String,
) -> Option<std::time::Duration> {
    if let Some(tracer) = &ctx.tracer {
        let outcome = Settled::Failed {
            kind: kind.what(),
            error: &error,
        };
        tracer.settled(&tracing::Span::current(), outcome);
    }
    let Some(handle) = settlement.take() else {
        ctx.failures
            .record(&ctx.info, kind, uuid, Some(1), asked, &error);
        tracing::warn!(
            "the input was settled early (e.g. instant ack), so this failure does not lead to \
             a redelivery"
        );
        return None;
    };
    let delay = ctx
        .failures
        .record(&ctx.info, kind, uuid, handle.attempt(), asked, &error);
    ctx.failures.nacked();
    tracked.nacked();
    if let Err(e) = handle.nack_with_delay(delay).await {
        tracing::warn!(error = %e, "nack failed; the broker will redeliver after its timeout");
    }
    Some(delay)
}

/// Takes (and so drops, which nacks) a handle nobody settled when the work on a message is
/// abandoned midway.
pub(super) struct DropNacks(pub(super) Settlement);

impl Drop for DropNacks {
    fn drop(&mut self) {
        drop(self.0.take());
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
    /// Wrappers that display their source (`permanent`, `redeliver_after`) would repeat it:
    /// a source whose text the line already ends with is not written again.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut text = self.0.to_string();
        let mut source = self.0.source();
        while let Some(s) = source {
            let next = s.to_string();
            if !text.ends_with(&next) {
                text.push_str(": ");
                text.push_str(&next);
            }
            source = s.source();
        }
        f.write_str(&text)
    }
}
