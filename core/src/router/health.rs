//! [`Router::health`]: whether the router is ready to take messages and alive, for
//! readiness and liveness probes.

use std::fmt;
use std::sync::Arc;

use serde::Serialize;

use super::{Router, State};
use crate::{ConnectionState, Publisher, Subscriber};

/// The clients a started handler uses.
pub(crate) struct Clients {
    pub(crate) subscriber: Arc<dyn Subscriber>,
    pub(crate) output: Option<Arc<dyn Publisher>>,
}

/// Where the router is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RouterStatus {
    /// Built, not running yet.
    Created,
    /// `run` is subscribing the handlers.
    Starting,
    /// Every initial handler is subscribed.
    Running,
    /// Shutting down.
    Closing,
    /// Closed.
    Closed,
}

/// Where a handler is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum HandlerStatus {
    /// Registered, not subscribed yet.
    Pending,
    /// Subscribed and taking messages.
    Running,
    /// Its loop ended without being stopped: the subscription ended (its subscriber was
    /// closed) or the handler's service failed. Nothing restarts it.
    Ended,
}

/// One handler's share of [`RouterHealth`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct HandlerHealth {
    /// The handler's name.
    pub name: String,
    /// The topic it consumes.
    pub topic: String,
    /// Where it is.
    pub status: HandlerStatus,
    /// Its subscriber's connection (once started).
    pub subscriber: Option<ConnectionState>,
    /// Its output publisher's connection, if it has an output (once started).
    pub publisher: Option<ConnectionState>,
}

impl HandlerHealth {
    /// Running, with every connection it uses up.
    pub fn is_ready(&self) -> bool {
        self.status == HandlerStatus::Running
            && self.subscriber.is_none_or(ConnectionState::is_up)
            && self.publisher.is_none_or(ConnectionState::is_up)
    }
}

/// What [`Router::health`] reports: the router's status and each handler's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct RouterHealth {
    /// Where the router is.
    pub status: RouterStatus,
    /// Every handler registered (sorted by name), and those that ended on their own.
    pub handlers: Vec<HandlerHealth>,
}

impl RouterHealth {
    /// Ready to take messages (a readiness probe): running, every handler subscribed and
    /// its stream alive, every broker connection up. A broker that goes away makes it not
    /// ready until the adapter has reconnected.
    pub fn is_ready(&self) -> bool {
        self.status == RouterStatus::Running && self.handlers.iter().all(HandlerHealth::is_ready)
    }

    /// Alive (a liveness probe): not closing or closed, and no handler ended on its own. A
    /// lost connection leaves it alive (adapters reconnect); a handler whose subscription
    /// ended does not come back, so a process in that state is better restarted.
    pub fn is_live(&self) -> bool {
        self.status < RouterStatus::Closing
            && self
                .handlers
                .iter()
                .all(|h| h.status != HandlerStatus::Ended)
    }
}

impl PartialOrd for RouterStatus {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some((*self as u8).cmp(&(*other as u8)))
    }
}

impl fmt::Display for RouterHealth {
    /// One line per handler after a headline: `ready`, `not ready` or `not live`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.is_ready() {
            "ready"
        } else if self.is_live() {
            "not ready"
        } else {
            "not live"
        };
        write!(f, "router {:?}: {verdict}", self.status)?;
        for h in &self.handlers {
            write!(f, "\n  {} ({}): {:?}", h.name, h.topic, h.status)?;
            if let Some(s) = h.subscriber {
                write!(f, ", subscriber {s}")?;
            }
            if let Some(p) = h.publisher {
                write!(f, ", publisher {p}")?;
            }
        }
        Ok(())
    }
}

impl Router {
    /// The router's health: its status, and for each handler whether it runs and whether
    /// the connections of its subscriber and output publisher are up (as the adapters
    /// report them, [`Subscriber::connection_state`]). Cheap: no broker round trip.
    ///
    /// ```
    /// use tidemill_core::{HandlerResult, MemoryBroker, Message, Router};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let broker = MemoryBroker::new();
    /// let router = Router::new();
    /// router
    ///     .add_handler("log")
    ///     .subscribe(broker.subscriber(), "events")
    ///     .handler(|_m: Message| async move { HandlerResult::Ok(()) })
    ///     .await?;
    /// assert!(!router.health().is_ready()); // not running yet
    /// let running = router.clone();
    /// tokio::spawn(async move { running.run().await });
    /// router.running().await;
    /// let health = router.health();
    /// assert!(health.is_ready() && health.is_live());
    /// router.close().await?;
    /// assert!(!router.health().is_live());
    /// # Ok(()) }
    /// ```
    pub fn health(&self) -> RouterHealth {
        let status = match *self.inner.state.borrow() {
            State::Created => RouterStatus::Created,
            State::Starting => RouterStatus::Starting,
            State::Running => RouterStatus::Running,
            State::Closing => RouterStatus::Closing,
            State::Closed => RouterStatus::Closed,
        };
        let mut handlers: Vec<HandlerHealth> = self
            .inner
            .handlers
            .lock()
            .iter()
            .map(|(name, slot)| {
                let (status, subscriber, publisher) = match &slot.clients {
                    None => (HandlerStatus::Pending, None, None),
                    Some(c) => (
                        HandlerStatus::Running,
                        Some(c.subscriber.connection_state()),
                        c.output.as_ref().map(|p| p.connection_state()),
                    ),
                };
                HandlerHealth {
                    name: name.clone(),
                    topic: slot.info.topic.clone(),
                    status,
                    subscriber,
                    publisher,
                }
            })
            .collect();
        for (name, topic) in self.inner.ended.lock().iter() {
            if handlers.iter().all(|h| h.name != *name) {
                handlers.push(HandlerHealth {
                    name: name.clone(),
                    topic: topic.clone(),
                    status: HandlerStatus::Ended,
                    subscriber: None,
                    publisher: None,
                });
            }
        }
        handlers.sort_by(|a, b| a.name.cmp(&b.name));
        RouterHealth { status, handlers }
    }
}
