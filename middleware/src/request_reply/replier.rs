//! The replying side: a layer publishing the handler's result to the reply address.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tidemill_core::{permanent, BoxError, Message, Publisher};
use tower::{Layer, Service};

use super::ReplyErrorKind;
use crate::headers;
use crate::util::{error_chain, truncate};

/// The longest error message sent back in a reply.
const MAX_ERROR: usize = 1_000;

/// Makes a handler answer requests: its result is published to the request's reply
/// address ([`REPLY_TO`](headers::REPLY_TO)) with the request's correlation id, then the
/// request is acked.
///
/// - `Ok(messages)`: one reply per message (numbered with
///   [`REPLY_SEQ`](headers::REPLY_SEQ) / [`REPLY_COUNT`](headers::REPLY_COUNT)); a handler
///   returning nothing sends one empty reply, so the requester learns it is done.
/// - `Err(e)`: one error reply with the error's kind and message
///   ([`ReplyErrorKind`](super::ReplyErrorKind)); the request is acked: the requester got
///   its answer. Put [`Retry`](crate::Retry) *inside* the replier to retry before
///   answering.
/// - If publishing the reply fails, the request is nacked and handled again later.
/// - A request without a reply address fails with the permanent [`MissingReplyAddress`]
///   error (logged by the router with the handler's name) and takes the normal failure
///   path (poison queue, dead letter, or redelivery).
///
/// The handler's output is sent as replies only, not to the handler's output topic.
#[derive(Clone)]
pub struct Replier {
    publisher: Arc<dyn Publisher>,
}

impl Replier {
    /// Publishes replies through `publisher`.
    pub fn new(publisher: impl Publisher + 'static) -> Self {
        Replier {
            publisher: Arc::new(publisher),
        }
    }
}

impl fmt::Debug for Replier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replier").finish_non_exhaustive()
    }
}

/// A request without a reply address or correlation id: it cannot be answered.
#[derive(Debug, thiserror::Error)]
#[error(
    "message {uuid} on `{topic}` is not a request: it has no `{missing}` metadata, so no reply \
     can be sent (send requests with tidemill_middleware::request_reply::Requester)"
)]
pub struct MissingReplyAddress {
    /// The message's uuid.
    pub uuid: String,
    /// The topic it came from.
    pub topic: String,
    /// The missing metadata key.
    pub missing: &'static str,
}

/// Publishing a reply failed; the request is nacked.
#[derive(Debug, thiserror::Error)]
#[error("cannot publish the reply to request {request_id} to `{reply_to}`: {source}")]
pub struct ReplyPublishFailed {
    /// The request's correlation id.
    pub request_id: String,
    /// The reply topic.
    pub reply_to: String,
    /// The publisher's error.
    #[source]
    pub source: tidemill_core::Error,
}

impl<S> Layer<S> for Replier {
    type Service = ReplierService<S>;

    fn layer(&self, inner: S) -> ReplierService<S> {
        ReplierService {
            inner,
            publisher: self.publisher.clone(),
        }
    }
}

/// The service made by [`Replier`].
#[derive(Clone)]
pub struct ReplierService<S> {
    inner: S,
    publisher: Arc<dyn Publisher>,
}

impl<S> fmt::Debug for ReplierService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplierService").finish_non_exhaustive()
    }
}

/// Makes `msg` the `seq`-th of `count` successful replies to request `request_id`.
///
/// Sets [`REPLY_STATUS`](headers::REPLY_STATUS) to `ok`, the correlation id
/// ([`REQUEST_ID`](headers::REQUEST_ID)) and numbering ([`REPLY_SEQ`](headers::REPLY_SEQ) /
/// [`REPLY_COUNT`](headers::REPLY_COUNT)); removes error and reply-address metadata the
/// handler's message may have carried over, and its receive context. [`Replier`] builds its
/// replies with this; use it to answer [`Requester`](super::Requester) requests from other
/// code (as `tidemill-cqrs` does), so both agree on the reply format.
///
/// ```
/// use tidemill_core::Message;
/// use tidemill_middleware::{headers, request_reply::ok_reply};
///
/// let reply = ok_reply(Message::new("42"), "req-1", 1, 1);
/// assert_eq!(reply.metadata().get(headers::REPLY_STATUS), Some("ok"));
/// assert_eq!(reply.metadata().get(headers::REQUEST_ID), Some("req-1"));
/// ```
pub fn ok_reply(mut msg: Message, request_id: &str, seq: usize, count: usize) -> Message {
    let md = msg.metadata_mut();
    md.set(headers::REPLY_STATUS, "ok");
    for key in [
        headers::REPLY_ERROR,
        headers::REPLY_ERROR_KIND,
        headers::REPLY_TO,
    ] {
        md.remove(key);
    }
    reply(msg, request_id, seq, count)
}

/// The single error reply to request `request_id` for a handler's `error`.
///
/// Sets [`REPLY_STATUS`](headers::REPLY_STATUS) to `error`, the error's
/// [`ReplyErrorKind`] in [`REPLY_ERROR_KIND`](headers::REPLY_ERROR_KIND) and the error with
/// its sources (cut to 1,000 bytes) in [`REPLY_ERROR`](headers::REPLY_ERROR), plus the
/// correlation id and numbering (1 of 1). [`Replier`] builds its error replies with this.
///
/// ```
/// use tidemill_core::{BoxError, Message};
/// use tidemill_middleware::{headers, request_reply::{error_reply, ReplyErrorKind}};
///
/// let error: BoxError = "no such account".into();
/// let reply = error_reply(&error, "req-1");
/// assert_eq!(reply.metadata().get(headers::REPLY_STATUS), Some("error"));
/// assert_eq!(reply.metadata().get(headers::REPLY_ERROR_KIND), Some(ReplyErrorKind::Failed.as_str()));
/// assert_eq!(reply.metadata().get(headers::REPLY_ERROR), Some("no such account"));
/// ```
pub fn error_reply(error: &BoxError, request_id: &str) -> Message {
    let mut m = Message::new("");
    let md = m.metadata_mut();
    md.set(headers::REPLY_STATUS, "error");
    md.set(
        headers::REPLY_ERROR_KIND,
        ReplyErrorKind::of(error).as_str(),
    );
    md.set(
        headers::REPLY_ERROR,
        truncate(error_chain(error.as_ref()), MAX_ERROR),
    );
    reply(m, request_id, 1, 1)
}

fn reply(mut msg: Message, request_id: &str, seq: usize, count: usize) -> Message {
    let md = msg.metadata_mut();
    md.set(headers::REQUEST_ID, request_id);
    md.set(headers::REPLY_SEQ, seq);
    md.set(headers::REPLY_COUNT, count);
    msg.set_context(None);
    msg
}

impl<S> Service<Message> for ReplierService<S>
where
    S: Service<Message, Response = Vec<Message>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = Vec<Message>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Vec<Message>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        let md = msg.metadata();
        let (reply_to, request_id) = match (md.get(headers::REPLY_TO), md.get(headers::REQUEST_ID))
        {
            (Some(r), Some(id)) => (r.to_owned(), id.to_owned()),
            (r, _) => {
                let err = MissingReplyAddress {
                    uuid: msg.uuid().to_owned(),
                    topic: msg
                        .context()
                        .map(|c| c.handler().topic.clone())
                        .unwrap_or_default(),
                    missing: if r.is_none() {
                        headers::REPLY_TO
                    } else {
                        headers::REQUEST_ID
                    },
                };
                return Box::pin(futures::future::ready(Err(permanent(err))));
            }
        };
        let fut = self.inner.call(msg);
        let publisher = self.publisher.clone();
        Box::pin(async move {
            let replies = match fut.await.map_err(Into::into) {
                Ok(out) if out.is_empty() => vec![ok_reply(Message::new(""), &request_id, 1, 1)],
                Ok(out) => {
                    let count = out.len();
                    out.into_iter()
                        .enumerate()
                        .map(|(i, m)| ok_reply(m, &request_id, i + 1, count))
                        .collect()
                }
                Err(error) => {
                    let reply = error_reply(&error, &request_id);
                    let md = reply.metadata();
                    let kind = md.get(headers::REPLY_ERROR_KIND).unwrap_or_default();
                    let text = md.get(headers::REPLY_ERROR).unwrap_or_default();
                    tracing::warn!(%request_id, %kind, error = %text, "handler failed; replying with the error");
                    vec![reply]
                }
            };
            publisher
                .publish(&reply_to, replies)
                .await
                .map_err(|source| ReplyPublishFailed {
                    request_id,
                    reply_to,
                    source,
                })?;
            Ok(Vec::new())
        })
    }
}
