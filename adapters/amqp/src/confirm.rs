//! A channel in publisher-confirm mode, re-opened after it is lost, and pipelined publishing
//! of a batch that awaits every confirm.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{Channel, Confirmation, PublisherConfirm};
use tidemill_core::{Error, Result};
use tokio::time::Instant;

use crate::connection::{broker_error, Connector};
use crate::convert::Encoded;
use crate::BROKER;

/// The current confirm-mode channel of a connector.
#[derive(Default)]
pub(crate) struct ConfirmChannel {
    cached: parking_lot::Mutex<Option<Channel>>,
    setup: tokio::sync::Mutex<()>,
}

impl ConfirmChannel {
    /// The cached channel if it is open, otherwise a new one (reconnecting, retrying until
    /// `deadline`). Returns the channel and whether it is new.
    pub(crate) async fn get(
        &self,
        connector: &Connector,
        topic: &str,
        deadline: Instant,
    ) -> Result<(Channel, bool)> {
        if let Some(channel) = self.current() {
            return Ok((channel, false));
        }
        let _setup = self.setup.lock().await;
        if let Some(channel) = self.current() {
            return Ok((channel, false));
        }
        let channel = loop {
            let conn = connector.connection_until(Some(deadline)).await?;
            match open(&conn, topic).await {
                Ok(channel) => break channel,
                // The connection died under us: reconnect while time remains.
                Err(e) if e.is_transient() && Instant::now() < deadline => {
                    tracing::debug!(broker = BROKER, error = %e, "opening a confirm channel");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        };
        *self.cached.lock() = Some(channel.clone());
        Ok((channel, true))
    }

    fn current(&self) -> Option<Channel> {
        self.cached
            .lock()
            .as_ref()
            .filter(|c| c.status().connected())
            .cloned()
    }

    /// The cached channel, open or not.
    pub(crate) fn snapshot(&self) -> Option<Channel> {
        self.cached.lock().clone()
    }

    /// Forgets `channel` (if it is still the current one), so the next `get` opens a new one.
    pub(crate) fn discard(&self, channel: &Channel) {
        let mut cached = self.cached.lock();
        if cached.as_ref().is_some_and(|c| c.id() == channel.id()) {
            *cached = None;
        }
    }
}

async fn open(conn: &lapin::Connection, topic: &str) -> Result<Channel> {
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| broker_error(topic, "open a channel", e))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| broker_error(topic, "enable publisher confirms", e))?;
    Ok(channel)
}

type SendFuture<'a> = Pin<Box<dyn Future<Output = lapin::Result<PublisherConfirm>> + Send + 'a>>;

/// A message of the batch the broker returned as unroutable (`mandatory`).
pub(crate) struct Returned {
    /// The uuid of the batch message whose confirm carried the return.
    pub(crate) uuid: std::sync::Arc<str>,
    /// The returned message's properties (which tell its uuid for sure: lapin attaches a
    /// return to whichever confirm comes next).
    pub(crate) properties: lapin::BasicProperties,
    /// RabbitMQ's reason, e.g. `312 NO_ROUTE`.
    pub(crate) reason: String,
}

/// Publishes `batch` to `exchange` on `channel` and waits for every confirm; returns what
/// the broker returned as unroutable (only with `mandatory`).
///
/// Each `basic.publish` hands its frames to the connection when first polled, so the batch
/// is polled once message by message (keeping its order on the wire), then the writes and
/// confirms complete together instead of one round trip per message.
///
/// RabbitMQ sends the `basic.return` of an unroutable mandatory message before the
/// `basic.ack` that confirms it, and lapin hands a return to the next confirm it resolves.
/// On a channel used by one batch at a time (how the publisher sends mandatory batches)
/// every return therefore lands on a confirm of the same batch, and all of them are in
/// once every confirm resolved.
pub(crate) async fn publish_batch(
    channel: &Channel,
    topic: &str,
    exchange: &ShortString,
    mandatory: bool,
    batch: &mut [Encoded],
) -> Result<Vec<Returned>> {
    let options = BasicPublishOptions {
        mandatory,
        immediate: false,
    };
    let mut confirms: Vec<(usize, PublisherConfirm)> = Vec::with_capacity(batch.len());
    let mut pending: Vec<(usize, SendFuture<'_>)> = Vec::new();
    let mut failed: Option<lapin::Error> = None;
    let uuids: Vec<std::sync::Arc<str>> = batch.iter().map(|m| m.uuid.clone()).collect();
    for (index, message) in batch.iter_mut().enumerate() {
        let properties = std::mem::take(&mut message.properties);
        let mut send: SendFuture<'_> = Box::pin(channel.basic_publish(
            exchange.clone(),
            std::mem::take(&mut message.routing_key),
            options,
            &message.payload,
            properties,
        ));
        match std::future::poll_fn(|cx| Poll::Ready(send.as_mut().poll(cx))).await {
            Poll::Ready(Ok(confirm)) => confirms.push((index, confirm)),
            Poll::Ready(Err(e)) => {
                failed = Some(e);
                break;
            }
            Poll::Pending => pending.push((index, send)),
        }
    }
    let (indices, sends): (Vec<usize>, Vec<SendFuture<'_>>) = pending.into_iter().unzip();
    for (index, result) in indices
        .into_iter()
        .zip(futures::future::join_all(sends).await)
    {
        match result {
            Ok(confirm) => confirms.push((index, confirm)),
            Err(e) => failed = failed.or(Some(e)),
        }
    }
    if let Some(e) = failed {
        return Err(broker_error(
            topic,
            format!("publish to exchange `{exchange}`"),
            e,
        ));
    }
    let mut nacked = 0usize;
    let mut returned = Vec::new();
    let mut error: Option<lapin::Error> = None;
    let (indices, confirms): (Vec<usize>, Vec<PublisherConfirm>) = confirms.into_iter().unzip();
    for (index, confirmation) in indices
        .into_iter()
        .zip(futures::future::join_all(confirms).await)
    {
        match confirmation {
            Ok(Confirmation::Ack(None)) => {}
            Ok(Confirmation::Ack(Some(message))) | Ok(Confirmation::Nack(Some(message))) => {
                returned.push(Returned {
                    uuid: uuids[index].clone(),
                    reason: format!("{} {}", message.reply_code, message.reply_text),
                    properties: message.delivery.properties.clone(),
                });
            }
            Ok(Confirmation::Nack(None)) | Ok(Confirmation::NotRequested) => nacked += 1,
            Err(e) => error = error.or(Some(e)),
        }
    }
    if let Some(e) = error {
        return Err(broker_error(
            topic,
            format!("publish to exchange `{exchange}`: not confirmed"),
            e,
        ));
    }
    if nacked > 0 {
        return Err(Error::transient(
            BROKER,
            topic,
            format!("publish to exchange `{exchange}`"),
            format!(
                "the broker nacked {nacked} of {} messages (it could not store them)",
                batch.len()
            ),
        ));
    }
    Ok(returned)
}
