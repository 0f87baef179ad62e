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

fn ok_reply(mut msg: Message, request_id: &str, seq: usize, count: usize) -> Message {
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
                    let kind = ReplyErrorKind::of(&error);
                    let text = truncate(error_chain(error.as_ref()), MAX_ERROR);
                    tracing::warn!(%request_id, %kind, error = %text, "handler failed; replying with the error");
                    let mut m = Message::new("");
                    let md = m.metadata_mut();
                    md.set(headers::REPLY_STATUS, "error");
                    md.set(headers::REPLY_ERROR_KIND, kind.as_str());
                    md.set(headers::REPLY_ERROR, text);
                    vec![reply(m, &request_id, 1, 1)]
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
