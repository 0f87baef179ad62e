//! Order per key within a subscription ([`order_per_key`](crate::JetStreamConfig::order_per_key)).
//!
//! JetStream delivers a consumer's messages in stream order, but with several messages in
//! flight a nacked one would come back after its successors. The subscription therefore
//! hands out one message per key at a time: the next one with the same key waits (kept
//! alive with in-progress acks) until the previous one is acked. A nacked keyed message is
//! not returned to the server: the subscription hands it out again itself (after the
//! nack's delay), before its successors. Only when the subscription has ended is the
//! server asked to redeliver it. Messages without a key pass straight through.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tidemill_core::{AckFuture, Acknowledger, Delivery, Message};
use tokio::sync::mpsc;

use super::subscriber::SubCtx;

/// A keyed message waiting for its turn, or handed out.
pub(crate) struct Parked {
    pub message: Message,
    pub reply: Option<Bytes>,
    /// Its entry in the in-progress registry.
    pub slot: Option<usize>,
    /// Delivery attempt: the server's count plus local redeliveries.
    pub attempt: u32,
}

/// What a keyed delivery's acknowledger tells its subscription.
pub(crate) enum KeyEvent {
    /// The message with this key was acked: the next one may go.
    Done(Bytes),
    /// The message was nacked: hand it out again, before its successors.
    Again(Parked),
}

/// Per-key queues of one subscription.
pub(crate) struct Sequencer {
    /// A key is present while one of its messages is out (handed out, ready to be handed
    /// out, or waiting for a delayed redelivery); the queue holds its successors.
    keys: HashMap<Bytes, VecDeque<Parked>>,
    /// Messages whose turn it is.
    ready: VecDeque<Parked>,
    tx: mpsc::UnboundedSender<KeyEvent>,
    rx: mpsc::UnboundedReceiver<KeyEvent>,
}

impl Sequencer {
    pub(crate) fn new() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Sequencer {
            keys: HashMap::new(),
            ready: VecDeque::new(),
            tx,
            rx,
        }
    }

    /// Takes in a newly received keyed message; returns it when it may be handed out now.
    pub(crate) fn admit(&mut self, key: Bytes, parked: Parked) -> Option<Parked> {
        match self.keys.entry(key) {
            Entry::Occupied(mut waiting) => {
                waiting.get_mut().push_back(parked);
                None
            }
            Entry::Vacant(slot) => {
                slot.insert(VecDeque::new());
                Some(parked)
            }
        }
    }

    /// The next message whose turn has come, after applying the acknowledgers' events.
    pub(crate) fn poll_ready(&mut self, cx: &mut Context<'_>) -> Option<Parked> {
        while let Poll::Ready(Some(event)) = self.rx.poll_recv(cx) {
            match event {
                KeyEvent::Done(key) => {
                    if let Some(waiting) = self.keys.get_mut(&key) {
                        match waiting.pop_front() {
                            Some(next) => self.ready.push_back(next),
                            None => {
                                self.keys.remove(&key);
                            }
                        }
                    }
                }
                KeyEvent::Again(parked) => self.ready.push_front(parked),
            }
        }
        self.ready.pop_front()
    }

    /// A delivery of `parked` whose settlement comes back to this sequencer.
    pub(crate) fn delivery(&self, ctx: &Arc<SubCtx>, parked: Parked) -> Delivery {
        keyed_delivery(ctx.clone(), self.tx.clone(), parked)
    }

    /// Everything not handed out (for giving back to the server when the subscription
    /// ends).
    pub(crate) fn take_waiting(&mut self) -> Vec<Parked> {
        // Closed first: a nack after this fails to send and gives its message back to the
        // server itself, instead of leaving it in a channel nobody reads.
        self.rx.close();
        let mut all: Vec<Parked> = self.ready.drain(..).collect();
        for (_, waiting) in self.keys.drain() {
            all.extend(waiting);
        }
        while let Ok(event) = self.rx.try_recv() {
            if let KeyEvent::Again(parked) = event {
                all.push(parked);
            }
        }
        all
    }
}

fn keyed_delivery(
    ctx: Arc<SubCtx>,
    events: mpsc::UnboundedSender<KeyEvent>,
    parked: Parked,
) -> Delivery {
    let attempt = parked.attempt;
    let message = parked.message.clone();
    Delivery::new(
        message,
        KeyedAcker {
            ctx,
            events,
            parked,
        },
    )
    .with_attempt(attempt)
}

/// Settles a keyed delivery: acks go to the server (and free the key); nacks hand the
/// message back to the subscription.
struct KeyedAcker {
    ctx: Arc<SubCtx>,
    events: mpsc::UnboundedSender<KeyEvent>,
    parked: Parked,
}

impl Acknowledger for KeyedAcker {
    fn ack(self: Box<Self>) -> AckFuture {
        let KeyedAcker {
            ctx,
            events,
            parked,
        } = *self;
        if let Some(key) = parked.message.key() {
            let _ = events.send(KeyEvent::Done(key.clone()));
        }
        ctx.settle(parked.reply, parked.slot, super::subscriber::ACK, "ack")
    }

    fn nack(self: Box<Self>, delay: Option<Duration>) -> AckFuture {
        let KeyedAcker {
            ctx,
            events,
            mut parked,
        } = *self;
        parked.attempt = parked.attempt.saturating_add(1);
        let runtime = tokio::runtime::Handle::try_current();
        match (delay, runtime) {
            (None, _) => match events.send(KeyEvent::Again(parked)) {
                Ok(()) => AckFuture::ready(Ok(())),
                Err(mpsc::error::SendError(event)) => give_back(&ctx, event, None),
            },
            (Some(delay), Ok(runtime)) => {
                runtime.spawn(async move {
                    tokio::time::sleep(delay).await;
                    if let Err(mpsc::error::SendError(event)) = events.send(KeyEvent::Again(parked))
                    {
                        let _ = give_back(&ctx, event, None).await;
                    }
                });
                AckFuture::ready(Ok(()))
            }
            (Some(delay), Err(_)) => give_back(&ctx, KeyEvent::Again(parked), Some(delay)),
        }
    }
}

/// The subscription is gone: ask the server to redeliver the message.
fn give_back(ctx: &Arc<SubCtx>, event: KeyEvent, delay: Option<Duration>) -> AckFuture {
    match event {
        KeyEvent::Again(parked) => ctx.settle(
            parked.reply,
            parked.slot,
            super::subscriber::nak_payload(delay),
            "nack",
        ),
        KeyEvent::Done(_) => AckFuture::ready(Ok(())),
    }
}
