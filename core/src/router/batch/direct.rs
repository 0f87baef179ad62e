//! Batches straight from the subscription, for a batch handler without per-message layers.
//!
//! The loop takes deliveries from the stream until the batch is full (by count or bytes),
//! `max_wait` has passed since its first message, the subscription ended or the handler
//! was stopped; calls the function once; then settles each message in order by the same
//! rules (and through the same code) as the single-message path. No message takes a
//! service call, a future or a reply channel of its own.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::panic::AssertUnwindSafe;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use tracing::Instrument;

use super::super::observe::Tracked;
use super::super::run::{
    next_delivery, next_unless_stopped, prepare, settle, DropNacks, HandlerCtx, Next, Outcome,
};
use super::super::HandlerRun;
use super::{BatchConfig, BatchOutput, IntoBatchResult, SharedError};
use crate::message::Uuid;
use crate::stop::StopWatch;
use crate::{Delivery, Message};

/// One message of the batch being handled: what settling it takes.
struct Entry {
    span: tracing::Span,
    settlement: DropNacks,
    uuid: Uuid,
    tracked: Tracked,
    key: Option<Bytes>,
}

/// How gathering a batch ended.
enum Gathered {
    /// Full, or `max_wait` passed: handle it and go on.
    Ready,
    /// The handler was stopped or its subscription ended: handle it, then stop.
    Last,
}

/// Runs a batch handler that has no per-message layers until it is stopped, its
/// subscription ends, or the close timeout passes (the work in hand is abandoned then: its
/// deliveries are dropped, which nacks them).
pub(crate) async fn run_direct<F, Fut>(
    f: F,
    config: BatchConfig,
    output: BatchOutput,
    run: HandlerRun,
) where
    F: Fn(Vec<Message>) -> Fut + Send + Sync + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: IntoBatchResult,
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
    let max = config.max_messages.max(1);
    let max_bytes = config.max_bytes.unwrap_or(usize::MAX);
    let mut carry: Option<Delivery> = None;
    let mut sizes = super::BatchSizes::default();
    loop {
        if stopped.is_stopped() {
            // A message carried over (max_bytes) is dropped, which nacks it.
            break;
        }
        let first = match carry.take() {
            Some(d) => d,
            None => match next_unless_stopped(&ctx, &mut stream, &mut stopped).await {
                Next::Delivery(d) => d,
                Next::Skip => continue,
                Next::Ended => break,
            },
        };
        // Yield now and then even when every step completes at once.
        tokio::task::consume_budget().await;
        let mut bytes = first.message().payload().len();
        let mut batch = Vec::with_capacity(max.min(1024));
        batch.push(first);
        let mut deadline = pin!(tokio::time::sleep(config.max_wait));
        let wait = !config.max_wait.is_zero();
        let mut gathered = Gathered::Ready;
        while batch.len() < max {
            let item = poll_fn(|cx| {
                if stopped.poll_stopped(cx).is_ready() {
                    return Poll::Ready(None);
                }
                match stream.poll_next_unpin(cx) {
                    Poll::Ready(item) => Poll::Ready(Some(Some(item))),
                    Poll::Pending if !wait || deadline.as_mut().poll(cx).is_ready() => {
                        Poll::Ready(Some(None))
                    }
                    Poll::Pending => Poll::Pending,
                }
            })
            .await;
            let delivery = match item {
                // Stopped: the partial batch is handled at once.
                None => {
                    gathered = Gathered::Last;
                    break;
                }
                // Nothing more within max_wait.
                Some(None) => break,
                Some(Some(item)) => match next_delivery(&ctx, item) {
                    Next::Delivery(d) => d,
                    Next::Skip => continue,
                    Next::Ended => {
                        gathered = Gathered::Last;
                        break;
                    }
                },
            };
            let len = delivery.message().payload().len();
            if bytes.saturating_add(len) > max_bytes {
                carry = Some(delivery);
                break;
            }
            bytes += len;
            batch.push(delivery);
        }
        sizes.record(&output, batch.len());
        if !handle(&f, batch, bytes, &ctx, &output, forced.as_mut()).await {
            break;
        }
        if matches!(gathered, Gathered::Last) {
            break;
        }
    }
}

/// Calls the function with one batch and settles each message; `false` when the close
/// timeout passed first (what was not settled yet is nacked as it is dropped).
async fn handle<F, Fut>(
    f: &F,
    batch: Vec<Delivery>,
    bytes: usize,
    ctx: &Arc<HandlerCtx>,
    output: &BatchOutput,
    mut forced: Pin<&mut impl Future<Output = ()>>,
) -> bool
where
    F: Fn(Vec<Message>) -> Fut,
    Fut: Future,
    Fut::Output: IntoBatchResult,
{
    let n = batch.len();
    let mut entries = Vec::with_capacity(n);
    let mut msgs = Vec::with_capacity(n);
    for delivery in batch {
        let key = delivery.message().key().cloned();
        let (span, settlement, msg, uuid) = prepare(ctx, delivery);
        let tracked = Tracked::start(&ctx.metrics, &ctx.tracer, &msg);
        entries.push(Entry {
            span,
            settlement: DropNacks(settlement),
            uuid,
            tracked,
            key,
        });
        msgs.push(msg);
    }
    let span = tracing::info_span!("batch", handler = %output.handler, size = n, bytes);
    let called = std::panic::catch_unwind(AssertUnwindSafe(|| span.in_scope(|| f(msgs))));
    let result = match called {
        Ok(fut) => {
            let run = AssertUnwindSafe(fut.instrument(span.clone())).catch_unwind();
            match unless_forced(run, forced.as_mut()).await {
                Some(result) => result.map(IntoBatchResult::into_batch_result),
                None => return false,
            }
        }
        Err(panic) => Err(panic),
    };
    let outcomes: Vec<Outcome> = match result {
        Err(panic) => {
            let message = super::super::run::panic_message(&*panic);
            span.in_scope(|| tracing::error!(panic = %message, "batch handler panicked"));
            (0..n).map(|_| Err(message.clone())).collect()
        }
        Ok(Err(e)) => {
            let shared = SharedError(Arc::new(e));
            (0..n)
                .map(|_| Ok(Err(Box::new(shared.clone()) as crate::BoxError)))
                .collect()
        }
        Ok(Ok(result)) => {
            let outcomes = super::settle(result, n, output).instrument(span.clone());
            match unless_forced(outcomes, forced.as_mut()).await {
                Some(outcomes) => outcomes.into_iter().map(Ok).collect(),
                None => return false,
            }
        }
    };
    // A failed message's later messages with the same key are not acked ahead of it: they
    // fail too, redelivered no sooner than it.
    let mut failed_keys: HashMap<Bytes, Duration> = HashMap::new();
    for (entry, mut outcome) in entries.into_iter().zip(outcomes) {
        entry.tracked.handled();
        if let (Some(key), Ok(Ok(_))) = (&entry.key, &outcome) {
            if let Some(&delay) = failed_keys.get(key) {
                outcome = Ok(Err(super::super::redeliver_after(
                    delay,
                    "an earlier message with the same key failed in this batch; redelivered \
                     after it, not acked ahead of it",
                )));
            }
        }
        let settling = settle(
            ctx,
            &entry.settlement.0,
            outcome,
            &entry.uuid,
            &entry.tracked,
        )
        .instrument(entry.span);
        match unless_forced(settling, forced.as_mut()).await {
            Some(Some(delay)) => {
                if let Some(key) = entry.key {
                    let at_least = failed_keys.entry(key).or_insert(delay);
                    *at_least = (*at_least).max(delay);
                }
            }
            Some(None) => {}
            None => return false,
        }
    }
    true
}

/// `fut`'s output, or `None` once the close timeout passed first.
async fn unless_forced<T>(
    fut: impl Future<Output = T>,
    mut forced: Pin<&mut impl Future<Output = ()>>,
) -> Option<T> {
    let mut fut = pin!(fut);
    poll_fn(|cx| match fut.as_mut().poll(cx) {
        Poll::Ready(out) => Poll::Ready(Some(out)),
        Poll::Pending if forced.as_mut().poll(cx).is_ready() => Poll::Ready(None),
        Poll::Pending => Poll::Pending,
    })
    .await
}
