//! CQRS errors.

use std::time::Duration;

use tidemill_core::router::RouterError;
use tidemill_core::BoxError;
use tidemill_middleware::request_reply::{ReplyErrorKind, RequestError};

/// Errors from buses and processors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CqrsError {
    /// The value could not be encoded.
    #[error("cannot marshal {kind} `{name}`: {source}")]
    Marshal {
        /// "command", "event" or "command result".
        kind: &'static str,
        /// Its name.
        name: String,
        /// The marshaler's error.
        #[source]
        source: BoxError,
    },
    /// Publishing failed.
    #[error("cannot publish {kind} `{name}` to topic `{topic}`: {source}")]
    Publish {
        /// "command" or "event".
        kind: &'static str,
        /// Its name.
        name: String,
        /// The topic.
        topic: String,
        /// The publisher's error (names the broker).
        #[source]
        source: Box<tidemill_core::Error>,
    },
    /// A second handler for one command type.
    #[error("command `{0}` already has a handler: a command type has exactly one handler")]
    DuplicateCommandHandler(String),
    /// Two handlers with one name.
    #[error("a handler named `{0}` is already registered")]
    DuplicateHandlerName(String),
    /// An event group whose event types map to different topics.
    #[error(
        "event group `{group}` would need two subscriptions: `{first}` is on topic `{first_topic}` \
         but `{second}` is on `{second_topic}`; name the group's events onto one topic \
         (e.g. EventProcessor::with_topic_naming)"
    )]
    GroupSpansTopics {
        /// The group.
        group: String,
        /// First event type.
        first: String,
        /// Its topic.
        first_topic: String,
        /// The event type on another topic.
        second: String,
        /// That topic.
        second_topic: String,
    },
    /// An event group without handlers.
    #[error("event group `{0}` has no handlers")]
    EmptyGroup(String),
    /// A command sent with [`send_and_wait`](crate::CommandClient::send_and_wait) failed in
    /// its handler (or did not decode there); the handler's error came back as the reply.
    #[error("command `{name}` (topic `{topic}`) failed in its handler ({kind}): {message}")]
    CommandFailed {
        /// The command name.
        name: String,
        /// The topic it was sent to.
        topic: String,
        /// What kind of error: [`ReplyErrorKind::Permanent`] means resending will not help.
        kind: ReplyErrorKind,
        /// The handler's error message, with its sources.
        message: String,
    },
    /// No verdict for a command sent with
    /// [`send_and_wait`](crate::CommandClient::send_and_wait) within the timeout.
    #[error(
        "no reply to command `{name}` (topic `{topic}`) within {timeout:?}: is a \
         CommandProcessor with_replies(..) running for it?"
    )]
    NoReply {
        /// The command name.
        name: String,
        /// The topic it was sent to.
        topic: String,
        /// How long the caller waited.
        timeout: Duration,
    },
    /// [`send_and_wait_for`](crate::CommandClient::send_and_wait_for) got an answer without
    /// a result: the command's handler was registered with `handle`, not
    /// `handle_with_result`.
    #[error(
        "command `{name}` was handled, but its handler returns no result (register it with \
         CommandProcessor::handle_with_result, or use send_and_wait)"
    )]
    NoResult {
        /// The command name.
        name: String,
    },
    /// The result of [`send_and_wait_for`](crate::CommandClient::send_and_wait_for) did not
    /// decode as the type asked for.
    #[error("the result of command `{name}` does not decode as `{result}`: {source}")]
    ResultDecode {
        /// The command name.
        name: String,
        /// The result type asked for.
        result: String,
        /// The marshaler's error.
        #[source]
        source: BoxError,
    },
    /// Request-reply failed otherwise (publishing the command, subscribing to replies,
    /// or the client was closed).
    #[error("send-and-wait of command `{name}`: {source}")]
    Request {
        /// The command name.
        name: String,
        /// The request-reply error.
        #[source]
        source: Box<RequestError>,
    },
    /// [`CommandBus::connect_client`](crate::CommandBus::connect_client) could not
    /// subscribe to its reply topic.
    #[error("cannot connect the command client: {0}")]
    Connect(#[source] Box<RequestError>),
    /// Registering on the router failed.
    #[error(transparent)]
    Router(#[from] RouterError),
}

impl CqrsError {
    /// Whether a command sent with [`send_and_wait`](crate::CommandClient::send_and_wait)
    /// failed permanently in its handler: resending it will not help.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            CqrsError::CommandFailed {
                kind: ReplyErrorKind::Permanent,
                ..
            }
        )
    }
}

/// Why a received message could not become a typed command or event. Handlers return it
/// marked permanent ([`tidemill_core::permanent`]), so poison-queue middleware routes the
/// message to the poison topic with this text as the reason instead of retrying it.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The payload did not decode as the type its name says.
    #[error("cannot decode {kind} `{name}` from message {uuid} on topic `{topic}`: {source}")]
    Payload {
        /// "command" or "event".
        kind: &'static str,
        /// The type name from the metadata.
        name: String,
        /// Message uuid.
        uuid: String,
        /// Topic it arrived on.
        topic: String,
        /// The marshaler's error.
        #[source]
        source: BoxError,
    },
    /// The message carries no type name.
    #[error(
        "message {uuid} on topic `{topic}` has no type name in {key}: cannot tell which {kind} it is"
    )]
    MissingName {
        /// "command" or "event".
        kind: &'static str,
        /// Message uuid.
        uuid: String,
        /// Topic it arrived on.
        topic: String,
        /// Where the name was expected ([`TypeHeader::describe`](crate::TypeHeader::describe)).
        key: String,
    },
    /// No handler knows the type and the policy is to reject it.
    #[error("no handler for {kind} `{name}` (message {uuid} on topic `{topic}`)")]
    UnknownType {
        /// "command" or "event".
        kind: &'static str,
        /// The type name.
        name: String,
        /// Message uuid.
        uuid: String,
        /// Topic it arrived on.
        topic: String,
    },
}
