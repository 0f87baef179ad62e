//! The router's own copy of the input, for layers' error paths.
//!
//! A layer that may need the input after the handler failed (retry calls the handler again,
//! dead letter publishes the input, correlation id reads it when there are outputs) would
//! otherwise keep a copy of every message on its success path too: a few atomic reference
//! counts per layer and message. Instead, a layer asks, when it is built into a handler
//! ([`keep_input`] from its `Layer::layer`), that the router keep one copy of each input;
//! while the router calls or polls the handler's service, that copy is reachable here.
//! A layer checks at call time that the message it got is that very copy
//! ([`input_token`]: same shared block, so no outer layer changed it) and, if so, keeps
//! only the token and fetches the copy ([`input`]) when it needs it. Otherwise (an outer
//! layer modified the message, the service runs outside a router, ...) it keeps its own
//! clone as before.
//!
//! The same goes for a layer's shared state (dead letter's configuration, retry's service
//! for later attempts): registered with [`keep_state`] when the layer is built, the router
//! keeps it for the handler's life, and a future holds a [`StateToken`] and fetches the
//! state ([`state`]) only on its error path, instead of a reference count per message.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::Arc;

use super::Settlement;
use crate::Message;

/// What the router keeps for a handler's layers: the shared states they registered with
/// [`keep_state`] (possibly none; `Some` at all means the input is kept too).
pub(crate) type Kept = Arc<[SharedState]>;

/// A layer's shared state as the router keeps it.
type SharedState = Arc<dyn Any + Send + Sync>;

/// What a [`Current`] guard makes reachable: the router's copy of the input (without its
/// context), the settlement whose block is that context, and the kept states.
type CurrentPtrs = (
    NonNull<Message>,
    NonNull<Settlement>,
    NonNull<[SharedState]>,
);

thread_local! {
    /// The router's copy of the input it is calling or polling on this thread: set only
    /// by a [`Current`] guard, which borrows what it points to for as long as it is set
    /// and puts the previous value back when dropped (also on unwinding). Plain pointers,
    /// so entering and leaving cost no more than two thread-local writes.
    static CURRENT: Cell<Option<CurrentPtrs>> = const { Cell::new(None) };
    /// Set by [`keep_input`] while the router builds a handler's service.
    static WANTED: Cell<bool> = const { Cell::new(false) };
    /// Filled by [`keep_state`] while the router builds a handler's service.
    static STATES: RefCell<Vec<SharedState>> = const { RefCell::new(Vec::new()) };
    /// Whether a router is building a handler's service on this thread (outside, states
    /// are not collected: nobody would take them).
    static BUILDING: Cell<bool> = const { Cell::new(false) };
}

/// Asks the router building the handler this layer wraps to keep a copy of each input and
/// make it reachable through [`input`] while it calls and polls the handler's service.
///
/// Call it from `Layer::layer`. Outside a router's handler construction it does nothing
/// harmful: the router building the next handler on this thread may keep inputs it need
/// not, nothing else.
pub fn keep_input() {
    WANTED.with(|w| w.set(true));
}

/// Asks the router building the handler this layer wraps to keep `state` (the layer's
/// shared configuration or service) for as long as the handler runs, and to make it
/// reachable through [`state`] while it calls and polls the handler's service; implies
/// [`keep_input`]. A layer's future can then hold a [`StateToken`] (from [`state_token`]
/// at call time) instead of a reference-counted clone, and fetch the state only on its
/// error path.
///
/// Call it from `Layer::layer`. Outside a router's handler construction it does nothing:
/// [`state_token`] then finds nothing and the layer keeps its own clone.
pub fn keep_state(state: Arc<dyn Any + Send + Sync>) {
    if BUILDING.with(Cell::get) {
        keep_input();
        STATES.with(|s| s.borrow_mut().push(state));
    }
}

/// Runs `build` (the making of a handler's service from its layers) and returns what the
/// layers asked the router to keep meanwhile: `None` if none asked for the input.
pub(crate) fn building<T>(build: impl FnOnce() -> T) -> (T, Option<Kept>) {
    let before = WANTED.with(|w| w.replace(false));
    let was_building = BUILDING.with(|b| b.replace(true));
    let states_before = STATES.with(|s| std::mem::take(&mut *s.borrow_mut()));
    // Put back on unwinding too: a layer that panics while being built must not leave
    // this thread collecting states.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            BUILDING.with(|b| b.set(self.0));
        }
    }
    let restore = Restore(was_building);
    let built = build();
    drop(restore);
    let wanted = WANTED.with(|w| w.replace(before));
    let states = STATES.with(|s| std::mem::replace(&mut *s.borrow_mut(), states_before));
    (built, wanted.then(|| Kept::from(states)))
}

/// Both lists of kept states (a handler's own layers and the router's), if either wants
/// the input kept.
pub(crate) fn merge(a: Option<Kept>, b: Option<Kept>) -> Option<Kept> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.iter().chain(b.iter()).cloned().collect()),
        (a, b) => a.or(b),
    }
}

/// Identifies a state the router keeps (see [`keep_state`]) without holding a reference
/// to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateToken(usize);

/// If the router calling the service now keeps `state` for this handler (see
/// [`keep_state`]), a token to fetch it later with [`state`]; otherwise `None` (keep
/// your own clone then). No reference count is touched.
#[inline]
pub fn state_token<T: ?Sized>(state: &Arc<T>) -> Option<StateToken> {
    let address = Arc::as_ptr(state) as *const () as usize;
    with_current(|current| {
        let (_, _, states) = current?;
        states
            .iter()
            .any(|s| Arc::as_ptr(s) as *const () as usize == address)
            .then_some(StateToken(address))
    })
}

/// The state the token was taken from, if the router calling or polling the service on
/// this thread now keeps it (so: from a future the router polls) and it is a `T`.
pub fn state<T: Any + Send + Sync>(token: StateToken) -> Option<Arc<T>> {
    with_current(|current| {
        let (_, _, states) = current?;
        let found = states
            .iter()
            .find(|s| Arc::as_ptr(s) as *const () as usize == token.0)?;
        found.clone().downcast::<T>().ok()
    })
}

/// Identifies the router's copy of the current input without holding a reference to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InputToken((usize, usize));

/// If `msg` is the router's copy of the input it is handling (same shared block and
/// context: no layer outside the caller changed it), a token to fetch that copy later with
/// [`input`]; otherwise `None` (keep your own clone then).
#[inline]
pub fn input_token(msg: &Message) -> Option<InputToken> {
    with_current(|current| match current {
        Some((detached, settlement, _)) if msg.is_input(detached, settlement) => {
            Some(InputToken(msg.identity()))
        }
        _ => None,
    })
}

/// Runs `f` on the current input (the message without its context, and the settlement
/// whose block is its context), if any.
#[inline]
fn with_current<R>(f: impl FnOnce(Option<(&Message, &Settlement, &[SharedState])>) -> R) -> R {
    let current = CURRENT.with(Cell::get);
    // SAFETY: the pointers are set only by a `Current` guard, which holds shared borrows of
    // the message, the settlement and the kept states for its whole life and clears or
    // restores the pointers when dropped, so pointers read here point to live values that
    // nobody can modify meanwhile. The references do not outlive `f`, which runs before
    // this call returns, inside the guard's scope (the guard is entered around the very
    // call or poll that leads here).
    f(current.map(|(m, s, k)| unsafe { (m.as_ref(), s.as_ref(), k.as_ref()) }))
}

/// A clone of the router's copy of the input the token was taken from, if the router is
/// calling or polling the service of that same input on this thread now (otherwise
/// `None`).
pub fn input(token: InputToken) -> Option<Message> {
    with_current(|current| match current {
        Some((detached, settlement, _)) if detached.identity_with(settlement) == token.0 => {
            Some(detached.with_context_of(settlement))
        }
        _ => None,
    })
}

/// Runs `f` on the router's copy of the input the token was taken from, if it is current
/// (see [`input`]), without cloning it. The message `f` sees has no receive context (use
/// [`input`] for that). `f` must not call or poll a router's handler.
pub fn with_input<R>(token: InputToken, f: impl FnOnce(&Message) -> R) -> Option<R> {
    with_current(|current| match current {
        // Without its context: `f` reads the message itself (payload, metadata, uuid).
        Some((detached, settlement, _)) if detached.identity_with(settlement) == token.0 => {
            Some(f(detached))
        }
        _ => None,
    })
}

/// Makes a message the current input while the guard lives (the previous one comes back
/// on drop).
pub(crate) struct Current<'a> {
    previous: Option<CurrentPtrs>,
    _input: PhantomData<(&'a Message, &'a Settlement, &'a [SharedState])>,
}

impl<'a> Current<'a> {
    /// Makes the input current until the guard is dropped: `detached` is the message
    /// without its context (the router's copy, one reference count), `settlement` the
    /// router's settlement, whose block is the message's context, `kept` the states the
    /// handler's layers registered.
    #[inline]
    pub(crate) fn enter(
        detached: &'a Message,
        settlement: &'a Settlement,
        kept: &'a [SharedState],
    ) -> Self {
        let input = (
            NonNull::from(detached),
            NonNull::from(settlement),
            NonNull::from(kept),
        );
        let previous = CURRENT.with(|c| c.replace(Some(input)));
        Current {
            previous,
            _input: PhantomData,
        }
    }
}

impl Drop for Current<'_> {
    #[inline]
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.previous));
    }
}
