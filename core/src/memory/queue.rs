//! One subscription's queue: bounded, ordered per key, with redelivery.
//!
//! Invariant: for each key, at most one message is *active* (ready to hand out or in flight);
//! later messages with that key are parked until it is acked. That is what keeps order per key
//! across nacks and redeliveries while messages with different keys (or none) flow freely.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::{AckFuture, Acknowledger, Delivery, Message};

/// A message held by a queue, with the number of times it has been handed out.
pub(crate) struct Entry {
    pub(crate) message: Message,
    pub(crate) attempt: u32,
}

impl Entry {
    pub(crate) fn new(message: Message) -> Self {
        Entry {
            message,
            attempt: 0,
        }
    }
}

pub(crate) struct Queue {
    state: Mutex<State>,
    readable: Notify,
    writable: Notify,
    capacity: usize,
    /// Blocked publishers are woken once the queue drains to this length, so a full queue
    /// does not ping-pong one message at a time between publisher and consumer.
    low_watermark: usize,
}

#[derive(Default)]
struct State {
    /// Messages that may be handed out now, in order.
    ready: VecDeque<Entry>,
    /// Keys with an active message, mapped to the later messages waiting for it.
    lanes: HashMap<Bytes, VecDeque<Entry>>,
    /// Every message the queue is responsible for: ready, parked, in flight, delayed.
    len: usize,
    readers_waiting: bool,
    writers_waiting: bool,
    closed: bool,
}

impl State {
    /// Adds a new or redelivered entry behind the others; returns whether it is ready.
    fn enqueue(&mut self, entry: Entry) -> bool {
        if let Some(key) = entry.message.key() {
            if let Some(parked) = self.lanes.get_mut(key) {
                parked.push_back(entry);
                return false;
            }
            self.lanes.insert(key.clone(), VecDeque::new());
        }
        self.ready.push_back(entry);
        true
    }

    /// The active message of `key` is done: promote the next parked one, if any.
    fn release_key(&mut self, key: &Bytes) -> bool {
        match self.lanes.get_mut(key) {
            Some(parked) => match parked.pop_front() {
                Some(next) => {
                    self.ready.push_back(next);
                    true
                }
                None => {
                    self.lanes.remove(key);
                    false
                }
            },
            None => false,
        }
    }
}

impl Queue {
    pub(crate) fn new(capacity: usize) -> Arc<Self> {
        let capacity = capacity.max(1);
        Arc::new(Queue {
            state: Mutex::new(State::default()),
            readable: Notify::new(),
            writable: Notify::new(),
            capacity,
            low_watermark: capacity - (capacity / 4).max(1),
        })
    }

    /// Adds `messages`, waiting while the queue is full. Returns early (dropping the rest)
    /// if the queue is closed: its subscription is gone, so nobody can lose them.
    pub(crate) async fn push_all(&self, messages: impl IntoIterator<Item = Message>) {
        let mut messages = messages.into_iter().peekable();
        while messages.peek().is_some() {
            let notified = {
                let mut st = self.state.lock();
                if st.closed {
                    return;
                }
                let mut any_ready = false;
                while st.len < self.capacity {
                    let Some(message) = messages.next() else {
                        break;
                    };
                    st.len += 1;
                    any_ready |= st.enqueue(Entry::new(message));
                }
                if any_ready {
                    self.wake_readers(&mut st);
                }
                if messages.peek().is_none() {
                    return;
                }
                st.writers_waiting = true;
                self.writable.notified()
            };
            notified.await;
        }
    }

    /// Appends already-counted entries (retention replay) regardless of capacity.
    pub(crate) fn replay(&self, messages: impl IntoIterator<Item = Message>) {
        let mut st = self.state.lock();
        for message in messages {
            st.len += 1;
            st.enqueue(Entry::new(message));
        }
        self.wake_readers(&mut st);
    }

    /// Moves up to `max` ready entries into `buf`, waiting while none is ready.
    /// Returns `false` once the queue is closed.
    pub(crate) async fn take(&self, buf: &mut VecDeque<Entry>, max: usize) -> bool {
        loop {
            let notified = {
                let mut st = self.state.lock();
                if st.closed {
                    return false;
                }
                if !st.ready.is_empty() {
                    let n = st.ready.len().min(max);
                    buf.extend(st.ready.drain(..n));
                    return true;
                }
                st.readers_waiting = true;
                self.readable.notified()
            };
            notified.await;
        }
    }

    /// Puts entries that were taken but never handed out back at the front, in order.
    pub(crate) fn untake(&self, buf: &mut VecDeque<Entry>) {
        if buf.is_empty() {
            return;
        }
        let mut st = self.state.lock();
        while let Some(entry) = buf.pop_back() {
            st.ready.push_front(entry);
        }
        self.wake_readers(&mut st);
    }

    fn ack(&self, entry: &Entry) {
        let mut st = self.state.lock();
        st.len = st.len.saturating_sub(1);
        if let Some(key) = entry.message.key() {
            if st.release_key(key) {
                self.wake_readers(&mut st);
            }
        }
        if st.writers_waiting && st.len <= self.low_watermark {
            st.writers_waiting = false;
            self.writable.notify_waiters();
        }
    }

    /// Redelivers `entry` before anything else; its key stays active, so later messages with
    /// the same key keep waiting behind it.
    fn requeue(&self, entry: Entry) {
        let mut st = self.state.lock();
        if st.closed {
            return;
        }
        st.ready.push_front(entry);
        self.wake_readers(&mut st);
    }

    fn wake_readers(&self, st: &mut State) {
        if st.readers_waiting {
            st.readers_waiting = false;
            self.readable.notify_waiters();
        }
    }

    /// Closes the queue: consumers end, blocked publishers return, settlements become no-ops.
    pub(crate) fn close(&self) {
        let mut st = self.state.lock();
        st.closed = true;
        st.ready.clear();
        st.lanes.clear();
        st.readers_waiting = false;
        st.writers_waiting = false;
        self.readable.notify_waiters();
        self.writable.notify_waiters();
    }

    #[cfg(test)]
    pub(crate) fn debug_state(&self) -> String {
        let st = self.state.lock();
        format!(
            "len={} ready={} lanes={} readers_waiting={} writers_waiting={} closed={}",
            st.len,
            st.ready.len(),
            st.lanes.len(),
            st.readers_waiting,
            st.writers_waiting,
            st.closed
        )
    }

    /// Number of messages the queue holds (waiting, in flight or delayed).
    pub(crate) fn len(&self) -> usize {
        self.state.lock().len
    }
}

/// Hands an entry out as a delivery whose settlement goes back to `queue`.
pub(crate) fn deliver(queue: &Arc<Queue>, mut entry: Entry) -> Delivery {
    entry.attempt += 1;
    let attempt = entry.attempt;
    let message = entry.message.clone();
    Delivery::new(
        message,
        MemoryAcker {
            queue: queue.clone(),
            entry,
        },
    )
    .with_attempt(attempt)
}

struct MemoryAcker {
    queue: Arc<Queue>,
    entry: Entry,
}

impl Acknowledger for MemoryAcker {
    fn ack(self: Box<Self>) -> AckFuture {
        self.queue.ack(&self.entry);
        AckFuture::ready(Ok(()))
    }

    fn nack(self: Box<Self>, delay: Option<Duration>) -> AckFuture {
        let MemoryAcker { queue, entry } = *self;
        match delay.filter(|d| !d.is_zero()) {
            None => queue.requeue(entry),
            Some(delay) => match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    // The entry stays counted (and its key active) while it waits.
                    runtime.spawn(async move {
                        tokio::time::sleep(delay).await;
                        queue.requeue(entry);
                    });
                }
                Err(_) => {
                    tracing::warn!(
                        "memory: nack_with_delay outside a tokio runtime; redelivering at once"
                    );
                    queue.requeue(entry);
                }
            },
        }
        AckFuture::ready(Ok(()))
    }
}
