//! Request-reply over any broker: a [`Requester`] sends a request carrying a correlation id
//! and a reply address and awaits the reply; a [`Replier`] layer on the handling side
//! publishes the handler's result, or its error, back to that address.
//!
//! - **Reply address**: each requester instance has a reply topic of its own
//!   (`tidemill-replies.<random>` unless configured), subscribed *before* the first request
//!   is sent, so no reply can be missed. One subscription serves any number of concurrent
//!   requests.
//! - **Correlation**: the request carries [`REQUEST_ID`](crate::headers::REQUEST_ID) and
//!   [`REPLY_TO`](crate::headers::REPLY_TO); every reply carries the request id back.
//!   Replies nobody waits for (unknown id, expired, or a second reply after a redelivery)
//!   are acked and counted ([`Requester::unknown_replies`]), never block the others.
//! - **Errors are replies too**: a failing handler's error kind and message reach the
//!   requester as [`RequestError::Handler`], not as a timeout.
//! - **Exactly one result**: if the replier crashes before acking, the request is
//!   redelivered and may be answered twice; the requester takes the first answer and
//!   counts the rest as unknown. It gets one result, or a timeout.
//! - **Streaming**: a handler returning several messages sends several replies (numbered,
//!   with the total), which [`Requester::request_stream`] yields in turn.
//!
//! ```
//! use std::time::Duration;
//! use tidemill_core::{HandlerResult, MemoryBroker, Message, Router};
//! use tidemill_middleware::request_reply::{Replier, Requester, RequesterConfig};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let broker = MemoryBroker::new();
//! let router = Router::new();
//! router
//!     .add_handler("quote")
//!     .subscribe(broker.subscriber(), "quotes")
//!     .group("quote")
//!     .layer(Replier::new(broker.publisher()))
//!     .handler(|req: Message| async move {
//!         let qty: u32 = std::str::from_utf8(req.payload())?.parse()?;
//!         HandlerResult::Ok(Message::new((qty * 350).to_string()))
//!     })
//!     .await?;
//! let running = router.clone();
//! tokio::spawn(async move { running.run().await });
//! router.running().await;
//!
//! let requester = Requester::connect(
//!     broker.publisher(),
//!     broker.subscriber(),
//!     RequesterConfig::default().timeout(Duration::from_secs(60)),
//! )
//! .await?;
//! let reply = requester.request("quotes", Message::new("3")).await?;
//! assert_eq!(reply.payload().as_ref(), b"1050");
//! requester.close().await;
//! router.close().await?;
//! # Ok(()) }
//! ```

mod replier;
mod requester;

pub use replier::{
    error_reply, ok_reply, MissingReplyAddress, Replier, ReplierService, ReplyPublishFailed,
};
pub use requester::{ReplyStream, Requester, RequesterConfig};

use std::fmt;
use std::time::Duration;

use tidemill_core::{is_permanent, BoxError};

/// What kind of failure a handler reported in an error reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReplyErrorKind {
    /// A permanent error ([`tidemill_core::permanent`]): retrying the request will not help.
    Permanent,
    /// The handler (or an attempt of it) timed out.
    Timeout,
    /// Any other error.
    Failed,
}

impl ReplyErrorKind {
    /// Classifies a handler error.
    pub fn of(error: &BoxError) -> Self {
        let error: &(dyn std::error::Error + 'static) = error.as_ref();
        if is_permanent(error) {
            return ReplyErrorKind::Permanent;
        }
        let mut current = Some(error);
        while let Some(e) = current {
            if e.is::<tower::timeout::error::Elapsed>() || e.is::<crate::AttemptTimedOut>() {
                return ReplyErrorKind::Timeout;
            }
            current = e.source();
        }
        ReplyErrorKind::Failed
    }

    /// The value written into [`REPLY_ERROR_KIND`](crate::headers::REPLY_ERROR_KIND).
    pub fn as_str(&self) -> &'static str {
        match self {
            ReplyErrorKind::Permanent => "permanent",
            ReplyErrorKind::Timeout => "timeout",
            ReplyErrorKind::Failed => "error",
        }
    }

    /// Parses [`as_str`](Self::as_str); unknown values are `Failed`.
    pub fn parse(s: &str) -> Self {
        match s {
            "permanent" => ReplyErrorKind::Permanent,
            "timeout" => ReplyErrorKind::Timeout,
            _ => ReplyErrorKind::Failed,
        }
    }
}

impl fmt::Display for ReplyErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a request got no (successful) reply.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// No reply within the timeout.
    #[error("request {request_id} to `{topic}` got no reply within {timeout:?}")]
    Timeout {
        /// The request topic.
        topic: String,
        /// The request's correlation id.
        request_id: String,
        /// The timeout.
        timeout: Duration,
    },
    /// The requester was closed (or its reply subscription ended) while waiting.
    #[error("the requester is closed; request to `{topic}` abandoned")]
    Closed {
        /// The request topic.
        topic: String,
    },
    /// The handler failed and replied with its error.
    #[error("the handler of `{topic}` failed ({kind}): {message}")]
    Handler {
        /// The request topic.
        topic: String,
        /// What kind of error.
        kind: ReplyErrorKind,
        /// The handler's error message (with its sources).
        message: String,
    },
    /// Publishing the request failed.
    #[error("cannot publish the request to `{topic}`: {source}")]
    Publish {
        /// The request topic.
        topic: String,
        /// The publisher's error.
        #[source]
        source: tidemill_core::Error,
    },
    /// Subscribing to the reply topic failed.
    #[error("cannot subscribe to the reply topic `{topic}`: {source}")]
    Subscribe {
        /// The reply topic.
        topic: String,
        /// The subscriber's error.
        #[source]
        source: tidemill_core::Error,
    },
}

impl RequestError {
    /// Whether the handler reported a permanent error (do not resend the request).
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            RequestError::Handler {
                kind: ReplyErrorKind::Permanent,
                ..
            }
        )
    }
}
