//! [`RedisPublisher`]: `XADD` to the topic's stream.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use redis::Value;
use tidemill_core::{ConnectionState, Error, Message, Publisher, Result};

use crate::codec;
use crate::config::RedisConfig;
use crate::conn::{self, StateCell};
use crate::BROKER;

/// Publishes messages as entries of the topic's stream (`XADD`), one pipelined round trip
/// per batch.
///
/// `publish` returns once the server added every entry, in order. What survives a server
/// crash then depends on the server's persistence: with the append-only file and
/// `appendfsync everysec` (what the test server runs), up to a second of writes; with
/// `appendfsync always`, none. Cloning is cheap; clones share the connection, which
/// reconnects by itself after a failure (a publish that failed may be retried).
#[derive(Clone)]
pub struct RedisPublisher {
    inner: Arc<Inner>,
}

struct Inner {
    config: RedisConfig,
    conn: ConnectionManager,
    closed: AtomicBool,
    state: StateCell,
}

impl std::fmt::Debug for RedisPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisPublisher")
            .field("server", &self.inner.config.address())
            .field("closed", &self.inner.closed.load(Ordering::Relaxed))
            .finish()
    }
}

impl RedisPublisher {
    /// Connects to the server; fails within `connect_timeout` naming the address (without
    /// its password) when it cannot.
    pub async fn connect(config: RedisConfig) -> Result<Self> {
        let client = conn::client(&config)?;
        let conn = conn::manager(&client, &config).await?;
        Ok(RedisPublisher {
            inner: Arc::new(Inner {
                config,
                conn,
                closed: AtomicBool::new(false),
                state: StateCell::default(),
            }),
        })
    }

    /// The configuration this publisher runs with.
    pub fn config(&self) -> &RedisConfig {
        &self.inner.config
    }

    /// `XADD` of `message` to `stream`, with the configured trimming.
    fn xadd(&self, stream: &str, topic: &str, message: &Message) -> Result<redis::Cmd> {
        let config = &self.inner.config;
        let mut cmd = redis::cmd("XADD");
        cmd.arg(stream);
        if !config.create_streams {
            cmd.arg("NOMKSTREAM");
        }
        if let Some(n) = config.max_len {
            cmd.arg("MAXLEN").arg("~").arg(n);
        } else if let Some(age) = config.max_age {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default();
            let min = now.saturating_sub(age).as_millis() as u64;
            cmd.arg("MINID").arg("~").arg(min);
        }
        cmd.arg("*");
        codec::write(
            message,
            topic,
            &config.payload_field,
            config.max_message_bytes,
            |k, v| {
                cmd.arg(k).arg(v);
            },
        )?;
        Ok(cmd)
    }
}

#[async_trait]
impl Publisher for RedisPublisher {
    async fn publish(&self, topic: &str, messages: Vec<Message>) -> Result<()> {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Err(Error::PublisherClosed {
                broker: BROKER,
                topic: topic.to_owned(),
            });
        }
        if messages.is_empty() {
            return Ok(());
        }
        let config = &inner.config;
        let stream = config.stream(topic);
        let mut pipe = redis::pipe();
        for message in &messages {
            pipe.add_command(self.xadd(&stream, topic, message)?);
        }
        // After a connection failure the batch is sent again once the connection is back
        // (within command_timeout): entries the lost attempt added come twice, which
        // at-least-once delivery allows; none is lost.
        let deadline = tokio::time::Instant::now() + config.command_timeout;
        let mut pause = std::time::Duration::from_millis(50);
        let ids = loop {
            let mut conn = inner.conn.clone();
            let result: Result<Vec<Value>, _> = pipe.query_async(&mut conn).await;
            conn::saw(&inner.state, &result);
            match result {
                Ok(ids) => break ids,
                Err(e)
                    if conn::is_transient(&e)
                        && tokio::time::Instant::now() + pause < deadline
                        && !inner.closed.load(Ordering::Acquire) =>
                {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(std::time::Duration::from_secs(1));
                }
                Err(e) => return Err(conn::error(e, config, topic, "publish (XADD)")),
            }
        };
        if let Some(at) = ids.iter().position(|v| matches!(v, Value::Nil)) {
            // NOMKSTREAM and no stream.
            return Err(Error::permanent(
                BROKER,
                topic,
                format!(
                    "publish message {}",
                    messages[at.min(messages.len() - 1)].uuid()
                ),
                format!(
                    "stream `{stream}` does not exist and create_streams is off (server {})",
                    config.address()
                ),
            ));
        }
        Ok(())
    }

    /// Creates consumer group `group` on the topic's stream (and the stream), starting where
    /// `start_from` says (by default at the end), so everything published from now on waits
    /// for the group.
    async fn retain_for(&self, topic: &str, group: &str) -> Result<()> {
        let config = &self.inner.config;
        let mut conn = self.inner.conn.clone();
        crate::subscriber::create_group(
            &mut conn,
            config,
            topic,
            group,
            config.start_from,
            &self.inner.state,
        )
        .await
    }

    async fn close(&self) -> Result<()> {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.state.set(ConnectionState::Closed);
        Ok(())
    }

    fn connection_state(&self) -> ConnectionState {
        self.inner.state.get()
    }
}
