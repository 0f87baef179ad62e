//! Acknowledgements coalesced per channel.
//!
//! An ack is booked and returns: a flush task of the channel writes the book, one round at
//! a time, each round taking every ack booked while the previous one was written (a
//! sequential handler's next acks as well as a batch handler's). Instead of one `basic.ack`
//! per delivery, the acks of a round are written as one `basic.ack` with `multiple = true`
//! for the run of delivery tags at the low end of what the channel still holds, provided
//! the application acked every tag of that run, and as single acks for the rest. Fewer
//! frames mean fewer wake-ups of lapin's I/O thread and less work for the broker.
//!
//! Soundness rests on three facts:
//! - RabbitMQ numbers a channel's deliveries 1, 2, 3, ... and lapin's consumer yields them in
//!   that order, so the subscription hands every tag below the latest one out before it
//!   (a tag it skips, from a channel that died, is recorded as held: never covered);
//! - a multiple ack up to `N` settles every tag up to `N` the broker still counts as
//!   unacknowledged on the channel, so it is only sent when every tag up to `N` this book
//!   still holds was acked by the application, and the frames of every tag already
//!   removed from it (acked by an earlier flush, or nacked) were written before it: flushes
//!   are serialised, a nack leaves the book only once its frame was written, and frames of
//!   one channel reach the broker in the order they are written;
//! - the book belongs to one channel (one `Lease`): a channel opened after a connection
//!   loss gets a new book, since delivery tags are per channel.

use std::collections::VecDeque;
use std::sync::Arc;

use lapin::options::BasicAckOptions;
use lapin::Channel;
use tokio::sync::oneshot;

use crate::BROKER;

/// What a flush reports to an ack that waits for it: `Ok` once the frame was written.
pub(crate) type Outcome = std::result::Result<(), lapin::Error>;

/// One delivery tag of the channel.
#[derive(Debug)]
enum Slot<W> {
    /// Handed out and not settled (or being nacked): breaks a run.
    Held,
    /// Acked by the application; waits for a flush. `true` once a flush passed it over
    /// (see [`AckBook::take`]).
    Acked(W, bool),
    /// Settled out of order (acked singly, or nacked): to be dropped from the front.
    Done,
}

/// The delivery tags a channel handed out and has not settled on the wire yet, in order.
#[derive(Debug)]
pub(crate) struct AckBook<W> {
    /// The tag of `slots[0]`.
    base: u64,
    slots: VecDeque<Slot<W>>,
    /// How many slots are `Acked`.
    acked: usize,
    /// A flush is under way (flushes are serialised).
    flushing: bool,
}

/// What one flush writes.
#[derive(Debug)]
pub(crate) struct Plan<W> {
    /// A run of acked tags from the low end: the last tag and every tag's waiter (one tag:
    /// a single ack, more: `multiple`).
    pub(crate) run: Option<(u64, Vec<W>)>,
    /// Acked tags above a held one: acked one by one.
    pub(crate) singles: Vec<(u64, W)>,
}

impl<W> Default for AckBook<W> {
    fn default() -> Self {
        AckBook {
            base: 0,
            slots: VecDeque::new(),
            acked: 0,
            flushing: false,
        }
    }
}

impl<W> AckBook<W> {
    /// Records that `tag` was handed to the application.
    pub(crate) fn deliver(&mut self, tag: u64) {
        if self.slots.is_empty() {
            self.base = tag;
        }
        let next = self.base + self.slots.len() as u64;
        if tag < next {
            // Never happens (tags grow); such a tag is acked singly (see `ack`).
            tracing::debug!(broker = BROKER, tag, next, "delivery tag out of order");
            return;
        }
        // Tags skipped (deliveries of a dead channel) are never covered by a run.
        for _ in next..tag {
            self.slots.push_back(Slot::Held);
        }
        self.slots.push_back(Slot::Held);
    }

    fn index(&self, tag: u64) -> Option<usize> {
        let i = usize::try_from(tag.checked_sub(self.base)?).ok()?;
        (i < self.slots.len()).then_some(i)
    }

    /// The application acked `tag`: `Ok(true)` when the caller must start a flush (none is
    /// under way), `Ok(false)` when the running one takes it, `Err(waiter)` when `tag` is
    /// not a held tag of this book (the caller acks it on its own).
    pub(crate) fn ack(&mut self, tag: u64, waiter: W) -> Result<bool, W> {
        let Some(slot) = self.index(tag).map(|i| &mut self.slots[i]) else {
            return Err(waiter);
        };
        if !matches!(slot, Slot::Held) {
            return Err(waiter);
        }
        *slot = Slot::Acked(waiter, false);
        self.acked += 1;
        let start = !self.flushing;
        self.flushing = true;
        Ok(start)
    }

    /// `tag` was settled without this book (its nack frame was written, or the ack failed
    /// before it was recorded): it no longer breaks a run.
    pub(crate) fn settled(&mut self, tag: u64) {
        if let Some(i) = self.index(tag) {
            if matches!(self.slots[i], Slot::Held) {
                self.slots[i] = Slot::Done;
            }
        }
        self.trim();
    }

    fn trim(&mut self) {
        while matches!(self.slots.front(), Some(Slot::Done)) {
            self.slots.pop_front();
            self.base += 1;
        }
    }

    /// Takes every acked tag for the next flush, or ends the flush (`None`) when there is
    /// none.
    pub(crate) fn take(&mut self) -> Option<Plan<W>> {
        self.trim();
        if self.acked == 0 {
            self.flushing = false;
            return None;
        }
        let mut run = Vec::new();
        while matches!(self.slots.front(), Some(Slot::Acked(..))) {
            if let Some(Slot::Acked(w, _)) = self.slots.pop_front() {
                run.push(w);
            }
            self.base += 1;
        }
        self.acked -= run.len();
        let run = (!run.is_empty()).then(|| (self.base - 1, run));
        // Acks above a held tag: when this round writes a run, each waits for one more
        // round, in which the held tags below it may have been acked too (acks of a batch
        // arrive over a few rounds, not in tag order), so that it joins a run; otherwise
        // (or after waiting once) it is acked singly.
        let mut singles = Vec::new();
        if self.acked > 0 {
            let defer = run.is_some();
            for (i, slot) in self.slots.iter_mut().enumerate() {
                match slot {
                    Slot::Acked(_, waited) if defer && !*waited => *waited = true,
                    Slot::Acked(..) => {
                        if let Slot::Acked(w, _) = std::mem::replace(slot, Slot::Done) {
                            singles.push((self.base + i as u64, w));
                        }
                    }
                    _ => {}
                }
            }
            self.acked -= singles.len();
        }
        self.trim();
        Some(Plan { run, singles })
    }

    /// Ends a flush that did not finish (its task was dropped).
    fn abandon(&mut self) {
        self.flushing = false;
    }
}

/// The acks of one channel.
pub(crate) struct Settler {
    channel: Channel,
    /// The queue the channel consumes, for the log line of a failed write.
    queue: Arc<str>,
    book: parking_lot::Mutex<AckBook<Option<oneshot::Sender<Outcome>>>>,
}

/// Where the ack of one tag goes.
pub(crate) enum Ticket {
    /// Taken by the book. With `Some(flush)`, nobody writes the book right now: the caller
    /// must run `flush` (spawn it, or await it when there is no runtime to spawn it on).
    Booked(Option<Flush>),
    /// Taken by the book, with a receiver that resolves once the frame carrying it was
    /// written: the caller asked to wait ([`Settler::ack_and_wait`]).
    Waiting {
        done: oneshot::Receiver<Outcome>,
        flush: Option<Flush>,
    },
    /// Not a tag of the book: ack it on its own.
    Alone,
}

/// A flush the caller of [`Settler::ack`] must run.
pub(crate) struct Flush(Arc<Settler>);

impl Flush {
    /// Writes what the book holds, round after round, until it holds no ack.
    pub(crate) async fn run(self) {
        self.0.flush().await
    }
}

impl Settler {
    pub(crate) fn new(channel: Channel, queue: Arc<str>) -> Self {
        Settler {
            channel,
            queue,
            book: parking_lot::Mutex::new(AckBook::default()),
        }
    }

    /// Records that `tag` was handed to the application.
    pub(crate) fn deliver(&self, tag: u64) {
        self.book.lock().deliver(tag);
    }

    /// `tag`'s nack frame was written (or failed): it no longer breaks a run.
    pub(crate) fn settled(&self, tag: u64) {
        self.book.lock().settled(tag);
    }

    /// Books the application's ack of `tag`; whoever runs the flush writes it. A write
    /// that fails is logged (the broker redelivers what it did not see acked).
    pub(crate) fn ack(self: &Arc<Self>, tag: u64) -> Ticket {
        match self.book.lock().ack(tag, None) {
            Ok(start) => Ticket::Booked(start.then(|| Flush(self.clone()))),
            Err(_) => Ticket::Alone,
        }
    }

    /// Books the application's ack of `tag` with a receiver for the outcome of its write.
    pub(crate) fn ack_and_wait(self: &Arc<Self>, tag: u64) -> Ticket {
        let (tx, done) = oneshot::channel();
        match self.book.lock().ack(tag, Some(tx)) {
            Ok(start) => Ticket::Waiting {
                done,
                flush: start.then(|| Flush(self.clone())),
            },
            Err(_) => Ticket::Alone,
        }
    }

    /// Writes what the book holds, round after round, until it holds no ack: each round's
    /// frames are written before the next round is taken.
    async fn flush(self: Arc<Self>) {
        struct Abandon<'a>(Option<&'a Settler>);
        impl Drop for Abandon<'_> {
            fn drop(&mut self) {
                if let Some(settler) = self.0 {
                    settler.book.lock().abandon();
                }
            }
        }
        let mut guard = Abandon(Some(&self));
        loop {
            let Some(plan) = self.book.lock().take() else {
                // `take` ended the flush.
                guard.0 = None;
                return;
            };
            let run = async {
                if let Some((last, waiters)) = plan.run {
                    let options = BasicAckOptions {
                        multiple: waiters.len() > 1,
                    };
                    let outcome = self.channel.basic_ack(last, options).await;
                    self.report(waiters, outcome);
                }
            };
            let this = &*self;
            let singles = futures::future::join_all(plan.singles.into_iter().map(
                |(tag, waiter)| async move {
                    let outcome = this
                        .channel
                        .basic_ack(tag, BasicAckOptions { multiple: false })
                        .await;
                    this.report([waiter], outcome);
                },
            ));
            futures::future::join(run, singles).await;
        }
    }

    /// Tells the waiters of one frame how its write went; a failure nobody waits for is
    /// logged.
    fn report(
        &self,
        waiters: impl IntoIterator<Item = Option<oneshot::Sender<Outcome>>>,
        outcome: Outcome,
    ) {
        let mut unseen = 0usize;
        for waiter in waiters {
            match waiter {
                Some(tx) => {
                    let _ = tx.send(outcome.clone());
                }
                None => unseen += 1,
            }
        }
        if let Err(e) = outcome {
            if unseen > 0 {
                tracing::warn!(broker = BROKER, queue = %self.queue, messages = unseen,
                    error = %e, "acknowledgements could not be written; the broker will \
                    redeliver those messages");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn book(tags: std::ops::RangeInclusive<u64>) -> AckBook<u64> {
        let mut book = AckBook::default();
        for tag in tags {
            book.deliver(tag);
        }
        book
    }

    fn waiters(plan: &Plan<u64>) -> (Option<(u64, Vec<u64>)>, Vec<u64>) {
        (
            plan.run.clone(),
            plan.singles.iter().map(|(t, _)| *t).collect(),
        )
    }

    #[test]
    fn a_contiguous_run_from_the_low_end_is_one_multiple_ack() {
        let mut b = book(1..=10);
        assert_eq!(b.ack(3, 3), Ok(true));
        assert_eq!(b.ack(1, 1), Ok(false));
        assert_eq!(b.ack(2, 2), Ok(false));
        let plan = b.take().unwrap();
        assert_eq!(waiters(&plan), (Some((3, vec![1, 2, 3])), vec![]));
        // 4 is held: nothing more, the flush ends.
        assert!(b.take().is_none());
        assert_eq!(b.ack(4, 4), Ok(true), "a new flush starts");
    }

    #[test]
    fn a_held_tag_breaks_the_run_and_later_acks_go_singly() {
        let mut b = book(1..=6);
        for t in [1, 2, 4, 5] {
            b.ack(t, t).unwrap();
        }
        let plan = b.take().unwrap();
        assert_eq!(
            waiters(&plan),
            (Some((2, vec![1, 2])), vec![]),
            "4, 5 wait a round"
        );
        let plan = b.take().unwrap();
        assert_eq!(waiters(&plan), (None, vec![4, 5]), "3 still held");
        assert!(b.take().is_none());
        // 3 is nacked (its frame written): 6 alone is at the low end now.
        b.settled(3);
        b.ack(6, 6).unwrap();
        let plan = b.take().unwrap();
        assert_eq!(waiters(&plan), (Some((6, vec![6])), vec![]));
        assert!(b.slots.is_empty());
    }

    #[test]
    fn a_nacked_tag_never_joins_a_run_until_its_frame_was_written() {
        let mut b = book(1..=4);
        // 2 is being nacked (still held); 1, 3 and 4 acked.
        for t in [1, 3, 4] {
            b.ack(t, t).unwrap();
        }
        let plan = b.take().unwrap();
        assert_eq!(waiters(&plan), (Some((1, vec![1])), vec![]));
        let plan = b.take().unwrap();
        assert_eq!(waiters(&plan), (None, vec![3, 4]));
        b.settled(2);
        assert!(b.take().is_none());
        assert!(b.slots.is_empty());
    }

    #[test]
    fn skipped_tags_are_never_covered() {
        let mut b = AckBook::default();
        b.deliver(1);
        b.deliver(4); // 2 and 3 never handed out
        b.ack(1, 1).unwrap();
        b.ack(4, 4).unwrap();
        let plan = b.take().unwrap();
        assert_eq!(waiters(&plan), (Some((1, vec![1])), vec![]));
        let plan = b.take().unwrap();
        assert_eq!(waiters(&plan), (None, vec![4]));
    }

    #[test]
    fn an_ack_above_a_gap_joins_the_run_when_the_gap_is_acked_within_a_round() {
        let mut b = book(1..=5);
        for t in [1, 4, 5] {
            b.ack(t, t).unwrap();
        }
        let plan = b.take().unwrap();
        assert_eq!(waiters(&plan), (Some((1, vec![1])), vec![]));
        b.ack(2, 2).unwrap();
        b.ack(3, 3).unwrap();
        let plan = b.take().unwrap();
        assert_eq!(waiters(&plan), (Some((5, vec![2, 3, 4, 5])), vec![]));
        assert!(b.take().is_none());
    }

    #[test]
    fn an_ack_waits_at_most_one_round() {
        let mut b = book(1..=6);
        for t in [1, 3, 6] {
            b.ack(t, t).unwrap();
        }
        assert_eq!(waiters(&b.take().unwrap()), (Some((1, vec![1])), vec![]));
        // 2 acked: a run again; 6 waited once already and goes now, 4-5 still held.
        b.ack(2, 2).unwrap();
        assert_eq!(
            waiters(&b.take().unwrap()),
            (Some((3, vec![2, 3])), vec![6])
        );
        assert!(b.take().is_none());
    }

    #[test]
    fn unknown_or_twice_acked_tags_are_refused() {
        let mut b = book(5..=6);
        assert_eq!(b.ack(4, 4), Err(4));
        assert_eq!(b.ack(7, 7), Err(7));
        b.ack(5, 5).unwrap();
        assert_eq!(b.ack(5, 55), Err(55));
    }

    #[test]
    fn acks_after_a_flush_started_join_it() {
        let mut b = book(1..=500);
        assert_eq!(b.ack(1, 1), Ok(true));
        let plan = b.take().unwrap();
        assert_eq!(waiters(&plan), (Some((1, vec![1])), vec![]));
        for t in 2..=500 {
            assert_eq!(b.ack(t, t), Ok(false), "the flush is still under way");
        }
        let plan = b.take().unwrap();
        let (run, singles) = waiters(&plan);
        assert_eq!(run.map(|(last, w)| (last, w.len())), Some((500, 499)));
        assert!(singles.is_empty());
        assert!(b.take().is_none());
    }
}
