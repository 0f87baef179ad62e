//! A cancellation check cheap enough for every message.
//!
//! Polling tokio-util's `WaitForCancellationFuture` takes two locks each time (the token's
//! tree node to read `is_cancelled`, the `Notify`'s waiter list to refresh the waker);
//! upstream: <https://github.com/tokio-rs/tokio/issues/7775> (`is_cancelled` locks a mutex),
//! with lock-free fixes proposed in <https://github.com/tokio-rs/tokio/pull/8138>. Each
//! token is watched once per message (a delivery stream watches its subscriber's token, the
//! router's handler loop its stop token). [`StopWatch`] polls the token's future once, with
//! a waker of its own that records the wake-up; afterwards a check is one atomic load, and
//! the token's future is polled again only when it has woken. Drop it for plain
//! `is_cancelled` once tokio-util's check is lock-free.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures::task::AtomicWaker;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// Watches a cancellation token for a task that checks it often.
pub(crate) struct StopWatch {
    token: CancellationToken,
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
    signal: Arc<Signal>,
    /// Wakes `signal`: the waker the token's future is polled with.
    waker: Waker,
    /// The task waker last registered in `signal.task`.
    task: Option<Waker>,
    /// The token's future has been polled and is waiting with `waker`.
    armed: bool,
    /// The token is cancelled.
    done: bool,
}

/// What the token's wake-up leaves behind: a flag, and the task to wake.
struct Signal {
    fired: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // The flag first: the task, once woken, must see it.
        self.fired.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl StopWatch {
    /// Watches `token`.
    pub(crate) fn new(token: CancellationToken) -> Self {
        let signal = Arc::new(Signal {
            fired: AtomicBool::new(false),
            task: AtomicWaker::new(),
        });
        StopWatch {
            cancelled: Box::pin(token.clone().cancelled_owned()),
            token,
            waker: Waker::from(signal.clone()),
            signal,
            task: None,
            armed: false,
            done: false,
        }
    }

    /// `Ready` once the token is cancelled; otherwise `Pending`, and the task of `cx` is
    /// woken when it is.
    pub(crate) fn poll_stopped(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.done {
                return Poll::Ready(());
            }
            if self.armed && !self.signal.fired.load(Ordering::Acquire) {
                // Nothing happened since the token's future was polled: the usual case.
                if self.task.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    return Poll::Pending;
                }
                self.signal.task.register(cx.waker());
                self.task = Some(cx.waker().clone());
                // A wake-up between the load above and the registration found the old
                // waker (or none): look once more.
                if !self.signal.fired.load(Ordering::Acquire) {
                    return Poll::Pending;
                }
            }
            // Not polled yet, or it woke (which took the registered task waker): poll it.
            self.signal.fired.store(false, Ordering::Release);
            self.task = None;
            match self
                .cancelled
                .as_mut()
                .poll(&mut Context::from_waker(&self.waker))
            {
                Poll::Ready(()) => self.done = true,
                Poll::Pending => self.armed = true,
            }
        }
    }

    /// Whether the token is cancelled, without registering any waker. Once
    /// [`poll_stopped`](Self::poll_stopped) has armed the watch this is one atomic load
    /// until a cancellation wakes it; before, it is the token's own (locking) check.
    pub(crate) fn is_stopped(&self) -> bool {
        if self.done {
            return true;
        }
        if self.armed && !self.signal.fired.load(Ordering::Acquire) {
            return false;
        }
        self.token.is_cancelled()
    }
}

impl Future for StopWatch {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.get_mut().poll_stopped(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn ends_when_the_token_is_cancelled_before_or_while_waiting() {
        let token = CancellationToken::new();
        token.cancel();
        StopWatch::new(token).await;

        let token = CancellationToken::new();
        let mut watch = StopWatch::new(token.clone());
        assert!(!watch.is_stopped());
        let canceller = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            token.cancel();
        });
        tokio::time::timeout(Duration::from_secs(10), &mut watch)
            .await
            .expect("the watch ended after the cancellation");
        assert!(watch.is_stopped());
        canceller.await.expect("canceller ran");
    }

    #[tokio::test]
    async fn a_parent_cancellation_reaches_a_watch_checked_between_messages() {
        let parent = CancellationToken::new();
        let mut watch = StopWatch::new(parent.child_token());
        // Checked many times while "messages" are ready: stays pending, cheaply.
        for _ in 0..1_000 {
            let polled = futures::poll!(&mut watch);
            assert!(polled.is_pending());
        }
        assert!(!watch.is_stopped());
        parent.cancel();
        // The next check sees it, with no other wake-up in between.
        assert!(watch.is_stopped());
        assert!(futures::poll!(&mut watch).is_ready());
    }

    #[tokio::test]
    async fn a_watch_polled_from_another_task_wakes_that_task() {
        let token = CancellationToken::new();
        let mut watch = StopWatch::new(token.clone());
        assert!(futures::poll!(&mut watch).is_pending());
        // Moved to a task of its own: its new waker must be the one woken.
        let waiter = tokio::spawn(watch);
        tokio::task::yield_now().await;
        token.cancel();
        tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("the task was woken")
            .expect("the task ran");
    }
}
