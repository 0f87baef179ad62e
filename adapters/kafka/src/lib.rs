//! # tidemill-kafka
//!
//! Kafka (and Kafka-protocol brokers) for [Tidemill](tidemill_core), on
//! [`rdkafka`] with its bundled librdkafka: a [`KafkaPublisher`] and a [`KafkaSubscriber`]
//! implementing Tidemill's `Publisher` and `Subscriber`, configured by a
//! serde-deserialisable [`KafkaConfig`].
//!
//! ```no_run
//! use futures::StreamExt;
//! use tidemill_core::{Message, Publisher, SubscribeOptions, Subscriber};
//! use tidemill_kafka::{KafkaConfig, KafkaPublisher, KafkaSubscriber};
//!
//! # async fn run() -> tidemill_core::Result<()> {
//! let config = KafkaConfig::new("127.0.0.1:9092"); // topics are created on first use
//! let publisher = KafkaPublisher::connect(config.clone()).await?;
//! let subscriber = KafkaSubscriber::connect(config).await?;
//!
//! // Consumer group "billing" receives every message published from now on.
//! let mut stream = subscriber.subscribe("orders", SubscribeOptions::group("billing")).await?;
//! let order = Message::new("tea").with_key("customer-7").with_metadata("qty", 2);
//! publisher.publish_one("orders", order).await?; // confirmed by every in-sync replica
//!
//! if let Some(delivery) = stream.next().await {
//!     let delivery = delivery?;
//!     assert_eq!(delivery.message().metadata().get("qty"), Some("2"));
//!     delivery.ack().await?; // only acked messages are committed
//! }
//! subscriber.close().await?; // commits what was acked, leaves the group
//! publisher.close().await?;
//! # Ok(()) }
//! ```
//!
//! ## What each Tidemill concept maps to
//!
//! | Tidemill | Kafka |
//! |---|---|
//! | topic `t` | topic `t`, created on first use (`partitions`, `replication_factor`, `topic_config`) unless `create_topics` is off |
//! | `publish(t, msgs)` | one record per message, sent by an idempotent producer with `acks=all`; returns once every delivery report is in |
//! | key | record key: the default partitioner puts every key on one partition, so a key's messages keep their order |
//! | payload / metadata | record value / record headers (values as UTF-8 bytes) |
//! | uuid | header `tidemill-uuid`; a record from another client gets a stable uuid derived from topic, partition and offset |
//! | `subscribe(t, group("g"))` | a member of consumer group `g` (Kafka `group.id`): members share the partitions, each group gets every message |
//! | `subscribe(t, no group)` | a consumer reading every partition of `t` from `start_from` (latest by default), joining no group, committing nothing; partitions added later are picked up within 30 s |
//! | `initialize(t, group("g"))` | creates `t` and commits the group's start positions where it has none, so the group keeps everything published afterwards |
//! | `ack()` | marks the message done; the offset after the longest acked prefix of its partition is committed every `commit_interval`, on revocation and on close |
//! | `nack()` / dropping a delivery | the message is handed out again from memory (no seek), before any later message with its key; its offset is not committed meanwhile |
//! | `nack_with_delay(d)` | the same after `d`; only the message's lane waits (its key, or its partition with `ordering = partition`), the rest of the consumer goes on |
//! | `attempt()` | how often this subscription handed the message out since it was assigned the partition (Kafka keeps no delivery count; see below) |
//! | backpressure | at most `max_buffered_per_partition` unacked messages per partition; a full partition is no longer read until acks make room |
//!
//! Header values that are not UTF-8 (from other clients) are kept base64-encoded under
//! `name.b64`; a header without a value becomes an empty string; of repeated header names
//! the last one wins; a record without a value (a tombstone) has an empty payload.
//!
//! ## Delivery guarantees
//!
//! - **At least once.** An offset is committed only once its message and every earlier
//!   message of the partition were acked, so a crash or a rebalance redelivers, never
//!   skips. Commits are periodic (`commit_interval`): after a crash, messages acked in the
//!   last interval come again. Consumers must tolerate duplicates.
//! - **Order.** Per key: with the default [`Ordering::Key`], a message is handed out only
//!   after the previous one with its key (in its partition) was acked; a nacked one comes
//!   back first. Messages with different keys, and without a key, are handed out without
//!   waiting, so `Router` handlers with `concurrency(n)` process them in parallel (keeping
//!   per-key order). [`Ordering::Partition`] serializes each partition instead. Kafka
//!   orders within a partition only; across partitions there is no order.
//! - **Rebalances.** When a partition is revoked, the offsets acked so far are committed,
//!   and deliveries of it still out become stale: settling them commits nothing, and the
//!   partition's new owner receives them again.
//! - **Delivery attempts.** Kafka does not count deliveries. `attempt()` counts the
//!   deliveries by this subscription since it was assigned the partition: it starts at 1
//!   again after a rebalance, a restart or on another group member, so it is a lower bound.
//! - **Publishing.** `publish` returns `Ok` once every message of the batch has its
//!   delivery report (`acks=all`: written to every in-sync replica). librdkafka retries
//!   through connection losses and broker restarts for `publish_timeout`; the idempotent
//!   producer keeps those retries from duplicating or reordering records. On an error some
//!   messages of the batch may have been written: retrying the batch is safe under
//!   at-least-once.
//! - **Reconnection.** librdkafka reconnects by itself; a subscription keeps its stream
//!   across connection losses and broker restarts (the group rejoins and resumes from its
//!   committed offsets; broker errors show up as `Err` items on the stream meanwhile).
//! - **Stopping.** [`KafkaSubscriber::close`] ends every stream at once, commits what was
//!   acked and leaves the groups. Dropping or cancelling a single stream stops reading at
//!   once but keeps the subscription's partitions until the deliveries still held are
//!   settled (at most `drain_timeout`), so a router finishing its in-flight messages gets
//!   them committed.
//!
//! ## Limits
//!
//! - `publish` refuses a message over `max_message_bytes` (payload, key and headers) with
//!   `Error::MessageTooLarge` naming the limit. Brokers have their own limit
//!   (`message.max.bytes`, topic `max.message.bytes`, about 1 MB by default): keep
//!   `max_message_bytes` at or below it.
//! - Transactions and exactly-once are not used: the adapter promises at least once.
#![warn(missing_docs)]

mod client;
mod config;
mod convert;
mod publisher;
mod state;
mod subscriber;
mod subscription;

pub use config::{KafkaConfig, Ordering, StartFrom};
pub use publisher::KafkaPublisher;
pub use subscriber::KafkaSubscriber;

/// The broker name in every error of this crate.
pub const BROKER: &str = "kafka";
