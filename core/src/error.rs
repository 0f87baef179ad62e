//! Errors shared by every Tidemill crate.
//!
//! Broker-facing operations return [`Error`], whose message always names the broker and,
//! where there is one, the topic. Handlers return [`BoxError`] (like tower), and can mark an
//! error as permanent with [`permanent`] so middleware (poison queue) knows retrying is futile.

use std::fmt;

/// A type-erased error, the error type of handlers and tower layers.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Result with Tidemill's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error from a publisher, subscriber or acknowledgement.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `publish` was called after `close`.
    #[error("{broker}: publisher is closed; cannot publish to topic `{topic}`")]
    PublisherClosed {
        /// Broker name, e.g. `memory`, `kafka`.
        broker: &'static str,
        /// The topic the caller tried to publish to.
        topic: String,
    },
    /// `subscribe` was called after `close`.
    #[error("{broker}: subscriber is closed; cannot subscribe to topic `{topic}`")]
    SubscriberClosed {
        /// Broker name.
        broker: &'static str,
        /// The topic the caller tried to subscribe to.
        topic: String,
    },
    /// The broker could not be reached.
    #[error("{broker}: cannot connect to {address}: {source}")]
    Connect {
        /// Broker name.
        broker: &'static str,
        /// The address that was tried.
        address: String,
        /// What went wrong.
        #[source]
        source: BoxError,
    },
    /// A message is larger than the publisher (or the broker) accepts.
    #[error(
        "{broker}: message {uuid} for topic `{topic}` is {size} bytes, over the limit of {limit} bytes"
    )]
    MessageTooLarge {
        /// Broker name.
        broker: &'static str,
        /// Target topic.
        topic: String,
        /// The offending message's uuid.
        uuid: String,
        /// Its encoded size in bytes.
        size: usize,
        /// The limit in bytes (the adapter's configured maximum, which its docs name).
        limit: usize,
    },
    /// The broker received the message but nothing keeps it: no queue, group or
    /// subscription takes messages published to the topic (see
    /// [`Publisher::publish_mandatory`](crate::Publisher::publish_mandatory)).
    #[error(
        "{broker}: nothing receives messages published to topic `{topic}` (no queue, group or \
         subscription): message {uuid} would be lost"
    )]
    Unroutable {
        /// Broker name.
        broker: &'static str,
        /// The topic.
        topic: String,
        /// The uuid of the first message nothing received.
        uuid: String,
    },
    /// The publisher or subscriber cannot do what was asked.
    #[error("{broker}: cannot do this for topic `{topic}`: {what} is not supported")]
    Unsupported {
        /// Broker name.
        broker: &'static str,
        /// The topic involved.
        topic: String,
        /// What was asked.
        what: &'static str,
    },
    /// A configuration value is missing or malformed.
    #[error("{broker}: invalid configuration: {message}")]
    Config {
        /// Broker (or component) name.
        broker: &'static str,
        /// What is wrong, naming the offending option.
        message: String,
    },
    /// Any other failure talking to the broker.
    #[error("{broker}: {context} (topic `{topic}`): {source}")]
    Broker {
        /// Broker name.
        broker: &'static str,
        /// The topic involved (empty when none).
        topic: String,
        /// What Tidemill was doing, e.g. "publish", "create subscription".
        context: String,
        /// Whether retrying the operation may succeed.
        transient: bool,
        /// The underlying cause.
        #[source]
        source: BoxError,
    },
}

impl Error {
    /// A broker failure that may succeed when retried (connection loss, timeouts).
    pub fn transient(
        broker: &'static str,
        topic: impl Into<String>,
        context: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        Error::Broker {
            broker,
            topic: topic.into(),
            context: context.into(),
            transient: true,
            source: source.into(),
        }
    }

    /// A broker failure that will fail again when retried (authorization, invalid request).
    pub fn permanent(
        broker: &'static str,
        topic: impl Into<String>,
        context: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        Error::Broker {
            broker,
            topic: topic.into(),
            context: context.into(),
            transient: false,
            source: source.into(),
        }
    }

    /// A configuration error for `broker`.
    pub fn config(broker: &'static str, message: impl Into<String>) -> Self {
        Error::Config {
            broker,
            message: message.into(),
        }
    }

    /// Whether retrying the failed operation may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Connect { .. } | Error::Unroutable { .. } => true,
            Error::Broker { transient, .. } => *transient,
            Error::PublisherClosed { .. }
            | Error::SubscriberClosed { .. }
            | Error::MessageTooLarge { .. }
            | Error::Unsupported { .. }
            | Error::Config { .. } => false,
        }
    }
}

/// Wraps a handler error to mark it permanent: retrying will not help (malformed payload,
/// unknown type, failed validation). Poison-queue middleware routes such errors to the poison
/// topic instead of retrying. Build one with [`permanent`].
#[derive(Debug)]
pub struct PermanentError(BoxError);

impl PermanentError {
    /// The wrapped error.
    pub fn inner(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self.0.as_ref()
    }
}

impl fmt::Display for PermanentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for PermanentError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.0.as_ref())
    }
}

/// Marks `error` as permanent (see [`PermanentError`]).
///
/// ```
/// use tidemill_core::{is_permanent, permanent, BoxError};
/// let err: BoxError = permanent("payload is not valid JSON");
/// assert!(is_permanent(err.as_ref()));
/// ```
pub fn permanent(error: impl Into<BoxError>) -> BoxError {
    Box::new(PermanentError(error.into()))
}

/// Whether `error`, or any error in its source chain, was marked permanent with [`permanent`],
/// or is a non-transient Tidemill [`Error`].
pub fn is_permanent(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(err) = current {
        if err.is::<PermanentError>() {
            return true;
        }
        if let Some(e) = err.downcast_ref::<Error>() {
            return !e.is_transient();
        }
        current = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permanent_is_found_through_the_source_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] BoxError);
        let inner = permanent("bad payload");
        let outer: BoxError = Box::new(Outer(inner));
        assert!(is_permanent(outer.as_ref()));
        let plain: BoxError = "flaky".into();
        assert!(!is_permanent(plain.as_ref()));
    }

    #[test]
    fn messages_name_broker_and_topic() {
        let e = Error::transient("kafka", "orders", "publish", "broker down");
        assert_eq!(
            e.to_string(),
            "kafka: publish (topic `orders`): broker down"
        );
        assert!(e.is_transient());
        let e = Error::PublisherClosed {
            broker: "memory",
            topic: "t".into(),
        };
        assert!(e.to_string().contains("`t`"));
        assert!(!e.is_transient());
    }
}
