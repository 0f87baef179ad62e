//! One AMQP connection per publisher or subscriber, re-established on demand after it is
//! lost, and the mapping of lapin errors to Tidemill errors.

use std::sync::Arc;
use std::time::Duration;

use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties, ErrorKind};
use tidemill_core::{CancellationToken, ConnectionState, Error, Result};
use tokio::time::Instant;

use crate::config::AmqpConfig;
use crate::BROKER;

/// The first pause between reconnection attempts; it doubles up to the configured maximum.
const BACKOFF_MIN: Duration = Duration::from_millis(100);

/// How long closing a connection may take before it is abandoned (dropped).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A lazily (re)connected AMQP connection to one node of the configured list.
pub(crate) struct Connector {
    /// The nodes (one for a plain URL): URI and address without credentials.
    nodes: Vec<Node>,
    /// Every node's address, comma-separated, without credentials.
    address: String,
    shuffle: bool,
    connection_name: Option<String>,
    connect_timeout: Duration,
    backoff_max: Duration,
    /// The connection and the index of its node.
    current: tokio::sync::Mutex<Option<(Arc<Connection>, usize)>>,
    /// The node of the latest connection: a new round of attempts tries it last.
    last_node: parking_lot::Mutex<Option<usize>>,
    /// What health checks read without waiting for `current`.
    seen: parking_lot::Mutex<Seen>,
    closed: CancellationToken,
}

/// One node of the list.
struct Node {
    uri: AMQPUri,
    address: String,
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
        let nodes: Vec<Node> = config
            .nodes()?
            .into_iter()
            .map(|(uri, address)| Node { uri, address })
            .collect();
        Ok(Connector {
            address: nodes
                .iter()
                .map(|n| n.address.as_str())
                .collect::<Vec<_>>()
                .join(","),
            nodes,
            shuffle: config.shuffle_nodes,
            connection_name: config.connection_name.clone(),
            connect_timeout: config.connect_timeout,
            backoff_max: config.reconnect_backoff_max,
            current: tokio::sync::Mutex::new(None),
            last_node: parking_lot::Mutex::new(None),
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

    /// The current connection, or a new one when there is none or it was lost: one round of
    /// attempts (each node of the list once, see [`round`](Self::round)), each bounded by the
    /// connect timeout.
    pub(crate) async fn connection(&self) -> Result<Arc<Connection>> {
        let mut current = self.current.lock().await;
        if let Some((conn, _)) = current.as_ref() {
            if conn.status().connected() {
                return Ok(conn.clone());
            }
        }
        if self.closed.is_cancelled() {
            return Err(self.connect_error("the client was closed"));
        }
        // Drop (and thereby close) the dead connection before making a new one.
        if let Some((_, node)) = current.take() {
            if self.nodes.len() > 1 {
                tracing::info!(broker = BROKER, node = %self.nodes[node].address,
                    "connection to the node lost; trying the other nodes first");
            }
        }
        let (conn, node) = match self.connect_round().await {
            Ok((conn, node)) => (Arc::new(conn), node),
            Err(e) => {
                *self.seen.lock() = Seen::Failed;
                return Err(e);
            }
        };
        *current = Some((conn.clone(), node));
        *self.last_node.lock() = Some(node);
        *self.seen.lock() = Seen::Connection(conn.clone());
        Ok(conn)
    }

    /// The order of the nodes for the next round: list order starting after the node of the
    /// latest connection (from the first when there was none), or a random order with that
    /// node last ([`AmqpConfig::shuffle_nodes`]).
    pub(crate) fn round(&self) -> Vec<usize> {
        let n = self.nodes.len();
        let last = *self.last_node.lock();
        if self.shuffle {
            let mut order: Vec<usize> = (0..n).collect();
            fastrand::shuffle(&mut order);
            if let Some(last) = last {
                order.retain(|&i| i != last);
                order.push(last);
            }
            order
        } else {
            let start = last.map_or(0, |l| l + 1);
            (0..n).map(|i| (start + i) % n).collect()
        }
    }

    /// One attempt per node, in [`round`](Self::round) order, until one connects.
    async fn connect_round(&self) -> Result<(Connection, usize)> {
        let order = self.round();
        if let [only] = order[..] {
            return self.connect_once(only).await.map(|c| (c, only));
        }
        let mut failures = Vec::with_capacity(order.len());
        for node in order {
            if self.closed.is_cancelled() {
                return Err(self.connect_error("the client was closed"));
            }
            match self.connect_once(node).await {
                Ok(conn) => return Ok((conn, node)),
                Err(e) => {
                    tracing::debug!(broker = BROKER, node = %self.nodes[node].address,
                        error = %e, "node did not accept the connection; trying the next");
                    let why = match &e {
                        Error::Connect { source, .. } => source.to_string(),
                        other => other.to_string(),
                    };
                    failures.push(format!("{}: {why}", self.nodes[node].address));
                }
            }
        }
        Err(self.connect_error(format!(
            "no node of the list accepted a connection ({})",
            failures.join("; ")
        )))
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

    async fn connect_once(&self, node: usize) -> Result<Connection> {
        let node = &self.nodes[node];
        let mut props = ConnectionProperties::default();
        if let Some(name) = &self.connection_name {
            props = props.with_connection_name(name.as_str().into());
        }
        match tokio::time::timeout(
            self.connect_timeout,
            Connection::connect_uri(node.uri.clone(), props),
        )
        .await
        {
            Ok(Ok(conn)) => {
                tracing::debug!(broker = BROKER, address = %node.address, "connected");
                Ok(conn)
            }
            Ok(Err(e)) => Err(Error::Connect {
                broker: BROKER,
                address: node.address.clone(),
                source: Box::new(e),
            }),
            Err(_) => Err(Error::Connect {
                broker: BROKER,
                address: node.address.clone(),
                source: format!(
                    "no AMQP handshake within the connect timeout of {:?}",
                    self.connect_timeout
                )
                .into(),
            }),
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
        if let Some((conn, _)) = conn {
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

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &str =
        "amqp://g:g@127.0.0.1:1/%2f,amqp://g:g@127.0.0.1:2/%2f,amqp://g:g@127.0.0.1:3/%2f";

    #[test]
    fn nodes_are_tried_in_order_starting_after_the_latest() {
        let c = Connector::new(&AmqpConfig::new(LIST)).unwrap();
        assert_eq!(
            c.address(),
            "amqp://g@127.0.0.1:1/%2f,amqp://g@127.0.0.1:2/%2f,amqp://g@127.0.0.1:3/%2f"
        );
        assert_eq!(c.round(), [0, 1, 2]);
        *c.last_node.lock() = Some(0);
        assert_eq!(c.round(), [1, 2, 0]);
        *c.last_node.lock() = Some(2);
        assert_eq!(c.round(), [0, 1, 2]);
        let single = Connector::new(&AmqpConfig::new("amqp://g:g@h:1/%2f")).unwrap();
        *single.last_node.lock() = Some(0);
        assert_eq!(single.round(), [0]);
    }

    #[test]
    fn shuffled_rounds_try_every_node_once_and_the_latest_last() {
        let config = AmqpConfig {
            shuffle_nodes: true,
            ..AmqpConfig::new(LIST)
        };
        let c = Connector::new(&config).unwrap();
        let mut firsts = std::collections::HashSet::new();
        for _ in 0..200 {
            let mut order = c.round();
            firsts.insert(order[0]);
            order.sort_unstable();
            assert_eq!(order, [0, 1, 2]);
        }
        assert_eq!(firsts.len(), 3, "every node comes first sometimes");
        *c.last_node.lock() = Some(1);
        for _ in 0..50 {
            let order = c.round();
            assert_eq!(order[2], 1, "{order:?}");
        }
    }

    #[tokio::test]
    async fn when_no_node_answers_the_error_names_each_without_passwords() {
        // Ports 1 and 2 on loopback refuse connections at once.
        let config =
            AmqpConfig::new("amqp://u:hunter2@127.0.0.1:1/%2f,amqp://u:hunter3@127.0.0.1:2/%2f");
        let c = Connector::new(&config).unwrap();
        let e = c.connection().await.unwrap_err();
        let text = format!("{e} / {e:?}");
        assert!(e.is_transient(), "{text}");
        assert!(text.contains("amqp://u@127.0.0.1:1/%2f"), "{text}");
        assert!(text.contains("amqp://u@127.0.0.1:2/%2f: "), "{text}");
        assert!(!text.contains("hunter"), "{text}");
        assert_eq!(c.state(false), ConnectionState::Disconnected);
    }
}
