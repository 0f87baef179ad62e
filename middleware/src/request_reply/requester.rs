//! The requesting side.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use parking_lot::Mutex;
use tidemill_core::{
    new_uuid, CancellationToken, DeliveryStream, Message, Publisher, SubscribeOptions, Subscriber,
};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{Instant, Sleep};

use super::{ReplyErrorKind, RequestError};
use crate::headers;

/// Settings of a [`Requester`].
#[derive(Clone, Debug)]
pub struct RequesterConfig {
    /// The reply topic; default: `{reply_topic_prefix}.{random}`, one per requester
    /// instance. Brokers where topics are durable objects (Kafka, Pub/Sub) keep one topic
    /// per instance: set a stable name for long-lived services.
    pub reply_topic: Option<String>,
    /// Prefix of generated reply topics. Default `tidemill-replies`.
    pub reply_topic_prefix: String,
    /// How long [`Requester::request`] waits for the reply (from sending the request), and
    /// [`Requester::request_stream`] for each next reply. Default 30 s.
    pub timeout: Duration,
}

impl Default for RequesterConfig {
    fn default() -> Self {
        RequesterConfig {
            reply_topic: None,
            reply_topic_prefix: "tidemill-replies".to_owned(),
            timeout: Duration::from_secs(30),
        }
    }
}

impl RequesterConfig {
    /// Sets the default timeout; builder style.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets a fixed reply topic; builder style.
    pub fn reply_topic(mut self, topic: impl Into<String>) -> Self {
        self.reply_topic = Some(topic.into());
        self
    }
}

type Reply = Result<Message, RequestError>;

enum Waiter {
    One {
        topic: String,
        tx: oneshot::Sender<Reply>,
    },
    Stream {
        topic: String,
        tx: mpsc::UnboundedSender<Reply>,
        seen: HashSet<u32>,
    },
}

struct Inner {
    publisher: Arc<dyn Publisher>,
    reply_topic: String,
    timeout: Duration,
    pending: Mutex<HashMap<String, Waiter>>,
    /// Cancelled by `close`, or when the reply subscription ended.
    closed: CancellationToken,
    unknown: AtomicU64,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// Sends requests and awaits their replies over one reply subscription (see the
/// [module docs](super)). Cheap to clone; clones share the subscription.
#[derive(Clone)]
pub struct Requester {
    inner: Arc<Inner>,
}

impl fmt::Debug for Requester {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Requester")
            .field("reply_topic", &self.inner.reply_topic)
            .field("pending", &self.inner.pending.lock().len())
            .field("closed", &self.inner.closed.is_cancelled())
            .finish()
    }
}

impl Requester {
    /// Subscribes to the reply topic (through `subscriber`, no consumer group) and returns
    /// once the subscription exists; requests go out through `publisher`.
    pub async fn connect(
        publisher: impl Publisher + 'static,
        subscriber: impl Subscriber + 'static,
        config: RequesterConfig,
    ) -> Result<Self, RequestError> {
        let reply_topic = config.reply_topic.clone().unwrap_or_else(|| {
            format!(
                "{}.{}",
                config.reply_topic_prefix,
                uuid::Uuid::new_v4().simple()
            )
        });
        let closed = CancellationToken::new();
        let stream = subscriber
            .subscribe(
                &reply_topic,
                SubscribeOptions::new().with_cancellation(closed.clone()),
            )
            .await
            .map_err(|source| RequestError::Subscribe {
                topic: reply_topic.clone(),
                source,
            })?;
        let inner = Arc::new(Inner {
            publisher: Arc::new(publisher),
            reply_topic,
            timeout: config.timeout,
            pending: Mutex::default(),
            closed,
            unknown: AtomicU64::new(0),
            task: Mutex::new(None),
        });
        let task = tokio::spawn(receive(inner.clone(), stream));
        *inner.task.lock() = Some(task);
        tracing::debug!(reply_topic = %inner.reply_topic, "requester listening for replies");
        Ok(Requester { inner })
    }

    /// The topic replies come back on.
    pub fn reply_topic(&self) -> &str {
        &self.inner.reply_topic
    }

    /// Replies that matched no waiting request (unknown or expired correlation id, or a
    /// second answer to an already answered request); each was acked.
    pub fn unknown_replies(&self) -> u64 {
        self.inner.unknown.load(Ordering::Relaxed)
    }

    /// Requests waiting for a reply.
    pub fn pending(&self) -> usize {
        self.inner.pending.lock().len()
    }

    /// Sends `request` to `topic` and waits for its reply, up to the configured timeout.
    pub async fn request(&self, topic: &str, request: Message) -> Result<Message, RequestError> {
        self.request_timeout(topic, request, self.inner.timeout)
            .await
    }

    /// Sends `request` to `topic` and waits for its reply, up to `timeout` from now. An
    /// error reply becomes [`RequestError::Handler`]. With several replies (a streaming
    /// handler), the first to arrive is returned and the others are counted as unknown.
    pub async fn request_timeout(
        &self,
        topic: &str,
        request: Message,
        timeout: Duration,
    ) -> Result<Message, RequestError> {
        let deadline = Instant::now() + timeout;
        let (tx, rx) = oneshot::channel();
        let id = self.register(
            topic,
            Waiter::One {
                topic: topic.to_owned(),
                tx,
            },
        )?;
        let guard = PendingGuard {
            inner: self.inner.clone(),
            id,
        };
        self.send(topic, request, &guard.id, deadline, timeout)
            .await?;
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Err(RequestError::Closed {
                topic: topic.to_owned(),
            }),
            Err(_) => Err(RequestError::Timeout {
                topic: topic.to_owned(),
                request_id: guard.id.clone(),
                timeout,
            }),
        }
    }

    /// Sends `request` to `topic` and returns the stream of its replies, for handlers that
    /// answer with several messages. The stream ends after the last reply (it knows how
    /// many there are), after an error reply (yielded as [`RequestError::Handler`]), or
    /// with [`RequestError::Timeout`] when the next reply takes longer than the configured
    /// timeout. Replies are yielded in arrival order; redelivered duplicates are dropped.
    pub async fn request_stream(
        &self,
        topic: &str,
        request: Message,
    ) -> Result<ReplyStream, RequestError> {
        let timeout = self.inner.timeout;
        let (tx, rx) = mpsc::unbounded_channel();
        let id = self.register(
            topic,
            Waiter::Stream {
                topic: topic.to_owned(),
                tx,
                seen: HashSet::new(),
            },
        )?;
        let guard = PendingGuard {
            inner: self.inner.clone(),
            id,
        };
        let deadline = Instant::now() + timeout;
        self.send(topic, request, &guard.id, deadline, timeout)
            .await?;
        Ok(ReplyStream {
            rx,
            timeout,
            sleep: Box::pin(tokio::time::sleep_until(deadline)),
            topic: topic.to_owned(),
            done: false,
            guard,
        })
    }

    /// Stops listening for replies: every waiting request fails with
    /// [`RequestError::Closed`], and so do later ones. Idempotent.
    pub async fn close(&self) {
        self.inner.closed.cancel();
        let task = self.inner.task.lock().take();
        if let Some(task) = task {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "the requester's reply task failed");
            }
        }
        fail_all(&self.inner);
    }

    fn register(&self, topic: &str, waiter: Waiter) -> Result<String, RequestError> {
        if self.inner.closed.is_cancelled() {
            return Err(RequestError::Closed {
                topic: topic.to_owned(),
            });
        }
        let id = new_uuid().to_string();
        self.inner.pending.lock().insert(id.clone(), waiter);
        if self.inner.closed.is_cancelled() {
            // Closed meanwhile: `close` may have failed the waiters before this one arrived.
            self.inner.pending.lock().remove(&id);
            return Err(RequestError::Closed {
                topic: topic.to_owned(),
            });
        }
        Ok(id)
    }

    async fn send(
        &self,
        topic: &str,
        mut request: Message,
        id: &str,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(), RequestError> {
        let md = request.metadata_mut();
        md.set(headers::REPLY_TO, &self.inner.reply_topic);
        md.set(headers::REQUEST_ID, id);
        request.set_context(None);
        match tokio::time::timeout_at(deadline, self.inner.publisher.publish_one(topic, request))
            .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(RequestError::Publish {
                topic: topic.to_owned(),
                source,
            }),
            Err(_) => Err(RequestError::Timeout {
                topic: topic.to_owned(),
                request_id: id.to_owned(),
                timeout,
            }),
        }
    }
}

/// Removes a request's waiter when the caller stops waiting (reply, timeout, cancelled).
struct PendingGuard {
    inner: Arc<Inner>,
    id: String,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.inner.pending.lock().remove(&self.id);
    }
}

/// Fails every waiting request with `Closed`.
fn fail_all(inner: &Inner) {
    let pending: Vec<Waiter> = inner.pending.lock().drain().map(|(_, w)| w).collect();
    for waiter in pending {
        match waiter {
            Waiter::One { topic, tx } => {
                let _ = tx.send(Err(RequestError::Closed { topic }));
            }
            Waiter::Stream { topic, tx, .. } => {
                let _ = tx.send(Err(RequestError::Closed { topic }));
            }
        }
    }
}

/// Reads replies until the subscription ends, handing each to its waiter.
async fn receive(inner: Arc<Inner>, mut stream: DeliveryStream) {
    while let Some(item) = stream.next().await {
        let delivery = match item {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(reply_topic = %inner.reply_topic, error = %e, "reply subscription reported an error");
                continue;
            }
        };
        dispatch(&inner, delivery.message());
        if let Err(e) = delivery.ack().await {
            tracing::warn!(reply_topic = %inner.reply_topic, error = %e, "acking a reply failed");
        }
    }
    if !inner.closed.is_cancelled() {
        tracing::warn!(reply_topic = %inner.reply_topic, "reply subscription ended; failing pending requests");
    }
    inner.closed.cancel();
    fail_all(&inner);
}

fn parse(topic: &str, msg: &Message) -> Reply {
    let md = msg.metadata();
    if md.get(headers::REPLY_STATUS) == Some("error") {
        return Err(RequestError::Handler {
            topic: topic.to_owned(),
            kind: ReplyErrorKind::parse(md.get(headers::REPLY_ERROR_KIND).unwrap_or("")),
            message: md.get(headers::REPLY_ERROR).unwrap_or("").to_owned(),
        });
    }
    let mut reply = msg.clone();
    reply.set_context(None);
    Ok(reply)
}

fn dispatch(inner: &Inner, msg: &Message) {
    let md = msg.metadata();
    let Some(id) = md.get(headers::REQUEST_ID) else {
        inner.unknown.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            uuid = msg.uuid(),
            "reply without a correlation id; acked and counted"
        );
        return;
    };
    let mut pending = inner.pending.lock();
    let Some(waiter) = pending.get_mut(id) else {
        drop(pending);
        inner.unknown.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            request_id = id,
            "reply to an unknown or expired request; acked and counted"
        );
        return;
    };
    match waiter {
        Waiter::One { .. } => {
            if let Some(Waiter::One { topic, tx }) = pending.remove(id) {
                drop(pending);
                if tx.send(parse(&topic, msg)).is_err() {
                    inner.unknown.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Waiter::Stream { topic, tx, seen } => {
            let seq = md
                .get_as::<u32>(headers::REPLY_SEQ)
                .ok()
                .flatten()
                .unwrap_or(1);
            let count = md
                .get_as::<u32>(headers::REPLY_COUNT)
                .ok()
                .flatten()
                .unwrap_or(1);
            if !seen.insert(seq) {
                drop(pending);
                inner.unknown.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(request_id = id, seq, "duplicate reply; acked and counted");
                return;
            }
            let reply = parse(topic, msg);
            let last = reply.is_err() || seen.len() as u32 >= count;
            let _ = tx.send(reply);
            if last {
                // Dropping the sender ends the stream after what was sent.
                pending.remove(id);
            }
        }
    }
}

/// The replies to one request of [`Requester::request_stream`].
pub struct ReplyStream {
    rx: mpsc::UnboundedReceiver<Reply>,
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
    topic: String,
    done: bool,
    guard: PendingGuard,
}

impl ReplyStream {
    /// The request's correlation id.
    pub fn request_id(&self) -> &str {
        &self.guard.id
    }
}

impl fmt::Debug for ReplyStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplyStream")
            .field("topic", &self.topic)
            .field("request_id", &self.guard.id)
            .field("done", &self.done)
            .finish()
    }
}

impl Stream for ReplyStream {
    type Item = Reply;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Reply>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(reply)) => {
                if reply.is_err() {
                    self.done = true;
                }
                let next = Instant::now() + self.timeout;
                self.sleep.as_mut().reset(next);
                Poll::Ready(Some(reply))
            }
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Pending => {
                if self.sleep.as_mut().poll(cx).is_ready() {
                    self.done = true;
                    let err = RequestError::Timeout {
                        topic: self.topic.clone(),
                        request_id: self.guard.id.clone(),
                        timeout: self.timeout,
                    };
                    return Poll::Ready(Some(Err(err)));
                }
                Poll::Pending
            }
        }
    }
}
