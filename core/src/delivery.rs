//! Deliveries: a received message plus the handle that acknowledges it to the broker.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;

use crate::{Message, Result};

/// A received message and its acknowledgement handle.
///
/// Settle it with [`ack`](Delivery::ack), [`nack`](Delivery::nack) or
/// [`nack_with_delay`](Delivery::nack_with_delay); each consumes the delivery, so a message
/// cannot be settled twice. **Dropping an unsettled delivery nacks it**: the broker redelivers
/// it, nothing is silently lost.
pub struct Delivery {
    message: Message,
    handle: AckHandle,
}

impl Delivery {
    /// A delivery of `message` settled through `acker` (adapters call this).
    pub fn new(message: Message, acker: impl Acknowledger) -> Self {
        Delivery {
            message,
            handle: AckHandle::new(Box::new(acker)),
        }
    }

    /// Records the broker's delivery attempt (1 = first delivery), a count the broker keeps
    /// across consumer restarts; builder style.
    pub fn with_attempt(mut self, attempt: u32) -> Self {
        self.handle.attempt = Some(attempt);
        self.handle.origin = AttemptOrigin::Broker;
        self
    }

    /// Records a delivery attempt the subscriber counted itself, in this process (1 = first
    /// delivery here; it starts again after a restart or rebalance); builder style. For
    /// brokers without a delivery count of their own.
    pub fn with_process_attempt(mut self, attempt: u32) -> Self {
        self.handle.attempt = Some(attempt);
        self.handle.origin = AttemptOrigin::Process;
        self
    }

    /// The received message.
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// The delivery attempt, 1 for the first delivery, where the broker or the subscriber
    /// counts it (see [`attempt_origin`](Self::attempt_origin)).
    pub fn attempt(&self) -> Option<u32> {
        self.handle.attempt
    }

    /// Who counted [`attempt`](Self::attempt).
    pub fn attempt_origin(&self) -> AttemptOrigin {
        self.handle.origin
    }

    /// Acknowledges the message: the broker will not deliver it again.
    pub async fn ack(self) -> Result<()> {
        self.handle.ack().await
    }

    /// Rejects the message: the broker redelivers it.
    pub async fn nack(self) -> Result<()> {
        self.handle.nack().await
    }

    /// Rejects the message; the broker redelivers it after (at least) `delay`.
    pub async fn nack_with_delay(self, delay: Duration) -> Result<()> {
        self.handle.nack_with_delay(delay).await
    }

    /// Splits into the message and its acknowledgement handle, so the message can be handed
    /// to a handler by value while the handle decides its fate.
    pub fn into_parts(self) -> (Message, AckHandle) {
        (self.message, self.handle)
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.message)
            .field("attempt", &self.handle.attempt)
            .finish()
    }
}

/// Settles one delivery. Dropping it unsettled nacks the delivery.
pub struct AckHandle {
    acker: Option<Box<dyn Acknowledger>>,
    attempt: Option<u32>,
    origin: AttemptOrigin,
}

/// Who counts a delivery's attempts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttemptOrigin {
    /// The broker: the count survives consumer restarts (in-memory queues, NATS JetStream,
    /// RabbitMQ quorum queues, Pub/Sub with a dead-letter policy). Also the value when no
    /// attempt is known.
    #[default]
    Broker,
    /// The subscriber, in this process: it starts at 1 again after a restart or rebalance
    /// (Kafka, Pub/Sub without a dead-letter policy, RabbitMQ classic queues). Layers that
    /// must count across restarts (dead letter) count durably themselves then.
    Process,
}

impl AckHandle {
    fn new(acker: Box<dyn Acknowledger>) -> Self {
        AckHandle {
            acker: Some(acker),
            attempt: None,
            origin: AttemptOrigin::Broker,
        }
    }

    /// The delivery attempt, where the broker or the subscriber counts it.
    pub fn attempt(&self) -> Option<u32> {
        self.attempt
    }

    /// Who counted [`attempt`](Self::attempt).
    pub fn attempt_origin(&self) -> AttemptOrigin {
        self.origin
    }

    /// Acknowledges the delivery.
    pub fn ack(mut self) -> AckFuture {
        match self.acker.take() {
            Some(acker) => acker.ack(),
            None => AckFuture::ready(Ok(())),
        }
    }

    /// Rejects the delivery for immediate redelivery.
    pub fn nack(mut self) -> AckFuture {
        match self.acker.take() {
            Some(acker) => acker.nack(None),
            None => AckFuture::ready(Ok(())),
        }
    }

    /// Rejects the delivery for redelivery after `delay`.
    pub fn nack_with_delay(mut self, delay: Duration) -> AckFuture {
        match self.acker.take() {
            Some(acker) => acker.nack(Some(delay)),
            None => AckFuture::ready(Ok(())),
        }
    }
}

impl Drop for AckHandle {
    fn drop(&mut self) {
        if let Some(acker) = self.acker.take() {
            acker.nack_on_drop();
        }
    }
}

impl fmt::Debug for AckHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AckHandle")
            .field("settled", &self.acker.is_none())
            .field("attempt", &self.attempt)
            .finish()
    }
}

/// The broker side of a delivery's acknowledgement; adapters implement it.
///
/// Each method consumes the acknowledger, so a delivery is settled at most once.
///
/// `ack` and `nack` settle when called: the [`AckFuture`] they return only reports the
/// outcome. A caller may drop it before it completes, or without polling it (a timeout, a
/// cancelled task), and the ack or nack still happens; work that takes round trips runs as
/// a task the subscriber's `close` waits for. The conformance suite checks this
/// (`settles_without_awaiting`).
pub trait Acknowledger: Send + Sync + 'static {
    /// Acknowledges the delivery.
    fn ack(self: Box<Self>) -> AckFuture;

    /// Rejects the delivery; the broker redelivers it, after `delay` when one is given.
    fn nack(self: Box<Self>, delay: Option<Duration>) -> AckFuture;

    /// Called when a delivery is dropped unsettled. Must not block. The default runs
    /// [`nack`](Acknowledger::nack) to completion: inline when it completes at once, otherwise
    /// on the current tokio runtime.
    fn nack_on_drop(self: Box<Self>) {
        let mut fut = self.nack(None);
        if let Some(result) = fut.take_ready() {
            if let Err(err) = result {
                tracing::warn!(error = %err, "nack of a dropped delivery failed");
            }
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if let Err(err) = fut.await {
                        tracing::warn!(error = %err, "nack of a dropped delivery failed");
                    }
                });
            }
            Err(_) => tracing::error!(
                "a delivery was dropped unsettled outside a tokio runtime; the broker will \
                 redeliver it only after its own timeout"
            ),
        }
    }
}

/// The future returned by acknowledgements: ready at once for brokers that settle in memory,
/// boxed for those that talk to the network. Not allocating in the common case matters on
/// the per-message hot path.
#[must_use = "an acknowledgement does nothing until awaited"]
pub struct AckFuture(AckFutureInner);

enum AckFutureInner {
    Ready(Option<Result<()>>),
    Pending(BoxFuture<'static, Result<()>>),
}

impl AckFuture {
    /// An already completed acknowledgement.
    pub fn ready(result: Result<()>) -> Self {
        AckFuture(AckFutureInner::Ready(Some(result)))
    }

    /// An acknowledgement that completes when `fut` does.
    pub fn boxed(fut: impl Future<Output = Result<()>> + Send + 'static) -> Self {
        AckFuture(AckFutureInner::Pending(Box::pin(fut)))
    }

    /// The result, if the acknowledgement already completed.
    fn take_ready(&mut self) -> Option<Result<()>> {
        match &mut self.0 {
            AckFutureInner::Ready(result) => result.take(),
            AckFutureInner::Pending(_) => None,
        }
    }
}

impl Future for AckFuture {
    type Output = Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().0 {
            AckFutureInner::Ready(result) => match result.take() {
                Some(r) => Poll::Ready(r),
                None => Poll::Ready(Ok(())),
            },
            AckFutureInner::Pending(fut) => fut.as_mut().poll(cx),
        }
    }
}

impl fmt::Debug for AckFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.0 {
            AckFutureInner::Ready(_) => "ready",
            AckFutureInner::Pending(_) => "pending",
        };
        f.debug_tuple("AckFuture").field(&state).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Debug, PartialEq, Clone, Copy)]
    enum Settled {
        Ack,
        Nack(Option<Duration>),
    }

    struct Recorder(Arc<Mutex<Vec<Settled>>>);

    impl Acknowledger for Recorder {
        fn ack(self: Box<Self>) -> AckFuture {
            self.0.lock().unwrap().push(Settled::Ack);
            AckFuture::ready(Ok(()))
        }
        fn nack(self: Box<Self>, delay: Option<Duration>) -> AckFuture {
            self.0.lock().unwrap().push(Settled::Nack(delay));
            AckFuture::ready(Ok(()))
        }
    }

    /// An acknowledger that settles asynchronously, like a network broker.
    struct AsyncRecorder(Arc<Mutex<Vec<Settled>>>);

    impl Acknowledger for AsyncRecorder {
        fn ack(self: Box<Self>) -> AckFuture {
            AckFuture::boxed(async move {
                tokio::task::yield_now().await;
                self.0.lock().unwrap().push(Settled::Ack);
                Ok(())
            })
        }
        fn nack(self: Box<Self>, delay: Option<Duration>) -> AckFuture {
            AckFuture::boxed(async move {
                tokio::task::yield_now().await;
                self.0.lock().unwrap().push(Settled::Nack(delay));
                Ok(())
            })
        }
    }

    fn delivery() -> (Delivery, Arc<Mutex<Vec<Settled>>>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        (
            Delivery::new(Message::new("x"), Recorder(log.clone())).with_attempt(2),
            log,
        )
    }

    #[tokio::test]
    async fn ack_and_nack_reach_the_acknowledger_once() {
        let (d, log) = delivery();
        assert_eq!(d.attempt(), Some(2));
        d.ack().await.unwrap();
        let (d2, log2) = delivery();
        d2.nack_with_delay(Duration::from_secs(3)).await.unwrap();
        assert_eq!(*log.lock().unwrap(), vec![Settled::Ack]);
        assert_eq!(
            *log2.lock().unwrap(),
            vec![Settled::Nack(Some(Duration::from_secs(3)))]
        );
    }

    #[test]
    fn dropping_an_unsettled_delivery_nacks_it() {
        let (d, log) = delivery();
        drop(d);
        assert_eq!(*log.lock().unwrap(), vec![Settled::Nack(None)]);
    }

    #[test]
    fn dropping_the_handle_after_into_parts_nacks() {
        let (d, log) = delivery();
        let (msg, handle) = d.into_parts();
        assert_eq!(msg.payload().as_ref(), b"x");
        assert_eq!(handle.attempt(), Some(2));
        drop(handle);
        assert_eq!(*log.lock().unwrap(), vec![Settled::Nack(None)]);
    }

    #[tokio::test]
    async fn dropping_an_async_delivery_nacks_it_on_the_runtime() {
        let log = Arc::new(Mutex::new(Vec::new()));
        drop(Delivery::new(Message::new("x"), AsyncRecorder(log.clone())));
        for _ in 0..1000 {
            if !log.lock().unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(*log.lock().unwrap(), vec![Settled::Nack(None)]);
    }

    #[tokio::test]
    async fn a_settled_delivery_is_not_nacked_on_drop() {
        let (d, log) = delivery();
        let (_msg, handle) = d.into_parts();
        handle.ack().await.unwrap();
        assert_eq!(*log.lock().unwrap(), vec![Settled::Ack]);
    }
}
