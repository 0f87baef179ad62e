//! One AMQP connection per publisher or subscriber, re-established on demand after it is
//! lost, and the mapping of lapin errors to Tidemill errors.

use std::sync::Arc;
use std::time::Duration;

use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties, ErrorKind};
use tidemill_core::{CancellationToken, ConnectionState, Error, Result};
use tokio::time::Instant;

use crate::config::{display_uri, AmqpConfig};
use crate::BROKER;

/// The first pause between reconnection attempts; it doubles up to the configured maximum.
const BACKOFF_MIN: Duration = Duration::from_millis(100);

/// How long closing a connection may take before it is abandoned (dropped).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A lazily (re)connected AMQP connection.
pub(crate) struct Connector {
    uri: AMQPUri,
    address: String,
    connection_name: Option<String>,
    connect_timeout: Duration,
    backoff_max: Duration,
    current: tokio::sync::Mutex<Option<Arc<Connection>>>,
    /// What health checks read without waiting for `current`.
    seen: parking_lot::Mutex<Seen>,
    closed: CancellationToken,
}

/// The connection as health checks see it.
enum Seen {
    /// Not connected yet (connections are made on first use): nothing known to be wrong.
    Never,
    /// The latest connection.
    Connection(Arc<Connection>),
    /// The latest attempt to connect failed.
    Failed,
}

impl Connector {
    pub(crate) fn new(config: &AmqpConfig) -> Result<Self> {
        let uri = config.parsed_uri()?;
        Ok(Connector {
            address: display_uri(&uri),
            uri,
            connection_name: config.connection_name.clone(),
            connect_timeout: config.connect_timeout,
            backoff_max: config.reconnect_backoff_max,
            current: tokio::sync::Mutex::new(None),
            seen: parking_lot::Mutex::new(Seen::Never),
            closed: CancellationToken::new(),
        })
    }

    /// The broker address without credentials.
    pub(crate) fn address(&self) -> &str {
        &self.address
    }

    /// Fires when [`close`](Self::close) is called.
    pub(crate) fn closed(&self) -> &CancellationToken {
        &self.closed
    }

    /// The connection's state for health checks: up until it is first made (made on
    /// first use), then what lapin reports of the latest connection; down after a failed
    /// attempt until one succeeds. With `lazy` (a publisher, which reconnects on its next
    /// publish), a lost connection nobody tried to replace yet counts as up: the broker
    /// may well be back by the time it is used.
    pub(crate) fn state(&self, lazy: bool) -> ConnectionState {
        if self.closed.is_cancelled() {
            return ConnectionState::Closed;
        }
        match &*self.seen.lock() {
            Seen::Never => ConnectionState::Connected,
            Seen::Connection(c) if lazy || c.status().connected() => ConnectionState::Connected,
            Seen::Connection(_) | Seen::Failed => ConnectionState::Disconnected,
        }
    }

    /// The current connection, or a new one when there is none or it was lost: one attempt,
    /// bounded by the connect timeout.
    pub(crate) async fn connection(&self) -> Result<Arc<Connection>> {
        let mut current = self.current.lock().await;
        if let Some(conn) = current.as_ref() {
            if conn.status().connected() {
                return Ok(conn.clone());
            }
        }
        if self.closed.is_cancelled() {
            return Err(self.connect_error("the client was closed"));
        }
        // Drop (and thereby close) the dead connection before making a new one.
        *current = None;
        let conn = match self.connect_once().await {
            Ok(conn) => Arc::new(conn),
            Err(e) => {
                *self.seen.lock() = Seen::Failed;
                return Err(e);
            }
        };
        *current = Some(conn.clone());
        *self.seen.lock() = Seen::Connection(conn.clone());
        Ok(conn)
    }

    /// Like [`connection`](Self::connection), retrying with exponential backoff until it
    /// succeeds, `deadline` passes (the last error is returned) or the client is closed.
    pub(crate) async fn connection_until(
        &self,
        deadline: Option<Instant>,
    ) -> Result<Arc<Connection>> {
        let mut pause = BACKOFF_MIN;
        loop {
            let err = match self.connection().await {
                Ok(conn) => return Ok(conn),
                Err(err) => err,
            };
            if !err.is_transient() || self.closed.is_cancelled() {
                return Err(err);
            }
            let wake = Instant::now() + pause;
            if deadline.is_some_and(|d| wake >= d) {
                return Err(err);
            }
            tracing::debug!(broker = BROKER, address = %self.address, error = %err,
                retry_in = ?pause, "reconnecting");
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                _ = self.closed.cancelled() => return Err(err),
            }
            pause = (pause * 2).min(self.backoff_max);
        }
    }

    async fn connect_once(&self) -> Result<Connection> {
        let mut props = ConnectionProperties::default();
        if let Some(name) = &self.connection_name {
            props = props.with_connection_name(name.as_str().into());
        }
        match tokio::time::timeout(
            self.connect_timeout,
            Connection::connect_uri(self.uri.clone(), props),
        )
        .await
        {
            Ok(Ok(conn)) => {
                tracing::debug!(broker = BROKER, address = %self.address, "connected");
                Ok(conn)
            }
            Ok(Err(e)) => Err(Error::Connect {
                broker: BROKER,
                address: self.address.clone(),
                source: Box::new(e),
            }),
            Err(_) => Err(self.connect_error(format!(
                "no AMQP handshake within the connect timeout of {:?}",
                self.connect_timeout
            ))),
        }
    }

    fn connect_error(&self, why: impl Into<String>) -> Error {
        let why: String = why.into();
        Error::Connect {
            broker: BROKER,
            address: self.address.clone(),
            source: why.into(),
        }
    }

    /// Closes the connection (idempotent); later calls to `connection` fail.
    pub(crate) async fn close(&self) {
        self.closed.cancel();
        let conn = self.current.lock().await.take();
        if let Some(conn) = conn {
            if conn.status().connected() {
                match tokio::time::timeout(CLOSE_TIMEOUT, conn.close(200, "OK".into())).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::debug!(broker = BROKER, error = %e, "closing the connection")
                    }
                    Err(_) => tracing::debug!(broker = BROKER, "closing the connection timed out"),
                }
            }
        }
    }
}

/// Whether retrying after `e` may succeed: connection-level trouble is transient; the
/// broker refusing a request (not found, access refused, precondition failed) is not.
pub(crate) fn is_transient(e: &lapin::Error) -> bool {
    match e.kind() {
        ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(_) => false,
            AMQPErrorKind::Hard(hard) => matches!(
                hard,
                AMQPHardError::CONNECTIONFORCED
                    | AMQPHardError::INTERNALERROR
                    | AMQPHardError::RESOURCEERROR
            ),
        },
        ErrorKind::InvalidProtocolVersion(_)
        | ErrorKind::AuthProviderError(_)
        | ErrorKind::NoDefaultRuntime
        | ErrorKind::SerialisationError(_) => false,
        _ => true,
    }
}

/// Whether `e` is the broker answering 404 NOT_FOUND.
pub(crate) fn is_not_found(e: &lapin::Error) -> bool {
    soft_error(e) == Some(AMQPSoftError::NOTFOUND)
}

/// The channel-level AMQP error in `e`, if that is what it is.
pub(crate) fn soft_error(e: &lapin::Error) -> Option<AMQPSoftError> {
    match e.kind() {
        ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(soft) => Some(soft.clone()),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

/// The limit RabbitMQ names when it refuses a message as too large (PRECONDITION_FAILED
/// "message size N is larger than configured max size M").
pub(crate) fn size_limit(e: &lapin::Error) -> Option<usize> {
    let ErrorKind::ProtocolError(amqp) = e.kind() else {
        return None;
    };
    let text = amqp.get_message().as_str();
    let (_, rest) = text.split_once("max size ")?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// A Tidemill error for a failed lapin operation.
pub(crate) fn broker_error(topic: &str, context: impl Into<String>, e: lapin::Error) -> Error {
    if is_transient(&e) {
        Error::transient(BROKER, topic, context, e)
    } else {
        Error::permanent(BROKER, topic, context, e)
    }
}
