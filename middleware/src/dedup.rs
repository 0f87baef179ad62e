//! Deduplicator: an idempotent consumer.

use std::fmt;
use std::future::poll_fn;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use moka::sync::Cache;
use sha2::{Digest, Sha256};
use tidemill_core::{BoxError, Message};
use tower::{Layer, Service};

use crate::util::Shared;

/// Where a [`Deduplicator`] remembers the messages it handled. Implement it over a
/// database or Redis to deduplicate across restarts and instances; [`MemoryDedupStore`]
/// is the in-process default.
#[async_trait]
pub trait DedupStore: Send + Sync + 'static {
    /// Whether `key` was recorded (and has not expired).
    async fn seen(&self, key: &str) -> Result<bool, BoxError>;
    /// Records `key` as handled.
    async fn record(&self, key: &str) -> Result<(), BoxError>;
}

/// An in-memory [`DedupStore`] whose entries expire after a time to live, holding at most
/// a given number of keys (least recently used go first). Lost on restart.
#[derive(Clone)]
pub struct MemoryDedupStore {
    cache: Cache<String, ()>,
}

impl MemoryDedupStore {
    /// Remembers keys for `ttl`, at most 1,000,000 of them.
    pub fn new(ttl: Duration) -> Self {
        Self::with_capacity(ttl, 1_000_000)
    }

    /// Remembers keys for `ttl`, at most `capacity` of them.
    pub fn with_capacity(ttl: Duration, capacity: u64) -> Self {
        MemoryDedupStore {
            cache: Cache::builder()
                .time_to_live(ttl)
                .max_capacity(capacity)
                .build(),
        }
    }
}

impl fmt::Debug for MemoryDedupStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryDedupStore")
            .field("entries", &self.cache.entry_count())
            .finish()
    }
}

#[async_trait]
impl DedupStore for MemoryDedupStore {
    async fn seen(&self, key: &str) -> Result<bool, BoxError> {
        Ok(self.cache.contains_key(key))
    }

    async fn record(&self, key: &str) -> Result<(), BoxError> {
        self.cache.insert(key.to_owned(), ());
        Ok(())
    }
}

type KeyFn = Arc<dyn Fn(&Message) -> Option<String> + Send + Sync>;

/// What identifies a message for a [`Deduplicator`].
#[derive(Clone)]
pub enum DedupKey {
    /// The message uuid (the default): catches redeliveries and republished copies.
    Uuid,
    /// A metadata entry (e.g. an idempotency key set by the producer); messages without
    /// it are not deduplicated.
    Metadata(String),
    /// The SHA-256 of the payload: equal payloads are duplicates.
    PayloadHash,
    /// Any function; `None` means "do not deduplicate this one".
    Custom(KeyFn),
}

impl fmt::Debug for DedupKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DedupKey::Uuid => f.write_str("Uuid"),
            DedupKey::Metadata(k) => f.debug_tuple("Metadata").field(k).finish(),
            DedupKey::PayloadHash => f.write_str("PayloadHash"),
            DedupKey::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

impl DedupKey {
    fn of(&self, msg: &Message) -> Option<String> {
        match self {
            DedupKey::Uuid => Some(msg.uuid().to_owned()),
            DedupKey::Metadata(k) => msg.metadata().get(k).map(str::to_owned),
            DedupKey::PayloadHash => {
                let digest = Sha256::digest(msg.payload());
                Some(digest.iter().map(|b| format!("{b:02x}")).collect())
            }
            DedupKey::Custom(f) => f(msg),
        }
    }
}

/// An idempotent consumer: a message whose key was already handled successfully is acked
/// without calling the handler, and counted ([`duplicates`](Deduplicator::duplicates)).
/// A key is recorded only after the handler succeeded, so a failed message is still
/// redelivered and handled. Two copies handled at the same moment (before either is
/// recorded) both run: deduplication narrows duplicates, at-least-once still applies.
///
/// Keys are scoped per handler (`handler/key`), so two handlers of one store do not see
/// each other's messages as duplicates. A store error fails the message (it is nacked).
/// It costs a boxed future, a store lookup and, on success, a store insert per message
/// (plus the payload's SHA-256 with [`DedupKey::PayloadHash`]).
///
/// ```
/// use std::time::Duration;
/// use tidemill_core::{HandlerResult, MemoryBroker, Message, Router};
/// use tidemill_middleware::{DedupKey, Deduplicator, MemoryDedupStore};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let broker = MemoryBroker::new();
/// let router = Router::new();
/// let dedup = Deduplicator::new(MemoryDedupStore::new(Duration::from_secs(3600)))
///     .key(DedupKey::Metadata("idempotency-key".into()));
/// router
///     .add_handler("payments")
///     .subscribe(broker.subscriber(), "payments")
///     .layer(dedup.clone())
///     .handler(|_m: Message| async move { HandlerResult::Ok(()) })
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Deduplicator {
    store: Arc<dyn DedupStore>,
    key: DedupKey,
    duplicates: Arc<AtomicU64>,
}

impl Deduplicator {
    /// Deduplicates by uuid in `store`.
    pub fn new(store: impl DedupStore) -> Self {
        Deduplicator {
            store: Arc::new(store),
            key: DedupKey::Uuid,
            duplicates: Arc::default(),
        }
    }

    /// What identifies a message.
    pub fn key(mut self, key: DedupKey) -> Self {
        self.key = key;
        self
    }

    /// How many duplicates were acked without handling.
    pub fn duplicates(&self) -> u64 {
        self.duplicates.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for Deduplicator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Deduplicator")
            .field("key", &self.key)
            .field("duplicates", &self.duplicates())
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for Deduplicator
where
    S: Service<Message>,
{
    type Service = DeduplicatorService<S>;

    fn layer(&self, inner: S) -> DeduplicatorService<S> {
        DeduplicatorService {
            inner: Shared::new(inner),
            config: self.clone(),
        }
    }
}

/// The service made by [`Deduplicator`].
pub struct DeduplicatorService<S> {
    inner: Shared<S>,
    config: Deduplicator,
}

impl<S> fmt::Debug for DeduplicatorService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeduplicatorService")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<S> Service<Message> for DeduplicatorService<S>
where
    S: Service<Message, Response = Vec<Message>> + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = Vec<Message>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Vec<Message>, BoxError>>;

    /// Always ready: the handler's readiness is awaited once the message is known to be new.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        let inner = self.inner.clone();
        let config = self.config.clone();
        Box::pin(async move {
            let handler = msg
                .context()
                .map(|c| c.handler().name.clone())
                .unwrap_or_default();
            let key = config.key.of(&msg).map(|k| format!("{handler}/{k}"));
            if let Some(key) = &key {
                if config.store.seen(key).await? {
                    config.duplicates.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(uuid = msg.uuid(), %key, "duplicate message; acking it unhandled");
                    return Ok(Vec::new());
                }
            }
            let fut = poll_fn(|cx| inner.poll_call(cx, &msg))
                .await
                .map_err(Into::into)?;
            let out = fut.await.map_err(Into::into)?;
            if let Some(key) = &key {
                config.store.record(key).await?;
            }
            Ok(out)
        })
    }
}
