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

/// Publishes `batch` to `exchange` on `channel` and waits for every confirm.
///
/// Each `basic.publish` hands its frames to the connection when first polled, so the batch
/// is polled once message by message (keeping its order on the wire), then the writes and
/// confirms complete together instead of one round trip per message.
pub(crate) async fn publish_batch(
    channel: &Channel,
    topic: &str,
    exchange: &ShortString,
    mandatory: bool,
    batch: &mut [Encoded],
) -> Result<()> {
    let options = BasicPublishOptions {
        mandatory,
        immediate: false,
    };
    let mut confirms: Vec<PublisherConfirm> = Vec::with_capacity(batch.len());
    let mut pending: Vec<SendFuture<'_>> = Vec::new();
    let mut failed: Option<lapin::Error> = None;
    for message in batch.iter_mut() {
        let properties = std::mem::take(&mut message.properties);
        let mut send: SendFuture<'_> = Box::pin(channel.basic_publish(
            exchange.clone(),
            std::mem::take(&mut message.routing_key),
            options,
            &message.payload,
            properties,
        ));
        match std::future::poll_fn(|cx| Poll::Ready(send.as_mut().poll(cx))).await {
            Poll::Ready(Ok(confirm)) => confirms.push(confirm),
            Poll::Ready(Err(e)) => {
                failed = Some(e);
                break;
            }
            Poll::Pending => pending.push(send),
        }
    }
    for result in futures::future::join_all(pending).await {
        match result {
            Ok(confirm) => confirms.push(confirm),
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
    let mut returned: Option<String> = None;
    let mut error: Option<lapin::Error> = None;
    for confirmation in futures::future::join_all(confirms).await {
        match confirmation {
            Ok(Confirmation::Ack(None)) => {}
            Ok(Confirmation::Ack(Some(message))) | Ok(Confirmation::Nack(Some(message))) => {
                returned.get_or_insert_with(|| {
                    format!("{} {}", message.reply_code, message.reply_text)
                });
            }
            Ok(Confirmation::Nack(None)) => nacked += 1,
            Ok(Confirmation::NotRequested) => {
                nacked += 1;
            }
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
    if let Some(reason) = returned {
        return Err(Error::permanent(
            BROKER,
            topic,
            format!("publish to exchange `{exchange}`"),
            format!(
                "the broker returned a mandatory message ({reason}): no queue is bound to the exchange or no binding matches"
            ),
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
    Ok(())
}
