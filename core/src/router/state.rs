//! Router-level state: [`Router::with_state`] and the [`StatefulRouter`] it returns.

use std::fmt;
use std::ops::Deref;

use tower::layer::util::Identity;

use super::{HandlerBuilder, Router};

impl Router {
    /// This router, handing `state` to the handlers added through the returned
    /// [`StatefulRouter`]: their functions take it (or a part of it, see
    /// [`FromRef`](crate::extract::FromRef)) as a [`State<T>`](crate::extract::State)
    /// argument, cloned per message. The result derefs to the router, so it runs,
    /// closes and takes layers like it; [`Router`] clones and other `with_state` views
    /// control the same router.
    ///
    /// ```
    /// use std::sync::atomic::{AtomicU64, Ordering};
    /// use std::sync::Arc;
    /// use tidemill_core::extract::State;
    /// use tidemill_core::{MemoryBroker, Message, Publisher, Router};
    ///
    /// #[derive(Clone, Default)]
    /// struct App { orders: Arc<AtomicU64> }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let broker = MemoryBroker::new();
    /// let app = App::default();
    /// let router = Router::new().with_state(app.clone());
    /// router
    ///     .add_handler("count")
    ///     .subscribe(broker.subscriber(), "orders")
    ///     .handler(|State(app): State<App>, _order: Message| async move {
    ///         app.orders.fetch_add(1, Ordering::Relaxed);
    ///     })
    ///     .await?;
    /// let running = router.clone();
    /// tokio::spawn(async move { running.run().await });
    /// router.running().await;
    /// broker.publisher().publish_one("orders", Message::new("tea")).await?;
    /// while app.orders.load(Ordering::Relaxed) == 0 {
    ///     tokio::task::yield_now().await; // the handler shares the same `app`
    /// }
    /// router.close().await?;
    /// # Ok(()) }
    /// ```
    pub fn with_state<S: Clone>(&self, state: S) -> StatefulRouter<S> {
        StatefulRouter {
            router: self.clone(),
            state,
        }
    }
}

/// A [`Router`] with state for its handlers; made by [`Router::with_state`]. Derefs to
/// the router; [`add_handler`](StatefulRouter::add_handler) starts a handler whose
/// function can take the state as [`State<T>`](crate::extract::State).
#[derive(Clone)]
pub struct StatefulRouter<S> {
    router: Router,
    state: S,
}

impl<S: Clone> StatefulRouter<S> {
    /// Starts describing a handler named `name` with a clone of the state (which
    /// [`HandlerBuilder::state`] can still replace).
    pub fn add_handler(&self, name: impl Into<String>) -> HandlerBuilder<'_, Identity, S> {
        self.router.add_handler(name).state(self.state.clone())
    }

    /// The state.
    pub fn state(&self) -> &S {
        &self.state
    }

    /// The router.
    pub fn router(&self) -> &Router {
        &self.router
    }
}

impl<S> Deref for StatefulRouter<S> {
    type Target = Router;

    fn deref(&self) -> &Router {
        &self.router
    }
}

impl<S> fmt::Debug for StatefulRouter<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StatefulRouter")
            .field("handlers", &self.router.handlers())
            .field("state", &std::any::type_name::<S>())
            .finish()
    }
}
