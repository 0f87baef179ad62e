//! Layer state that per-message futures reach by key instead of holding a reference count.
//!
//! A layer whose future needs the layer's configuration only on the error path (dead
//! letter, poison queue, delayed redelivery, ignore errors) would clone an `Arc` into every
//! future (poison queue: four): two atomic read-modify-write operations per `Arc` and
//! message, which cost more than everything else such a layer does on the success path (an
//! uncontended `lock`-prefixed instruction takes about 20 cycles). Instead, the service registers its state once, when it is built, in a
//! process-wide table; each future keeps the plain [`Key`], and the error path fetches the
//! state from the table (a lock and a hash lookup, far cheaper than the publish that
//! follows). The entry goes when the last clone of the service's [`Registered`] handle is
//! dropped; a future that outlives its service then finds nothing and its layer passes
//! the error on (the router nacks: nothing is lost).
//!
//! Retry does not use it: its futures call the service again, which needs exclusive access
//! arbitrated on every call (a lock or a reference count), so they keep an `Arc`.

use std::any::Any;
use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};

use parking_lot::Mutex;

type Table = HashMap<u64, Arc<dyn Any + Send + Sync>>;

static TABLE: LazyLock<Mutex<Table>> = LazyLock::new(Mutex::default);
/// Keys are never reused, so a stale key cannot find another layer's state.
static NEXT_KEY: AtomicU64 = AtomicU64::new(1);

/// Finds a [`Registered`] state while it is registered (`Copy`, no reference count).
pub(crate) struct Key<T> {
    id: u64,
    _state: PhantomData<fn() -> T>,
}

impl<T> Clone for Key<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Key<T> {}

impl<T: Send + Sync + 'static> Key<T> {
    /// The state, if its service (or a clone of it) still lives.
    pub(crate) fn fetch(self) -> Option<Arc<T>> {
        let entry = TABLE.lock().get(&self.id).cloned()?;
        entry.downcast::<T>().ok()
    }

    /// [`fetch`](Self::fetch), with a warning naming `layer` when the service is gone (its
    /// error path then passes the error on).
    pub(crate) fn fetch_or_warn(self, layer: &str) -> Option<Arc<T>> {
        let state = self.fetch();
        if state.is_none() {
            tracing::warn!(
                layer,
                "the layer's service is gone (the future outlived it); passing the error on"
            );
        }
        state
    }
}

/// A state registered in the table for as long as a clone of this handle lives.
pub(crate) struct Registered<T: Send + Sync + 'static>(Arc<Entry<T>>);

struct Entry<T: Send + Sync + 'static> {
    id: u64,
    state: Arc<T>,
}

impl<T: Send + Sync + 'static> Registered<T> {
    /// Registers `state` under a new key.
    pub(crate) fn new(state: Arc<T>) -> Self {
        let id = NEXT_KEY.fetch_add(1, Ordering::Relaxed);
        TABLE.lock().insert(id, state.clone());
        Registered(Arc::new(Entry { id, state }))
    }

    /// The key futures keep.
    pub(crate) fn key(&self) -> Key<T> {
        Key {
            id: self.0.id,
            _state: PhantomData,
        }
    }

    /// The state itself.
    pub(crate) fn state(&self) -> &Arc<T> {
        &self.0.state
    }
}

impl<T: Send + Sync + 'static> std::fmt::Debug for Registered<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Registered").field(&self.0.id).finish()
    }
}

impl<T: Send + Sync + 'static> Clone for Registered<T> {
    fn clone(&self) -> Self {
        Registered(self.0.clone())
    }
}

impl<T: Send + Sync + 'static> Drop for Entry<T> {
    fn drop(&mut self) {
        TABLE.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_finds_its_state_until_the_last_handle_goes() {
        let registered = Registered::new(Arc::new(String::from("dead-letters")));
        let key = registered.key();
        let copy = registered.clone();
        assert_eq!(
            key.fetch().as_deref().map(String::as_str),
            Some("dead-letters")
        );
        drop(registered);
        assert_eq!(
            key.fetch().as_deref().map(String::as_str),
            Some("dead-letters")
        );
        drop(copy);
        assert!(key.fetch().is_none(), "the entry goes with the last handle");
    }

    #[test]
    fn keys_are_not_reused_and_do_not_cross_types() {
        let first = Registered::new(Arc::new(1_u32));
        let key = first.key();
        drop(first);
        let second = Registered::new(Arc::new(2_u32));
        assert!(key.fetch().is_none(), "a stale key finds nothing");
        assert_eq!(second.key().fetch().as_deref(), Some(&2));
        let wrong = Key::<String> {
            id: second.key().id,
            _state: PhantomData,
        };
        assert!(
            wrong.fetch().is_none(),
            "another type's state is not returned"
        );
    }
}
