//! The in-memory side of one subscription: per assigned partition, the messages received
//! from Kafka and not yet acked, which of them may be handed out, and up to which offset
//! the partition may be committed.
//!
//! - **Order per key.** Messages of a partition are put in *lanes*: one per key
//!   ([`Ordering::Key`]) or one for the whole partition ([`Ordering::Partition`]); messages
//!   without a key in key mode have no lane. Only the head of a lane is handed out; the
//!   next one becomes ready when the head is acked. A nacked head is handed out again
//!   (after its delay), before anything behind it: redelivery is local, without seeking.
//! - **Contiguous commits.** The commit point of a partition is the offset after the
//!   longest prefix of acked messages, so a committed offset never skips an unacked one.
//! - **Generations.** Each assignment of a partition gets a new generation; an ack or nack
//!   for an older one (the partition was revoked meanwhile) changes nothing, so the old
//!   owner never commits what it no longer owns.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::task::Waker;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tidemill_core::{Error, Message};

use crate::convert::{self, Identity};
use crate::record::KafkaRecord;
use crate::Ordering;

/// Identifies one received message for its acknowledgement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Ref {
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) generation: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    /// Behind an unsettled message of its lane.
    Waiting,
    /// In the ready queue.
    Ready,
    /// Nacked with a delay; in the delay heap.
    Delayed,
    /// Handed out, not settled.
    InFlight,
    /// Acked, behind an unacked message of the partition (not committable yet).
    Acked,
}

/// A received message in the state: the record as the poll thread copied it out of
/// librdkafka, until it is first handed out and made into its message (on the thread that
/// takes it, so the message's allocations are made where they are usually freed); the
/// message is kept for redeliveries.
pub(crate) enum Item {
    /// Boxed: entries stay small (a full partition holds thousands of them).
    Record(Box<KafkaRecord>),
    Message(Message),
    /// Only while its record is made into its message.
    Converting,
}

impl From<KafkaRecord> for Item {
    fn from(record: KafkaRecord) -> Self {
        Item::Record(Box::new(record))
    }
}

impl From<Message> for Item {
    fn from(message: Message) -> Self {
        Item::Message(message)
    }
}

impl Item {
    fn key(&self) -> Option<&Bytes> {
        match self {
            Item::Record(r) => r.key_bytes(),
            Item::Message(m) => m.key(),
            Item::Converting => None,
        }
    }
}

struct Entry {
    offset: i64,
    item: Item,
    lane: Option<Bytes>,
    /// Times handed out.
    deliveries: u32,
    status: Status,
}

struct Partition {
    generation: u64,
    /// Received, not yet committable; ascending offsets.
    entries: VecDeque<Entry>,
    /// Per lane key, the offsets of its unacked messages in order; the front is the one
    /// that may be out.
    lanes: HashMap<Bytes, VecDeque<i64>>,
    /// The next offset expected from Kafka; older ones are duplicates.
    next_fetch: Option<i64>,
    /// Every offset below it is acked (or was never there).
    commit_point: Option<i64>,
    /// The last commit point handed to Kafka.
    commit_sent: Option<i64>,
    /// The last commit point Kafka confirmed.
    commit_confirmed: Option<i64>,
}

impl Partition {
    /// Where the entry of `offset` is in `entries`. Offsets are ascending and usually
    /// consecutive, so the distance from the front is tried first; gaps (compacted topics,
    /// transaction markers) fall back to a binary search.
    fn index(&self, offset: i64) -> Option<usize> {
        let front = self.entries.front()?.offset;
        let guess = usize::try_from(offset.checked_sub(front)?).ok()?;
        if self.entries.get(guess).is_some_and(|e| e.offset == offset) {
            return Some(guess);
        }
        self.entries
            .binary_search_by_key(&offset, |e| e.offset)
            .ok()
    }

    fn entry(&self, offset: i64) -> Option<&Entry> {
        self.entries.get(self.index(offset)?)
    }

    fn entry_mut(&mut self, offset: i64) -> Option<&mut Entry> {
        let idx = self.index(offset)?;
        self.entries.get_mut(idx)
    }
}

/// Hashes a partition id as itself (spread by a multiplication): the partitions map is
/// looked up for every hand-out and settlement, and SipHash costs more than the rest of
/// such a lookup.
#[derive(Default)]
struct PartitionHasher(u64);

impl std::hash::Hasher for PartitionHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_i32(&mut self, n: i32) {
        // The high bits pick hashbrown's control bytes, the low bits the bucket.
        self.0 = u64::from(n as u32).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type Partitions = HashMap<i32, Partition, std::hash::BuildHasherDefault<PartitionHasher>>;

/// What a settlement asks the caller to wake.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Wake {
    /// A message became ready: wake the stream.
    pub(crate) stream: bool,
    /// A full partition got room, or the last delivery of a draining subscription was
    /// settled: wake the poll thread.
    pub(crate) poller: bool,
}

/// Whether the poll thread should be woken because a partition that held `before` entries
/// now holds `after`: it refills a partition once a quarter of its capacity is free again
/// (waking it for every freed slot would cost a thread wake-up per message while the
/// handler is slower than the broker).
fn refill(capacity: usize, before: usize, after: usize) -> bool {
    let mark = capacity - (capacity / 4).max(1);
    before > mark && after <= mark
}

/// Everything a subscription keeps in memory; guarded by one mutex.
pub(crate) struct State {
    ordering: Ordering,
    /// Which headers carry the uuid (to make records into messages).
    identity: Arc<Identity>,
    capacity: usize,
    partitions: Partitions,
    ready: VecDeque<Ref>,
    delayed: BinaryHeap<Reverse<(Instant, u64, Ref)>>,
    delay_seq: u64,
    next_generation: u64,
    in_flight: usize,
    /// Acks since the last commit; at `commit_every`, a commit is due.
    acked_since_commit: usize,
    commit_every: usize,
    /// Errors to report on the stream.
    errors: VecDeque<Error>,
    /// The stream's waker, while it waits.
    pub(crate) stream_waker: Option<Waker>,
    /// The stream was dropped: hand out nothing more, end once nothing is in flight.
    pub(crate) draining: bool,
    /// The subscription ended: the stream returns `None`.
    pub(crate) ended: bool,
}

/// At most this many errors wait for the stream; older ones are dropped (and were logged).
const MAX_ERRORS: usize = 16;

impl State {
    pub(crate) fn new(
        ordering: Ordering,
        capacity: usize,
        commit_every: usize,
        identity: Arc<Identity>,
    ) -> Self {
        State {
            identity,
            acked_since_commit: 0,
            commit_every: commit_every.max(1),
            ordering,
            capacity: capacity.max(1),
            partitions: Partitions::default(),
            ready: VecDeque::new(),
            delayed: BinaryHeap::new(),
            delay_seq: 0,
            next_generation: 1,
            in_flight: 0,
            errors: VecDeque::new(),
            stream_waker: None,
            draining: false,
            ended: false,
        }
    }

    /// Starts (or restarts) a partition at `start`, the offset the consumer was assigned
    /// at (`None`: unknown, the first message received tells).
    pub(crate) fn assign(&mut self, partition: i32, start: Option<i64>) {
        self.drop_partition(partition);
        let generation = self.next_generation;
        self.next_generation += 1;
        self.partitions.insert(
            partition,
            Partition {
                generation,
                entries: VecDeque::new(),
                lanes: HashMap::new(),
                next_fetch: start,
                commit_point: start,
                commit_sent: start,
                commit_confirmed: start,
            },
        );
    }

    /// Forgets a revoked partition; returns the offset to commit for it, if it advanced
    /// since the last commit. Its outstanding deliveries become stale.
    pub(crate) fn revoke(&mut self, partition: i32) -> Option<i64> {
        let p = self.partitions.get(&partition)?;
        let commit = advanced(p);
        self.drop_partition(partition);
        commit
    }

    /// Forgets every partition and ends the subscription; returns the offsets to commit.
    pub(crate) fn end(&mut self) -> Vec<(i32, i64)> {
        let ids: Vec<i32> = self.partitions.keys().copied().collect();
        let commits = ids
            .into_iter()
            .filter_map(|p| self.revoke(p).map(|o| (p, o)))
            .collect();
        self.ended = true;
        self.ready.clear();
        self.delayed.clear();
        commits
    }

    fn drop_partition(&mut self, partition: i32) {
        if let Some(p) = self.partitions.remove(&partition) {
            let out = p
                .entries
                .iter()
                .filter(|e| e.status == Status::InFlight)
                .count();
            self.in_flight -= out;
            // Its refs in `ready` and `delayed` are stale now and skipped when popped.
        }
    }

    /// The assigned partitions.
    pub(crate) fn assigned(&self) -> Vec<i32> {
        let mut ids: Vec<i32> = self.partitions.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Each assigned partition's commit point (where it is known): every offset below it
    /// is acked; a group commits it within `commit_interval`.
    pub(crate) fn commit_points(&self) -> Vec<(i32, i64)> {
        self.partitions
            .iter()
            .filter_map(|(id, p)| p.commit_point.map(|o| (*id, o)))
            .collect()
    }

    /// How many more messages `partition` may take (0 when not assigned).
    pub(crate) fn room(&self, partition: i32) -> usize {
        self.partitions
            .get(&partition)
            .map_or(0, |p| self.capacity.saturating_sub(p.entries.len()))
    }

    /// Messages handed out and not yet settled (of current assignments).
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Adds messages received for `partition`, in offset order. Returns whether one became
    /// ready.
    pub(crate) fn push<T: Into<Item>>(&mut self, partition: i32, messages: Vec<(i64, T)>) -> bool {
        let ordering = self.ordering;
        let Some(p) = self.partitions.get_mut(&partition) else {
            return false; // revoked meanwhile; Kafka redelivers to the new owner
        };
        let mut any_ready = false;
        for (offset, item) in messages {
            let item: Item = item.into();
            if p.next_fetch.is_some_and(|next| offset < next) {
                tracing::debug!(partition, offset, "skipping a message received twice");
                continue;
            }
            p.next_fetch = Some(offset + 1);
            if p.commit_point.is_none() {
                p.commit_point = Some(offset);
            }
            let lane = match ordering {
                Ordering::Key => item.key().cloned(),
                Ordering::Partition => Some(Bytes::new()),
            };
            let status = match &lane {
                None => Status::Ready,
                Some(key) => {
                    let queue = p.lanes.entry(key.clone()).or_default();
                    queue.push_back(offset);
                    if queue.len() == 1 {
                        Status::Ready
                    } else {
                        Status::Waiting
                    }
                }
            };
            if status == Status::Ready {
                self.ready.push_back(Ref {
                    partition,
                    offset,
                    generation: p.generation,
                });
                any_ready = true;
            }
            p.entries.push_back(Entry {
                offset,
                item,
                lane,
                deliveries: 0,
                status,
            });
        }
        any_ready
    }

    /// Hands out up to `max` ready messages (moving due delayed ones to ready first):
    /// their refs, messages and delivery attempts.
    pub(crate) fn take(&mut self, max: usize, now: Instant, out: &mut Vec<(Ref, Message, u32)>) {
        if self.ended || self.draining {
            return;
        }
        while let Some(Reverse((at, _, r))) = self.delayed.peek().copied() {
            if at > now {
                break;
            }
            self.delayed.pop();
            let due = match self.live_entry(r) {
                Some(e) if e.status == Status::Delayed => {
                    e.status = Status::Ready;
                    true
                }
                _ => false,
            };
            if due {
                self.ready.push_back(r);
            }
        }
        let identity = self.identity.clone();
        while out.len() < max {
            let Some(r) = self.ready.pop_front() else {
                break;
            };
            let Some(e) = self.live_entry(r) else {
                continue;
            };
            if e.status != Status::Ready {
                continue;
            }
            if matches!(e.item, Item::Record(_)) {
                if let Item::Record(record) = std::mem::replace(&mut e.item, Item::Converting) {
                    e.item = Item::Message(convert::message_of(*record, &identity));
                }
            }
            let Item::Message(message) = &e.item else {
                continue;
            };
            e.status = Status::InFlight;
            e.deliveries += 1;
            let item = (r, message.clone(), e.deliveries);
            self.in_flight += 1;
            out.push(item);
        }
    }

    /// When the next delayed message is due.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.delayed.peek().map(|Reverse((at, _, _))| *at)
    }

    /// Whether `r` is still a delivery of the current assignment that is out (not revoked
    /// since it was taken).
    pub(crate) fn is_out(&self, r: Ref) -> bool {
        self.partitions
            .get(&r.partition)
            .filter(|p| p.generation == r.generation)
            .and_then(|p| p.entry(r.offset))
            .is_some_and(|e| e.status == Status::InFlight)
    }

    fn live_entry(&mut self, r: Ref) -> Option<&mut Entry> {
        let p = self.partitions.get_mut(&r.partition)?;
        if p.generation != r.generation {
            return None;
        }
        p.entry_mut(r.offset)
    }

    /// Settles a delivery as processed. A stale ref (partition revoked since) changes
    /// nothing.
    pub(crate) fn ack(&mut self, r: Ref) -> Wake {
        let capacity = self.capacity;
        let Some(p) = self.partitions.get_mut(&r.partition) else {
            return Wake::default();
        };
        if p.generation != r.generation {
            return Wake::default();
        }
        let before = p.entries.len();
        let Some(e) = p.entry_mut(r.offset) else {
            return Wake::default();
        };
        if e.status != Status::InFlight {
            return Wake::default();
        }
        e.status = Status::Acked;
        let lane = e.lane.clone();
        self.in_flight -= 1;
        self.acked_since_commit += 1;
        let mut wake = Wake {
            // `commit_every` reached: the poll thread commits now.
            poller: self.acked_since_commit == self.commit_every,
            ..Wake::default()
        };
        if let Some(key) = lane {
            if let Some(queue) = p.lanes.get_mut(&key) {
                debug_assert_eq!(queue.front(), Some(&r.offset));
                queue.pop_front();
                match queue.front().copied() {
                    Some(next) => {
                        if let Some(n) = p.entry_mut(next) {
                            n.status = Status::Ready;
                            self.ready.push_back(Ref {
                                partition: r.partition,
                                offset: next,
                                generation: r.generation,
                            });
                            wake.stream = true;
                        }
                    }
                    None => {
                        p.lanes.remove(&key);
                    }
                }
            }
        }
        while p.entries.front().is_some_and(|e| e.status == Status::Acked) {
            if let Some(done) = p.entries.pop_front() {
                p.commit_point = Some(done.offset + 1);
            }
        }
        wake.poller |= refill(capacity, before, p.entries.len());
        if self.draining && self.in_flight == 0 {
            wake.poller = true;
        }
        wake
    }

    /// Settles a delivery for redelivery, after `delay` if given. The message stays at the
    /// head of its lane, so it comes back before later messages with its key.
    pub(crate) fn nack(&mut self, r: Ref, delay: Option<Duration>, now: Instant) -> Wake {
        let delay = delay.filter(|d| !d.is_zero());
        match self.live_entry(r) {
            Some(e) if e.status == Status::InFlight => {
                e.status = if delay.is_some() {
                    Status::Delayed
                } else {
                    Status::Ready
                };
            }
            _ => return Wake::default(),
        }
        match delay {
            Some(d) => {
                self.delay_seq += 1;
                self.delayed.push(Reverse((now + d, self.delay_seq, r)));
            }
            None => self.ready.push_front(r),
        }
        self.in_flight -= 1;
        Wake {
            stream: true,
            poller: self.draining && self.in_flight == 0,
        }
    }

    /// The partitions whose commit point advanced since the last commit, with the offset to
    /// commit; they count as sent.
    pub(crate) fn commits(&mut self) -> Vec<(i32, i64)> {
        self.acked_since_commit = 0;
        let mut out = Vec::new();
        for (id, p) in &mut self.partitions {
            if let Some(offset) = advanced(p) {
                p.commit_sent = Some(offset);
                out.push((*id, offset));
            }
        }
        out.sort_unstable();
        out
    }

    /// Whether `commit_every` messages were acked since the last commit.
    pub(crate) fn commit_due(&self) -> bool {
        self.acked_since_commit >= self.commit_every
    }

    /// Kafka confirmed (or refused) a commit of `offset` for `partition`.
    pub(crate) fn committed(&mut self, partition: i32, offset: i64, ok: bool) {
        let Some(p) = self.partitions.get_mut(&partition) else {
            return;
        };
        if ok {
            p.commit_confirmed = p.commit_confirmed.max(Some(offset));
        } else if p.commit_sent == Some(offset) {
            // Send it again with the next commit.
            p.commit_sent = p.commit_confirmed;
        }
    }

    /// Queues an error for the stream (the oldest is dropped when too many wait).
    pub(crate) fn report(&mut self, error: Error) {
        if self.errors.len() >= MAX_ERRORS {
            self.errors.pop_front();
        }
        self.errors.push_back(error);
    }

    /// The oldest error waiting for the stream.
    pub(crate) fn take_error(&mut self) -> Option<Error> {
        self.errors.pop_front()
    }
}

fn advanced(p: &Partition) -> Option<i64> {
    match (p.commit_point, p.commit_sent) {
        (Some(point), Some(sent)) if point > sent => Some(point),
        (Some(point), None) => Some(point),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KafkaConfig;

    fn identity() -> Arc<Identity> {
        Identity::new(&KafkaConfig::default())
    }

    fn msg(name: &str, key: Option<&str>) -> Message {
        let m = Message::with_uuid(name, name.to_owned());
        match key {
            Some(k) => m.with_key(k),
            None => m,
        }
    }

    fn take_all(s: &mut State) -> Vec<(Ref, Message, u32)> {
        let mut out = Vec::new();
        s.take(usize::MAX, Instant::now(), &mut out);
        out
    }

    fn names(out: &[(Ref, Message, u32)]) -> Vec<&str> {
        out.iter().map(|(_, m, _)| m.uuid()).collect()
    }

    #[test]
    fn same_key_waits_for_the_ack_of_the_previous() {
        let mut s = State::new(Ordering::Key, 100, 1000, identity());
        s.assign(0, Some(10));
        s.push(
            0,
            vec![
                (10, msg("a1", Some("a"))),
                (11, msg("b1", Some("b"))),
                (12, msg("a2", Some("a"))),
                (13, msg("n1", None)),
                (14, msg("n2", None)),
            ],
        );
        let first = take_all(&mut s);
        assert_eq!(names(&first), ["a1", "b1", "n1", "n2"]);
        assert!(take_all(&mut s).is_empty(), "a2 waits for a1");
        let wake = s.ack(first[0].0);
        assert!(wake.stream);
        let second = take_all(&mut s);
        assert_eq!(names(&second), ["a2"]);
        assert_eq!(second[0].2, 1, "first delivery of a2");
    }

    #[test]
    fn a_nacked_message_comes_back_before_its_successors_and_counts_attempts() {
        let mut s = State::new(Ordering::Key, 100, 1000, identity());
        s.assign(0, Some(0));
        s.push(
            0,
            vec![(0, msg("a1", Some("a"))), (1, msg("a2", Some("a")))],
        );
        let out = take_all(&mut s);
        assert_eq!(names(&out), ["a1"]);
        s.nack(out[0].0, None, Instant::now());
        let again = take_all(&mut s);
        assert_eq!(names(&again), ["a1"]);
        assert_eq!(again[0].2, 2, "second attempt");
        s.ack(again[0].0);
        assert_eq!(names(&take_all(&mut s)), ["a2"]);
    }

    #[test]
    fn partition_ordering_puts_every_message_in_one_lane() {
        let mut s = State::new(Ordering::Partition, 100, 1000, identity());
        s.assign(0, Some(0));
        s.push(0, vec![(0, msg("x", None)), (1, msg("y", Some("k")))]);
        let out = take_all(&mut s);
        assert_eq!(names(&out), ["x"]);
        s.ack(out[0].0);
        assert_eq!(names(&take_all(&mut s)), ["y"]);
    }

    #[test]
    fn commits_are_contiguous() {
        let mut s = State::new(Ordering::Key, 100, 1000, identity());
        s.assign(3, Some(5));
        assert!(s.commits().is_empty(), "nothing new at the start position");
        s.push(
            3,
            (5..9).map(|o| (o, msg(&format!("m{o}"), None))).collect(),
        );
        let out = take_all(&mut s);
        // Ack 6 and 7 first: nothing committable while 5 is unacked.
        s.ack(out[1].0);
        s.ack(out[2].0);
        assert!(s.commits().is_empty());
        s.ack(out[0].0);
        assert_eq!(s.commits(), vec![(3, 8)], "5, 6, 7 acked: commit 8");
        assert!(s.commits().is_empty(), "sent once");
        s.ack(out[3].0);
        assert_eq!(s.commits(), vec![(3, 9)]);
    }

    #[test]
    fn commit_points_follow_the_acked_prefix() {
        let mut s = State::new(Ordering::Key, 100, 1000, identity());
        s.assign(0, Some(5));
        s.assign(1, None);
        assert_eq!(
            s.commit_points(),
            vec![(0, 5)],
            "partition 1's start is unknown"
        );
        s.push(0, vec![(5, msg("a", None)), (6, msg("b", None))]);
        let out = take_all(&mut s);
        s.ack(out[1].0);
        assert_eq!(s.commit_points(), vec![(0, 5)], "6 acked, 5 not: still 5");
        s.ack(out[0].0);
        assert_eq!(s.commit_points(), vec![(0, 7)]);
    }

    #[test]
    fn a_failed_commit_is_sent_again() {
        let mut s = State::new(Ordering::Key, 100, 1000, identity());
        s.assign(0, Some(0));
        s.push(0, vec![(0, msg("m", None))]);
        let out = take_all(&mut s);
        s.ack(out[0].0);
        assert_eq!(s.commits(), vec![(0, 1)]);
        s.committed(0, 1, false);
        assert_eq!(s.commits(), vec![(0, 1)]);
        s.committed(0, 1, true);
        assert!(s.commits().is_empty());
    }

    #[test]
    fn unknown_start_is_taken_from_the_first_message() {
        let mut s = State::new(Ordering::Key, 100, 1000, identity());
        s.assign(0, None);
        s.push(0, vec![(42, msg("m", None))]);
        let out = take_all(&mut s);
        // The position librdkafka chose may be committed as is (it pins a new group).
        assert_eq!(s.commits(), vec![(0, 42)]);
        s.ack(out[0].0);
        assert_eq!(s.commits(), vec![(0, 43)]);
    }

    #[test]
    fn revoked_partitions_ignore_late_settlements() {
        let mut s = State::new(Ordering::Key, 100, 1000, identity());
        s.assign(0, Some(0));
        s.push(0, vec![(0, msg("a", None)), (1, msg("b", None))]);
        let out = take_all(&mut s);
        s.ack(out[0].0);
        assert_eq!(s.in_flight(), 1);
        assert_eq!(
            s.revoke(0),
            Some(1),
            "what was acked before revocation is committed"
        );
        assert_eq!(s.in_flight(), 0);
        // The partition comes back (a new generation): the old delivery's ack is void.
        s.assign(0, Some(1));
        assert_eq!(s.ack(out[1].0), Wake::default());
        assert!(s.commits().is_empty());
        s.push(0, vec![(1, msg("b", None))]);
        let again = take_all(&mut s);
        assert_eq!(names(&again), ["b"]);
        assert_eq!(again[0].2, 1);
    }

    fn record(offset: i64, key: Option<&'static [u8]>, uuid: Option<&str>) -> KafkaRecord {
        use crate::record::{Arena, KafkaTimestamp, RecordBuilder};
        let mut arena = Arena::new();
        let mut b = RecordBuilder::new(
            Arc::from("orders"),
            0,
            offset,
            KafkaTimestamp::CreateTime(1),
            key.map(Bytes::from_static),
            Some(Bytes::from(format!("value {offset}"))),
            &mut arena,
        );
        b.header("trace", Some(b"t1"));
        if let Some(u) = uuid {
            b.header(&KafkaConfig::default().uuid_header, Some(u.as_bytes()));
        }
        b.finish(&mut arena)
    }

    #[test]
    fn records_become_messages_when_first_handed_out_and_stay_the_same() {
        let mut s = State::new(Ordering::Key, 100, 1000, identity());
        s.assign(0, Some(0));
        s.push(
            0,
            vec![
                (0, record(0, Some(b"k"), None)),
                (1, record(1, Some(b"k"), Some("given-uuid"))),
            ],
        );
        let first = take_all(&mut s);
        assert_eq!(first.len(), 1, "1 waits behind 0 (same key)");
        let m = &first[0].1;
        assert_eq!(m.uuid(), &*convert::derived_uuid("orders", 0, 0));
        assert_eq!(m.payload().as_ref(), b"value 0");
        assert_eq!(m.key_str(), Some("k"));
        assert_eq!(m.metadata().get("trace"), Some("t1"));
        assert_eq!(KafkaRecord::of(m).map(KafkaRecord::offset), Some(0));
        s.nack(first[0].0, None, Instant::now());
        let again = take_all(&mut s);
        assert_eq!(again[0].1, first[0].1, "the redelivery is the same message");
        assert_eq!(again[0].2, 2);
        s.ack(again[0].0);
        let second = take_all(&mut s);
        assert_eq!(second[0].1.uuid(), "given-uuid");
        assert_eq!(
            second[0].1.metadata().len(),
            1,
            "the uuid header is not metadata"
        );
        s.ack(second[0].0);
        assert_eq!(s.commits(), vec![(0, 2)]);
    }

    #[test]
    fn offsets_with_gaps_are_found() {
        // Compacted topics and transaction markers leave gaps between offsets.
        let mut s = State::new(Ordering::Key, 100, 1000, identity());
        s.assign(0, Some(0));
        s.assign(7, Some(3));
        let offsets = [0, 2, 5, 6, 9];
        s.push(
            0,
            offsets
                .iter()
                .map(|&o| (o, msg(&format!("m{o}"), None)))
                .collect(),
        );
        s.push(7, vec![(3, msg("p7", None))]);
        let out = take_all(&mut s);
        assert_eq!(names(&out), ["m0", "m2", "m5", "m6", "m9", "p7"]);
        for (r, _, _) in out.iter().rev() {
            assert!(s.is_out(*r));
        }
        // Settle out of order: the commit point follows the acked prefix across the gaps.
        s.ack(out[3].0);
        s.ack(out[1].0);
        assert!(
            s.commits().is_empty(),
            "0 is not acked: {:?}",
            s.commit_points()
        );
        s.ack(out[0].0);
        assert_eq!(s.commits(), vec![(0, 3)]);
        s.nack(out[2].0, None, Instant::now());
        let again = take_all(&mut s);
        assert_eq!(names(&again), ["m5"]);
        s.ack(again[0].0);
        s.ack(out[4].0);
        s.ack(out[5].0);
        assert_eq!(s.commits(), vec![(0, 10), (7, 4)]);
        assert_eq!(s.in_flight(), 0);
    }

    #[test]
    fn duplicates_from_kafka_are_skipped() {
        let mut s = State::new(Ordering::Key, 100, 1000, identity());
        s.assign(0, Some(0));
        s.push(0, vec![(0, msg("a", None)), (1, msg("b", None))]);
        s.push(0, vec![(1, msg("b", None)), (2, msg("c", None))]);
        assert_eq!(names(&take_all(&mut s)), ["a", "b", "c"]);
    }

    #[test]
    fn delayed_nacks_wait_until_due() {
        let mut s = State::new(Ordering::Key, 100, 1000, identity());
        s.assign(0, Some(0));
        s.push(0, vec![(0, msg("a", Some("k"))), (1, msg("b", Some("k")))]);
        let out = take_all(&mut s);
        let t0 = Instant::now();
        s.nack(out[0].0, Some(Duration::from_secs(5)), t0);
        assert_eq!(s.next_deadline(), Some(t0 + Duration::from_secs(5)));
        let mut early = Vec::new();
        s.take(10, t0 + Duration::from_secs(4), &mut early);
        assert!(
            early.is_empty(),
            "neither a nor b (behind a) before the delay"
        );
        let mut due = Vec::new();
        s.take(10, t0 + Duration::from_secs(5), &mut due);
        assert_eq!(names(&due), ["a"]);
    }

    #[test]
    fn a_delayed_message_holds_its_key_and_the_commit_point_only() {
        let mut s = State::new(Ordering::Key, 100, 1000, identity());
        s.assign(0, Some(0));
        s.push(
            0,
            vec![
                (0, msg("a1", Some("a"))),
                (1, msg("b1", Some("b"))),
                (2, msg("a2", Some("a"))),
                (3, msg("n1", None)),
                (4, msg("b2", Some("b"))),
            ],
        );
        let out = take_all(&mut s);
        assert_eq!(names(&out), ["a1", "b1", "n1"]);
        let t0 = Instant::now();
        s.nack(out[0].0, Some(Duration::from_secs(30)), t0);
        s.ack(out[1].0);
        s.ack(out[2].0);
        let mut more = Vec::new();
        s.take(10, t0, &mut more);
        assert_eq!(names(&more), ["b2"], "other keys flow; a2 waits behind a1");
        s.ack(more[0].0);
        assert!(
            s.commits().is_empty(),
            "offset 0 is held: nothing to commit"
        );
        let mut due = Vec::new();
        s.take(10, t0 + Duration::from_secs(30), &mut due);
        assert_eq!(names(&due), ["a1"]);
        assert_eq!(due[0].2, 2);
        s.ack(due[0].0);
        assert_eq!(s.commits(), vec![(0, 2)], "a1 and b1 acked; a2 is next");
        assert_eq!(names(&take_all(&mut s)), ["a2"]);
    }

    #[test]
    fn room_and_wakeups_follow_the_capacity() {
        let mut s = State::new(Ordering::Key, 2, 1000, identity());
        s.assign(0, Some(0));
        assert_eq!(s.room(0), 2);
        assert_eq!(s.room(9), 0, "not assigned");
        s.push(0, vec![(0, msg("a", None)), (1, msg("b", None))]);
        assert_eq!(s.room(0), 0);
        let out = take_all(&mut s);
        assert!(!s.ack(out[1].0).poller, "b acked but a holds the room");
        assert!(s.ack(out[0].0).poller, "room again");
        assert_eq!(s.room(0), 2);
    }

    #[test]
    fn a_full_partition_wakes_the_poller_once_a_quarter_is_free() {
        let mut s = State::new(Ordering::Key, 8, 1000, identity());
        s.assign(0, Some(0));
        s.push(0, (0..8).map(|i| (i, msg("m", None))).collect());
        let out = take_all(&mut s);
        let wakes: Vec<bool> = out.iter().map(|(r, _, _)| s.ack(*r).poller).collect();
        // Capacity 8: the poller is woken when 2 slots are free (6 held), not for each.
        assert_eq!(
            wakes,
            [false, true, false, false, false, false, false, false],
            "one wake-up per quarter of the capacity"
        );
        assert_eq!(s.room(0), 8);
        assert!(refill(1, 1, 0), "capacity 1: every freed slot");
    }

    #[test]
    fn draining_wakes_the_poller_when_the_last_delivery_settles() {
        let mut s = State::new(Ordering::Key, 10, 1000, identity());
        s.assign(0, Some(0));
        s.push(0, vec![(0, msg("a", None)), (1, msg("b", None))]);
        let out = take_all(&mut s);
        s.draining = true;
        assert!(!s.ack(out[0].0).poller);
        assert!(s.nack(out[1].0, None, Instant::now()).poller);
        assert_eq!(s.in_flight(), 0);
        assert!(
            take_all(&mut s).is_empty(),
            "nothing handed out while draining"
        );
        assert_eq!(s.end(), vec![(0, 1)]);
        assert!(s.ended);
    }
}
