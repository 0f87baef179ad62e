//! One `LISTEN` connection per subscriber, waking its subscriptions when their topic gets
//! messages.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use std::time::Duration;

use parking_lot::Mutex;
use sqlx::postgres::{PgListener, PgPool};
use tokio_util::sync::CancellationToken;

/// Subscriptions waiting for their topic, woken by the listener task.
#[derive(Default)]
pub(crate) struct Hub {
    topics: Mutex<HashMap<String, Vec<Weak<tokio::sync::Notify>>>>,
    started: std::sync::OnceLock<()>,
}

impl Hub {
    /// Registers `wake` for notifications of `topic`; starts the listener task on first use.
    pub(crate) fn register(
        self: &Arc<Self>,
        topic: &str,
        wake: &Arc<tokio::sync::Notify>,
        pool: &PgPool,
        channel: &str,
        stop: &CancellationToken,
    ) {
        {
            let mut topics = self.topics.lock();
            let list = topics.entry(topic.to_owned()).or_default();
            list.retain(|w| w.strong_count() > 0);
            list.push(Arc::downgrade(wake));
        }
        self.started.get_or_init(|| {
            let hub = Arc::clone(self);
            let pool = pool.clone();
            let channel = channel.to_owned();
            let stop = stop.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = listen(hub, pool, channel) => {}
                    () = stop.cancelled() => {}
                }
            });
        });
    }

    fn wake(&self, topic: &str) {
        if let Some(list) = self.topics.lock().get(topic) {
            for wake in list.iter().filter_map(Weak::upgrade) {
                wake.notify_one();
            }
        }
    }

    /// Wakes every subscription: notifications may have been missed.
    fn wake_all(&self) {
        let mut topics = self.topics.lock();
        topics.retain(|_, list| {
            list.retain(|w| w.strong_count() > 0);
            !list.is_empty()
        });
        for wake in topics.values().flatten().filter_map(Weak::upgrade) {
            wake.notify_one();
        }
    }
}

/// Listens on `channel` until the task is cancelled; after a lost connection (or a failure
/// to listen) wakes everyone, since notifications may have been missed meanwhile.
async fn listen(hub: Arc<Hub>, pool: PgPool, channel: String) {
    let mut pause = Duration::from_millis(100);
    loop {
        let listening = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(&channel).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = match listening.await {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(error = %e, "LISTEN failed; subscriptions poll meanwhile");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        pause = Duration::from_millis(100);
        hub.wake_all();
        loop {
            match listener.try_recv().await {
                Ok(Some(n)) => {
                    hub.wake(n.payload());
                    while let Some(n) = listener.next_buffered() {
                        hub.wake(n.payload());
                    }
                }
                // Connection lost and re-established: wake everyone, then go on.
                Ok(None) => hub.wake_all(),
                Err(e) => {
                    tracing::debug!(error = %e, "LISTEN connection failed; reconnecting");
                    hub.wake_all();
                    tokio::time::sleep(pause).await;
                    break;
                }
            }
        }
    }
}
