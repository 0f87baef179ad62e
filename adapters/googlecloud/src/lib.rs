//! # tidemill-googlecloud
//!
//! Google Cloud Pub/Sub for [Tidemill](tidemill_core), on Google's official
//! [`google-cloud-pubsub`](google_cloud_pubsub) client: a [`GoogleCloudPublisher`] and a
//! [`GoogleCloudSubscriber`] implementing Tidemill's `Publisher` and `Subscriber`, configured
//! by a serde-deserialisable [`GoogleCloudConfig`].
//!
//! ```no_run
//! use futures::StreamExt;
//! use tidemill_core::{Message, Publisher, SubscribeOptions, Subscriber};
//! use tidemill_googlecloud::{GoogleCloudConfig, GoogleCloudPublisher, GoogleCloudSubscriber};
//!
//! # async fn run() -> tidemill_core::Result<()> {
//! // On Google Cloud: application-default credentials. With PUBSUB_EMULATOR_HOST set (or
//! // `GoogleCloudConfig::emulator`), the emulator without credentials.
//! let config = GoogleCloudConfig::new("my-project");
//! let publisher = GoogleCloudPublisher::connect(config.clone()).await?;
//! let subscriber = GoogleCloudSubscriber::connect(config).await?;
//!
//! // The group's subscription must exist before publishing (a Pub/Sub property).
//! subscriber.initialize("orders", &SubscribeOptions::group("billing")).await?;
//! publisher.publish_one("orders", Message::new("tea").with_metadata("qty", 2)).await?;
//!
//! let mut stream = subscriber.subscribe("orders", SubscribeOptions::group("billing")).await?;
//! if let Some(delivery) = stream.next().await {
//!     let delivery = delivery?;
//!     assert_eq!(delivery.message().metadata().get("qty"), Some("2"));
//!     delivery.ack().await?; // only now is the message acknowledged to Pub/Sub
//! }
//! subscriber.close().await?;
//! publisher.close().await?;
//! # Ok(()) }
//! ```
//!
//! ## What each Tidemill concept maps to
//!
//! | Tidemill | Pub/Sub |
//! |---|---|
//! | topic `t` | topic `projects/{project_id}/topics/t` (a full `projects/P/topics/T` name is used as is); created on first use unless `create_topics` is off |
//! | `subscribe(t, group("g"))` | subscription `{subscription_prefix}t.g`, shared by every subscriber of the group (competing consumers); created unless `create_subscriptions` is off; never deleted by the adapter |
//! | `subscribe(t, no group)` | a subscription of its own, `{subscription_prefix}t.tidemill-{random}`, deleted when the stream ends (`delete_unique_subscriptions`) and expiring after `unique_subscription_ttl` without a subscriber otherwise |
//! | `initialize(t, group("g"))` | creates the topic and the group's subscription ahead of publishing |
//! | payload / metadata | `data` / attributes, unchanged |
//! | `retain_for(t, g)` | creates the topic and the subscription group `g` consumes |
//! | `publish_mandatory(t, ..)` | publish after checking the topic has a subscription; `Error::Unroutable` otherwise |
//! | uuid | attribute [`uuid_attribute`](GoogleCloudConfig::uuid_attribute) (`tidemill-uuid`; `_watermill_message_uuid` for Watermill); a message without it has its Pub/Sub message id as uuid, the same on every redelivery |
//! | key | the ordering key when `message_ordering` is on, otherwise attribute `tidemill-key` (`tidemill-key.b64`, base64, for a key that is not UTF-8); a received message's ordering key is its key |
//! | `publish` returning `Ok` | Pub/Sub answered the publish request with a message id for every message |
//! | `ack()` | acknowledge (with exactly-once delivery: confirmed, failures returned) |
//! | `nack()` / dropping a delivery | modify ack deadline to 0: redelivered at once (after the subscription's retry backoff, if configured) |
//! | `nack_with_delay(d)` | the message stays leased for `d`, then is nacked (see below) |
//! | `attempt()` | `delivery_attempt`, which Pub/Sub reports only on subscriptions with a dead-letter policy (`dead_letter`); `None` otherwise; never read from an attribute |
//! | what was delivered | a [`PubSubRecord`] on every received message: message id, publish time, ordering key, attributes, delivery attempt |
//! | flow control | `max_outstanding_messages` / `max_outstanding_bytes` per stream |
//!
//! A received message published again through a [`GoogleCloudPublisher`] (a handler
//! passing it on, a dead-letter layer) is rebuilt from its [`PubSubRecord`]: the same
//! ordering key and attributes, with only the application's changes to metadata, uuid and
//! key applied. A plain subscriber of the output sees what the original publisher sent,
//! plus the uuid attribute if the original had none.
//!
//! Attributes are UTF-8 strings in Pub/Sub's protocol, so every metadata value arrives as
//! sent and there are no binary header values to preserve. Pub/Sub limits attributes
//! (at most 100, keys up to 256 bytes and not starting with `goog`, values up to 1024
//! bytes): a message beyond them is refused by the service with an error naming the topic.
//!
//! ## Delivery guarantees
//!
//! - **At least once.** A message is acknowledged only when the application acks it.
//!   Every message the server sends is read at once, so the client leases it from receipt
//!   (buffered, handed out or held for a delayed nack) and extends the lease until it is
//!   settled (up to `max_lease`): a slow handler's message, and the messages waiting
//!   behind it, are not redelivered meanwhile. A nacked, dropped or abandoned delivery, or
//!   one whose process died, is redelivered (at the latest after `max_lease_extension`).
//!   Acks are sent in batches every 100 ms and, with at-least-once delivery, not confirmed
//!   by Pub/Sub; closing the subscriber waits until they are sent. Duplicates are
//!   possible, as with every Pub/Sub client, unless the subscription has exactly-once
//!   delivery (`exactly_once_delivery`), where acks are confirmed and a failed ack is
//!   returned by `Delivery::ack`.
//! - **Subscriptions only see what is published while they exist.** Messages published to
//!   a topic without subscriptions are dropped by Pub/Sub. A group's subscription is
//!   created by `initialize`, `retain_for` or the first `subscribe` and then keeps every
//!   message for the group, also while no subscriber runs (up to the subscription's
//!   retention, 7 days by default). `subscribe` returns only once its subscription exists,
//!   so every message published after it returns is delivered. `publish_mandatory` (used
//!   by dead-letter and poison layers) fails with `Error::Unroutable` when the topic has no
//!   subscription; a positive check is trusted for 60 s, so a subscription deleted within
//!   that time can still lose messages.
//! - **Ordering.** Only with `message_ordering` on: messages with the same key are
//!   delivered in publish order (Pub/Sub orders per ordering key and region). Without it,
//!   Pub/Sub promises no order.
//! - **Publishing.** `publish` returns `Ok` once Pub/Sub accepted every message; transient
//!   failures are retried for `publish_timeout`. On an error some messages of the batch may
//!   have been accepted; retrying is safe under at-least-once.
//! - **`nack_with_delay(d)`.** The client library does not expose ack ids, so the adapter
//!   cannot ask Pub/Sub for a custom ack deadline; it keeps the message leased for `d`, then
//!   nacks it, while other messages keep flowing. The message is redelivered no earlier
//!   than `d` (capped to end within `max_lease`); ending the stream or closing the
//!   subscriber nacks it at once; if the process dies, it returns after the lease runs out.
//!   It counts as outstanding for flow control meanwhile. For server-side backoff on every
//!   nack, configure `retry_backoff`.
//! - **Reconnection.** The client reconnects its streaming pulls and retries publishes and
//!   acks after connection loss; a subscription (or topic) that vanished, e.g. after an
//!   emulator restart, is created again and consumption resumes.
//! - **Stopping.** Dropping a stream, cancelling it or closing the subscriber ends its
//!   streaming pull at once, polled or not: messages read ahead but not handed out, and
//!   messages held for a delayed nack, are nacked; only deliveries the application still
//!   holds stay leased until it settles them.
//!
//! ## Health and backlog
//!
//! The client library exposes no connection state (it retries connection failures inside
//! its calls without telling), so once `connection_state` is first asked for (by
//! `Router::health`), each publisher and subscriber checks every
//! [`health_check_interval`](GoogleCloudConfig::health_check_interval) that the service
//! answers (one `GetTopic`, a single attempt) and reports what the last check found; a
//! subscriber is also disconnected while a failed streaming pull is re-opened. The
//! subscription backlog (consumer lag) is not reported: Pub/Sub tells it only through
//! Cloud Monitoring, and the emulator not at all.
//!
//! ## The emulator
//!
//! With `emulator_host` set, or `PUBSUB_EMULATOR_HOST` in the environment (and no
//! `endpoint`), the adapter talks to `http://HOST` without credentials: gRPC for
//! publishing and pulling, REST/JSON for creating topics and subscriptions (the emulator
//! must serve both, as Google's does). The emulator keeps everything in memory (a restart
//! loses topics, subscriptions and messages), and it does not implement ordering (ordering
//! keys are carried, not ordered by), dead-letter policies, delivery attempts, exactly-once
//! delivery or retry policies: the settings are accepted and ignored.
#![warn(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod client;
mod config;
mod convert;
mod names;
mod publisher;
mod record;
mod subscriber;

pub use config::{
    DeadLetterConfig, GoogleCloudConfig, RetryBackoff, EMULATOR_HOST_ENV, PUBSUB_MAX_MESSAGE_BYTES,
    WATERMILL_UUID_ATTRIBUTE,
};
pub use publisher::GoogleCloudPublisher;
pub use record::PubSubRecord;
pub use subscriber::GoogleCloudSubscriber;

/// The broker name in every error of this crate.
pub const BROKER: &str = "googlecloud";

/// The README's examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
