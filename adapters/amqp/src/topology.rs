//! Declaring (or checking) exchanges, queues and bindings.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::Channel;
use tidemill_core::{Error, Result};

use crate::config::AmqpConfig;
use crate::connection::{broker_error, is_not_found};
use crate::BROKER;

/// Declares the durable exchange of `topic`, or with `declare_topology` off checks that it
/// exists. A failure closes `channel` (AMQP's rule for channel errors).
pub(crate) async fn exchange(
    channel: &Channel,
    config: &AmqpConfig,
    topic: &str,
    exchange: &str,
) -> Result<()> {
    let options = ExchangeDeclareOptions {
        passive: !config.declare_topology,
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            short(topic, exchange)?,
            config.exchange_type.kind(),
            options,
            FieldTable::default(),
        )
        .await
        .map_err(|e| {
            if is_not_found(&e) {
                Error::permanent(
                    BROKER,
                    topic,
                    format!(
                        "exchange `{exchange}` does not exist (declare_topology is off, so it is not created)"
                    ),
                    e,
                )
            } else {
                broker_error(
                    topic,
                    format!(
                        "declare exchange `{exchange}` (durable, {:?})",
                        config.exchange_type
                    ),
                    e,
                )
            }
        })
}

/// What kind of queue a subscription consumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum QueueKind {
    /// A consumer group's durable queue.
    Group,
    /// A subscription's own exclusive, auto-deleted queue.
    Exclusive,
}

/// Declares (or checks) the exchange of `topic` and `queue`, and binds them.
pub(crate) async fn subscription(
    channel: &Channel,
    config: &AmqpConfig,
    topic: &str,
    exchange_name: &str,
    queue: &str,
    kind: QueueKind,
) -> Result<()> {
    exchange(channel, config, topic, exchange_name).await?;
    let (options, arguments) = match kind {
        QueueKind::Group => (
            QueueDeclareOptions {
                passive: !config.declare_topology,
                durable: true,
                ..QueueDeclareOptions::default()
            },
            if config.declare_topology {
                config.group_queue_arguments()?
            } else {
                FieldTable::default()
            },
        ),
        QueueKind::Exclusive => (
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        ),
    };
    channel
        .queue_declare(short(topic, queue)?, options, arguments)
        .await
        .map_err(|e| {
            if options.passive && is_not_found(&e) {
                Error::permanent(
                    BROKER,
                    topic,
                    format!(
                        "queue `{queue}` does not exist (declare_topology is off, so it is not created)"
                    ),
                    e,
                )
            } else {
                broker_error(topic, format!("declare queue `{queue}`"), e)
            }
        })?;
    if options.passive {
        // Not ours to change: the binding is assumed to be in place.
        return Ok(());
    }
    channel
        .queue_bind(
            short(topic, queue)?,
            short(topic, exchange_name)?,
            short(topic, &config.binding_key)?,
            QueueBindOptions::default(),
            config.binding_table()?,
        )
        .await
        .map_err(|e| {
            broker_error(
                topic,
                format!("bind queue `{queue}` to exchange `{exchange_name}`"),
                e,
            )
        })
}

/// An AMQP short string, or an error naming `topic` when `s` is longer than 255 bytes.
pub(crate) fn short(topic: &str, s: &str) -> Result<ShortString> {
    ShortString::try_new(s).map_err(|e| Error::permanent(BROKER, topic, format!("name `{s}`"), e))
}
